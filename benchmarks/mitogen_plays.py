"""Does mitogen (its mitogen_linear strategy) work with every play of this collection? (issue 16: recommend it
only if it does.)

On one local host (v0.8.0), with strategy mitogen_linear: the upgrade playbook to v0.9.0, the rollback playbook,
the rollback drill (v0.9.1, its gate fails and the window rolls back), verify_release, and an upgrade whose
controller is killed inside the window (the window must end on the host by itself, as with the linear strategy).
Each play's outcome is saved as a figure (pass/fail, with the reason).

    .venv/bin/python benchmarks/mitogen_plays.py      (after make bench-deps)
"""

import os
import signal
import time

import benchlib
from fleetrun import BenchFleet, Settings, timing_env

HOST = "cara-01"
PLAY_TIMEOUT = 300


def outcome(run, want_rc=0, want=None):
    ok = run.rc == want_rc and (want is None or want(run))
    return ok, "rc %s%s" % (run.rc, "" if ok else ": " + run.output[-600:].replace("\n", " | "))


def killed_window(fleet):
    """Kill ansible-playbook (mitogen) inside the window; does the window end by itself?"""
    config = fleet.settings.write_config(os.path.join(fleet.dir, "ansible.cfg"))
    with timing_env(os.path.join(fleet.dir, "timings-killed.jsonl"), config):
        proc = fleet.fleet.spawn_playbook("upgrade", **dict(fleet.settings.extra_vars(), cara_upgrade_version="v0.9.0"))
    while proc.poll() is None:
        record = fleet.window_record(HOST) or {}
        if record.get("state") == "running" and record.get("phase") == "backup":
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait(timeout=PLAY_TIMEOUT)
    deadline = time.monotonic() + 180
    while fleet.fleet.window_running(HOST) and time.monotonic() < deadline:
        time.sleep(0.1)
    record = fleet.window_record(HOST) or {}
    ok = record.get("state") == "done" and record.get("outcome") == "upgraded"
    return ok, "window after the kill: state %s, outcome %s, phase %s" % (
        record.get("state"), record.get("outcome"), record.get("phase"))


def main():
    benchlib.ensure_reaped()
    settings = Settings(forks=25, pipelining=True, strategy="mitogen_linear")
    results = benchlib.Results("M1", "mitogen_linear with every play of the collection")
    with BenchFleet("mitogen", 1, settings=settings) as fleet:
        checks = [
            # each play bounded (PLAY_TIMEOUT): a hang is a failure, not a stuck benchmark
            ("upgrade v0.8.0 -> v0.9.0", lambda: outcome(fleet.upgrade(timeout=PLAY_TIMEOUT))),
            ("rollback playbook", lambda: outcome(fleet.playbook("rollback", timeout=PLAY_TIMEOUT))),
            ("rollback drill, faulty v0.9.1", lambda: outcome(fleet.playbook(
                "rollback_drill", timeout=PLAY_TIMEOUT, cara_drill_version="v0.9.1", cara_upgrade_health_timeout=10))),
            ("verify_release v0.9.0", lambda: outcome(fleet.playbook("verify_release", timeout=PLAY_TIMEOUT,
                                                                     cara_verify_tag="v0.9.0"))),
            ("controller killed inside the window", lambda: killed_window(fleet)),
        ]
        for name, check in checks:
            try:
                ok, detail = check()
            except Exception as exc:  # pylint: disable=broad-exception-caught
                ok, detail = False, "%s: %s" % (type(exc).__name__, exc)
            results.figure(name, "pass" if ok else "FAIL", "", goal="works", met=ok, detail=detail)
    results.note("settings: " + settings.label())
    results.save()


if __name__ == "__main__":
    main()
