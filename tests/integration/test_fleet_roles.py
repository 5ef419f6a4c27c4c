"""The upgrade and rollback playbooks, for real, on a local fleet: ansible-playbook against N local hosts whose
`cara` daemons run as processes, releases signed by the test Sigstore and served on 127.0.0.1."""

import json
import os
import signal
import subprocess
import threading
import time

import pytest

from fleet import BIN, COLLECTIONS, LocalFleet, state_files

UPGRADE_SERIAL = ["1", "100%"]


def host_changed_counts(out):
    """PLAY RECAP changed= per host."""
    counts = {}
    for line in out.splitlines():
        if " : ok=" in line and "changed=" in line:
            host = line.split(":", 1)[0].strip()
            counts[host] = counts.get(host, 0) + int(line.split("changed=", 1)[1].split()[0])
    return counts


def test_rolling_upgrade_then_idempotent_rerun(make_fleet, releases):
    fleet = make_fleet(hosts=5)
    manifest = json.load(open(os.path.join(releases, "releases.json"), encoding="utf-8"))
    rc, out = fleet.playbook("upgrade", cara_upgrade_version="v0.9.0",
                             cara_upgrade_release_notes=fleet.server.url + "/puremachinery/carapace/docs/releases/v0.9.0.md",
                             cara_upgrade_ack_breaking="v0.9.0")
    assert rc == 0, out[-4000:]
    report = fleet.report()
    assert [h["result"] for h in report["hosts"]] == ["upgraded"] * 5
    for row in report["hosts"]:
        hv = fleet.hostvars()[row["host"]]
        assert fleet.active(row["host"]) == "v0.9.0"
        assert fleet.health(row["host"])["version"] == "0.9.0"
        assert row["from"] == "v0.8.0" and row["to"] == "v0.9.0"
        assert row["sha256"] == manifest["releases"]["v0.9.0"]["assets"]["cara-x86_64-linux"]
        assert isinstance(row["log_index"], int) and row["downtime_s"] > 0
        assert os.path.isfile(row["backup"]) and row["backup"].startswith(hv["cara_backup_dir"])
        index = json.load(open(os.path.join(hv["cara_backup_dir"], "index.json"), encoding="utf-8"))
        assert any(e["path"] == row["backup"] for e in (index["backups"] if isinstance(index, dict) else index))
        assert not os.path.exists(os.path.join(hv["cara_state_dir"], "updates", "transaction.json"))
    # one download of the asset for the whole fleet
    assert fleet.server.downloads("cara-x86_64-linux") == 1
    rc, out = fleet.playbook("upgrade", cara_upgrade_version="v0.9.0")
    assert rc == 0, out[-4000:]
    assert [h["result"] for h in fleet.report()["hosts"]] == ["unchanged"] * 5
    assert set(host_changed_counts(out).values()) == {0}, out[-3000:]
    assert fleet.server.downloads("cara-x86_64-linux") == 1


def test_canary_failure_rolls_back_and_stops_the_line(make_fleet):
    fleet = make_fleet(hosts=3)
    before = {name: state_files(hv) for name, hv in fleet.hostvars().items()}
    rc, out = fleet.playbook("upgrade", cara_upgrade_version="v0.9.1", cara_upgrade_serial=UPGRADE_SERIAL,
                             cara_upgrade_health_timeout=15)
    assert rc != 0
    rows = {h["host"]: h for h in fleet.report()["hosts"]}
    assert rows["cara-01"]["result"] == "rolled_back", out[-4000:]
    assert isinstance(rows["cara-01"]["rto_s"], float)
    assert rows["cara-02"]["result"] == rows["cara-03"]["result"] == "pending"
    assert "ready" in rows["cara-01"]["details"]["error"]
    for name in ("cara-01", "cara-02", "cara-03"):
        assert fleet.active(name) == "v0.8.0"
        assert fleet.health(name)["version"] == "0.8.0"
    # the canary's state is back as it was, but for what the gate's own `cara verify` after the rollback writes
    # (a chat session, a task, usage); cara_restore itself checks every restored path against the archive
    after = state_files(fleet.hostvars()["cara-01"])
    for rel, data in before["cara-01"].items():
        if not rel.startswith(("sessions", "tasks", "usage.json")):
            assert after[rel] == data, rel
    for name in ("cara-02", "cara-03"):
        assert state_files(fleet.hostvars()[name]) == before[name]
        assert not os.listdir(fleet.hostvars()[name]["cara_backup_dir"])
        # the fleet-wide plan only read them: their service script and start guard are installed in their own
        # batch, which never came
        run_dir = fleet.hostvars()[name]["cara_run_dir"]
        assert not os.path.exists(os.path.join(run_dir, "cara-service")), name
        assert not os.path.exists(os.path.join(run_dir, "cara-start-guard.py")), name
    assert host_changed_counts(out)["cara-02"] == host_changed_counts(out)["cara-03"] == 0, out[-3000:]
    tx = json.load(open(os.path.join(fleet.hostvars()["cara-01"]["cara_state_dir"], "updates", "transaction.json"),
                        encoding="utf-8"))
    assert tx["state"] == "failed" and tx["retryable"] is False and "rolled back to v0.8.0" in tx["lastError"]


