# -*- coding: utf-8 -*-
# Copyright: carapace.fleet maintainers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""`{state_dir}/updates/transaction.json` in Carapace's own schema: the update transaction state machine.

Domain logic only (no Ansible imports). `cara` reads the same file (cara-contract.md section 3), so every write
satisfies its load-time validation, keeps the key order of its schema and any key we do not know, and goes through
tmp + fsync + rename (0600, O_NOFOLLOW) while the flock `updates/update.lock.lock` that `cara update` takes is held.
Our own facts live under one extra key, `fleet`; a transaction without it was started by `cara update` itself.

Phases only move forward (created -> downloading -> downloaded -> verified -> applying -> applied); `fail` moves
any phase to failed; `resume` is the only way back, and it re-hashes the staged file against the recorded sha256
before it lets the caller continue from anything later than `downloading`.
"""

from __future__ import annotations

import copy
import errno
import fcntl
import hashlib
import json
import os
import pwd
import re
import stat
import time
import uuid

from ansible_collections.carapace.fleet.plugins.module_utils import _safejson
from ansible_collections.carapace.fleet.plugins.module_utils._cara import ASSET_NAMES, platform_asset

PHASES = ("created", "downloading", "downloaded", "verified", "applying", "applied", "failed")
FORWARD = PHASES[:-1]
ADVANCE_PHASES = FORWARD[1:]
STATES = ("in_progress", "applied", "failed")
ACTIONS = ("create", "advance", "fail", "resume", "clear")
# Field order of cara's UpdateTransaction (section 3.2); keys not listed here follow, in their own order.
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

_SAFE_VERSION_RE = re.compile(r"[A-Za-z0-9._-]+")
_UNSAFE_CHAR_RE = re.compile(r"[^A-Za-z0-9._-]")
_SHA256_RE = re.compile(r"[0-9a-fA-F]{64}")
_NOFOLLOW_ERRNOS = (errno.ELOOP, errno.EMLINK)


class TransactionError(Exception):
    """A refusal or failure. `cause` is machine-readable, `message` names the cause and the operator's next step.

    `retryable` says whether re-running the same task later can succeed without the operator acting;
    `transaction` is the transaction as it is on disk afterwards (when known); `changed` whether the failing
    call still wrote something (a transaction marked failed when its retry budget ran out).
    """

    def __init__(self, cause, message, retryable=False, transaction=None, changed=False):
        super().__init__(message)
        self.cause = cause
        self.message = message
        self.retryable = retryable
        self.transaction = transaction
        self.changed = changed


def now_ms():
    return int(time.time() * 1000)


def normalize_version(version):
    """The version as cara stores it: without one leading `v`, non-empty and path-safe, else ValueError."""
    text = (version or "").strip()
    if text[:1] == "v":
        text = text[1:]
    if not text or not _SAFE_VERSION_RE.fullmatch(text) or text in (".", ".."):
        raise ValueError("version %r is not a release version: expected a tag such as v0.9.0 or 0.9.0 "
                         "(letters, digits, '.', '_', '-')" % (version,))
    return text


def sanitize_version_for_path(version):
    """cara's `sanitize_version_for_path`: any char outside [A-Za-z0-9._-] becomes `_`."""
    return _UNSAFE_CHAR_RE.sub("_", version)


def staged_path(state_dir, version):
    return os.path.join(state_dir, UPDATES_DIR, "cara-" + sanitize_version_for_path(version))


def bundle_path(state_dir, version):
    return staged_path(state_dir, version) + ".bundle"


def _is_uint(value, maximum):
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= maximum


