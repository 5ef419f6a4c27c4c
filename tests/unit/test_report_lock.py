"""The fleet report and the controller run lock (module_utils/_report.py, _lock.py)."""

import json
import os
import subprocess
import sys

import pytest

from ansible_collections.carapace.fleet.plugins.module_utils import _lock
from ansible_collections.carapace.fleet.plugins.module_utils._report import ROW_KEYS, Report

RUN = {"id": "run-1", "kind": "upgrade", "target": "v0.9.0", "started": "2026-11-24T06:00:00Z"}


def row(host, result="upgraded", **extra):
    base = {"host": host, "from": "v0.8.0", "to": "v0.9.0", "result": result, "phase": "applied", "downtime_s": 2.5,
            "rto_s": None, "sha256": "ab" * 32, "log_index": 7, "backup": "/var/backups/carapace/b.tar.gz"}
    base.update(extra)
    return base


def test_report_rows_summary_and_markdown(tmp_path):
    rep = Report(str(tmp_path))
    report, changed = rep.write(RUN, row=row("b"))
    assert changed is True
    report, changed = rep.write(RUN, rows=[row("a", "rolled_back", rto_s=12.25, error="gate failed: ready 503"),
                                           row("c", "unchanged", downtime_s=None)])
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk == report
    assert [h["host"] for h in report["hosts"]] == ["a", "b", "c"]
    assert set(report["hosts"][1]) == set(ROW_KEYS)
    assert report["hosts"][0]["details"] == {"error": "gate failed: ready 503"}
    assert report["summary"]["upgraded"] == 1 and report["summary"]["rolled_back"] == 1
    assert report["summary"]["max_rto_s"] == 12.25 and report["summary"]["ok"] is False
    md = (tmp_path / "report.md").read_text()
    assert "| a | v0.8.0 | v0.9.0 | rolled_back | applied | 2.5 | 12.2 | abababababab | 7 | b.tar.gz |" in md
    assert "gate failed: ready 503" in md and "NEEDS ATTENTION" in md
    # the same row again changes nothing
    assert rep.write(RUN, row=row("b"))[1] is False


def test_a_new_run_starts_a_fresh_report(tmp_path):
    rep = Report(str(tmp_path))
    rep.write(RUN, rows=[row("a"), row("b")])
    report, _changed = rep.write(dict(RUN, id="run-2"), row=row("c"))
    assert [h["host"] for h in report["hosts"]] == ["c"]
    assert report["summary"]["ok"] is True


def test_a_rollback_is_the_expected_outcome_of_a_drill(tmp_path):
    report, _changed = Report(str(tmp_path)).write(dict(RUN, kind="drill"), row=row("a", "rolled_back", rto_s=30.0))
    assert report["summary"]["ok"] is True
    report, _changed = Report(str(tmp_path)).write(dict(RUN, id="run-9", kind="drill"), row=row("a", "failed"))
    assert report["summary"]["ok"] is False


def test_bad_rows_are_refused(tmp_path):
    with pytest.raises(ValueError):
        Report(str(tmp_path)).write(RUN, row=row("a", "exploded"))
    with pytest.raises(ValueError):
        Report(str(tmp_path)).write(RUN, row={"result": "upgraded"})


def test_lock_acquire_release_and_contention(tmp_path):
    path = str(tmp_path / "fleet.lock")
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "ansible-playbook"])  # pylint: disable=consider-using-with
    try:
        assert _lock.acquire(path, "run-1", holder.pid)[0] is True
        assert _lock.acquire(path, "run-1", holder.pid)[0] is False  # same run: idempotent
        with pytest.raises(_lock.LockHeld, match="run run-1"):
            _lock.acquire(path, "run-2", 12345)
        assert _lock.release(path, "run-2") is False
        assert _lock.release(path, "run-1") is True
        assert _lock.read(path) is None
    finally:
        holder.kill()
        holder.wait()


def test_stale_lock_of_a_dead_run_is_taken_over(tmp_path):
    path = str(tmp_path / "fleet.lock")
    dead = subprocess.Popen([sys.executable, "-c", "pass", "ansible-playbook"])  # pylint: disable=consider-using-with
    dead.wait()
    _lock.acquire(path, "run-1", dead.pid)
    changed, previous, stale = _lock.acquire(path, "run-2", None)
    assert changed and stale and previous["run_id"] == "run-1"
    assert _lock.read(path)["run_id"] == "run-2"


def test_a_reused_pid_does_not_hold_the_lock(tmp_path):
    """The lock names its process by pid AND start time: the same pid with another start time is another process."""
    path = str(tmp_path / "fleet.lock")
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # pylint: disable=consider-using-with
    try:
        _lock.acquire(path, "run-1", other.pid)
        holder = _lock.read(path)
        assert holder["start_time"] is not None and holder["start_time"] == _lock.start_time(other.pid)
        with pytest.raises(_lock.LockHeld):
            _lock.acquire(path, "run-2", None)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(dict(holder, start_time=holder["start_time"] - 1), f)  # what a reused pid looks like
        assert _lock.acquire(path, "run-2", None)[2] is True
    finally:
        other.kill()
        other.wait()


