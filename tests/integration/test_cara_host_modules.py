"""cara_info, cara_backup and cara_restore run by real ansible-playbook processes on localhost, against a local host
laid out by fleetctl whose `cara` is a release of the double running as a real daemon, for both flavors.

Three playbook runs per flavor: (1) daemon running, (2) daemon stopped: backups, (3) after corrupting the state:
restores and refusals. Each run holds several tasks (tests/support/playbook.py run_tasks).
"""

import hashlib
import io
import json
import os
import re
import shutil
import stat
import subprocess
import tarfile
import urllib.request

import pytest

from cara_double import build_release
from fleetctl import load_hosts, make_fleet
from playbook import run_tasks

TAGS = {"head": "v0.9.0", "v0.8.0": "v0.8.0"}
INFO = "carapace.fleet.cara_info"
BACKUP = "carapace.fleet.cara_backup"
RESTORE = "carapace.fleet.cara_restore"


@pytest.fixture
def fleet_host(tmp_path, cara_flavor, fake_llm):
    """One fleetctl host with the flavor's release installed as releases/<tag>/cara behind the bin symlink."""
    base = tmp_path / "fleet"
    make_fleet(str(base), 1, llm_url=fake_llm.base_url)
    hv = load_hosts(str(base))["cara-01"]
    tag = TAGS[cara_flavor]
    release = os.path.join(hv["cara_install_root"], "releases", tag, "cara")
    build_release(tag, release, flavor=cara_flavor)
    os.symlink(release, hv["cara_bin_path"])
    hv.update(tag=tag, release=release, home=str(tmp_path / "home"),
              token=re.search(r'token: "([0-9a-f]+)"', open(hv["cara_config_path"]).read()).group(1))
    os.makedirs(hv["home"])
    hv["procs"] = []
    yield hv
    for proc in hv["procs"]:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def start(hv, cara_hosts):
    """Run the host's daemon (`cara start`) in the background; returns once /health answers (or it exited)."""
    env = dict(os.environ, CARAPACE_STATE_DIR=hv["cara_state_dir"], CARAPACE_CONFIG_PATH=hv["cara_config_path"])
    with open(os.path.join(hv["cara_run_dir"], "cara.log"), "ab") as log:
        proc = subprocess.Popen([hv["cara_bin_path"], "start"], env=env, stdout=log, stderr=log,  # pylint: disable=consider-using-with
                                stdin=subprocess.DEVNULL)
    hv["procs"].append(proc)
    cara_hosts.wait_for(lambda: proc.poll() is not None or cara_hosts.http_get(hv["cara_port"], "/health"),
                        what="the daemon to answer /health or exit")
    return proc


def stop(proc):
    proc.terminate()
    assert proc.wait(timeout=20) == 0


def paths(hv):
    return {"bin_path": hv["cara_bin_path"], "state_dir": hv["cara_state_dir"], "config_path": hv["cara_config_path"],
            "backup_dir": hv["cara_backup_dir"]}