def problems(tx, state_dir, strict=False):
    """What cara's load-time validation (HEAD, section 3.2) would reject in `tx`, as a list of short texts.

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
    version_ok = isinstance(version, str) and bool(_SAFE_VERSION_RE.fullmatch(version)) and version not in (".", "..")
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
    if "maxAttempts" in tx and (not _is_uint(tx["maxAttempts"], U32_MAX) or tx["maxAttempts"] < 1):
        out.append("maxAttempts must be an integer >= 1")
    if "attempt" in tx:
        if not _is_uint(tx["attempt"], U32_MAX):
            out.append("attempt must be a non-negative integer")
        elif _is_uint(tx.get("maxAttempts"), U32_MAX) and tx["attempt"] > tx["maxAttempts"]:
            out.append("attempt %d is greater than maxAttempts %d" % (tx["attempt"], tx["maxAttempts"]))
    for key in ("startedAtMs", "updatedAtMs"):
        if key in tx and not _is_uint(tx[key], U64_MAX):
            out.append("%s must be a non-negative integer (Unix ms)" % key)
    if _is_uint(tx.get("startedAtMs"), U64_MAX) and _is_uint(tx.get("updatedAtMs"), U64_MAX) \
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
    if sha is not None and (not isinstance(sha, str) or not _SHA256_RE.fullmatch(sha)):
        out.append("sha256 must be 64 hex characters or null")
    if tx.get("lastError") is not None and not isinstance(tx["lastError"], str):
        out.append("lastError must be a string or null")
    if "retryable" in tx and not isinstance(tx["retryable"], bool):
        out.append("retryable must be true or false")
    confirmed = tx.get("applyConfirmedUntilMs")
    if confirmed is not None and not _is_uint(confirmed, U64_MAX):
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
    """cara's `transaction_resume_pending`: what the daemon would auto-resume at its next start (section 3.6)."""
    if tx is None:
        return False
    if tx.get("state") == "in_progress":
        return True
    return tx.get("state") == "failed" and tx.get("retryable") is True and tx.get("attempt", 0) < tx.get("maxAttempts", 0)


def host_asset():
    """This host's release asset name as cara's updater maps it, or None."""
    try:
        return platform_asset()
    except (OSError, AttributeError):
        return None


def _merge(base, extra):
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


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


def _with_fleet(tx, facts):
    tx[FLEET_KEY] = _merge(tx.get(FLEET_KEY) or {}, facts or {})
    return tx[FLEET_KEY]


def _history(fleet, entry):
    fleet["history"] = (list(fleet.get("history") or []) + [entry])[-HISTORY_LIMIT:]


def _touch(tx, now):
    tx["updatedAtMs"] = max(now, tx["startedAtMs"], tx["updatedAtMs"])
    return tx["updatedAtMs"]


def _describe(tx):
    return "version %s, phase %s, state %s, attempt %s/%s" % (tx.get("version"), tx.get("phase"), tx.get("state"),
                                                              tx.get("attempt"), tx.get("maxAttempts"))


def new_transaction(state_dir, version, asset_name, max_attempts, now, facts=None):
    """A fresh transaction in phase `created`; its first run is attempt 1 (cara counts each run, section 3.3)."""
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
    fleet = _with_fleet(tx, facts)
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
                               "%s. To update again, start a fresh transaction with action=create." % (_describe(tx), phase))
    if tx["state"] == "failed":
        raise TransactionError("bad_transition", "the transaction (%s) has failed (lastError: %s); it cannot advance to %s. "
                               "Resume it with action=resume (when retryable) or start a fresh one with action=create."
                               % (_describe(tx), tx.get("lastError"), phase))
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
    fleet = _with_fleet(out, facts)
    if out == tx:
        return tx
    at = _touch(out, now)
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
                               "version the host was rolled back to)." % _describe(tx))
    if tx["state"] == "failed" and tx.get("retryable") is False and retryable:
        raise TransactionError("bad_transition", "the transaction (%s) already failed non-retryable (lastError: %s); it "
                               "cannot become retryable. Start a fresh one with action=create." % (_describe(tx), tx.get("lastError")))
    out = copy.deepcopy(tx)
    out.update(state="failed", phase="failed", retryable=bool(retryable), lastError=error)
    fleet = _with_fleet(out, facts)
    if out == tx:
        return tx
    at = _touch(out, now)
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
                               "passed health gate clear it (action=clear); to update again use action=create." % _describe(tx))
    if tx["state"] == "failed" and tx.get("retryable") is not True:
        raise TransactionError("not_resumable", "the transaction (%s) failed non-retryable (lastError: %s): it cannot be "
                               "resumed. Fix the cause, then start a fresh one with action=create (it replaces this one)."
                               % (_describe(tx), tx.get("lastError")))
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
    fleet = _with_fleet(out, facts)
    at = _touch(out, now)
    from_phase = fleet.pop("failed_phase", None) or tx["phase"]
    fleet["phase_entered_ms"] = dict(fleet.get("phase_entered_ms") or {}, **{resume_from: at})
    _history(fleet, {"event": "resumed", "attempt": out["attempt"], "phase": from_phase, "resume_from": resume_from,
                     "reason": reason, "at_ms": at})
    return out, resume_from, reason


