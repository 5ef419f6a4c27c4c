# -*- coding: utf-8 -*-
# Copyright: carapace.fleet maintainers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The downtime window of one host, run on the host: upgrade (stop -> backup -> applying -> switch -> applied ->
start -> gate) or rollback (stop -> switch back -> restore -> close -> start -> verify), with its own way back.

Domain logic only (no Ansible imports). The steps themselves are the caller's `ops` (built on the other module_utils);
this file orders them, times them, persists each phase in the window record, and decides the way back on a failure.
The record, `{install_root}/window.json`, says who runs the window (run id, pid) and how it ended; `window.lock`
(flock, held for the whole window) makes a second window on the same host impossible while one runs, and tells a
later run whether the window is still going.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import time

from ansible_collections.carapace.fleet.plugins.module_utils import _atomic
from ansible_collections.carapace.fleet.plugins.module_utils._errors import FleetError

RECORD = "window.json"
LOCK = "window.lock"
SCHEMA = 1
MAX_RECORD = 256 * 1024
UPGRADE_PHASES = ("stop", "backup", "applying", "switch", "applied", "start", "gate", "clear")
ROLLBACK_PHASES = ("stop", "switch", "restore", "close", "start", "verify")


class WindowError(FleetError):
    """A refusal before anything was touched (another window runs, a bad record)."""

    def __init__(self, cause, message, record=None):
        super().__init__(cause, message)
        self.record = record


class GateFailed(FleetError):
    """The gate (or the rollback's verify) did not pass: `gate` is its result, for the report and the evidence."""

    def __init__(self, gate, what="gate"):
        super().__init__("gate_failed", "%s: %s" % (what, gate.get("msg") or "failed"))
        self.gate = gate


def describe(exc):
    """One line for a failed step: its message, with the cause when there is one."""
    if isinstance(exc, FleetError):
        return exc.message
    return "%s: %s" % (type(exc).__name__, exc)


# -- the record and its lock ------------------------------------------------------------------------------------------

