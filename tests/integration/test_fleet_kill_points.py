"""The controller killed (-9, its whole process group) at every phase of the downtime window, and of the window's
own rollback: the window, running on the host (cara_apply, async), ends by itself - healthy on the new release, or
rolled back with its state restored - and the next run reports each host as it ended.

Each host of a fleet gets its own killed run (`--limit`), at its own phase, seen in the host's window record. The
fleet's teardown checks every start of every host: always on a terminal transaction, and never thanks to the start
guard. The host-side crash (the window killed too) is test_fleet_roles' test_killed_run_resumes.
"""

import json
import os

from fleet import state_files, task_ids

UPGRADE_PHASES = ("stop", "backup", "applying", "switch", "applied", "start", "gate")
ROLLBACK_PHASES = ("rollback_stop", "rollback_switch", "rollback_restore", "rollback_start")
ROLLBACK_WINDOW = ("stop", "switch", "restore", "close", "start", "verify")
ROLLBACK_ORDER = ("rollback_stop", "rollback_switch", "rollback_restore", "rollback_close", "rollback_start",
                  "rollback_verify")


def kept(fleet, name, before):
    """The state as it was (but for what the gates' own `cara verify` adds), in the shape v0.8.0 reads."""
    after = state_files(fleet.hostvars()[name])
    for rel, data in before.items():
        if not rel.startswith(("sessions", "tasks", "usage.json")):
            assert after.get(rel) == data, (name, rel)
    assert task_ids(before) <= task_ids(after), name
    queue = after.get(os.path.join("tasks", "queue.json"))
    assert queue is None or all(isinstance(t["attempts"], int) for t in json.loads(queue)), name


def at_phase(fleet, name, phase, phases, landed):
    """The window runs, in `phase` or past it. The kill lands in `phase`, or for the phases that last milliseconds
    (the transaction writes, the switch) possibly a phase later: always inside the running window. `landed` gets
    the phase the record showed at the kill."""
    def reached():
        record = fleet.window(name) or {}
        if record.get("state") == "running" and record.get("phase") in phases and \
                phases.index(record["phase"]) >= phases.index(phase):
            landed[name] = record["phase"]
            return True
        return False
    return reached


def tx_of(hv):
    path = os.path.join(hv["cara_state_dir"], "updates", "transaction.json")
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def test_the_controller_killed_in_every_phase_of_the_window(make_fleet):
    fleet = make_fleet(len(UPGRADE_PHASES))
    hosts = fleet.hostvars()
    names = sorted(hosts)
    before = {name: state_files(hv) for name, hv in hosts.items()}
    upgrade = {"cara_upgrade_version": "v0.9.0"}
    landed = {}
    for name, phase in zip(names, UPGRADE_PHASES):
        fleet.kill_run("upgrade", name, when=at_phase(fleet, name, phase, UPGRADE_PHASES, landed), poll=0.002,
                       **upgrade)
        assert landed[name] in UPGRADE_PHASES[UPGRADE_PHASES.index(phase):], (name, phase, landed)
    # the slow phases are hit exactly: the stop, the backup, the start, the gate
    assert [landed[n] for n, p in zip(names, UPGRADE_PHASES) if p in ("stop", "backup", "start", "gate")] == [
        "stop", "backup", "start", "gate"], landed
    # no controller: every window ends by itself, the host up on v0.9.0 (the last one is still in its gate when the
    # next run starts, which waits for it)
    fleet.wait_windows(names[:-1])
    for name, phase in zip(names[:-1], UPGRADE_PHASES):
        record = fleet.window(name)
        assert (record["state"], record["outcome"]) == ("done", "upgraded"), (phase, record)
        assert phase in [p["phase"] for p in record["phases"]], (phase, record["phases"])
        assert fleet.health(name)["version"] == "0.9.0" and tx_of(hosts[name]) is None, (name, phase)

    rc, out = fleet.playbook("upgrade", **upgrade)
    assert rc == 0, out[-4000:]
    rows = {row["host"]: row for row in fleet.report()["hosts"]}
    for name, hv in hosts.items():
        row = rows[name]
        assert row["result"] == "upgraded" and row["from"] == "v0.8.0", (name, row)
        assert "ended on the host after its controller was lost: upgraded" in row["details"]["error"], (name, row)
        assert row["downtime_s"] is not None and row["details"]["phases"], row
        assert fleet.active(name) == "v0.9.0" and fleet.health(name)["version"] == "0.9.0", name
        assert fleet.release_intact(name, "v0.8.0") and fleet.release_intact(name, "v0.9.0"), name
        assert tx_of(hv) is None, name
        assert fleet.window(name)["acknowledged_by"] == fleet.report()["run"]["id"], name
        kept(fleet, name, before[name])
    # reported once: the run after it finds nothing to do
    rc, out = fleet.playbook("upgrade", **upgrade)
    assert rc == 0 and all(row["result"] == "unchanged" for row in fleet.report()["hosts"]), out[-3000:]