def _user(uid):
    try:
        return "%s (uid %d)" % (pwd.getpwuid(uid).pw_name, uid)
    except KeyError:
        return "uid %d" % uid


class Host:
    """The checked `state_dir` and `updates/` of one host, opened by file descriptor, with cara's update lock held.

    Use as a context manager. In check mode nothing is created, chmod-ed or written; the lock is taken (non-
    blocking) only when its file already exists, so a running update is reported as a real run would see it.
    """

    def __init__(self, state_dir, check_mode=False, create=False):
        self.state_dir = os.path.normpath(os.path.abspath(state_dir))
        self.updates_dir = os.path.join(self.state_dir, UPDATES_DIR)
        self.path = os.path.join(self.updates_dir, TX_NAME)
        self.lock_path = os.path.join(self.updates_dir, LOCK_NAME)
        self.check_mode = check_mode
        self.create = create
        self.actions = []
        self.changed = False
        self.state_fd = None
        self.updates_fd = None
        self.lock_fd = None
        self.euid = os.geteuid()

    def __enter__(self):
        try:
            self._open()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        for name in ("lock_fd", "updates_fd", "state_fd"):
            fd = getattr(self, name)
            if fd is not None:
                os.close(fd)
                setattr(self, name, None)

    def _insecure(self, path, what):
        return TransactionError("insecure_dir", "%s %s. cara refuses it too (non-retryable): every `cara update` on this "
                                "host fails until it is fixed. Make it a real directory owned by the user cara runs as, "
                                "mode 0700, and run this task as that user (become_user)." % (path, what))

    def _checked_dir(self, path, name, parent_fd):
        try:
            st = os.lstat(name, dir_fd=parent_fd) if parent_fd is not None else os.lstat(path)
        except FileNotFoundError:
            return None
        if stat.S_ISLNK(st.st_mode):
            raise self._insecure(path, "is a symlink")
        if not stat.S_ISDIR(st.st_mode):
            raise self._insecure(path, "is not a directory")
        if st.st_uid != self.euid:
            raise self._insecure(path, "is owned by %s, not by %s that runs this task" % (_user(st.st_uid), _user(self.euid)))
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
        fd = os.open(name if parent_fd is not None else path, flags, dir_fd=parent_fd)
        fst = os.fstat(fd)
        if (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino) or fst.st_uid != self.euid:
            os.close(fd)
            raise self._insecure(path, "changed while it was checked")
        mode = stat.S_IMODE(fst.st_mode)
        if mode & 0o077:
            if self.check_mode:
                self.actions.append("would remove group/other permissions from %s (%04o -> %04o)" % (path, mode, mode & 0o700))
            else:
                os.fchmod(fd, mode & 0o700)
                self.actions.append("removed group/other permissions from %s (%04o -> %04o)" % (path, mode, mode & 0o700))
            self.changed = True
        return fd

    def _open(self):
        self.state_fd = self._checked_dir(self.state_dir, None, None)
        if self.state_fd is None:
            return
        self.updates_fd = self._checked_dir(self.updates_dir, UPDATES_DIR, self.state_fd)
        if self.updates_fd is None:
            if not self.create:
                return
            if self.check_mode:
                self.actions.append("would create %s (0700)" % self.updates_dir)
                self.changed = True
                return
            os.mkdir(UPDATES_DIR, 0o700, dir_fd=self.state_fd)
            self.updates_fd = self._checked_dir(self.updates_dir, UPDATES_DIR, self.state_fd)
            os.fchmod(self.updates_fd, 0o700)
            self.actions.append("created %s (0700)" % self.updates_dir)
            self.changed = True
        self._lock()

    def _lock(self):
        cloexec = getattr(os, "O_CLOEXEC", 0)
        try:
            if self.check_mode:
                self.lock_fd = os.open(LOCK_NAME, os.O_RDONLY | os.O_NOFOLLOW | cloexec, dir_fd=self.updates_fd)
            else:
                self.lock_fd = os.open(LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | cloexec, 0o600,
                                       dir_fd=self.updates_fd)
        except FileNotFoundError:
            return  # check mode only: nobody created the lock file, so nobody holds it
        except OSError as exc:
            if exc.errno in _NOFOLLOW_ERRNOS:
                raise self._insecure(self.lock_path, "is a symlink") from exc
            raise
        try:
            fcntl.flock(self.lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise TransactionError("lock_held", "another update is running on this host (lock %s held). Wait until it "
                                   "ends (a `cara update`, or another carapace.fleet run on this host), then run this "
                                   "again." % self.lock_path, retryable=True) from exc

    def corrupt(self, what):
        return TransactionError("corrupt", "update transaction %s is invalid: %s. cara refuses such a file too: every "
                                "`cara update` on this host fails until it is removed. Inspect it (it is evidence of an "
                                "interrupted or tampered update), then remove it, or run carapace.fleet.cara_transaction "
                                "with action=clear and force=true, and start the update again." % (self.path, what))

    def read(self):
        """The transaction on disk (validated as cara validates it), or None. Raises TransactionError."""
        if self.updates_fd is None:
            return None
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(TX_NAME, flags, dir_fd=self.updates_fd)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno in _NOFOLLOW_ERRNOS:
                raise TransactionError("corrupt", "update transaction %s is a symlink; it is never followed (cara refuses it "
                                       "too). Inspect where it points, then remove the link (or run this module with "
                                       "action=clear and force=true) and start the update again." % self.path) from exc
            raise
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise self.corrupt("it is not a regular file")
            chunks, size = [], 0
            while size <= MAX_FILE_BYTES:
                chunk = os.read(fd, MAX_FILE_BYTES + 1 - size)
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
        finally:
            os.close(fd)
        if size > MAX_FILE_BYTES:
            raise self.corrupt("it is larger than 64 KiB, the most cara reads")
        try:
            tx = _safejson.loads(b"".join(chunks).decode("utf-8"), parse_constant=_reject_constant)
        except UnicodeDecodeError as exc:
            raise self.corrupt("it is not UTF-8 (%s)" % exc) from exc
        except ValueError as exc:
            raise self.corrupt("it is not valid JSON (%s)" % exc) from exc
        found = problems(tx, self.state_dir)
        if found:
            raise self.corrupt("; ".join(found))
        return tx

    def write(self, tx):
        """Atomically replace transaction.json: tmp in updates/ (0600, O_EXCL|O_NOFOLLOW) + fsync + rename + fsync dir."""
        found = problems(tx, self.state_dir, strict=True)
        if found:
            raise TransactionError("bad_argument", "refusing to write a transaction cara would reject: %s" % "; ".join(found))
        data = dumps(tx)
        if len(data) > MAX_FILE_BYTES:
            raise TransactionError("bad_argument", "the transaction would be %d bytes, more than the 64 KiB cara reads; "
                                   "pass smaller facts" % len(data))
        if self.check_mode:
            return
        tmp = ".%s.%d.%s.tmp" % (TX_NAME, os.getpid(), uuid.uuid4().hex)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
        fd = os.open(tmp, flags, 0o600, dir_fd=self.updates_fd)
        try:
            try:
                os.fchmod(fd, 0o600)
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, TX_NAME, src_dir_fd=self.updates_fd, dst_dir_fd=self.updates_fd)
        except BaseException:
            try:
                os.unlink(tmp, dir_fd=self.updates_fd)
            except OSError:
                pass
            raise
        os.fsync(self.updates_fd)

    def remove(self):
        """Delete transaction.json (the link itself when it is one). Returns whether something was removed."""
        if self.updates_fd is None:
            return False
        try:
            st = os.lstat(TX_NAME, dir_fd=self.updates_fd)
        except FileNotFoundError:
            return False
        if stat.S_ISDIR(st.st_mode):
            raise TransactionError("io_error", "%s is a directory; remove it by hand" % self.path)
        if not self.check_mode:
            os.unlink(TX_NAME, dir_fd=self.updates_fd)
            os.fsync(self.updates_fd)
        return True

    def hash_staged(self, name):
        """(status, sha256 hex) of `updates/<name>`, never following a symlink (see resume_point)."""
        if self.updates_fd is None:
            return "missing", None
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(name, flags, dir_fd=self.updates_fd)
        except FileNotFoundError:
            return "missing", None
        except OSError as exc:
            if exc.errno in _NOFOLLOW_ERRNOS:
                return "not_regular", None
            raise
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return "not_regular", None
            if st.st_size == 0:
                return "empty", None
            digest = hashlib.sha256()
            while True:
                chunk = os.read(fd, 1024 * 1024)
                if not chunk:
                    break
                digest.update(chunk)
            return "ok", digest.hexdigest()
        finally:
            os.close(fd)