def test_check_mode_changes_nothing(make_fleet):
    fleet = make_fleet(hosts=2)
    before = {name: (state_files(hv), fleet.active(name)) for name, hv in fleet.hostvars().items()}
    rc, out = fleet.playbook("upgrade", "--check", cara_upgrade_version="v0.9.0")
    assert rc == 0, out[-4000:]
    for name, hv in fleet.hostvars().items():
        assert (state_files(hv), fleet.active(name)) == before[name]
        assert not os.path.exists(os.path.join(hv["cara_state_dir"], "updates", "transaction.json"))
    assert fleet.server.downloads("cara-x86_64-linux") == 0


@pytest.mark.parametrize("extra,message", [
    ({"cara_upgrade_version": "v0.7.0"}, "downgrade"),
    ({"cara_upgrade_version": "v1.0.0-preview1", "cara_known_tags": ["v0.8.0", "v1.0.0-preview1"]}, "preview"),
    ({"cara_upgrade_version": "v0.9.0", "cara_upgrade_release_notes": "NOTES-INCOMPLETE"}, "Rollback Steps"),
    ({"cara_upgrade_version": "v0.9.0", "cara_upgrade_release_notes": "NOTES"}, "cara_upgrade_ack_breaking"),
])
def test_refusals_touch_no_host(make_fleet, extra, message):
    fleet = make_fleet(hosts=1)
    notes = fleet.server.url + "/puremachinery/carapace/docs/%s/v0.9.0.md"
    if extra.get("cara_upgrade_release_notes") == "NOTES":
        extra["cara_upgrade_release_notes"] = notes % "releases"
    elif extra.get("cara_upgrade_release_notes") == "NOTES-INCOMPLETE":
        extra["cara_upgrade_release_notes"] = notes % "releases-incomplete"
    before = state_files(fleet.hostvars()["cara-01"])
    rc, out = fleet.playbook("upgrade", **extra)
    assert rc != 0
    assert message in out, out[-3000:]
    assert fleet.active("cara-01") == "v0.8.0"
    assert state_files(fleet.hostvars()["cara-01"]) == before
    assert fleet.server.downloads("cara-x86_64-linux") == 0


def test_chain_is_planned_and_refused_without_opt_in(make_fleet):
    fleet = make_fleet(hosts=1, install="v0.7.0")
    rc, out = fleet.playbook("upgrade", cara_upgrade_version="v0.9.0")
    assert rc != 0
    assert "v0.8.0 -> v0.9.0" in out and "cara_upgrade_chain" in out
    assert fleet.active("cara-01") == "v0.7.0"


def _kill_when(fleet, host, phase, proc_holder, stop):
    """SIGKILL the run when the host's transaction reaches `phase`, or (`window:<phase>`) when its window does; in
    the window the host-side process is killed too, as a host crash would: nothing goes on by itself."""
    path = os.path.join(fleet.hostvars()[host]["cara_state_dir"], "updates", "transaction.json")
    while not stop.is_set():
        try:
            if phase.startswith("window:"):
                reached = (fleet.window(host) or {}).get("phase") == phase.split(":", 1)[1]
            else:
                with open(path, encoding="utf-8") as f:
                    reached = json.load(f).get("phase") == phase
            if reached and proc_holder:
                fleet.kill_window(host)
                os.killpg(proc_holder[0].pid, signal.SIGKILL)
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.01)


# verified: before the window; in the backup (the transaction still says verified, the service is stopped); in the
# start (applied, the new release coming up).
# The attempt that ends it: a second one of an in-progress transaction; an applied one is gated, not re-attempted.
@pytest.mark.parametrize("phase,left_at,attempt", [("verified", "verified", 2), ("window:backup", "verified", 2),
                                                   ("window:start", "applied", 1)])
def test_killed_run_resumes(make_fleet, phase, left_at, attempt):
    fleet = make_fleet(hosts=1)
    vars_file = os.path.join(fleet.base, "kill-vars.json")
    with open(vars_file, "w", encoding="utf-8") as f:
        json.dump(fleet.extra_vars(cara_upgrade_version="v0.9.0"), f)
    cmd = [os.path.join(BIN, "ansible-playbook"), "-i", fleet.inventory, "carapace.fleet.upgrade", "-e", "@" + vars_file]
    env = dict(os.environ, ANSIBLE_COLLECTIONS_PATH=COLLECTIONS, ANSIBLE_HOME=os.path.join(fleet.base, ".ansible"))
    holder, stop = [], threading.Event()
    watcher = threading.Thread(target=_kill_when, args=(fleet, "cara-01", phase, holder, stop))
    proc = subprocess.Popen(cmd, cwd=fleet.base, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,  # pylint: disable=consider-using-with
                            start_new_session=True)
    holder.append(proc)
    watcher.start()
    try:
        proc.wait(timeout=600)
    finally:
        stop.set()
        watcher.join()
    assert proc.returncode == -signal.SIGKILL, "the run finished before reaching %s" % phase
    tx_path = os.path.join(fleet.hostvars()["cara-01"]["cara_state_dir"], "updates", "transaction.json")
    assert json.load(open(tx_path, encoding="utf-8"))["phase"] == left_at
    fleet.wait_windows(timeout=60)  # the killed window's lock goes with it
    rc, out = fleet.playbook("upgrade", cara_upgrade_version="v0.9.0")
    assert rc == 0, out[-4000:]
    assert fleet.active("cara-01") == "v0.9.0"
    assert fleet.health("cara-01")["version"] == "0.9.0"
    assert not os.path.exists(tx_path)
    row = fleet.report()["hosts"][0]
    assert row["result"] == "upgraded" and row["details"]["attempt"] == attempt, row
