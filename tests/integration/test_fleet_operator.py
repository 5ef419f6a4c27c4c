"""The operator's path (issue 13), through ansible-playbook as an operator runs it: a rollback never leaves a host
down, each fault between the stop and the start of an upgrade ends on the previous release, reports and exit codes
agree, each kind of run reports into its own place, the lock never outlives a run."""

import contextlib
import fcntl
import json
import os
import threading
import time

import pytest


HOST = "cara-01"


def tx_of(fleet, host=HOST):
    path = os.path.join(fleet.hostvars()[host]["cara_state_dir"], "updates", "transaction.json")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def switch_record(fleet, host=HOST):
    """<install_root>/state.json (cara_switch's record), or None on a host that was never switched by the roles."""
    path = os.path.join(fleet.hostvars()[host]["cara_install_root"], "state.json")
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def assert_lock_released(fleet):
    assert not os.path.exists(os.path.join(fleet.base, "run.lock")), "the run left its lock behind"


def assert_runs(fleet, tag, host=HOST):
    """The host serves `tag` from the untouched bytes of that release."""
    assert fleet.health(host)["version"] == tag.lstrip("v")
    assert fleet.active(host) == tag
    assert fleet.release_intact(host, tag)


def _evidence_count(hv):
    return len([n for n in os.listdir(hv["cara_backup_dir"]) if n.startswith("evidence-")])


