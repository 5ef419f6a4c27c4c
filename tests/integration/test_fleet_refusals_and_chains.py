"""What the README promises, where an operator meets it: `ansible-playbook carapace.fleet.upgrade` on a local fleet.

- Refusals: a host that cannot be upgraded as it is (its service unhealthy, cara's own update pending or in
  progress, a config that does not parse, too little free space) is refused before anything on it changes, and
  nothing is downloaded for it; an unhealthy service is upgraded anyway with cara_upgrade_allow_unhealthy_start.
- Overlapping runs on one inventory: the second is refused while the first runs.
- Chains and retention: cara_upgrade_chain runs v0.7.0 -> v0.8.0 -> v0.9.0 with one verified download per tag for
  the whole fleet, and cara_upgrade_keep_releases prunes the releases kept on the hosts.
"""

import json
import os
import time

from fleet import state_files

ASSET = "cara-x86_64-linux"


def untouched(fleet, name, before):
    """Still v0.8.0 from its own bytes, the state as it was, no transaction of ours, no backup, nothing fetched."""
    hv = fleet.hostvars()[name]
    assert fleet.active(name) == "v0.8.0" and fleet.release_intact(name, "v0.8.0")
    assert state_files(hv) == before
    tx = os.path.join(hv["cara_state_dir"], "updates", "transaction.json")
    assert not os.path.exists(tx) or "fleet" not in json.load(open(tx, encoding="utf-8"))
    assert not [n for n in os.listdir(hv["cara_backup_dir"]) if n.endswith(".tar.gz")]
    assert fleet.server.downloads(ASSET) == 0


def write_marker(fleet, name, file_name, data):
    updates = os.path.join(fleet.hostvars()[name]["cara_state_dir"], "updates")
    os.makedirs(updates, exist_ok=True)
    path = os.path.join(updates, file_name)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f)
    return path


CARA_OWN_TX = {"id": "0b6d1c52-3f0e-4a6e-9f7e-2f1c0d9a8b7c", "version": "0.9.0", "assetName": ASSET,
               "state": "in_progress", "attempt": 1, "maxAttempts": 3, "startedAtMs": 1, "updatedAtMs": 2,
               "stagedPath": None, "bundlePath": None, "sha256": None, "lastError": None, "phase": "downloading",
               "retryable": True}


def test_refusals_leave_the_host_as_it_was(make_fleet):
    fleet = make_fleet()
    name = "cara-01"
    hv = fleet.hostvars()[name]
    before = state_files(hv)

    # cara's own update, pending its first start (rollback.json) or in progress (transaction.json without `fleet`)
    marker = write_marker(fleet, name, "rollback.json", {"binaryPath": hv["cara_bin_path"], "startupState": "pending"})
    rc, out = fleet.playbook("upgrade", cara_upgrade_version="v0.9.0")
    assert rc != 0 and "in the middle of its own update" in out and "rollback.json is pending" in out, out[-3000:]
    os.unlink(marker)
    untouched(fleet, name, before)

    marker = write_marker(fleet, name, "transaction.json", CARA_OWN_TX)
    rc, out = fleet.playbook("upgrade", cara_upgrade_version="v0.9.0")
    assert rc != 0 and "started by `cara update` is in progress" in out, out[-3000:]
    assert json.load(open(marker, encoding="utf-8")) == CARA_OWN_TX  # cara's own transaction is not ours to touch
    os.unlink(marker)
    untouched(fleet, name, before)

    # too little free space for the release and a backup
    rc, out = fleet.playbook("upgrade", cara_upgrade_version="v0.9.0", cara_upgrade_min_free_mb=10 ** 9)
    assert rc != 0 and "MiB free" in out and "Free space first" in out, out[-3000:]
    untouched(fleet, name, before)

    # a config that does not parse (the running daemon read it at its start; the next start would not)
    with open(hv["cara_config_path"], encoding="utf-8") as f:
        config = f.read()
    with open(hv["cara_config_path"], "w", encoding="utf-8") as f:
        f.write(config + "\n}{ not json5")
    rc, out = fleet.playbook("upgrade", cara_upgrade_version="v0.9.0")
    assert rc != 0 and "its config does not parse" in out, out[-3000:]
    with open(hv["cara_config_path"], "w", encoding="utf-8") as f:
        f.write(config)
    untouched(fleet, name, before)

    # an unhealthy service: refused as it is...
    fleet.stop_daemons()
    rc, out = fleet.playbook("upgrade", cara_upgrade_version="v0.9.0")
    assert rc != 0 and "health check 'health' failed" in out, out[-3000:]
    untouched(fleet, name, before)
    # ...and upgraded when the operator says so
    rc, out = fleet.playbook("upgrade", cara_upgrade_version="v0.9.0", cara_upgrade_allow_unhealthy_start=True)
    assert rc == 0, out[-3000:]
    assert fleet.active(name) == "v0.9.0" and fleet.health(name)["version"] == "0.9.0"
    fleet.assert_starts_terminal()


def test_a_second_run_on_the_same_inventory_is_refused_while_the_first_runs(make_fleet):
    fleet = make_fleet()
    first = fleet.spawn_playbook("upgrade", cara_upgrade_version="v0.9.0")
    tx = os.path.join(fleet.hostvars()["cara-01"]["cara_state_dir"], "updates", "transaction.json")
    deadline = time.monotonic() + 300
    while not os.path.exists(tx):  # the first run holds the lock from its start to its end
        assert first.poll() is None and time.monotonic() < deadline, "the first run ended before it staged"
        time.sleep(0.05)
    rc, out = fleet.playbook("upgrade", cara_upgrade_version="v0.9.0")
    assert rc != 0 and "another carapace.fleet run holds" in out, out[-3000:]
    assert first.wait(timeout=600) == 0, "the first run failed (log: %s)" % first.log
    assert fleet.active("cara-01") == "v0.9.0"
    assert fleet.report()["hosts"][0]["result"] == "upgraded"
    fleet.assert_starts_terminal()


def test_a_chain_runs_with_one_download_per_tag_and_prunes_old_releases(make_fleet):
    fleet = make_fleet(hosts=2, install="v0.7.0")
    rc, out = fleet.playbook("upgrade", cara_upgrade_version="v0.9.0", cara_upgrade_chain=True,
                             cara_upgrade_keep_releases=2)
    assert rc == 0, out[-3000:]
    # one verified download per (tag, asset) for the whole fleet, on the controller: v0.8.0 and v0.9.0
    assert fleet.server.downloads(ASSET) == 2
    for name, hv in fleet.hostvars().items():
        assert fleet.active(name) == "v0.9.0" and fleet.health(name)["version"] == "0.9.0"
        assert sorted(os.listdir(os.path.join(hv["cara_install_root"], "releases"))) == ["v0.8.0", "v0.9.0"]
        assert fleet.release_intact(name, "v0.8.0") and fleet.release_intact(name, "v0.9.0")
    rows = fleet.report()["hosts"]
    assert [(r["from"], r["to"], r["result"]) for r in rows] == [("v0.7.0", "v0.9.0", "upgraded")] * 2
    fleet.assert_starts_terminal()