class Record:
    """`{install_root}/window.json` and `window.lock` (flock). Written atomically, mode 0644 (no secrets in it)."""

    def __init__(self, install_root):
        self.root = os.path.normpath(os.path.abspath(install_root))
        self.path = os.path.join(self.root, RECORD)
        self.lock_path = os.path.join(self.root, LOCK)
        self._fd = None

    def read(self):
        """The record, or None. A record that is not a regular file of ours is an error, never followed."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return None
            raise WindowError("bad_record", "cannot read the window record %s: %s. Remove it once no window runs "
                              "on this host." % (self.path, exc)) from exc
        with os.fdopen(fd, "rb") as f:
            data = f.read(MAX_RECORD + 1)
        try:
            record = json.loads(data.decode("utf-8"))
            if not isinstance(record, dict) or len(data) > MAX_RECORD:
                raise ValueError("not a window record")
        except ValueError as exc:
            raise WindowError("bad_record", "the window record %s is not valid (%s). Remove it once no window runs on "
                              "this host." % (self.path, exc)) from exc
        return record

    def write(self, record):
        _atomic.write_file(self.path, json.dumps(record, indent=1, sort_keys=True, default=str) + "\n", mode=0o644)

    def _open_lock(self):
        return os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o644)

    def running(self):
        """Whether a window holds the lock now (no lock file: none ever ran)."""
        try:  # read-only: any user may look (flock works on a read-only descriptor)
            fd = os.open(self.lock_path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        finally:
            os.close(fd)  # closing drops the probe's lock
        return False

    def acquire(self):
        if not os.path.isdir(self.root):
            os.makedirs(self.root, mode=0o755, exist_ok=True)
        fd = self._open_lock()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            record = None
            try:
                record = self.read()
            except WindowError:
                pass
            raise WindowError("window_running", "another window is running on this host (%s); nothing was touched. "
                              "Wait for it: the next run of the playbook waits and reports its outcome."
                              % who(record), record) from exc
        self._fd = fd

    def release(self):
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def wait(self, timeout, interval=0.5, clock=time.monotonic, sleep=time.sleep):
        """Wait (at most `timeout` s) for a running window to end; returns (still running, seconds waited)."""
        started = clock()
        while self.running():
            if clock() - started >= timeout:
                return True, round(clock() - started, 2)
            sleep(interval)
        return False, round(clock() - started, 2)

    def acknowledge(self, run_id):
        """Mark a finished record as reported by `run_id`; returns (changed, record)."""
        record = self.read()
        if record is None or record.get("state") != "done" or record.get("acknowledged_by"):
            return False, record
        record["acknowledged_by"] = run_id
        self.write(record)
        return True, record


def who(record):
    if not record:
        return "no record yet"
    return "%s of %s by run %s, pid %s, started %s, phase %s" % (
        record.get("action"), record.get("tag"), record.get("run_id") or "?", record.get("pid"),
        time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(record.get("started_at") or 0)), record.get("phase"))


# -- the window -------------------------------------------------------------------------------------------------------

class Window:
    """One window. `ops` has stop(), start(), backup(), advance(phase, facts), switch(how, src, sha256, tag) (how:
    present, previous, or back - to `tag` whichever way undoes this window's switch),
    restore(path), close(reason), clear(), gate(version, timeout, fail_what), fail_tx(error, facts) and
    evidence(data); each raises on failure. `spec` holds the window's parameters (see the module's options)."""

    def __init__(self, ops, record, spec, clock=time.time):
        self.ops = ops
        self.record = record
        self.spec = spec
        self.clock = clock
        self.phases = []
        self.data = None

    # ---- bookkeeping
    def _persist(self, **fields):
        self.data.update(fields)
        self.data["phases"] = self.phases
        try:
            self.record.write(self.data)
        except OSError:
            pass  # the record is evidence, never a reason to leave the host down

    def _phase(self, name, func, *args, tolerate=False):
        entry = {"phase": name, "start": round(self.clock(), 3), "end": None, "ok": None}
        self.phases.append(entry)
        self._persist(phase=name)
        try:
            value = func(*args)
        except Exception as exc:  # pylint: disable=broad-exception-caught
            entry.update(end=round(self.clock(), 3), ok=False, error=describe(exc))
            self._persist()
            if tolerate:
                return None
            raise
        entry.update(end=round(self.clock(), 3), ok=True)
        self._persist()
        return value

    def _begin(self, action):
        s = self.spec
        self.data = {"schema": SCHEMA, "action": action, "tag": s["tag"], "from": s.get("from_tag"),
                     "run_id": s.get("run_id"), "pid": os.getpid(), "started_at": round(self.clock(), 3),
                     "state": "running", "phase": None, "outcome": None, "phases": self.phases}
        self._persist()

    def _end(self, result):
        keys = ("outcome", "error", "downtime_s", "rto_s", "down_at", "up_at", "backup", "evidence", "failed_check",
                "rollback_error", "attempt")
        summary = {k: result.get(k) for k in keys}
        self._persist(state="done", phase=None, outcome=result["outcome"], finished_at=round(self.clock(), 3),
                      result=summary)
        result["phases"] = self.phases
        result["record"] = self.record.path
        return result

    # ---- the upgrade
    def upgrade(self):
        s = self.spec
        self._begin("upgrade")
        down_at = s.get("down_at") or round(self.clock(), 3)  # before the stop: downtime_s includes it
        result = {"outcome": None, "down_at": down_at, "backup": s.get("backup_path") or None, "backup_entry": None,
                  "evidence": None,
                  "gate": None, "failed_check": None, "error": None, "rto_s": None, "downtime_s": None, "up_at": None,
                  "rollback": None, "rollback_error": None, "attempt": None}
        switched = False
        try:
            self._phase("stop", self.ops.stop)
            if not result["backup"]:
                entry = self._phase("backup", self.ops.backup)
                result["backup_entry"] = entry
                result["backup"] = entry.get("path") if isinstance(entry, dict) else None
            self._phase("applying", self.ops.advance, "applying", {"backup": result["backup"], "down_at": down_at})
            switched = True  # from here the active link may point at the new release
            self._phase("switch", self.ops.switch, "present", s["src"], s["sha256"], s["tag"])
            applied = self._phase("applied", self.ops.advance, "applied", None)
            result["attempt"] = ((applied or {}).get("transaction") or {}).get("attempt")
            self._phase("start", self.ops.start)
            gate = self._phase("gate", self.ops.gate, s["tag"], s["health_timeout"], "Gate on health, readiness, "
                               "status and cara verify")
            result["gate"] = gate
            self._phase("clear", self.ops.clear)
        except Exception as exc:  # pylint: disable=broad-exception-caught
            return self._end(self._upgrade_failed(result, exc, switched))
        result["up_at"] = self.phases[-2]["end"]  # the gate passed
        result["downtime_s"] = round(result["up_at"] - down_at, 2)
        result["outcome"] = "upgraded"
        return self._end(result)

    def _upgrade_failed(self, result, exc, switched):
        """Keep the evidence, mark the transaction failed (rollback pending) before anything starts cara again, roll
        back to the release the host ran, record how that ended."""
        s = self.spec
        failed = self.phases[-1]["phase"] if self.phases else "stop"
        result["error"] = "%s: %s" % (failed, describe(exc))
        if isinstance(exc, GateFailed):
            result["gate"] = exc.gate
            result["failed_check"] = exc.gate.get("failed_check")
        backup_done = bool(result["backup"]) and failed not in ("stop", "backup")
        result["evidence"] = self._evidence(result, exc)
        rollback = s.get("auto_rollback", True)
        pending = {"rollback": {"state": "pending", "to": s["from_tag"], "backup": result["backup"] if backup_done else "",
                                "restore": backup_done}} if rollback else {}
        going = "; rolling back to %s" % s["from_tag"] if rollback else ""
        tx_error = "%s%s; evidence in %s" % (result["error"], going, result["evidence"] or "-")
        failed_tx = self._phase("fail", self.ops.fail_tx, tx_error, dict(pending, evidence=result["evidence"]),
                                tolerate=True)
        result["attempt"] = ((failed_tx or {}).get("transaction") or {}).get("attempt")
        if not rollback:
            result["outcome"] = "failed"
            result["rollback_error"] = None
            return result
        how = "back" if switched else "none"
        back = self._return(s["from_tag"], how, s.get("from_src"), s.get("from_sha256"),
                            result["backup"] if backup_done else None, result["down_at"], s["rollback_timeout"],
                            prefix="rollback_")
        result["rollback"] = back
        result["rto_s"] = back.get("rto_s")
        result["rollback_error"] = back.get("error")
        result["outcome"] = "rolled_back" if back["ok"] else "failed"
        if not back["ok"]:
            result["failed_check"] = result["failed_check"] or back.get("failed_check")
        done = "rolled back to %s%s" % (s["from_tag"], "" if backup_done else
                                        " (the backup of this run did not complete, so the state was left untouched and "
                                        "nothing was restored)") if back["ok"] else \
            "the rollback failed: %s" % back.get("error")
        self._phase("record", self.ops.fail_tx, "%s; %s; evidence in %s" % (result["error"], done, result["evidence"] or "-"),
                    {"evidence": result["evidence"], "rto_s": result["rto_s"], "rollback": {"state": "done"}},
                    tolerate=True)
        if back["ok"]:
            result["up_at"] = back.get("up_at")
        return result

    def _evidence(self, result, exc):
        gate = getattr(exc, "gate", None)
        data = {"host_window": self.record.path, "step": self.spec["tag"], "error": result["error"],
                "failed_result": gate if gate is not None else {"msg": describe(exc), "cause": getattr(exc, "cause", None)},
                "phases": self.phases}
        try:
            return self.ops.evidence(data)
        except Exception:  # pylint: disable=broad-exception-caught
            return None  # evidence is best effort: the rollback matters more

    # ---- back to a release (the upgrade's own rollback, and the rollback runbook)
    def _return(self, tag, how, src, sha256, backup, clock_from, timeout, prefix=""):
        """stop -> switch -> restore -> close -> start -> verify; returns {ok, error, rto_s, up_at, gate}."""
        out = {"ok": False, "error": None, "rto_s": None, "up_at": None, "gate": None, "failed_check": None,
               "restored": None}
        try:
            self._phase(prefix + "stop", self.ops.stop, tolerate=bool(prefix))
            if how != "none":
                self._phase(prefix + "switch", self.ops.switch, how, src, sha256, tag)
            if backup:
                out["restored"] = self._phase(prefix + "restore", self.ops.restore, backup)
            self._phase(prefix + "close", self.ops.close, "rolled back to %s by carapace.fleet (%s)"
                        % (tag, self.spec.get("reason") or "rollback"))
            self._phase(prefix + "start", self.ops.start)
            out["gate"] = self._phase(prefix + "verify", self.ops.gate, tag, timeout, "Verify %s after the rollback" % tag)
        except Exception as exc:  # pylint: disable=broad-exception-caught
            out["error"] = "%s: %s" % (self.phases[-1]["phase"], describe(exc))
            if isinstance(exc, GateFailed):
                out["gate"] = exc.gate
                out["failed_check"] = exc.gate.get("failed_check")
            return out
        out["ok"] = True
        out["up_at"] = self.phases[-1]["end"]
        out["rto_s"] = round(out["up_at"] - clock_from, 2)
        return out

    def rollback(self):
        """The rollback runbook as one window; if it fails, the host comes back up on the release it ran."""
        s = self.spec
        self._begin("rollback")
        clock_from = s.get("down_at") or round(self.clock(), 3)
        back = self._return(s["tag"], s["switch"], s.get("src"), s.get("sha256"), s.get("backup_path") or None,
                            clock_from, s["health_timeout"])
        result = {"outcome": "rolled_back" if back["ok"] else None, "down_at": clock_from, "rto_s": back["rto_s"],
                  "up_at": back["up_at"], "gate": back["gate"], "failed_check": back["failed_check"],
                  "error": back["error"], "backup": s.get("backup_path") or None, "evidence": None,
                  "downtime_s": back["rto_s"], "rollback_error": None, "recovered": None, "restored": back["restored"]}
        if back["ok"]:
            return self._end(result)
        # Back up on the release the host ran before this rollback: stop, switch to it, close, start (no verify
        # deadline of its own: the failure is reported either way).
        recovered = s.get("from_tag") and s.get("from_src") and s.get("from_sha256")
        steps_ok = True
        self._phase("recover_stop", self.ops.stop, tolerate=True)
        if recovered:
            steps_ok = self._phase("recover_switch", self.ops.switch, "present", s["from_src"], s["from_sha256"],
                                   s["from_tag"], tolerate=True) is not None
        self._phase("recover_close", self.ops.close, "the rollback to %s failed (%s); carapace.fleet brought the "
                    "host back up on %s" % (s["tag"], back["error"], s.get("from_tag") or "its release"), tolerate=True)
        started = self._phase("recover_start", self.ops.start, tolerate=True) is not None
        result["outcome"] = "failed"
        result["recovered"] = {"to": s.get("from_tag") if recovered and steps_ok else None, "started": started}
        return self._end(result)
