# -*- coding: utf-8 -*-
# Copyright: carapace.fleet maintainers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""One action of the cara_transaction module on a host's `{state_dir}/updates/transaction.json`.

Domain logic only (no Ansible imports). The file's schema and state machine are in _transaction_model, its reading
and writing (by descriptor, under cara's update lock) in _transaction_host; this file decides what an action does:
create, advance, fail, resume or clear, and which transactions carapace.fleet may touch (`fleet` key: ours).
"""

from __future__ import annotations

import copy
import json

from ansible_collections.carapace.fleet.plugins.module_utils._cara import platform_asset
from ansible_collections.carapace.fleet.plugins.module_utils._transaction_host import Host
from ansible_collections.carapace.fleet.plugins.module_utils._transaction_model import (
    ACTIONS, ADVANCE_PHASES, ASSET_NAMES, DEFAULT_ASSET, DEFAULT_MAX_ATTEMPTS, FLEET_OWN_KEYS, PHASES, SHA256_RE,
    STATES, TX_NAME, U32_MAX, UPDATES_DIR, TransactionError, advance, describe, fail, is_uint, new_transaction, now_ms,
    owner, resume, resume_pending, touch, with_fleet)
from ansible_collections.carapace.fleet.plugins.module_utils._version import normalize_version

# What the module and other callers use from here (some of it defined in _transaction_model).
__all__ = ["ACTIONS", "ADVANCE_PHASES", "ASSET_NAMES", "DEFAULT_MAX_ATTEMPTS", "TX_NAME", "UPDATES_DIR",
           "TransactionError", "check_facts", "host_asset", "owner", "resume_pending", "run"]


def host_asset():
    """This host's release asset name as cara's updater maps it, or None."""
    try:
        return platform_asset()
    except (OSError, AttributeError):
        return None


def check_facts(facts):
    if facts is None:
        return {}
    if not isinstance(facts, dict):
        raise ValueError("facts must be a dictionary")
    reserved = sorted(k for k in facts if k in FLEET_OWN_KEYS)
    if reserved:
        raise ValueError("facts may not set %s: this module maintains them under `fleet` itself" % ", ".join(reserved))
    try:
        json.dumps(facts)
    except (TypeError, ValueError) as exc:
        raise ValueError("facts must be plain JSON data: %s" % exc) from exc
    return facts


def _foreign(host, tx, what):
    return TransactionError("foreign", "the update transaction in %s was started by cara's own updater (`cara update`), not "
                            "by carapace.fleet (it has no `fleet` key): %s. %s" % (host.path, describe(tx), what))


def _check_same(tx, version, asset_name):
    if version is not None and version != tx["version"]:
        raise TransactionError("version_mismatch", "the transaction on this host is for version %s, not %s. Start a "
                               "transaction for %s with action=create (it replaces the other one when that one is not "
                               "resumable)." % (tx["version"], version, version))
    if asset_name is not None and asset_name != tx["assetName"]:
        raise TransactionError("version_mismatch", "the transaction on this host is for asset %s, not %s. Start one "
                               "for %s with action=create." % (tx["assetName"], asset_name, asset_name))


def run(state_dir, action, version=None, asset_name=None, phase=None, sha256=None, error=None, retryable=False,
        facts=None, max_attempts=DEFAULT_MAX_ATTEMPTS, force=False, check_mode=False, clock=now_ms):
    """Carry out one action of the cara_transaction module. Returns the result dict; raises TransactionError.

    Result keys: changed, actions, before, transaction, owner, resume_from, resume_reason, resumed,
    resume_pending, transaction_path, warnings.
    """
    if action not in ACTIONS:
        raise TransactionError("bad_argument", "action must be one of %s" % ", ".join(ACTIONS))
    try:
        version = normalize_version(version) if version is not None else None
        facts = check_facts(facts)
        if sha256 is not None:
            if not isinstance(sha256, str) or not SHA256_RE.fullmatch(sha256):
                raise ValueError("sha256 must be 64 hex characters")
            sha256 = sha256.lower()
    except ValueError as exc:
        raise TransactionError("bad_argument", str(exc)) from exc
    if asset_name is not None and asset_name not in ASSET_NAMES:
        raise TransactionError("bad_argument", "asset_name must be one of %s" % ", ".join(ASSET_NAMES))
    if not is_uint(max_attempts, U32_MAX) or max_attempts < 1:
        raise TransactionError("bad_argument", "max_attempts must be an integer >= 1")
    result = {"changed": False, "actions": [], "before": None, "transaction": None, "owner": None, "resume_from": None,
              "resume_reason": None, "resumed": False, "resume_pending": False, "warnings": []}
    with Host(state_dir, check_mode=check_mode, create=action == "create") as host:
        result["transaction_path"] = host.path
        if host.state_fd is None:
            if action == "clear":
                result["actions"].append("nothing to clear: %s does not exist" % host.state_dir)
                return result
            raise TransactionError("state_dir_missing", "state_dir %s does not exist. Point state_dir at cara's "
                                   "CARAPACE_STATE_DIR on this host (is cara installed and set up?)." % host.state_dir)
        try:
            tx, problem = host.read(), None
        except TransactionError as exc:
            if exc.cause != "corrupt":
                raise
            tx, problem = None, exc
        before = None if problem else copy.deepcopy(tx)
        result.update(before=before, owner=owner(before) if not problem else "unknown")
        try:
            after = _dispatch(host, result, action, tx, problem, version=version, asset_name=asset_name, phase=phase,
                              sha256=sha256, error=error, retryable=retryable, facts=facts,
                              max_attempts=max_attempts, force=force, clock=clock)
        except TransactionError as exc:
            if exc.transaction is not None:  # a budget exhausted: persisted as failed, as cara does
                host.write(exc.transaction)
                exc.changed = not check_mode
                exc.message += " (check mode: not written)" if check_mode else ""
            else:
                exc.transaction = before
            raise
        finally:
            result["actions"][:0] = host.actions
        result["changed"] = result["changed"] or host.changed
        result["transaction"] = after
        result["owner"] = owner(after)
        result["resume_pending"] = resume_pending(after)
        return result


def _dispatch(host, result, action, tx, problem, **kw):
    now = kw["clock"]()
    actions = result["actions"]
    if action == "clear":
        if problem is not None and not kw["force"]:
            raise problem
        if tx is not None:
            _check_same(tx, kw["version"], kw["asset_name"])
        if tx is not None and owner(tx) == "cara" and resume_pending(tx) and not kw["force"]:
            raise _foreign(host, tx, "Clearing it would cancel that update: let it finish with `cara update`, or clear it "
                                     "with force=true if it is abandoned.")
        if host.remove():
            actions.append("%s %s" % (_verb(host, "remove", "removed"), host.path))
            result["changed"] = True
        else:
            actions.append("nothing to clear: %s does not exist" % host.path)
        return None
    if action == "create":
        return _create(host, result, tx, problem, now, **kw)
    if problem is not None:
        raise problem
    if tx is None:
        raise TransactionError("no_transaction", "there is no update transaction in %s to %s. Start one with action=create."
                               % (host.path, action))
    if owner(tx) == "cara":
        raise _foreign(host, tx, "carapace.fleet does not drive it: let it finish with `cara update`, or replace it with "
                                 "action=create and force=true if it is abandoned.")
    _normalize_loaded(tx, result)
    _check_same(tx, kw["version"], kw["asset_name"])
    if action == "advance":
        after = advance(tx, kw["phase"], now, sha256=kw["sha256"], facts=kw["facts"])
        summary = "%s the transaction for %s from %s to %s" % (_verb(host, "advance", "advanced"), tx["version"],
                                                               tx["phase"], kw["phase"])
    elif action == "fail":
        after = fail(tx, kw["error"], kw["retryable"], now, facts=kw["facts"])
        summary = "%s the transaction for %s failed (%s): %s" % (
            _verb(host, "mark", "marked"), tx["version"], "retryable" if kw["retryable"] else "non-retryable", kw["error"])
        if resume_pending(after):
            result["warnings"].append("cara resumes a retryable failed transaction by itself when its daemon starts "
                                      "(v0.8.0 downloads and applies %s from GitHub): resume it, or mark it failed with "
                                      "retryable=false, before cara starts on this host" % after["version"])
    else:
        after, resume_from, reason = resume(tx, host.hash_staged, now, facts=kw["facts"])
        result.update(resume_from=resume_from, resume_reason=reason, resumed=True)
        summary = "%s the transaction for %s at attempt %d/%d from phase %s: %s" % (
            _verb(host, "resume", "resumed"), tx["version"], after["attempt"], after["maxAttempts"], resume_from, reason)
    if after is tx:
        actions.append("unchanged: the transaction is already as requested (%s)" % describe(tx))
        return tx
    host.write(after)
    actions.append(summary)
    result["changed"] = True
    return after


def _verb(host, base, past):
    return "would " + base if host.check_mode else past


def _normalize_loaded(tx, result):
    for key, values in (("state", STATES), ("phase", PHASES)):
        if tx[key] not in values:
            result["warnings"].append("the transaction's %s %r is unknown; read as failed, as cara does" % (key, tx[key]))
            tx[key] = "failed"
            tx["retryable"] = bool(tx.get("retryable"))


def _create(host, result, tx, problem, now, **kw):
    version, force, facts = kw["version"], kw["force"], kw["facts"]
    if version is None:
        raise TransactionError("bad_argument", "action=create needs version (the target release, e.g. v0.9.0)")
    asset_name = kw["asset_name"] or DEFAULT_ASSET
    actions = result["actions"]
    replacing = None
    if problem is not None:
        if not force:
            raise problem
        replacing = "the invalid transaction file (force)"
    elif tx is not None:
        _normalize_loaded(tx, result)
        if owner(tx) == "cara":
            if resume_pending(tx) and not force:
                raise _foreign(host, tx, "Let it finish with `cara update` first, or replace it with action=create and "
                                         "force=true if it is abandoned.")
            replacing = "cara's own transaction (%s)" % describe(tx)
        elif force:
            replacing = "the transaction (%s) with a fresh one (force)" % describe(tx)
        elif tx["state"] == "applied" or (tx["state"] == "failed" and tx.get("retryable") is not True):
            replacing = "the finished transaction (%s)" % describe(tx)
        elif tx["version"] != version or tx["assetName"] != asset_name:
            replacing = "the transaction for %s %s" % (tx["version"], tx["assetName"])
        elif tx["state"] == "in_progress" and tx["phase"] == "created":
            after = copy.deepcopy(tx)
            with_fleet(after, facts)
            result["resume_from"] = "created"
            if after == tx:
                actions.append("unchanged: a transaction for %s is already created (%s)" % (version, describe(tx)))
                return tx
            touch(after, now)
            host.write(after)
            actions.append("%s the facts of the created transaction for %s" % (_verb(host, "update", "updated"), version))
            result["changed"] = True
            return after
        else:
            after, resume_from, reason = resume(tx, host.hash_staged, now, facts=facts)
            host.write(after)
            result.update(resume_from=resume_from, resume_reason=reason, resumed=True, changed=True)
            actions.append("%s the transaction for %s at attempt %d/%d from phase %s: %s" % (
                _verb(host, "resume", "resumed"), version, after["attempt"], after["maxAttempts"], resume_from, reason))
            return after
    expected = host_asset()
    if expected and asset_name != expected:
        result["warnings"].append("this host's cara expects asset %s; cara's own updater refuses a transaction for %s"
                                  % (expected, asset_name))
    after = new_transaction(host.state_dir, version, asset_name, kw["max_attempts"], now, facts)
    host.write(after)
    if replacing:
        actions.append("%s %s" % (_verb(host, "replace", "replaced"), replacing))
    actions.append("%s a transaction for %s (%s) in %s" % (_verb(host, "create", "created"), version, asset_name, host.path))
    result.update(changed=True, resume_from="created")
    return after
