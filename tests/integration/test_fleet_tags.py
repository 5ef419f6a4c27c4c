"""Tags cannot skip safety (issue 15): a runbook runs whole. A run whose --tags or --skip-tags name one of its steps
(the backup, the gate, the rollback, ...) is refused before anything is read, locked or changed; tags that name a
whole runbook select it."""

import os

import pytest

from fleet import state_files

HOST = "cara-01"


def _snapshot(fleet):
    """What a run could change on each host: its state, its active release, its daemon's starts, its backups."""
    return {name: (state_files(hv), fleet.active(name), len(fleet.starts(name)), sorted(os.listdir(hv["cara_backup_dir"])),
                   os.path.exists(os.path.join(hv["cara_run_dir"], "cara-service")))
            for name, hv in fleet.hostvars().items()}


@pytest.mark.parametrize("playbook,args,named,extra", [
    ("upgrade", ["--skip-tags", "backup"], "--skip-tags backup", {"cara_upgrade_version": "v0.9.0"}),
    ("upgrade", ["--tags", "gate"], "--tags gate", {"cara_upgrade_version": "v0.9.0"}),
    ("upgrade", ["--tags", "cara_upgrade,stage", "--skip-tags", "rollback"], "--tags stage and --skip-tags rollback",
     {"cara_upgrade_version": "v0.9.0"}),
    ("rollback", ["--skip-tags", "restore"], "--skip-tags restore", {"cara_rollback_to": "v0.8.0"}),
])
def test_tags_that_name_a_step_are_refused_and_touch_no_host(make_fleet, playbook, args, named, extra):
    fleet = make_fleet(hosts=2)
    before = _snapshot(fleet)
    rc, out = fleet.playbook(playbook, *args, **extra)
    assert rc != 0, out[-3000:]
    assert "Refused: %s would run only part of the runbook" % named in out, out[-3000:]
    assert "The backup, the gate and the rollback are never skipped" in out
    assert "cara_upgrade, cara_rollback, cara_rollback_drill, cara_verify_release" in out
    # refused on every host, before the lock, the plan or any download
    assert out.count("Refused: ") >= 2, out[-3000:]
    assert "Take the fleet lock" not in out and "Read cara on the host" not in out
    assert not os.path.exists(os.path.join(fleet.base, "run.lock"))
    assert fleet.server.downloads("cara-x86_64-linux") == 0
    assert _snapshot(fleet) == before
    for name in fleet.hostvars():
        assert fleet.health(name)["version"] == "0.8.0"


def test_a_whole_runbook_tag_runs_the_whole_runbook(make_fleet):
    fleet = make_fleet(hosts=1)
    rc, out = fleet.playbook("upgrade", "--tags", "cara_upgrade", cara_upgrade_version="v0.9.0")
    assert rc == 0, out[-4000:]
    row = fleet.report()["hosts"][0]
    assert row["result"] == "upgraded"
    # every step ran: the backup was taken and indexed, the gate passed on the new release
    assert os.path.isfile(row["backup"])
    assert fleet.active(HOST) == "v0.9.0" and fleet.health(HOST)["version"] == "0.9.0"
    # a tag that names another runbook selects nothing of this one: the run reads and changes nothing
    before = _snapshot(fleet)
    rc, out = fleet.playbook("upgrade", "--tags", "cara_rollback", cara_upgrade_version="v0.9.0")
    assert rc == 0, out[-3000:]
    assert "Read cara on the host" not in out and "Take the fleet lock" not in out
    assert _snapshot(fleet) == before
