"""roles/cara_service/files/cara-start-guard.py: run before every start of cara (unit ExecStartPre, service script).

cara resumes an open update transaction by itself at start (cara-contract 3.6; v0.8.0 downloads and applies it):
the guard makes a carapace.fleet transaction that cara would resume terminal first, and leaves cara's own alone.
"""
import json
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

GUARD = Path(__file__).resolve().parents[2] / "roles" / "cara_service" / "files" / "cara-start-guard.py"


@pytest.fixture(name="guard")
def guard_fixture():
    """The guard as the unit and the service script run it: `<python> cara-start-guard.py <state dir>`."""
    return GUARD


def tx(**kw):
    base = {"id": "0b6d1c52-3f0e-4a6e-9f7e-2f1c0d9a8b7c", "version": "0.9.0", "assetName": "cara-x86_64-linux",
            "state": "in_progress", "attempt": 1, "maxAttempts": 3, "startedAtMs": 1, "updatedAtMs": 2,
            "stagedPath": None, "bundlePath": None, "sha256": None, "lastError": None, "phase": "verified",
            "retryable": True, "fleet": {"run_id": "r1", "history": [{"event": "created"}]}}
    base.update(kw)
    return base


def run(guard, state):
    proc = subprocess.run([sys.executable, str(guard), str(state)], capture_output=True, text=True, check=False)
    return proc.returncode, proc.stderr


def write(state, data):
    (state / "updates").mkdir(parents=True, exist_ok=True)
    path = state / "updates" / "transaction.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


@pytest.mark.parametrize("before", [
    tx(),  # in progress (a reboot between stage and stop)
    tx(phase="applying"),  # the service was stopped, the host rebooted mid-window
    tx(state="failed", phase="failed", retryable=True, attempt=2, lastError="network"),  # retryable, attempts left
])
def test_a_fleet_transaction_cara_would_resume_is_made_terminal(guard, tmp_path, before):
    path = write(tmp_path, before)
    rc, err = run(guard, tmp_path)
    after = json.loads(path.read_text())
    assert rc == 0 and "marked failed, not retryable" in err
    assert after["state"] == "failed" and after["phase"] == "failed" and after["retryable"] is False
    assert "start guard" in after["lastError"] and "Re-run the upgrade playbook" in after["lastError"]
    assert after["fleet"]["run_id"] == "r1" and after["fleet"]["history"][-1]["by"] == "start_guard"
    assert after["fleet"]["start_guard"]["was"] == {"state": before["state"], "phase": before["phase"]}
    assert {k: after[k] for k in ("id", "version", "assetName", "attempt")} == \
        {k: before[k] for k in ("id", "version", "assetName", "attempt")}
    assert (path.stat().st_mode & 0o777) == 0o600
    # a second start finds it terminal and changes nothing
    text = path.read_text()
    assert run(guard, tmp_path)[0] == 0 and path.read_text() == text


@pytest.mark.parametrize("before", [
    tx(state="applied", phase="applied", retryable=False),  # ours, terminal: the start after the switch
    tx(state="failed", phase="failed", retryable=False),  # ours, terminal
    tx(state="failed", phase="failed", retryable=True, attempt=3),  # budget spent: cara resumes nothing
    {k: v for k, v in tx().items() if k != "fleet"},  # cara's own `cara update`: cara's business
])
def test_other_transactions_are_left_alone(guard, tmp_path, before):
    path = write(tmp_path, before)
    text = path.read_text()
    assert run(guard, tmp_path) == (0, "") and path.read_text() == text


def test_no_transaction_corrupt_or_symlinked(guard, tmp_path):
    assert run(guard, tmp_path) == (0, "")
    path = write(tmp_path, tx())
    path.write_text("{not json")
    assert run(guard, tmp_path) == (0, "") and path.read_text() == "{not json"
    target = tmp_path / "elsewhere.json"
    target.write_text(json.dumps(tx()))
    path.unlink()
    path.symlink_to(target)
    rc, err = run(guard, tmp_path)  # fail closed: not followed, and cara is not started
    assert rc == 1 and "cannot read" in err and json.loads(target.read_text())["state"] == "in_progress"


def test_refuses_the_start_when_it_cannot_make_it_terminal(guard, tmp_path):
    """A write that fails (here: no file may grow, RLIMIT_FSIZE 0) leaves it open, so cara must not start."""
    path = write(tmp_path, tx())

    def no_writes():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a killed process
        resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))
    proc = subprocess.run([sys.executable, str(guard), str(tmp_path)], capture_output=True, text=True, check=False,
                          preexec_fn=no_writes)  # pylint: disable=subprocess-popen-preexec-fn
    assert proc.returncode == 1 and "not starting cara" in proc.stderr
    assert json.loads(path.read_text())["state"] == "in_progress"
