"""The downtime window's order, its own way back, and its record (module_utils/_window, _as_user).

The steps are recorded by a stand-in `ops` here, to pin the order and the decisions; the real steps against the
cara double run in tests/integration (test_fleet_kill_points, test_cara_apply_module).
"""

import json
import os
import pwd

import pytest

from ansible_collections.carapace.fleet.plugins.module_utils import _as_user, _window
from ansible_collections.carapace.fleet.plugins.module_utils._errors import FleetError

SPEC = {"tag": "v0.9.0", "src": "/s/updates/cara-0.9.0", "sha256": "a" * 64, "from_tag": "v0.8.0",
        "from_src": "/o/releases/v0.8.0/cara", "from_sha256": "b" * 64, "health_timeout": 60, "rollback_timeout": 30,
        "run_id": "run-1", "auto_rollback": True, "backup_path": "", "down_at": None, "switch": "present",
        "reason": "test"}


class Ops:
    def __init__(self, fail=None, gate_fails=(), rollback_fail=None):
        self.calls = []
        self.fail = fail
        self.gate_fails = set(gate_fails)
        self.rollback_fail = rollback_fail
        self.rolling_back = False

    def _do(self, name, *args):
        self.calls.append((name,) + args)
        if name == self.fail and not self.rolling_back:
            raise FleetError("boom", "%s broke" % name)
        if self.rolling_back and name == self.rollback_fail:
            raise FleetError("boom", "%s broke in the rollback" % name)

    def stop(self):
        self._do("stop")
        return {}

    def start(self):
        self._do("start")
        return {}

    def backup(self):
        self._do("backup")
        return {"path": "/b/backup.tar.gz", "snapshot": {"content_digest": "c"}}

    def advance(self, phase, facts):
        self._do("advance", phase, facts)

    def switch(self, how, src, sha256, tag):
        self._do("switch", how, src, sha256, tag)
        return {"tag": tag}

    def restore(self, path):
        self._do("restore", path)
        return {"backup": {"path": path}, "snapshot": {}}

    def close(self, reason):
        self._do("close")

    def clear(self):
        self._do("clear")

    def gate(self, tag, timeout, what):
        self._do("gate", tag, timeout)
        if tag in self.gate_fails:
            raise _window.GateFailed({"passed": False, "msg": "ready answered 503", "failed_check": "ready"}, what)
        return {"passed": True}

    def fail_tx(self, error, facts):
        self.calls.append(("fail_tx", error, facts))
        self.rolling_back = True

    def evidence(self, data):
        self.calls.append(("evidence", data["error"]))
        return "/b/evidence.json"


def names(ops):
    return [c[0] if c[0] not in ("advance", "switch") else "%s:%s" % (c[0], c[1]) for c in ops.calls]


def run(tmp_path, ops, action="upgrade", **spec):
    record = _window.Record(str(tmp_path))
    record.acquire()
    try:
        window = _window.Window(ops, record, dict(SPEC, **spec))
        return (window.upgrade() if action == "upgrade" else window.rollback()), record
    finally:
        record.release()


def test_an_upgrade_window_runs_the_runbook_in_order_and_records_each_phase(tmp_path):
    ops = Ops()
    result, record = run(tmp_path, ops)
    assert names(ops) == ["stop", "backup", "advance:applying", "switch:present", "advance:applied", "start", "gate",
                          "clear"]
    assert result["outcome"] == "upgraded" and result["backup"] == "/b/backup.tar.gz"
    assert result["downtime_s"] == pytest.approx(result["up_at"] - result["down_at"], abs=0.01)
    assert ops.calls[2][2] == {"backup": "/b/backup.tar.gz", "down_at": result["down_at"]}
    saved = record.read()
    assert (saved["state"], saved["outcome"], saved["run_id"]) == ("done", "upgraded", "run-1")
    assert [p["phase"] for p in saved["phases"]] == list(_window.UPGRADE_PHASES)
    assert all(p["ok"] and p["end"] >= p["start"] for p in saved["phases"])


@pytest.mark.parametrize("failing,switched_back,restored", [
    ("stop", False, False), ("backup", False, False), ("switch", True, True), ("start", True, True),
])
def test_a_failure_after_the_stop_is_rolled_back_by_the_window(tmp_path, failing, switched_back, restored):
    ops = Ops(fail=failing)
    result, _record = run(tmp_path, ops)
    assert result["outcome"] == "rolled_back" and result["error"].startswith(failing + ":")
    calls = names(ops)
    tail = calls[calls.index("fail_tx"):]
    # marked failed (rollback pending) before anything starts cara again; recorded done at the end
    pending = ops.calls[calls.index("fail_tx")][2]["rollback"]
    assert pending == {"state": "pending", "to": "v0.8.0", "backup": "/b/backup.tar.gz" if restored else "",
                       "restore": restored}
    assert ("switch:back" in tail) == switched_back
    assert ("restore" in tail) == restored
    assert tail[-4:] == ["close", "start", "gate", "fail_tx"] and ops.calls[-2][1] == "v0.8.0"
    assert "rolled back to v0.8.0" in ops.calls[-1][1] and ops.calls[-1][2]["rollback"] == {"state": "done"}
    assert calls.index("evidence") < calls.index("fail_tx") and result["evidence"] == "/b/evidence.json"
    assert result["rto_s"] is not None