def request(hv, method, path, body=None):
    req = urllib.request.Request("http://127.0.0.1:%d%s" % (hv["cara_port"], path), method=method,
                                 data=None if body is None else json.dumps(body).encode(),
                                 headers={"Authorization": "Bearer " + hv["token"], "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def write_state_through_the_daemon(hv, cara_hosts):
    """Sessions and usage by a chat roundtrip, tasks/queue.json by a control task run to its end."""
    assert request(hv, "POST", "/__double/chat", {"message": "hello"})["ok"] is True
    task = request(hv, "POST", "/control/tasks", {"title": "t", "payload": {"kind": "noop"}})
    cara_hosts.wait_for(lambda: request(hv, "GET", "/control/tasks/%s" % task["id"])["state"] == "done",
                        what="the control task to finish")
    state = hv["cara_state_dir"]
    os.makedirs(os.path.join(state, "credentials"), exist_ok=True)
    for rel, data in (("credentials/index.json", b'{"credentials": ["matrix"]}\n'),
                      ("auth_profiles.json", b'{"profiles": {"default": {"kind": "oauth"}}}\n')):
        with open(os.path.join(state, rel), "wb") as f:
            f.write(data)
        os.chmod(os.path.join(state, rel), 0o600)


def state_files(state_dir):
    """{relative path: (bytes, mode)} of every regular file of the state dir."""
    found = {}
    for dirpath, _dirs, files in os.walk(state_dir):
        for name in files:
            full = os.path.join(dirpath, name)
            with open(full, "rb") as f:
                found[os.path.relpath(full, state_dir)] = (f.read(), stat.S_IMODE(os.lstat(full).st_mode))
    return found


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def evil_archive(path):
    with tarfile.open(path, "w:gz") as tar:
        for name, data in ((".carapace-backup", b"carapace-backup v1\ncreated=20260101T000000Z\n"),
                           ("sessions/../../escape.json", b"{}")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def test_info_backup_restore_round_trip(tmp_path, fleet_host, cara_flavor, cara_hosts):
    hv = fleet_host
    state = hv["cara_state_dir"]
    backup_dir = hv["cara_backup_dir"]
    environment = {"HOME": hv["home"]}  # cara backup/restore put memory/ under $HOME

    # An operator's own archive, made before the daemon starts (not in the index).
    operator_archive = str(tmp_path / "operator-backup.tar.gz")
    env = dict(os.environ, CARAPACE_STATE_DIR=state, CARAPACE_CONFIG_PATH=hv["cara_config_path"], HOME=hv["home"])
    assert subprocess.run([hv["cara_bin_path"], "backup", "-o", operator_archive], env=env, capture_output=True,
                          check=False).returncode == 0

    daemon = start(hv, cara_hosts)
    assert daemon.poll() is None
    write_state_through_the_daemon(hv, cara_hosts)

    # -- run 1: the daemon runs -----------------------------------------------------------------------------------
    nowhere = tmp_path / "no-cara"
    rc, res, out = run_tasks(tmp_path, [
        {"name": "info_missing", "module": INFO,
         "args": {"bin_path": str(nowhere / "bin" / "cara"), "state_dir": str(nowhere / "state"),
                  "install_root": str(nowhere / "opt"), "backup_dir": str(nowhere / "backups")}},
        {"name": "info", "module": INFO, "args": dict(paths(hv), install_root=hv["cara_install_root"])},
        {"name": "backup_running", "module": BACKUP, "args": paths(hv)},
        {"name": "restore_running", "module": RESTORE,
         "args": dict(paths(hv), backup=operator_archive, allow_unindexed=True)},
    ], environment=environment, verbosity=1)
    assert rc == 0, out
    assert hv["token"] not in out and hv["token"] not in json.dumps(res)

    missing = res["info_missing"]
    assert not missing.get("failed") and missing["changed"] is False
    assert missing["installed"] is False and missing["version"] is None and missing["daemon"]["running"] is False

    info = res["info"]
    assert not info.get("failed"), info
    assert info["installed"] is True and info["version"] == hv["tag"][1:] and info["tag"] == hv["tag"]
    assert info["bin_is_symlink"] is True and info["symlink_target"] == hv["release"]
    assert info["sha256"] == sha256(hv["release"])
    assert info["daemon"]["running"] is True and info["daemon"]["pid"] > 1
    assert info["config"]["gateway"]["auth"] == "********"  # the whole auth subtree (issue 12 item 6)
    assert info["gateway"] == {"port": hv["cara_port"], "bind": "loopback", "control_enabled": True,
                               "auth_mode": "token", "hooks_enabled": False}
    assert [(r["tag"], r["active"], r["sha256"]) for r in info["releases"]] == [(hv["tag"], True, info["sha256"])]
    assert info["active_release"] == hv["tag"] and info["platform_asset"].startswith("cara-")
    assert info["transaction"] is None and info["backups"] == []

    for name in ("backup_running", "restore_running"):
        assert res[name]["failed"] is True and res[name]["cause"] == "daemon_running", res[name]
        assert "Stop the service first" in res[name]["msg"]
    assert not [n for n in os.listdir(backup_dir) if n.endswith(".tar.gz")]

    stop(daemon)
    before = state_files(state)
    assert {"sessions", "tasks", "credentials"} <= {p.split("/")[0] for p in before}

    # -- run 2: stopped, backups ------------------------------------------------------------------------------------
    rc, res, out = run_tasks(tmp_path, [
        {"name": "backup_check", "module": BACKUP, "args": dict(paths(hv), include_state_snapshot=True),
         "check_mode": True},
        {"name": "listing_after_check", "module": "ansible.builtin.find",
         "args": {"paths": backup_dir, "hidden": True, "file_type": "any"}},
        {"name": "backup", "module": BACKUP, "args": dict(paths(hv), include_state_snapshot=True, retention=3),
         "diff": True},
        {"name": "backup_again", "module": BACKUP,
         "args": dict(paths(hv), include_state_snapshot=True, retention=3, reuse_within=3600)},
        {"name": "restore_noop", "module": RESTORE, "args": paths(hv)},
    ], environment=environment)
    assert rc == 0, out
    check = res["backup_check"]
    assert not check.get("failed") and check["changed"] is True, check
    assert check["backup"]["path"].startswith(os.path.join(backup_dir, "carapace-backup-%s-" % hv["tag"]))
    assert res["listing_after_check"]["matched"] == 0  # check mode wrote nothing

    made = res["backup"]
    assert not made.get("failed") and made["changed"] is True, made
    entry = made["backup"]
    assert re.match(r"^carapace-backup-%s-\d{8}T\d{6}Z\.tar\.gz$" % re.escape(hv["tag"]), entry["file"])
    assert entry["sha256"] == sha256(entry["path"]) and entry["size"] == os.path.getsize(entry["path"])
    assert entry["snapshot"]["sha256"] == sha256(entry["snapshot"]["path"])
    assert {"sessions", "config", "tasks", "usage"} <= set(entry["sections"])
    assert made["diff"] == {"before": {"backups": []}, "after": {"backups": [entry["path"]]}}
    index_file = os.path.join(backup_dir, "index.json")
    with open(index_file) as f:
        assert json.load(f)["backups"] == [entry]
    assert stat.S_IMODE(os.stat(index_file).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(backup_dir).st_mode) == 0o700  # fleetctl made it 0755
    assert stat.S_IMODE(os.stat(entry["path"]).st_mode) == 0o600

    again = res["backup_again"]
    assert again["changed"] is False and again["backup"]["path"] == entry["path"], again
    noop = res["restore_noop"]
    assert noop["changed"] is False and noop["restored"] == [] and noop["backup"]["path"] == entry["path"], noop

    # -- corrupt the state; prepare a tampered (indexed) and an unknown archive ---------------------------------------
    with open(os.path.join(state, "tasks", "queue.json"), "w") as f:
        f.write("{garbage")
    for name in os.listdir(os.path.join(state, "sessions")):
        os.unlink(os.path.join(state, "sessions", name))
    open(os.path.join(state, "usage.json"), "wb").close()
    os.unlink(os.path.join(state, "credentials", "index.json"))
    with open(os.path.join(state, "auth_profiles.json"), "w") as f:
        f.write("{}")
    with open(os.path.join(state, "credentials", "added-later.json"), "w") as f:
        f.write("{}")
    assert start(hv, cara_hosts).wait(timeout=20) == 1  # the double fails closed on the corrupt task queue

    unknown = os.path.join(backup_dir, "carapace-backup-%s-20000101T000000Z.tar.gz" % hv["tag"])
    shutil.copyfile(entry["path"], unknown)
    tampered = os.path.join(backup_dir, "carapace-backup-%s-19990101T000000Z.tar.gz" % hv["tag"])
    shutil.copyfile(entry["path"], tampered)
    with open(tampered, "ab") as f:
        f.write(b"\0tampered")
    with open(index_file) as f:
        index = json.load(f)
    index["backups"].insert(0, dict(entry, path=tampered, file=os.path.basename(tampered), snapshot=None,
                                    created_epoch=entry["created_epoch"] - 3600))
    with open(index_file, "w") as f:
        json.dump(index, f)
    evil = evil_archive(tmp_path / "evil.tar.gz")

    # -- run 3: restores and refusals ------------------------------------------------------------------------------
    rc, res, out = run_tasks(tmp_path, [
        {"name": "restore_check", "module": RESTORE, "args": paths(hv), "check_mode": True},
        {"name": "queue_after_check", "module": "ansible.builtin.slurp",
         "args": {"src": os.path.join(state, "tasks", "queue.json")}},
        {"name": "restore_unknown", "module": RESTORE, "args": dict(paths(hv), backup=unknown)},
        {"name": "restore_tampered", "module": RESTORE, "args": dict(paths(hv), backup=tampered)},
        {"name": "restore_evil", "module": RESTORE, "args": dict(paths(hv), backup=evil, allow_unindexed=True)},
        {"name": "restore", "module": RESTORE, "args": dict(paths(hv), backup="latest", tag=hv["tag"]), "diff": True},
        {"name": "restore_again", "module": RESTORE, "args": paths(hv)},
    ], environment=environment)
    assert rc == 0, out

    planned = res["restore_check"]
    assert planned["changed"] is True and not planned.get("failed"), planned
    assert os.path.join(state, "tasks", "queue.json") in planned["differences"]
    assert "credentials/index.json" in planned["snapshot"]["write"]
    # what came after the backup goes: a file added later, and the copy cara made of the queue it could not parse
    removed = planned["snapshot"]["remove"]
    assert removed[0] == "credentials/added-later.json" and len(removed) == 2
    assert re.fullmatch(r"tasks/queue\.json\.corrupt\.\d+\.0", removed[1]), removed
    assert res["queue_after_check"]["content"] == "e2dhcmJhZ2U="  # base64 of "{garbage": check mode wrote nothing

    assert res["restore_unknown"]["failed"] is True and res["restore_unknown"]["cause"] == "unknown_backup"
    assert "allow_unindexed" in res["restore_unknown"]["msg"]
    assert res["restore_tampered"]["failed"] is True and res["restore_tampered"]["cause"] == "tampered"
    assert "does not match its index entry" in res["restore_tampered"]["msg"]
    assert res["restore_evil"]["failed"] is True and res["restore_evil"]["cause"] == "unsafe_member"
    assert not os.path.exists(os.path.join(os.path.dirname(state), "escape.json"))

    restored = res["restore"]
    assert restored["changed"] is True and not restored.get("failed"), restored
    assert {"sessions", "tasks", "usage"} <= set(restored["restored"]) and restored["sessions"] >= 1
    assert restored["backup"]["path"] == entry["path"]
    queue = os.path.join(state, "tasks", "queue.json")
    assert restored["diff"]["after"][queue] == hashlib.sha256(before["tasks/queue.json"][0]).hexdigest()
    assert res["restore_again"]["changed"] is False, res["restore_again"]

    after = state_files(state)
    # audit.jsonl is evidence, never rolled back: it keeps the failed start's line
    audit_before, audit_after = before.pop("audit.jsonl")[0], after.pop("audit.jsonl")[0]
    assert audit_after.startswith(audit_before) and len(audit_after) > len(audit_before)
    assert after == before  # byte-identical, modes too, credentials/ and auth_profiles.json included
    daemon = start(hv, cara_hosts)  # and the restored state starts
    assert daemon.poll() is None
    stop(daemon)
