"""The double's fault switches (for rollback drills) and its startup handling of update markers (spec 3.7)."""
import hashlib
import json
import os

import pytest


def control(port):
    return {"gateway": {"port": port, "control": {"enabled": True}, "auth": {"token": "t"}}}


@pytest.fixture
def faulty(cara_hosts, cara_flavor):
    """faulty(**faults) -> a host running a release of cara_flavor with those faults baked in."""
    def make(**faults):
        return cara_hosts(cara_hosts.flavor_versions[cara_flavor], flavor=cara_flavor, faults=faults)
    return make


def test_start_fail(faulty):
    host = faulty(start_fail_ms=50)
    result = host.run("start")
    assert result.returncode == 1
    assert result.stderr == 'Error: "failed to build LLM provider: injected start failure (fault start_fail_ms)"\n'
    assert not (host.state / "daemon.pid").exists() and host.get("/health") is None
    assert (host.state / "sessions").is_dir()  # it got as far as preparing the state dir


def test_start_fail_still_answers_version(faulty):
    host = faulty(start_fail_ms=50)
    assert host.run("--version").stdout == "cara %s\n" % host.version


def test_ready_never(faulty):
    host = faulty(ready_never=True)
    host.start()
    assert host.get("/health")[0] == 200
    status, headers, body = host.get("/health/ready")
    assert status == 503 and headers["Retry-After"] == "5" and json.loads(body)["status"] == "not_ready"
    assert "carapace_ready 0" in host.get("/metrics")[2].decode()


def test_verify_autonomy_fail(faulty):
    host = faulty(verify_autonomy_fail=True)
    host.write_config(control(host.port))
    host.start()
    result = host.run("verify", "--outcome", "autonomy")
    assert result.returncode == 1 and result.stderr == 'Error: "outcome verification failed"\n'
    checks = [line for line in result.stdout.splitlines() if line.startswith("[")]
    assert checks[1].startswith("[PASS] Task start proof")
    assert checks[2].startswith("[FAIL] Task terminal proof: task ") and "ended in state failed" in checks[2]


def test_health_version(faulty):
    host = faulty(health_version="9.9.9")
    host.write_config(control(host.port))
    host.start()
    assert json.loads(host.get("/health")[2])["version"] == "9.9.9"
    assert json.loads(host.get("/health/live")[2])["version"] == "9.9.9"
    assert host.run("status").stdout.splitlines()[2] == "  Version:  9.9.9"
    assert host.run("--version").stdout == "cara %s\n" % host.version
    status = host.get("/control/status", headers={"Authorization": "Bearer t"})
    assert json.loads(status[2])["version"] == host.version


def test_slow_start(faulty):
    host = faulty(slow_start_s=1.5)
    proc = host.spawn("start")
    host.wait_for(lambda: "slow start: delaying bind" in host.stdout(proc), what="the slow-start log line")
    # Before binding the daemon already holds the lock and wrote daemon.pid, but nothing answers yet.
    assert (host.state / "daemon.pid").read_text() == "%d\n" % proc.pid
    assert host.get("/health") is None
    host.wait_for(lambda: host.get("/health"), what="the slow daemon to bind")
    assert host.stop(proc) == 0


def test_sigterm_during_slow_start_exits_0(faulty):
    host = faulty(slow_start_s=30)
    proc = host.spawn()
    host.wait_for((host.state / "daemon.pid").exists, what="daemon.pid")
    assert host.stop(proc) == 0 and not (host.state / "daemon.pid").exists()


# -- state migration drill ------------------------------------------------------------------------------------------

def queue_bytes(host):
    return (host.state / "tasks" / "queue.json").read_bytes()