def test_the_lock_names_the_topmost_ansible_process(tmp_path):
    """ansible-playbook -> worker fork (same command line) -> sh -> module: the lock names ansible-playbook, which
    lives as long as the run, not the worker, which ends with the task."""
    script = ("import os, subprocess, sys\n"
              "if sys.argv[1] == 'top':\n"
              "    r = subprocess.run([sys.executable, __file__, 'worker', 'ansible-playbook'], capture_output=True,\n"
              "                       text=True, check=True)\n"
              "    print(os.getpid(), r.stdout.strip())\n"
              "elif sys.argv[1] == 'worker':\n"
              "    subprocess.run(['/bin/sh', '-c', '%s %s module; true' % (sys.executable, __file__)], check=True)\n"
              "else:\n"
              "    from ansible_collections.carapace.fleet.plugins.module_utils import _lock\n"
              "    print(_lock.playbook_pid())\n")
    (tmp_path / "tree.py").write_text(script)
    out = subprocess.run([sys.executable, str(tmp_path / "tree.py"), "top", "ansible-playbook"], capture_output=True,
                         text=True, check=True, env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    top, found = out.stdout.split()
    assert found == top


def test_runs_of_each_kind_in_their_own_directory_with_latest_links(tmp_path):
    from ansible_collections.carapace.fleet.plugins.module_utils._report import link_latest, run_directory
    base = str(tmp_path)
    up = run_directory(base, RUN)
    assert up == os.path.join(base, "upgrade", "run-1")
    Report(up).write(RUN, row=row("a"))
    link_latest(base, up)
    back = run_directory(base, dict(RUN, id="run-2", kind="rollback"))
    Report(back).write(dict(RUN, id="run-2", kind="rollback"), row=row("a", "rolled_back"))
    link_latest(base, back)
    assert json.loads((tmp_path / "upgrade" / "latest" / "report.json").read_text())["run"]["id"] == "run-1"
    assert json.loads((tmp_path / "rollback" / "latest" / "report.json").read_text())["run"]["id"] == "run-2"
    assert json.loads((tmp_path / "report.json").read_text())["run"]["id"] == "run-2"
    with pytest.raises(ValueError):
        run_directory(base, dict(RUN, id=".."))


def test_a_dry_run_is_marked_and_pending_is_not_a_problem(tmp_path):
    report, _changed = Report(str(tmp_path)).write(dict(RUN, dry_run=True), rows=[row("a", "pending")])
    assert report["summary"]["ok"] is True and report["summary"]["dry_run"] is True
    md = (tmp_path / "report.md").read_text()
    assert "(DRY RUN)" in md and "DRY RUN (check mode): nothing was changed" in md


@pytest.mark.parametrize("result", ["refused", "in_progress"])
def test_refused_and_in_progress_need_attention(tmp_path, result):
    report, _changed = Report(str(tmp_path)).write(RUN, rows=[row("a", result), row("b", "pending")])
    assert report["summary"]["ok"] is False and report["summary"][result] == 1
    assert report["summary"]["incomplete"] is False and report["summary"]["outcome"] == "needs_attention"
    md = (tmp_path / "report.md").read_text()
    assert "- outcome: NEEDS ATTENTION\n" in md
    if result == "in_progress":
        assert "may be down" in md


def test_only_pending_hosts_left_is_an_incomplete_run(tmp_path):
    """A run that stopped before some hosts (a closed window, a stopped line) left them untouched: not OK (the exit
    code says so), but nothing needs repair either."""
    report, _changed = Report(str(tmp_path)).write(RUN, rows=[row("a", "pending"), row("b"), row("c", "pending")])
    assert report["summary"]["ok"] is False and report["summary"]["incomplete"] is True
    assert report["summary"]["outcome"] == "incomplete"
    md = (tmp_path / "report.md").read_text()
    assert "- outcome: INCOMPLETE: 2 hosts not reached (pending), untouched; run again to continue\n" in md
    # a rollback in an upgrade run is something to look at, pending hosts or not; in a drill it is the plan
    report, _changed = Report(str(tmp_path)).write(dict(RUN, id="run-2"), rows=[row("a", "pending"),
                                                                                row("b", "rolled_back")])
    assert report["summary"]["outcome"] == "needs_attention" and report["summary"]["incomplete"] is False
    report, _changed = Report(str(tmp_path)).write(dict(RUN, id="run-3", kind="drill"), rows=[
        row("a", "pending"), row("b", "rolled_back")])
    assert report["summary"]["outcome"] == "incomplete"
    assert "INCOMPLETE: 1 host not reached" in (tmp_path / "report.md").read_text()


def test_the_outcome_names_ok_and_dry_runs(tmp_path):
    report, _changed = Report(str(tmp_path)).write(RUN, rows=[row("a")])
    assert (report["summary"]["outcome"], report["summary"]["incomplete"]) == ("ok", False)
    report, _changed = Report(str(tmp_path)).write(dict(RUN, id="run-2", dry_run=True), rows=[row("a", "pending")])
    assert (report["summary"]["outcome"], report["summary"]["incomplete"]) == ("dry_run", False)
