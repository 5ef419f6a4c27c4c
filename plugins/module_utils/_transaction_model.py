# -*- coding: utf-8 -*-
# Copyright: carapace.fleet maintainers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""`{state_dir}/updates/transaction.json` in Carapace's own schema: its keys, its validation and the update
transaction state machine, on values (no file access: _transaction_host reads and writes the file).

Domain logic only (no Ansible imports). `cara` reads the same file, so every transaction written satisfies its
load-time validation (`problems`), keeps the key order of its schema and any key we do not know. Our own facts live
under one extra key, `fleet`; a transaction without it was started by `cara update` itself.

Phases only move forward (created -> downloading -> downloaded -> verified -> applying -> applied); `fail` moves
any phase to failed; `resume` is the only way back, and it re-hashes the staged file against the recorded sha256
before it lets the caller continue from anything later than `downloading`.
"""

from __future__ import annotations

import copy
import json
import os
import re
import time
import uuid

from ansible_collections.carapace.fleet.plugins.module_utils._cara import ASSET_NAMES
from ansible_collections.carapace.fleet.plugins.module_utils._errors import FleetError
from ansible_collections.carapace.fleet.plugins.module_utils._version import is_path_safe, sanitize_for_path

PHASES = ("created", "downloading", "downloaded", "verified", "applying", "applied", "failed")
FORWARD = PHASES[:-1]
ADVANCE_PHASES = FORWARD[1:]
STATES = ("in_progress", "applied", "failed")
ACTIONS = ("create", "advance", "fail", "resume", "clear")
# Field order of cara's UpdateTransaction; keys not listed here follow, in their own order.
KEY_ORDER = ("id", "version", "assetName", "state", "attempt", "maxAttempts", "startedAtMs", "updatedAtMs",
             "stagedPath", "bundlePath", "sha256", "lastError", "phase", "retryable", "applyConfirmedUntilMs")
OPTIONAL_KEYS = ("applyConfirmedUntilMs",)
REQUIRED_KEYS = tuple(k for k in KEY_ORDER if k not in OPTIONAL_KEYS)
FLEET_KEY = "fleet"
# Keys under `fleet` this module maintains itself; `facts` may not set them.
FLEET_OWN_KEYS = ("phase_entered_ms", "failed_phase", "history")
HISTORY_LIMIT = 20
DEFAULT_ASSET = "cara-x86_64-linux"
DEFAULT_MAX_ATTEMPTS = 3
MAX_FILE_BYTES = 64 * 1024
U32_MAX = 2 ** 32 - 1
U64_MAX = 2 ** 64 - 1
UPDATES_DIR = "updates"
TX_NAME = "transaction.json"
LOCK_NAME = "update.lock.lock"

SHA256_RE = re.compile(r"[0-9a-fA-F]{64}")


class TransactionError(FleetError):
    """A refusal or failure. `cause` is machine-readable, `message` names the cause and the operator's next step.

    `retryable` says whether re-running the same task later can succeed without the operator acting;
    `transaction` is the transaction as it is on disk afterwards (when known); `changed` whether the failing
    call still wrote something (a transaction marked failed when its retry budget ran out).
    """

    def __init__(self, cause, message, retryable=False, transaction=None, changed=False):
        super().__init__(cause, message)
        self.retryable = retryable
        self.transaction = transaction
        self.changed = changed


def now_ms():
    return int(time.time() * 1000)


def staged_path(state_dir, version):
    return os.path.join(state_dir, UPDATES_DIR, "cara-" + sanitize_for_path(version))


def bundle_path(state_dir, version):
    return staged_path(state_dir, version) + ".bundle"


def is_uint(value, maximum):
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= maximum


def problems(tx, state_dir, strict=False):
    """What cara's load-time validation (HEAD) would reject in `tx`, as a list of short texts.

    With strict=False, unknown `state`/`phase` strings pass (cara reads them as `failed`); strict=True (used
    before every write) requires the known values and a consistent state/phase pair. `fleet`, when present,
    must be an object (our rule, not cara's).
    """
    if not isinstance(tx, dict):
        return ["it is not a JSON object"]
    out = []
    missing = [k for k in REQUIRED_KEYS if k not in tx]
    if missing:
        out.append("missing keys: %s" % ", ".join(missing))
    if "id" in tx and (not isinstance(tx["id"], str) or not tx["id"]):
        out.append("id must be a non-empty string")
    version = tx.get("version")
    version_ok = is_path_safe(version)
    if "version" in tx and not version_ok:
        out.append("version %r is not a non-empty path-safe version" % (version,))
    if "assetName" in tx and tx["assetName"] not in ASSET_NAMES:
        out.append("assetName %r is not a Carapace release asset (%s)" % (tx["assetName"], ", ".join(ASSET_NAMES)))
    for key, values in (("state", STATES), ("phase", PHASES)):
        if key in tx:
            if not isinstance(tx[key], str):
                out.append("%s must be a string" % key)
            elif strict and tx[key] not in values:
                out.append("%s %r is not one of %s" % (key, tx[key], ", ".join(values)))
    if "maxAttempts" in tx and (not is_uint(tx["maxAttempts"], U32_MAX) or tx["maxAttempts"] < 1):
        out.append("maxAttempts must be an integer >= 1")
    if "attempt" in tx:
        if not is_uint(tx["attempt"], U32_MAX):
            out.append("attempt must be a non-negative integer")
        elif is_uint(tx.get("maxAttempts"), U32_MAX) and tx["attempt"] > tx["maxAttempts"]:
            out.append("attempt %d is greater than maxAttempts %d" % (tx["attempt"], tx["maxAttempts"]))
    for key in ("startedAtMs", "updatedAtMs"):
        if key in tx and not is_uint(tx[key], U64_MAX):
            out.append("%s must be a non-negative integer (Unix ms)" % key)
    if is_uint(tx.get("startedAtMs"), U64_MAX) and is_uint(tx.get("updatedAtMs"), U64_MAX) \
            and tx["updatedAtMs"] < tx["startedAtMs"]:
        out.append("updatedAtMs is earlier than startedAtMs")
    for key, expect in (("stagedPath", staged_path), ("bundlePath", bundle_path)):
        value = tx.get(key)
        if value is None:
            continue
        if not isinstance(value, str):
            out.append("%s must be a string or null" % key)
        elif version_ok and value != expect(state_dir, version):
            out.append("%s %r is not %s" % (key, value, expect(state_dir, version)))
    sha = tx.get("sha256")
    if sha is not None and (not isinstance(sha, str) or not SHA256_RE.fullmatch(sha)):
        out.append("sha256 must be 64 hex characters or null")
    if tx.get("lastError") is not None and not isinstance(tx["lastError"], str):
        out.append("lastError must be a string or null")
    if "retryable" in tx and not isinstance(tx["retryable"], bool):
        out.append("retryable must be true or false")
    confirmed = tx.get("applyConfirmedUntilMs")
    if confirmed is not None and not is_uint(confirmed, U64_MAX):
        out.append("applyConfirmedUntilMs must be a non-negative integer (Unix ms)")
    if FLEET_KEY in tx and not isinstance(tx[FLEET_KEY], dict):
        out.append("the %r key (carapace.fleet's own facts) must be an object" % FLEET_KEY)
    if strict and not out:
        if (tx["state"] == "applied") != (tx["phase"] == "applied") or (tx["state"] == "failed") != (tx["phase"] == "failed"):
            out.append("state %r does not match phase %r" % (tx["state"], tx["phase"]))
    return out


def ordered(tx):
    """`tx` with cara's keys in the order of its schema, then every other key in its original order."""
    out = {k: tx[k] for k in KEY_ORDER if k in tx}
    out.update((k, v) for k, v in tx.items() if k not in out)
    return out


def dumps(tx):
    """Pretty JSON + newline, as cara writes it (serde_json's 2-space pretty printer, UTF-8)."""
    return (json.dumps(ordered(tx), indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def owner(tx):
    """Who drives the transaction: `fleet` (ours: it has the `fleet` key), `cara` (cara's own updater) or None."""
    if tx is None:
        return None
    return "fleet" if FLEET_KEY in tx else "cara"


def resume_pending(tx):
    """cara's `transaction_resume_pending`: what the daemon would auto-resume at its next start."""
    if tx is None:
        return False
    if tx.get("state") == "in_progress":
        return True
    return tx.get("state") == "failed" and tx.get("retryable") is True and tx.get("attempt", 0) < tx.get("maxAttempts", 0)


def _merge(base, extra):
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def with_fleet(tx, facts):
    tx[FLEET_KEY] = _merge(tx.get(FLEET_KEY) or {}, facts or {})
    return tx[FLEET_KEY]


def _history(fleet, entry):
    fleet["history"] = (list(fleet.get("history") or []) + [entry])[-HISTORY_LIMIT:]


def touch(tx, now):
    tx["updatedAtMs"] = max(now, tx["startedAtMs"], tx["updatedAtMs"])
    return tx["updatedAtMs"]


def describe(tx):
    return "version %s, phase %s, state %s, attempt %s/%s" % (tx.get("version"), tx.get("phase"), tx.get("state"),
                                                              tx.get("attempt"), tx.get("maxAttempts"))


def new_transaction(state_dir, version, asset_name, max_attempts, now, facts=None):
    """A fresh transaction in phase `created`; its first run is attempt 1 (cara counts each run)."""
    tx = {
        "id": str(uuid.uuid4()),
        "version": version,
        "assetName": asset_name,
        "state": "in_progress",
        "attempt": 1,
        "maxAttempts": max_attempts,
        "startedAtMs": now,
        "updatedAtMs": now,
        "stagedPath": staged_path(state_dir, version),
        "bundlePath": bundle_path(state_dir, version),
        "sha256": None,
        "lastError": None,
        "phase": "created",
        "retryable": True,
    }
    fleet = with_fleet(tx, facts)
    fleet["phase_entered_ms"] = {"created": now}
    _history(fleet, {"event": "created", "attempt": 1, "at_ms": now})
    return tx


def advance(tx, phase, now, sha256=None, facts=None):
    """Move an in-progress transaction forward to `phase` (never back). Returns the new transaction."""
    if phase not in ADVANCE_PHASES:
        raise TransactionError("bad_argument", "phase must be one of %s (use action=fail to mark a failure)"
                               % ", ".join(ADVANCE_PHASES))
    current = tx["phase"]
    if tx["state"] == "applied" and phase != "applied":
        raise TransactionError("bad_transition", "the transaction (%s) is already applied: there is no going back to "
                               "%s. To update again, start a fresh transaction with action=create." % (describe(tx), phase))
    if tx["state"] == "failed":
        raise TransactionError("bad_transition", "the transaction (%s) has failed (lastError: %s); it cannot advance to %s. "
                               "Resume it with action=resume (when retryable) or start a fresh one with action=create."
                               % (describe(tx), tx.get("lastError"), phase))
    if current not in FORWARD or FORWARD.index(phase) < FORWARD.index(current):
        raise TransactionError("bad_transition", "cannot go back from phase %s to %s: a transaction only moves forward "
                               "(%s). To redo an earlier step, fail it and resume (resume re-checks the staged file) or "
                               "start a fresh one with action=create." % (current, phase, " -> ".join(FORWARD)))
    recorded = tx.get("sha256")
    if sha256 is not None and sha256 != recorded:
        may_set = phase == "downloaded" or (phase == "verified" and recorded is None)
        if not may_set:
            raise TransactionError("bad_transition", "sha256 %s differs from the digest recorded for the staged file (%s); "
                                   "at phase %s it may no longer change. The staged file changed: fail the transaction "
                                   "and resume it to download and verify again." % (sha256, recorded, phase))
    out = copy.deepcopy(tx)
    if sha256 is not None:
        out["sha256"] = sha256
    out["phase"] = phase
    out["state"] = "applied" if phase == "applied" else "in_progress"
    out["retryable"] = phase != "applied"
    fleet = with_fleet(out, facts)
    if out == tx:
        return tx
    at = touch(out, now)
    if phase != current:
        fleet["phase_entered_ms"] = dict(fleet.get("phase_entered_ms") or {}, **{phase: at})
        if phase == "applied":
            _history(fleet, {"event": "applied", "attempt": out["attempt"], "at_ms": at})
    return out


def fail(tx, error, retryable, now, facts=None):
    """Mark the transaction failed with `error` (cara's lastError). Returns the new transaction.

    Allowed from every phase; from `applied` only as non-retryable (a health gate that failed after the switch:
    the host was rolled back, there is nothing to resume). A non-retryable failure never becomes retryable.
    """
    if not isinstance(error, str) or not error.strip():
        raise TransactionError("bad_argument", "error must say what failed (it becomes the transaction's lastError)")
    if tx["state"] == "applied" and retryable:
        raise TransactionError("bad_transition", "the transaction (%s) is applied: its failure cannot be retryable, "
                               "nothing is left to resume. Record it with retryable=false (say what failed and which "
                               "version the host was rolled back to)." % describe(tx))
    if tx["state"] == "failed" and tx.get("retryable") is False and retryable:
        raise TransactionError("bad_transition", "the transaction (%s) already failed non-retryable (lastError: %s); it "
                               "cannot become retryable. Start a fresh one with action=create." % (describe(tx), tx.get("lastError")))
    out = copy.deepcopy(tx)
    out.update(state="failed", phase="failed", retryable=bool(retryable), lastError=error)
    fleet = with_fleet(out, facts)
    if out == tx:
        return tx
    at = touch(out, now)
    if tx["phase"] != "failed":
        fleet["failed_phase"] = tx["phase"]
        fleet["phase_entered_ms"] = dict(fleet.get("phase_entered_ms") or {}, failed=at)
    if (tx["state"], tx.get("lastError"), tx.get("retryable")) != ("failed", error, bool(retryable)):
        _history(fleet, {"event": "failed", "attempt": out["attempt"], "phase": fleet.get("failed_phase"), "error": error,
                         "retryable": bool(retryable), "at_ms": at})
    return out


def budget_exhausted_message(tx):
    return "update transaction retry budget exhausted (%d/%d)" % (tx["attempt"], tx["maxAttempts"])


def resume_point(tx, hash_staged):
    """(phase to continue from, why) for a transaction being resumed, after re-hashing the staged file.

    `hash_staged(name)` hashes `updates/<name>` without following symlinks and returns (status, hex digest): status
    is `ok`, `missing`, `not_regular` or `empty`. Anything later than `downloading` needs a staged file whose
    sha256 equals the recorded one; otherwise the caller downloads again.
    """
    stored = tx["phase"]
    if stored == "failed":
        stored = (tx.get(FLEET_KEY) or {}).get("failed_phase")
    if stored == "applied":  # in_progress + applied is not something we write; redo the switch
        stored = "applying"
    if stored in ("created", "downloading"):
        return "downloading", "nothing was staged yet (the transaction was at phase %s)" % stored
    if stored not in FORWARD:
        stored = None
    recorded = tx.get("sha256")
    staged = tx.get("stagedPath") or staged_path("", tx["version"])
    if not recorded:
        return "downloading", "no sha256 is recorded for the staged file %s, so it cannot be trusted; download it again" % staged
    status, digest = hash_staged(os.path.basename(staged))
    if status == "missing":
        return "downloading", "the staged file %s is missing; download it again" % staged
    if status == "not_regular":
        return "downloading", "the staged file %s is not a regular file (or is a symlink); download it again" % staged
    if status == "empty":
        return "downloading", "the staged file %s is empty; download it again" % staged
    if digest != recorded.lower():
        return "downloading", ("the staged file %s has sha256 %s but the transaction recorded %s: it changed after it "
                               "was staged; download it again" % (staged, digest, recorded.lower()))
    if stored in (None, "downloaded"):
        bundle = tx.get("bundlePath") or staged + ".bundle"
        if hash_staged(os.path.basename(bundle))[0] != "ok":
            return "downloading", "the staged file matches its sha256 but its bundle %s is missing; download again" % bundle
    if stored is None:
        return "downloaded", ("the phase it failed in is not recorded; the staged file %s matches the recorded sha256, "
                              "verify it again" % staged)
    return stored, "the staged file %s matches the recorded sha256 %s" % (staged, recorded.lower())


def resume(tx, hash_staged, now, facts=None):
    """Start the next attempt of a resumable transaction. Returns (transaction, resume_from, reason).

    Raises TransactionError(budget_exhausted) carrying the transaction marked failed, non-retryable, when
    attempt >= maxAttempts (the caller persists it, as cara does; the next create then starts fresh).
    """
    if tx["state"] == "applied":
        raise TransactionError("not_resumable", "the transaction (%s) is already applied: nothing to resume. After a "
                               "passed health gate clear it (action=clear); to update again use action=create." % describe(tx))
    if tx["state"] == "failed" and tx.get("retryable") is not True:
        raise TransactionError("not_resumable", "the transaction (%s) failed non-retryable (lastError: %s): it cannot be "
                               "resumed. Fix the cause, then start a fresh one with action=create (it replaces this one)."
                               % (describe(tx), tx.get("lastError")))
    if tx["attempt"] >= tx["maxAttempts"]:
        message = budget_exhausted_message(tx)
        failed = fail(tx, message, False, now, facts)
        raise TransactionError("budget_exhausted", "%s: version %s was tried %d times (last error: %s). The transaction is "
                               "now failed, non-retryable. Find out why it keeps failing, then start again with "
                               "action=create, which replaces it." % (message, tx["version"], tx["attempt"],
                                                                      tx.get("lastError") or "none recorded"),
                               transaction=failed)
    resume_from, reason = resume_point(tx, hash_staged)
    out = copy.deepcopy(tx)
    out.update(attempt=tx["attempt"] + 1, state="in_progress", phase=resume_from, retryable=True)
    if resume_from == "downloading":
        out["sha256"] = None
    fleet = with_fleet(out, facts)
    at = touch(out, now)
    from_phase = fleet.pop("failed_phase", None) or tx["phase"]
    fleet["phase_entered_ms"] = dict(fleet.get("phase_entered_ms") or {}, **{resume_from: at})
    _history(fleet, {"event": "resumed", "attempt": out["attempt"], "phase": from_phase, "resume_from": resume_from,
                     "reason": reason, "at_ms": at})
    return out, resume_from, reason