def test_migration_needs_restore_to_roll_back(cara_hosts, cara_flavor):
    old_version = cara_hosts.flavor_versions[cara_flavor]
    host = cara_hosts(old_version, flavor=cara_flavor, name="drill")
    old_binary = host.binary
    new_binary = cara_hosts.release("0.9.1", "new", faults={"migrate_state": 2})
    host.write_config(control(host.port))
    host.stop(host.start())
    backup = host.root / "pre-upgrade.tar.gz"
    assert host.run("backup", "-o", str(backup)).returncode == 0
    pre_upgrade = queue_bytes(host)

    host.binary = new_binary  # upgrade: first start migrates the queue to schema 2
    proc = host.start()
    assert host.run("verify", "--outcome", "autonomy").returncode == 0
    host.stop(proc)
    migrated = json.loads(queue_bytes(host))
    assert (migrated["schemaVersion"], migrated["migratedFrom"], len(migrated["tasks"])) == (2, 1, 1)
    host.stop(host.start())
    assert json.loads(queue_bytes(host)) == migrated  # no second migration

    host.binary = old_binary  # binary-only rollback: the old release fails closed
    result = host.run("start")
    assert result.returncode == 1
    assert "has schemaVersion 2, newer than this release (v%s) supports (1)" % old_version in result.stderr
    assert "cara restore <backup> --force" in result.stderr
    assert not (host.state / "daemon.pid").exists()

    assert host.run("restore", str(backup), "--force").returncode == 0  # the runbook's restore step
    proc = host.start()
    assert host.run("verify", "--outcome", "autonomy").returncode == 0
    assert host.stop(proc) == 0
    assert json.loads(queue_bytes(host))["schemaVersion"] == 1
    assert json.loads(pre_upgrade)["tasks"] == []


# -- update markers at start (spec 3.7: HEAD only; v0.8.0 and the double never touch transaction.json) -------------

def rollback_marker(host, state, backup_sha=None):
    binary = os.path.realpath(host.binary)
    marker = {"binaryPath": binary, "backupPath": binary + ".bak", "sha256": "0" * 64, "appliedAtMs": 1,
              "startupState": state, "extraKey": {"kept": True}}
    if backup_sha:
        marker["backupSha256"] = backup_sha
    (host.state / "updates").mkdir(parents=True, exist_ok=True)
    (host.state / "updates" / "rollback.json").write_text(json.dumps(marker))
    return host.state / "updates" / "rollback.json"


def test_pending_marker_is_cleared_after_healthy_start(cara_host):
    host = cara_host
    marker = rollback_marker(host, "pending")
    backup = host.binary.with_name("cara.bak")
    backup.write_text("old binary")
    transaction = host.state / "updates" / "transaction.json"
    transaction.write_text('{"state": "in_progress"}')
    proc = host.start()
    if host.flavor == "head":
        assert not marker.exists() and not backup.exists()
    else:
        assert json.loads(marker.read_text())["startupState"] == "pending" and backup.exists()
    assert transaction.read_text() == '{"state": "in_progress"}'
    assert host.stop(proc) == 0


def test_failed_start_leaves_marker_started_then_next_start_rolls_back(cara_hosts, cara_flavor):
    host = cara_hosts("0.9.1", flavor=cara_flavor, faults={"start_fail_ms": 10})
    old = b"#!/bin/sh\necho old\n"
    backup = host.binary.with_name("cara.bak")
    backup.write_bytes(old)
    new_bytes = host.binary.read_bytes()
    marker = rollback_marker(host, "pending", hashlib.sha256(old).hexdigest())
    assert host.run("start").returncode == 1
    if cara_flavor == "v0.8.0":
        assert json.loads(marker.read_text())["startupState"] == "pending" and backup.exists()
        return
    started = json.loads(marker.read_text())
    assert started["startupState"] == "started" and "startedAtMs" in started and started["extraKey"] == {"kept": True}
    assert host.run("start").returncode == 1  # this start still runs the new code, but swaps the file on disk
    rolled = json.loads(marker.read_text())
    assert rolled["startupState"] == "rolled_back" and "rolledBackAtMs" in rolled
    assert host.binary.read_bytes() == old and backup.exists() and new_bytes != old


def test_old_binary_siblings_are_reaped_at_head_start(cara_host):
    host = cara_host
    siblings = [host.binary.with_name(n) for n in ("cara.bak", "cara.OLD", "cara-tools.bak", "notes.old")]
    for path in siblings:
        path.write_text("x")
    host.stop(host.start())
    expected = [False, False, True, True] if host.flavor == "head" else [True] * 4
    assert [p.exists() for p in siblings] == expected


def test_marker_for_another_binary_is_refused(cara_host):
    host = cara_host
    marker = rollback_marker(host, "pending")
    data = json.loads(marker.read_text())
    data["binaryPath"] = "/usr/local/bin/other"
    marker.write_text(json.dumps(data))
    host.stop(host.start())
    assert json.loads(marker.read_text())["startupState"] == "pending"
