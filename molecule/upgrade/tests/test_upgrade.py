"""upgrade: every host was upgraded v0.8.0 -> v0.9.0 by playbooks/upgrade.yml, as the release policy says.

Run by `molecule verify` (testinfra, once per host); helpers and fixtures in ../../conftest.py.
"""

from __future__ import annotations

import json
import os

from conftest import (BACKUP_DIR, STATE_DIR, active_release, asset_sha256, assert_state_kept, backup_index, health,
                      prepared_service, read_report, service_props)

TARGET = "v0.9.0"


def test_active_link_points_at_the_verified_release(host, manifest):
    tag, digest = active_release(host)
    assert tag == TARGET
    assert digest == asset_sha256(manifest, TARGET)
    release = host.file("/opt/carapace/releases/%s/cara" % TARGET)
    assert release.mode == 0o755 and release.user == "root"
    # The release it replaced is kept (N deep) for the rollback, and recorded as the previous one.
    record = json.loads(host.file("/opt/carapace/state.json").content_string)
    assert record["previous"]["tag"] == "v0.8.0"
    assert record["previous"]["sha256"] == asset_sha256(manifest, "v0.8.0")
    assert host.file("/opt/carapace/releases/v0.8.0/cara").sha256sum == asset_sha256(manifest, "v0.8.0")
    assert host.check_output("/usr/local/bin/cara --version") == "cara 0.9.0"


def test_health_says_the_new_version_here_and_to_the_other_hosts(host, fleet_hosts):
    assert health(host)["version"] == "0.9.0"
    for name in fleet_hosts:
        assert health(host, name)["version"] == "0.9.0", name


def test_service_was_restarted_once_under_the_hardened_unit(host):
    before = prepared_service(host)
    now = service_props(host, "ActiveState", "SubState", "User", "MainPID", "NRestarts",
                        "ExecMainStartTimestampMonotonic", "NoNewPrivileges", "ProtectSystem", "ReadWritePaths")
    assert now["ActiveState"] == "active" and now["SubState"] == "running"
    assert now["User"] == "cara" and now["NRestarts"] == "0"
    assert now["MainPID"] != before["MainPID"]
    assert int(now["ExecMainStartTimestampMonotonic"]) > int(before["ExecMainStartTimestampMonotonic"])
    assert now["NoNewPrivileges"] == "yes" and now["ProtectSystem"] == "strict" and now["ReadWritePaths"] == STATE_DIR
    pid = now["MainPID"]
    assert host.check_output("ps -o user= -p %s", pid) == "cara"
    # The sandbox is in force, not only configured: the daemon sees / read-only and its state dir writable.
    mounts = {}
    for line in host.file("/proc/%s/mountinfo" % pid).content_string.splitlines():
        fields = line.split()
        mounts[fields[4]] = fields[5].split(",")
    assert "ro" in mounts["/"] and "rw" in mounts[STATE_DIR]
    assert host.socket("tcp://0.0.0.0:18789").is_listening


def test_transaction_was_applied_and_cleared(host):
    assert not host.file(STATE_DIR + "/updates/transaction.json").exists
    staged = host.file(STATE_DIR + "/updates/cara-0.9.0")
    assert staged.user == "cara" and staged.mode == 0o755


def test_pre_upgrade_backup_is_indexed_with_its_sha256(host):
    backups = [b for b in backup_index(host)["backups"] if b["tag"] == "v0.8.0"]
    assert len(backups) == 1, backups
    entry = backups[0]
    archive = host.file(entry["path"])
    assert os.path.dirname(entry["path"]) == BACKUP_DIR
    assert archive.sha256sum == entry["sha256"] and archive.size == entry["size"]
    assert archive.mode == 0o600 and archive.user == "cara"
    assert host.file(BACKUP_DIR).mode == 0o700 and host.file(BACKUP_DIR).user == "cara"
    names = host.check_output("tar -tzf %s", entry["path"]).splitlines()
    assert names[0] == ".carapace-backup" and any(n.startswith("sessions/") for n in names)
    assert entry["cara_version"].endswith("0.8.0")


def test_state_files_are_as_before_the_upgrade(host):
    assert_state_kept(host)


def _reports(run_dir):
    """The reports of the two converges (one dir per run id, oldest first)."""
    base = os.path.join(run_dir, "reports")
    return [read_report(os.path.join(base, d)) for d in sorted(os.listdir(base))]


def test_reports_say_upgraded_then_unchanged(host, me, run_dir, manifest):
    (first, rows), (second, again) = _reports(run_dir)
    assert first["run"]["kind"] == second["run"]["kind"] == "upgrade"
    row = rows[me]
    assert (row["result"], row["from"], row["to"], row["phase"]) == ("upgraded", "v0.8.0", TARGET, "applied")
    assert row["sha256"] == asset_sha256(manifest, TARGET)
    assert row["backup"] in [b["path"] for b in backup_index(host)["backups"]]
    assert row["downtime_s"] > 0 and row["details"]["attempt"] == 1
    # The idempotence converge found nothing to do.
    assert (again[me]["result"], again[me]["from"]) == ("unchanged", TARGET)


def test_the_gateway_token_is_in_no_report(host, run_dir):
    config = host.file(STATE_DIR + "/carapace.json5")
    assert config.mode == 0o600 and config.user == "cara"
    token = host.check_output(
        "python3 -c 'import json5, sys; print(json5.load(open(sys.argv[1]))[\"gateway\"][\"auth\"][\"token\"])' %s",
        STATE_DIR + "/carapace.json5")
    assert len(token) == 40
    for root, _dirs, files in os.walk(run_dir):
        for name in files:
            if name.endswith((".json", ".md")):
                with open(os.path.join(root, name), encoding="utf-8", errors="replace") as f:
                    assert token not in f.read(), os.path.join(root, name)


def test_provider_secrets_stay_in_the_root_only_environment_file(host, me):
    """upgrade-2 names its LLM provider only in cara_service_secret_environment (molecule.yml): the unit reads the
    root-only file, the world-readable unit itself holds no value, and cara (which needs a provider) runs."""
    unit = host.file("/etc/systemd/system/cara.service").content_string
    assert "EnvironmentFile=-/etc/carapace/cara.env" in unit and "OLLAMA" not in unit
    assert "ExecStartPre=/usr/bin/python3 /usr/local/libexec/carapace-fleet/cara-start-guard.py /var/lib/carapace" in unit
    env_file = host.file("/etc/carapace/cara.env")
    config = host.file(STATE_DIR + "/carapace.json5").content_string
    if me == "upgrade-2":
        assert env_file.exists and env_file.user == "root" and env_file.mode == 0o600
        assert env_file.content_string == "OLLAMA_BASE_URL='http://127.0.0.1:11434'\n"
        assert "providers" not in config
    else:
        assert not env_file.exists and "providers" in config
    # the provider is real: the gates' `cara verify --outcome auto` made model calls through it
    stats = json.loads(host.check_output("python3 -c 'import urllib.request; print(urllib.request.urlopen("
                                         "\"http://127.0.0.1:11434/__stats\", timeout=5).read().decode())'"))
    assert stats["chat_requests"] >= 2, stats
