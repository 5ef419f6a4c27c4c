"""cara re-applies an open update transaction by itself at start (cara-contract 3.6, 10): released v0.8.0 downloads
the target from GitHub and copies it over its own running binary. Every path that starts cara must therefore find
the transaction terminal. These tests run against v0.8.0 hosts whose double CAN do that (its "GitHub" is the test
release server), and record the transaction each start found: if the collection ever starts cara on an open
transaction, the start log shows it and the v0.8.0 release on disk turns into v0.9.x bytes."""

import json
import os
import urllib.request

import pytest

from fleet import LocalFleet, state_files, task_ids
from playbook import run_module


@pytest.fixture
def fleet(tmp_path, releases):
    fleet = LocalFleet(tmp_path / "f", releases, hosts=1, install="v0.8.0")
    yield fleet
    fleet.stop()


HOST = "cara-01"


def tx_of(fleet):
    path = os.path.join(fleet.hostvars()[HOST]["cara_state_dir"], "updates", "transaction.json")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def assert_back_on_v080(fleet, before, guard_may_act=()):
    """Running 0.8.0 from its own, untouched bytes, with the state as it was - but for what the rollback's own gate
    adds (`cara verify` writes a chat session, usage and a task): every other file is byte-identical, and every
    task that was queued before is still there."""
    assert fleet.health(HOST)["version"] == "0.8.0"
    assert fleet.active(HOST) == "v0.8.0"
    assert fleet.release_intact(HOST, "v0.8.0"), "releases/v0.8.0/cara no longer holds v0.8.0's bytes"
    after = state_files(fleet.hostvars()[HOST])
    for rel, data in before.items():
        if not rel.startswith(("sessions", "tasks", "usage.json")):
            assert after.get(rel) == data, rel
    assert task_ids(before) <= task_ids(after)
    fleet.assert_starts_terminal(guard_may_act)


def add_task(fleet):
    """A change to the state made after a backup: one autonomy task, through the gateway (tasks/queue.json)."""
    hv = fleet.hostvars()[HOST]
    request = urllib.request.Request("http://127.0.0.1:%d/control/tasks" % hv["cara_port"], method="POST",
                                     data=json.dumps({"payload": {"kind": "agentTurn", "message": "after backup"}}).encode(),
                                     headers={"Authorization": "Bearer " + fleet.token(HOST),
                                              "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as resp:
        assert resp.status in (200, 201)


def test_a_failed_backup_restarts_v080_and_restores_nothing_older(fleet, tmp_path):
    hv = fleet.hostvars()[HOST]
    # An older backup of v0.8.0, then a change to the state after it.
    fleet.stop_daemons()
    rc, res, out = run_module(tmp_path, "carapace.fleet.cara_backup", {
        "bin_path": hv["cara_bin_path"], "state_dir": hv["cara_state_dir"], "config_path": hv["cara_config_path"],
        "backup_dir": hv["cara_backup_dir"]}, keep_going=False)
    assert rc == 0 and res["changed"], out[-3000:]
    fleet.start()
    add_task(fleet)
    before = state_files(hv)

    # retention 0 makes the backup step fail after the service was stopped
    rc, out = fleet.playbook("upgrade", cara_upgrade_version="v0.9.0", cara_upgrade_backup_retention=0)
    assert rc != 0
    row = fleet.report()["hosts"][0]
    assert row["result"] == "rolled_back" and "(backup: retention must be at least 1" in row["details"]["error"]
    tx = tx_of(fleet)
    assert tx["state"] == "failed" and tx["retryable"] is False
    assert "did not complete" in tx["lastError"] and "nothing was restored" in tx["lastError"]
    assert "no backup was restored" in out
    assert_back_on_v080(fleet, before)  # the older backup was NOT restored over the newer state


def test_a_failed_switch_rolls_back_to_v080_with_this_runs_backup(fleet):
    hv = fleet.hostvars()[HOST]
    before = state_files(hv)
    # /opt/carapace/releases/v0.9.0 cannot be created (a file is in its way): the switch fails after `applying`
    blocker = os.path.join(hv["cara_install_root"], "releases", "v0.9.0")
    with open(blocker, "w", encoding="utf-8") as f:
        f.write("not a directory\n")
    rc, _out = fleet.playbook("upgrade", cara_upgrade_version="v0.9.0")
    assert rc != 0
    row = fleet.report()["hosts"][0]
    assert row["result"] == "rolled_back" and row["backup"] and os.path.isfile(row["backup"])
    tx = tx_of(fleet)
    assert tx["state"] == "failed" and tx["retryable"] is False and tx["fleet"]["failed_phase"] == "applying"
    assert "rolled back to v0.8.0" in tx["lastError"]
    assert_back_on_v080(fleet, before)


def test_an_interrupted_upgrade_then_the_rollback_playbook(fleet):
    """v0.9.0, then an upgrade to v0.9.1 killed after `verified` (in progress), then rollback.yml to v0.8.0: the
    open transaction is closed before v0.8.0 starts, so v0.8.0 never applies v0.9.1 by itself."""
    hv = fleet.hostvars()[HOST]
    before = state_files(hv)
    rc, out = fleet.playbook("upgrade", cara_upgrade_version="v0.9.0")
    assert rc == 0, out[-3000:]
    assert fleet.kill_run_at("upgrade", "verified", cara_upgrade_version="v0.9.1") == "verified"
    assert tx_of(fleet)["state"] == "in_progress" and tx_of(fleet)["version"] == "0.9.1"
    rc, out = fleet.playbook("rollback")
    assert rc == 0, out[-3000:]
    tx = tx_of(fleet)
    assert tx["state"] == "failed" and tx["retryable"] is False and "rolled back to v0.8.0" in tx["lastError"]
    # v0.9.0's gate added tasks and a chat session; the v0.8.0 backup brought the state back to before
    assert_back_on_v080(fleet, before)


def test_a_reboot_between_stage_and_stop(fleet):
    """A run killed after `verified`, then the host restarts cara on its own (a reboot): the start guard makes
    the transaction terminal first; the next run then upgrades from scratch."""
    hv = fleet.hostvars()[HOST]
    before = state_files(hv)
    assert fleet.kill_run_at("upgrade", "verified", cara_upgrade_version="v0.9.0") == "verified"
    fleet.reboot(HOST)
    tx = tx_of(fleet)
    assert tx["state"] == "failed" and tx["retryable"] is False and "start guard" in tx["lastError"]
    assert tx["fleet"]["start_guard"]["was"] == {"state": "in_progress", "phase": "verified"}
    assert_back_on_v080(fleet, before, guard_may_act=[HOST])
    rc, out = fleet.playbook("upgrade", cara_upgrade_version="v0.9.0")
    assert rc == 0, out[-3000:]
    assert fleet.health(HOST)["version"] == "0.9.0" and fleet.report()["hosts"][0]["result"] == "upgraded"
    fleet.assert_starts_terminal(guard_may_act=[HOST])