def test_a_failed_gate_is_rolled_back_with_the_failing_check(tmp_path):
    ops = Ops(gate_fails={"v0.9.0"})
    result, _record = run(tmp_path, ops)
    assert result["outcome"] == "rolled_back" and result["failed_check"] == "ready"
    assert result["error"].startswith("gate: Gate") and "ready answered 503" in result["error"]


def test_a_failing_rollback_says_so(tmp_path):
    ops = Ops(fail="start", rollback_fail="restore")
    result, record = run(tmp_path, ops)
    assert result["outcome"] == "failed" and "restore broke in the rollback" in result["rollback_error"]
    assert "the rollback failed" in ops.calls[-1][1]
    assert record.read()["outcome"] == "failed"


def test_without_auto_rollback_the_host_is_left_stopped(tmp_path):
    ops = Ops(fail="switch")
    result, _record = run(tmp_path, ops, auto_rollback=False)
    assert result["outcome"] == "failed"
    assert names(ops)[-1] == "fail_tx" and "start" not in names(ops)[names(ops).index("evidence"):]


def test_a_rollback_window_that_fails_comes_back_up_on_the_release_it_ran(tmp_path):
    ops = Ops(gate_fails={"v0.8.0"})
    result, _record = run(tmp_path, ops, action="rollback", tag="v0.8.0", from_tag="v0.9.0",
                          from_src="/o/releases/v0.9.0/cara", backup_path="/b/backup.tar.gz")
    assert result["outcome"] == "failed" and result["failed_check"] == "ready"
    calls = names(ops)
    assert calls[:6] == ["stop", "switch:present", "restore", "close", "start", "gate"]
    assert calls[6:] == ["stop", "switch:present", "close", "start"] and ops.calls[7][4] == "v0.9.0"
    assert result["recovered"] == {"to": "v0.9.0", "started": True}


def test_a_second_window_is_refused_while_one_runs(tmp_path):
    first = _window.Record(str(tmp_path))
    first.acquire()
    try:
        first.write({"action": "upgrade", "tag": "v0.9.0", "run_id": "run-1", "pid": 42, "state": "running",
                     "phase": "gate", "started_at": 0})
        assert _window.Record(str(tmp_path)).running()
        with pytest.raises(_window.WindowError) as info:
            _window.Record(str(tmp_path)).acquire()
        assert info.value.cause == "window_running" and "run run-1, pid 42" in info.value.message
        still, _waited = _window.Record(str(tmp_path)).wait(0.3, interval=0.05)
        assert still
    finally:
        first.release()
    assert not _window.Record(str(tmp_path)).running()
    assert _window.Record(str(tmp_path)).wait(5) == (False, 0.0)


def test_a_finished_window_is_acknowledged_once(tmp_path):
    record = _window.Record(str(tmp_path))
    record.write({"state": "done", "outcome": "upgraded"})
    assert record.acknowledge("run-2")[0] and record.read()["acknowledged_by"] == "run-2"
    assert not record.acknowledge("run-3")[0]


def test_a_planted_record_symlink_is_refused(tmp_path):
    os.symlink("/etc/passwd", tmp_path / "window.json")
    with pytest.raises(_window.WindowError):
        _window.Record(str(tmp_path)).read()


def _whoami():
    return {"uid": os.geteuid(), "home": os.environ.get("HOME")}


def _refuse():
    raise FleetError("wrong_user", "nope")


def test_call_as_runs_the_step_as_the_state_user():
    """(The suite runs as root, as CI does: dropping to another user needs it.)"""
    nobody = pwd.getpwnam("nobody")
    assert _as_user.call_as("nobody", _whoami) == {"uid": nobody.pw_uid, "home": nobody.pw_dir}
    assert _as_user.call_as("", _whoami)["uid"] == os.geteuid()
    with pytest.raises(_as_user.AsUserError) as info:
        _as_user.call_as("nobody", _refuse)
    assert (info.value.cause, info.value.message) == ("wrong_user", "nope")
    with pytest.raises(_as_user.AsUserError) as info:
        _as_user.call_as("nobody", json.loads, "{")
    assert info.value.cause == "internal" and "JSONDecodeError" in info.value.message
