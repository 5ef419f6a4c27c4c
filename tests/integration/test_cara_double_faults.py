"""The double's fault switches (for rollback drills) and its startup handling of update markers (spec 3.7)."""
import hashlib
import json
import os
import signal
import time

import pytest

from fake_llm import FakeLLM


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
    # Before binding, HEAD already holds the lock and wrote daemon.pid (v0.8.0 has neither); nothing answers yet.
    assert (host.state / "daemon.pid").exists() == (host.flavor == "head")
    if host.flavor == "head":
        assert (host.state / "daemon.pid").read_text() == "%d\n" % proc.pid
    assert host.get("/health") is None
    host.wait_for(lambda: host.get("/health"), what="the slow daemon to bind")
    assert host.stop(proc) == 0


def test_sigterm_during_slow_start_exits_0(faulty):
    host = faulty(slow_start_s=30)
    proc = host.spawn()
    host.wait_for(lambda: "slow start: delaying bind" in host.stdout(proc), what="the slow-start log line")
    assert host.stop(proc) == 0 and not (host.state / "daemon.pid").exists()


def test_stop_delay(faulty):
    """Shutdown takes stop_delay_s after SIGTERM (spec 10: up to ~5 s audit drain + 5 s + 2 s): the port is
    closed at once, the process (and HEAD's daemon.pid and lock) stay until the delay is over, then exit 0."""
    host = faulty(stop_delay_s=6.0)
    proc = host.start()
    signalled = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    host.wait_for(lambda: "shutdown: draining" in host.stdout(proc), what="the drain log line")
    assert host.get("/health") is None  # no longer listening
    assert proc.poll() is None  # but still shutting down
    assert (host.state / "daemon.pid").exists() == (host.flavor == "head")
    assert proc.wait(timeout=30) == 0
    assert time.monotonic() - signalled >= 6.0  # it cannot exit before the delay is over
    assert not (host.state / "daemon.pid").exists()


def test_normal_stop_has_no_injected_delay(faulty):
    host = faulty()
    proc = host.start()
    assert host.stop(proc) == 0
    assert "shutdown: draining" not in host.stdout(proc)


def test_autonomy_fails_when_the_provider_fails(cara_hosts, cara_flavor):
    """An agentTurn task is a model call: a failing provider ends the task `failed` (maxAttempts 1)."""
    with FakeLLM() as llm:
        host = cara_hosts(cara_hosts.flavor_versions[cara_flavor], flavor=cara_flavor, llm=llm.base_url)
        host.write_config(control(host.port))
        host.start()
        assert host.run("verify", "--outcome", "autonomy").returncode == 0
        calls = llm.chat_requests
        llm.set_faults(fail=True)
        result = host.run("verify", "--outcome", "autonomy")
    assert result.returncode == 1 and llm.chat_requests == calls + 1
    assert "[FAIL] Task terminal proof" in result.stdout and "agent turn failed" in result.stdout


# -- state migration drill ------------------------------------------------------------------------------------------

def queue_bytes(host):
    return (host.state / "tasks" / "queue.json").read_bytes()


@pytest.mark.parametrize("switch", [True, 2])
def test_migration_needs_restore_to_roll_back(cara_hosts, cara_flavor, switch):
    """migrate_state stands for a release whose task-queue migration changes a field's type (attempts becomes
    {"count": n}): it rewrites the queue at first start, older releases' serde then cannot parse it and refuse to
    start, and restoring the pre-upgrade backup makes them start again."""
    old_version = cara_hosts.flavor_versions[cara_flavor]
    host = cara_hosts(old_version, flavor=cara_flavor, name="drill")
    old_binary = host.binary
    new_binary = cara_hosts.release("0.9.1", "new", faults={"migrate_state": switch})
    host.write_config(control(host.port))
    proc = host.start()
    assert host.run("verify", "--outcome", "autonomy").returncode == 0  # one task in the queue
    host.stop(proc)
    backup = host.root / "pre-upgrade.tar.gz"
    assert host.run("backup", "-o", str(backup)).returncode == 0
    pre_upgrade = queue_bytes(host)
    assert json.loads(pre_upgrade)[0]["attempts"] == 1

    host.binary = new_binary  # upgrade: the first start migrates the queue
    proc = host.start()
    assert host.run("verify", "--outcome", "autonomy").returncode == 0
    host.stop(proc)
    migrated = json.loads(queue_bytes(host))
    assert [t["attempts"] for t in migrated] == [{"count": 1}, {"count": 1}]
    assert "migrated task queue" in host.stdout(proc)
    settled = queue_bytes(host)
    host.stop(host.start())
    assert queue_bytes(host) == settled  # no second migration

    host.binary = old_binary  # binary-only rollback: the old release fails closed
    result = host.run("start")
    assert result.returncode == 1
    assert result.stderr.startswith('Error: Runtime("failed to parse current task queue file %s; persisted tasks were '
                                    'not loaded: invalid type: map, expected u32 at line ' % (host.state / "tasks" / "queue.json"))
    assert "Remove or repair the file before restarting" in result.stderr
    assert not (host.state / "daemon.pid").exists()

    assert host.run("restore", str(backup), "--force").returncode == 0  # the runbook's restore step
    assert queue_bytes(host) == pre_upgrade
    proc = host.start()
    assert host.run("verify", "--outcome", "autonomy").returncode == 0
    assert host.stop(proc) == 0
    assert [t["attempts"] for t in json.loads(queue_bytes(host))] == [1, 1]


# -- update markers at start (spec 3.7: HEAD only) -------------------------------------------------------------------

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
    proc = host.start()
    if host.flavor == "head":
        assert not marker.exists() and not backup.exists()
    else:  # v0.8.0 has no marker handling, but deletes every *.bak beside the exe at start
        assert json.loads(marker.read_text())["startupState"] == "pending" and not backup.exists()
    assert host.stop(proc) == 0


def test_failed_start_leaves_marker_started_then_next_start_rolls_back(cara_hosts, cara_flavor):
    host = cara_hosts("0.9.1", flavor=cara_flavor, faults={"start_fail_ms": 10})
    old = b"#!/bin/sh\necho old\n"
    backup = host.binary.with_name("cara.bak")
    backup.write_bytes(old)
    new_bytes = host.binary.read_bytes()
    marker = rollback_marker(host, "pending", hashlib.sha256(old).hexdigest())
    assert host.run("start").returncode == 1
    if cara_flavor == "v0.8.0":  # no marker handling; the .bak is gone (cleanup_old_binaries before the failure)
        assert json.loads(marker.read_text())["startupState"] == "pending" and not backup.exists()
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
    # HEAD: <exe name>.bak/.old, case-insensitive; v0.8.0: every *.bak/*.old in the directory (extension as written)
    expected = [False, False, True, True] if host.flavor == "head" else [False, True, False, False]
    assert [p.exists() for p in siblings] == expected


def test_marker_for_another_binary_is_refused(cara_host):
    host = cara_host
    marker = rollback_marker(host, "pending")
    data = json.loads(marker.read_text())
    data["binaryPath"] = "/usr/local/bin/other"
    marker.write_text(json.dumps(data))
    host.stop(host.start())
    assert json.loads(marker.read_text())["startupState"] == "pending"
