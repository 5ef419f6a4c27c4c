"""A run killed with -9 at every point of the downtime window, and of the rollback, is finished or rolled back by the
next run: the host ends healthy, on the new release or on its own old bytes, with nothing lost.

Each host of a fleet gets its own killed run (`--limit`), at its own point; then ONE ordinary run of the same command
sorts out every host at once. Points between tasks are hit from inside the run (the kill_at callback, after the named
task returned); points inside a task (the backup, the start, the gate) by watching what the task does. The fleet's
teardown checks every start of every host: always on a terminal transaction, and never thanks to the start guard.
"""

import json
import os

from fleet import state_files, task_ids

ASSET = "cara-x86_64-linux"


def starts_of(fleet, name, version):
    return sum(1 for entry in fleet.starts(name) if entry.get("version") == version)


def kept(fleet, name, before):
    """The state as it was (but for what the gates' own `cara verify` adds), in the shape v0.8.0 reads."""
    after = state_files(fleet.hostvars()[name])
    for rel, data in before.items():
        if not rel.startswith(("sessions", "tasks", "usage.json")):
            assert after.get(rel) == data, (name, rel)
    assert task_ids(before) <= task_ids(after), name
    queue = after.get(os.path.join("tasks", "queue.json"))
    assert queue is None or all(isinstance(t["attempts"], int) for t in json.loads(queue)), name


def test_every_kill_point_of_an_upgrade_is_finished_by_the_next_run(make_fleet):
    fleet = make_fleet(7)
    hosts = fleet.hostvars()
    before = {name: state_files(hv) for name, hv in hosts.items()}
    upgrade = {"cara_upgrade_version": "v0.9.0"}

    def backup_started(name):
        return lambda: bool(os.listdir(hosts[name]["cara_backup_dir"]))

    def started(name, version):
        seen = starts_of(fleet, name, version)
        return lambda: starts_of(fleet, name, version) > seen

    def model_called():
        seen = fleet.llm.chat_requests
        return lambda: fleet.llm.chat_requests > seen

    points = {  # host: the kill point
        "cara-01": {"after_task": "Stop cara (service script)"},
        "cara-02": {"when": backup_started("cara-02")},  # inside the backup
        "cara-03": {"after_task": "Record the backup in the transaction and mark applying"},
        "cara-04": {"after_task": "Install the release and switch the active binary atomically"},
        "cara-05": {"after_task": "Mark applied"},
        "cara-06": {"when": started("cara-06", "0.9.0")},  # inside the start: the new release is coming up
        "cara-07": {"when": model_called()},  # inside the gate: its `cara verify --outcome auto`
    }
    for name, point in points.items():
        fleet.kill_run("upgrade", name, **point, **upgrade)
        tx = json.load(open(os.path.join(hosts[name]["cara_state_dir"], "updates", "transaction.json"),
                            encoding="utf-8"))
        assert tx["state"] in ("in_progress", "applied"), (name, tx)

    rc, out = fleet.playbook("upgrade", **upgrade)
    assert rc == 0, out[-4000:]
    rows = {row["host"]: row for row in fleet.report()["hosts"]}
    for name, hv in hosts.items():
        assert rows[name]["result"] == "upgraded", (name, rows[name])
        assert fleet.active(name) == "v0.9.0" and fleet.health(name)["version"] == "0.9.0", name
        assert fleet.release_intact(name, "v0.8.0") and fleet.release_intact(name, "v0.9.0"), name
        assert not os.path.exists(os.path.join(hv["cara_state_dir"], "updates", "transaction.json")), name
        kept(fleet, name, before[name])


def test_every_kill_point_of_a_rollback_is_finished_by_the_next_run(make_fleet):
    """The faulty v0.9.1 fails its gate and is rolled back; each run is killed inside that rollback: after its
    stop, after the switch back, after the restore, and while v0.8.0 starts again."""
    fleet = make_fleet(4)
    hosts = fleet.hostvars()
    before = {name: state_files(hv) for name, hv in hosts.items()}
    faulty = {"cara_upgrade_version": "v0.9.1", "cara_upgrade_health_timeout": 8}

    def restarting(name):
        seen = starts_of(fleet, name, "0.8.0")
        return lambda: starts_of(fleet, name, "0.9.1") > 0 and starts_of(fleet, name, "0.8.0") > seen

    points = {
        "cara-01": {"after_task": "Stop cara (service script)#2"},  # the rollback's stop (the upgrade's was #1)
        "cara-02": {"after_task": "Switch back to the recorded previous release"},
        "cara-03": {"after_task": "Restore the backup"},
        "cara-04": {"when": restarting("cara-04")},
    }
    for name, point in points.items():
        fleet.kill_run("upgrade", name, **point, **faulty)
        tx = json.load(open(os.path.join(hosts[name]["cara_state_dir"], "updates", "transaction.json"),
                            encoding="utf-8"))
        assert (tx["state"], tx["retryable"], tx["fleet"]["rollback"]["state"]) == ("failed", False, "pending"), tx

    rc, out = fleet.playbook("upgrade", **faulty)
    assert rc != 0  # the hosts were rolled back, not upgraded: the run says so
    rows = {row["host"]: row for row in fleet.report()["hosts"]}
    for name, hv in hosts.items():
        assert rows[name]["result"] == "rolled_back", (name, rows[name])
        assert fleet.active(name) == "v0.8.0" and fleet.health(name)["version"] == "0.8.0", name
        assert fleet.release_intact(name, "v0.8.0"), name
        tx = json.load(open(os.path.join(hv["cara_state_dir"], "updates", "transaction.json"), encoding="utf-8"))
        assert (tx["state"], tx["retryable"], tx["fleet"]["rollback"]["state"]) == ("failed", False, "done"), tx
        assert "rolled back to v0.8.0" in tx["lastError"] and "finished by run" in tx["lastError"]
        kept(fleet, name, before[name])  # v0.9.1 had migrated the queue: the restore brought the old one back
    assert out.count("this run finished it") >= len(hosts) and "re-run to try it again" in out