def test_the_controller_killed_in_every_phase_of_the_windows_rollback(make_fleet):
    """The faulty v0.9.1 fails its gate and the window rolls back; the controller dies inside that rollback."""
    fleet = make_fleet(len(ROLLBACK_PHASES))
    hosts = fleet.hostvars()
    names = sorted(hosts)
    before = {name: state_files(hv) for name, hv in hosts.items()}
    faulty = {"cara_upgrade_version": "v0.9.1", "cara_upgrade_health_timeout": 8}
    landed = {}
    for name, phase in zip(names, ROLLBACK_PHASES):
        fleet.kill_run("upgrade", name, when=at_phase(fleet, name, phase, ROLLBACK_ORDER, landed), poll=0.002,
                       **faulty)
        assert landed[name] in ROLLBACK_ORDER[ROLLBACK_ORDER.index(phase):], (name, phase, landed)
    fleet.wait_windows()
    for name, phase in zip(names, ROLLBACK_PHASES):
        record = fleet.window(name)
        assert (record["state"], record["outcome"]) == ("done", "rolled_back"), (phase, record)
        assert fleet.health(name)["version"] == "0.8.0", (name, phase)
        tx = tx_of(hosts[name])
        assert (tx["state"], tx["retryable"], tx["fleet"]["rollback"]["state"]) == ("failed", False, "done"), tx
        assert "rolled back to v0.8.0" in tx["lastError"], tx

    rc, out = fleet.playbook("upgrade", **faulty)
    assert rc != 0  # the hosts were rolled back, not upgraded: the run says so
    rows = {row["host"]: row for row in fleet.report()["hosts"]}
    for name in names:
        assert rows[name]["result"] == "rolled_back", (name, rows[name])
        assert "controller was lost: rolled_back" in rows[name]["details"]["error"], rows[name]
        assert rows[name]["rto_s"] is not None, rows[name]
        assert fleet.active(name) == "v0.8.0" and fleet.release_intact(name, "v0.8.0"), name
        kept(fleet, name, before[name])  # v0.9.1 had migrated the queue: the restore brought the old one back
    # not retried in the run that reports it: only one start of v0.9.1 per host
    for name in names:
        assert sum(1 for s in fleet.starts(name) if s.get("version") == "0.9.1") == 1, name
    assert out.count("re-run to try it again") >= len(names)


def test_the_controller_killed_in_the_rollback_runbooks_window(make_fleet):
    """The rollback playbook's window (v0.9.0 back to v0.8.0) loses its controller in its restore: it ends by itself,
    and the next rollback run reports it instead of rolling back one release more."""
    fleet = make_fleet(1)
    rc, out = fleet.playbook("upgrade", cara_upgrade_version="v0.9.0")
    assert rc == 0, out[-3000:]
    landed = {}
    fleet.kill_run("rollback", "cara-01", when=at_phase(fleet, "cara-01", "restore", ROLLBACK_WINDOW, landed),
                   poll=0.002)
    fleet.wait_windows()
    record = fleet.window("cara-01")
    assert (record["action"], record["state"], record["outcome"]) == ("rollback", "done", "rolled_back"), record
    assert fleet.health("cara-01")["version"] == "0.8.0"
    starts = len(fleet.starts("cara-01"))
    rc, out = fleet.playbook("rollback")
    assert rc == 0, out[-3000:]
    assert "ended on the host after its controller was lost: rolled_back" in out
    row = fleet.report(kind="rollback")["hosts"][0]
    assert (row["result"], row["to"]) == ("rolled_back", "v0.8.0") and row["rto_s"] is not None, row
    assert len(fleet.starts("cara-01")) == starts and fleet.active("cara-01") == "v0.8.0"  # not run again
    assert fleet.window("cara-01")["acknowledged_by"]