@contextlib.contextmanager
def update_lock_held(fleet, trigger, host=HOST):
    """From the moment trigger() is true until the run has kept its evidence, hold cara's update lock
    (updates/update.lock.lock) as a concurrent `cara update` would: the next transaction write of the run fails."""
    hv = fleet.hostvars()[host]
    evidence_before = _evidence_count(hv)
    done, held = threading.Event(), []

    def hold():
        while not done.is_set() and not trigger():
            time.sleep(0.01)
        if done.is_set():
            return
        fd = os.open(os.path.join(hv["cara_state_dir"], "updates", "update.lock.lock"), os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        held.append(True)
        try:
            while not done.is_set() and _evidence_count(hv) == evidence_before:
                time.sleep(0.01)
        finally:
            os.close(fd)
    thread = threading.Thread(target=hold)
    thread.start()
    try:
        yield held
    finally:
        done.set()
        thread.join()


def _file_bytes(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def inject(fleet, fault, target, host=HOST):
    """Run the upgrade to `target` with `fault` between the stop and the start; returns (rc, out)."""
    hv = fleet.hostvars()[host]
    if fault == "backup":  # retention 0: cara_backup refuses after the service was stopped
        return fleet.playbook("upgrade", cara_upgrade_version=target, cara_upgrade_backup_retention=0)
    if fault == "switch":  # <install_root>/releases/<target> cannot be created: a file is in its way
        blocker = os.path.join(hv["cara_install_root"], "releases", target)
        with open(blocker, "w", encoding="utf-8") as f:
            f.write("not a directory\n")
        try:
            return fleet.playbook("upgrade", cara_upgrade_version=target)
        finally:
            os.unlink(blocker)
    if fault == "start":  # the new release does not start: its start is refused (the guard stands in for a crash)
        return _with_start_refused(fleet, hv, target)
    # applying: from the backup on (the window's phase before it), cara's update lock is held, as a concurrent
    # `cara update` would hold it: the `applying` write fails
    with update_lock_held(fleet, lambda: (fleet.window(host) or {}).get("phase") == "backup", host) as held:
        rc, out = fleet.playbook("upgrade", cara_upgrade_version=target)
    assert held, "the fault was never injected"
    return rc, out


FAULT_GUARD = """import os, runpy, sys
if os.path.realpath(%(bin)r).startswith(%(release)r):
    sys.stderr.write("test fault: the start of %(target)s is refused\\n")
    sys.exit(1)
sys.argv[0] = %(real)r
runpy.run_path(%(real)r, run_name="__main__")
"""


def _with_start_refused(fleet, hv, target):
    """The start of `target` fails (its start guard is swapped, once the window has begun, for one that refuses
    that release and runs the real guard for any other); the previous release starts."""
    guard = os.path.join(hv["cara_run_dir"], "cara-start-guard.py")
    real = guard + ".real"
    release = os.path.join(os.path.realpath(hv["cara_install_root"]), "releases", target) + os.sep
    done, swapped = threading.Event(), []

    def swap():
        while not done.is_set():
            if (fleet.window(HOST) or {}).get("phase") == "backup":
                os.replace(guard, real)
                with open(guard, "w", encoding="utf-8") as f:
                    f.write(FAULT_GUARD % {"bin": hv["cara_bin_path"], "release": release, "target": target, "real": real})
                swapped.append(True)
                return
            time.sleep(0.005)
    thread = threading.Thread(target=swap)
    thread.start()
    try:
        rc, out = fleet.playbook("upgrade", cara_upgrade_version=target)
    finally:
        done.set()
        thread.join()
        if swapped:
            os.replace(real, guard)
    assert swapped, "the fault was never injected"
    assert "test fault: the start of %s is refused" % target in out, out[-3000:]
    return rc, out


FAULTS = ["backup", "applying", "switch", "start"]


@pytest.mark.parametrize("record", [False, True], ids=["no-switch-record", "switch-record"])
def test_every_fault_between_stop_and_start_ends_on_the_previous_release(make_fleet, record):
    """Issue 13 item 2: backup, `applying`, switch, the start, each fault-injected; each run fails (rc 2, the report
    says so), and the host runs its previous release again, from its own bytes, with no open transaction."""
    fleet = make_fleet()
    previous, target = "v0.8.0", "v0.9.0"
    if record:
        rc, out = fleet.playbook("upgrade", cara_upgrade_version="v0.9.0")
        assert rc == 0, out[-3000:]
        previous, target = "v0.9.0", "v0.9.1"
        assert switch_record(fleet)["active"]["tag"] == "v0.9.0"
    for fault in FAULTS:
        if not record and fault != "start":
            assert switch_record(fleet) is None  # fleetctl installed the host: no switch record until the first switch
        rc, out = inject(fleet, fault, target)
        assert rc == 2, "%s: %s" % (fault, out[-3000:])
        assert_runs(fleet, previous)
        report = fleet.report(kind="upgrade")
        row = report["hosts"][0]
        assert row["result"] == "rolled_back" and report["summary"]["ok"] is False, (fault, row)
        tx = tx_of(fleet)
        assert tx["state"] == "failed" and tx["retryable"] is False and "rolled back to %s" % previous in tx["lastError"]
        assert_lock_released(fleet)
    if record:
        assert switch_record(fleet)["active"]["tag"] == "v0.9.0"
    fleet.assert_starts_terminal()


def test_rollback_without_a_switch_record_refuses_before_the_stop_then_rolls_back_to_a_named_release(make_fleet):
    """Issue 13 items 1, 2, 6: a host installed by hand (no state.json) on v0.9.0. The rollback refuses before it
    stops anything, and says so in the report and the exit code; named, it fetches v0.8.0 and rolls back."""
    fleet = make_fleet(install="v0.9.0")
    starts = len(fleet.starts(HOST))
    rc, out = fleet.playbook("rollback")
    assert rc == 2
    assert "no previous release is recorded" in out and "cara_rollback_to" in out
    assert len(fleet.starts(HOST)) == starts  # never stopped, never restarted
    assert_runs(fleet, "v0.9.0")
    report = fleet.report(kind="rollback")
    assert report["hosts"][0]["result"] == "refused" and report["summary"]["ok"] is False
    assert_lock_released(fleet)

    # no backup was ever taken from v0.8.0 on this host: refused too, before the stop
    rc, out = fleet.playbook("rollback", cara_rollback_to="v0.8.0")
    assert rc == 2
    assert len(fleet.starts(HOST)) == starts
    assert fleet.report(kind="rollback")["hosts"][0]["result"] == "refused"

    # a release that cannot be fetched and verified: refused before the stop as well
    rc, out = fleet.playbook("rollback", cara_rollback_to="v0.6.9", cara_rollback_restore=False)
    assert rc == 2 and "v0.6.9" in out
    assert len(fleet.starts(HOST)) == starts
    assert fleet.report(kind="rollback")["hosts"][0]["result"] == "refused"
    assert_runs(fleet, "v0.9.0")

    rc, out = fleet.playbook("rollback", cara_rollback_to="v0.8.0", cara_rollback_restore=False)
    assert rc == 0, out[-3000:]
    assert_runs(fleet, "v0.8.0")
    report = fleet.report(kind="rollback")
    assert report["hosts"][0]["result"] == "rolled_back" and report["summary"]["ok"] is True
    assert switch_record(fleet)["active"]["tag"] == "v0.8.0"
    fleet.assert_starts_terminal()


def test_a_failing_rollback_brings_the_host_back_up_on_what_it_ran(make_fleet):
    """Issue 13 item 1: the rollback fails after the stop (its target's gate cannot pass): the host comes back up on
    v0.9.0, the release it was running, the transaction is not left open, the run fails and the report says so."""
    fleet = make_fleet()
    rc, out = fleet.playbook("upgrade", cara_upgrade_version="v0.9.0")
    assert rc == 0, out[-3000:]
    # the LLM provider answers every chat with 500: `cara verify --outcome auto` after the rollback cannot pass
    fleet.llm.set_faults(fail=True)
    try:
        rc, out = fleet.playbook("rollback", cara_rollback_health_timeout=20, cara_rollback_verify_timeout=10)
    finally:
        fleet.llm.set_faults(fail=False)
    assert rc == 2
    assert "was brought back up on v0.9.0" in out, out[-3000:]
    assert_runs(fleet, "v0.9.0")
    report = fleet.report(kind="rollback")
    assert report["hosts"][0]["result"] == "failed" and report["summary"]["ok"] is False
    assert_lock_released(fleet)
    fleet.assert_starts_terminal()


def test_rollbacks_keep_the_history_the_next_rollback_needs(make_fleet):
    """Issue 13 items 2, 3: v0.8.0 -> v0.9.0 -> v0.9.1 (fails its gate, rolled back to v0.9.0); the next rollback
    still knows v0.8.0; then a named rollback with a switch record."""
    fleet = make_fleet()
    rc, out = fleet.playbook("upgrade", cara_upgrade_version="v0.9.0")
    assert rc == 0, out[-3000:]
    rc, out = fleet.playbook("upgrade", cara_upgrade_version="v0.9.1", cara_upgrade_health_timeout=15)
    assert rc == 2
    assert_runs(fleet, "v0.9.0")
    record = switch_record(fleet)
    assert [r["tag"] for r in record["history"]] == ["v0.8.0"] and record["rolledBackFrom"]["tag"] == "v0.9.1"

    rc, out = fleet.playbook("rollback")
    assert rc == 0, out[-3000:]
    assert_runs(fleet, "v0.8.0")
    row = fleet.report(kind="rollback")["hosts"][0]
    assert row["to"] == "v0.8.0" and row["result"] == "rolled_back"
    assert fleet.report(kind="upgrade")["hosts"][0]["result"] == "rolled_back"  # the upgrade's report is still there

    rc, out = fleet.playbook("rollback", cara_rollback_to="v0.9.0")
    assert rc == 0, out[-3000:]
    assert_runs(fleet, "v0.9.0")
    fleet.assert_starts_terminal()


def test_reports_and_exit_codes_agree(make_fleet):
    """Issue 13 items 6, 7, 12: check mode (a dry run, never the latest report), refusals, a failed plan, an
    interrupted run; each kind in its own place, one directory per run, a latest link; no lock left behind."""
    fleet = make_fleet(hosts=2)
    base = fleet.report_dir

    rc, out = fleet.playbook("upgrade", "--check", cara_upgrade_version="v0.9.0")
    assert rc == 0, out[-3000:]
    assert not os.path.exists(os.path.join(base, "upgrade", "latest"))  # a dry run is never the latest report
    (dry_run_id,) = os.listdir(os.path.join(base, "upgrade"))
    with open(os.path.join(base, "upgrade", dry_run_id, "report.json"), encoding="utf-8") as f:
        dry = json.load(f)
    assert dry["run"]["dry_run"] is True and dry["summary"]["ok"] is True
    assert [h["result"] for h in dry["hosts"]] == ["pending", "pending"]
    with open(os.path.join(base, "upgrade", dry_run_id, "report.md"), encoding="utf-8") as f:
        assert "DRY RUN" in f.read()

    rc, out = fleet.playbook("upgrade", cara_upgrade_version="v0.9.0")
    assert rc == 0, out[-3000:]
    real = fleet.report(kind="upgrade")
    assert real["summary"]["ok"] is True and not real["run"].get("dry_run")
    rc, out = fleet.playbook("upgrade", "--check", cara_upgrade_version="v0.9.0")
    assert rc == 0, out[-3000:]
    assert fleet.report(kind="upgrade")["run"]["id"] == real["run"]["id"]  # the dry run did not replace it
    assert fleet.report()["run"]["id"] == real["run"]["id"]

    # a downgrade is refused on every host: rc 2, and the report lists the refused hosts
    rc, out = fleet.playbook("upgrade", cara_upgrade_version="v0.7.0")
    assert rc == 2
    report = fleet.report(kind="upgrade")
    assert [h["result"] for h in report["hosts"]] == ["refused", "refused"] and report["summary"]["ok"] is False
    assert all("downgrade" in h["details"]["error"] for h in report["hosts"])
    with open(os.path.join(base, "upgrade", "latest", "report.md"), encoding="utf-8") as f:
        assert "NEEDS ATTENTION" in f.read()
    assert_lock_released(fleet)

    # the plan phase fails (incomplete release notes): a report all the same
    notes = fleet.server.url + "/puremachinery/carapace/docs/releases-incomplete/v0.9.1.md"
    rc, out = fleet.playbook("upgrade", cara_upgrade_version="v0.9.1", cara_upgrade_release_notes=notes)
    assert rc == 2
    report = fleet.report(kind="upgrade")
    assert report["summary"]["refused"] == 2 and report["summary"]["ok"] is False
    assert all(h["phase"] == "plan" for h in report["hosts"])
    assert_lock_released(fleet)

    # a run whose controller is killed after the stop: the report says the host may be down, not just pending (the
    # window goes on without it, see test_fleet_kill_points)
    fleet.kill_run("upgrade", HOST, when=lambda: (fleet.window(HOST) or {}).get("phase") == "backup",
                   cara_upgrade_version="v0.9.1")
    report = fleet.report(kind="upgrade")
    rows = {h["host"]: h for h in report["hosts"]}
    assert rows[HOST]["result"] == "in_progress" and report["summary"]["ok"] is False
    with open(os.path.join(base, "upgrade", "latest", "report.md"), encoding="utf-8") as f:
        assert "may be down" in f.read()

    # four real upgrade runs and two dry runs, each in its own directory; the rollback's report apart
    runs = [n for n in os.listdir(os.path.join(base, "upgrade")) if n != "latest"]
    assert len(runs) == 6
    rc, out = fleet.playbook("rollback", "-l", "cara-02")
    assert rc == 0, out[-3000:]
    assert fleet.report(kind="rollback")["hosts"][0]["host"] == "cara-02"
    assert fleet.report(kind="upgrade")["run"]["id"] != fleet.report(kind="rollback")["run"]["id"]
    assert_lock_released(fleet)