def _reject_constant(name):
    raise ValueError("%s is not JSON" % name)


def _foreign(host, tx, what):
    return TransactionError("foreign", "the update transaction in %s was started by cara's own updater (`cara update`), not "
                            "by carapace.fleet (it has no `fleet` key): %s. %s" % (host.path, _describe(tx), what))


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
            if not isinstance(sha256, str) or not _SHA256_RE.fullmatch(sha256):
                raise ValueError("sha256 must be 64 hex characters")
            sha256 = sha256.lower()
    except ValueError as exc:
        raise TransactionError("bad_argument", str(exc)) from exc
    if asset_name is not None and asset_name not in ASSET_NAMES:
        raise TransactionError("bad_argument", "asset_name must be one of %s" % ", ".join(ASSET_NAMES))
    if not _is_uint(max_attempts, U32_MAX) or max_attempts < 1:
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
        actions.append("unchanged: the transaction is already as requested (%s)" % _describe(tx))
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
            replacing = "cara's own transaction (%s)" % _describe(tx)
        elif force:
            replacing = "the transaction (%s) with a fresh one (force)" % _describe(tx)
        elif tx["state"] == "applied" or (tx["state"] == "failed" and tx.get("retryable") is not True):
            replacing = "the finished transaction (%s)" % _describe(tx)
        elif tx["version"] != version or tx["assetName"] != asset_name:
            replacing = "the transaction for %s %s" % (tx["version"], tx["assetName"])
        elif tx["state"] == "in_progress" and tx["phase"] == "created":
            after = copy.deepcopy(tx)
            _with_fleet(after, facts)
            result["resume_from"] = "created"
            if after == tx:
                actions.append("unchanged: a transaction for %s is already created (%s)" % (version, _describe(tx)))
                return tx
            _touch(after, now)
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
