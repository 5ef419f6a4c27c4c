"""module_utils/_cara.py: parsing cara's outputs, config handling and daemon detection (no daemon needed)."""

import fcntl
import os
import subprocess
import sys

import pytest

from ansible_collections.carapace.fleet.plugins.module_utils import _cara

STATUS_TEXT = """Carapace gateway status
=======================
  Version:  0.8.0
  Uptime:   1m 5s
  Address:  127.0.0.1:18789
  Status:   ok
  Channels: 0/0 connected
"""

VERIFY_FAIL = """
Outcome verification summary
----------------------------
Outcome: autonomy
Gateway port: 18789

[PASS] Gateway reachability: gateway healthy at 127.0.0.1:18789 (v0.9.0)
[PASS] Task start proof: task 1 attempts=1
[FAIL] Task terminal proof: task 1 reached state failed
      next step: inspect the task with `cara task get 1`
"""

VERIFY_SKIP = """
Outcome verification summary
----------------------------
Outcome: hooks
Gateway port: 4000

[PASS] Gateway reachability: ok
[SKIP] Signed /hooks/wake: no token
      next step: set gateway.hooks.token

Outcome verification passed with skipped checks.
"""


def test_parse_version():
    assert _cara.parse_version("cara 0.9.0\n") == "0.9.0"
    assert _cara.parse_version("cara 0.1.0-preview3") == "0.1.0-preview3"
    assert _cara.parse_version("carapace 0.9.0") is None
    assert _cara.parse_version("") is None


def test_parse_status_text():
    assert _cara.parse_status_text(STATUS_TEXT) == {"version": "0.8.0", "uptime": "1m 5s", "address": "127.0.0.1:18789",
                                                    "status": "ok", "channels": "0/0 connected"}


def test_parse_verify_failure_and_next_step():
    res = _cara.parse_verify(VERIFY_FAIL)
    assert res["outcome"] == "autonomy" and res["port"] == 18789 and res["passed"] is False
    assert [c["result"] for c in res["checks"]] == ["PASS", "PASS", "FAIL"]
    assert res["checks"][2] == {"result": "FAIL", "name": "Task terminal proof", "detail": "task 1 reached state failed",
                                "next_step": "inspect the task with `cara task get 1`"}


def test_parse_verify_passed_with_skips():
    res = _cara.parse_verify(VERIFY_SKIP)
    assert res["passed"] is True and res["skipped"] is True and res["port"] == 4000
    assert res["checks"][1]["next_step"] == "set gateway.hooks.token"


def test_config_resolution_and_redaction(tmp_path):
    assert _cara.config_path(str(tmp_path)) == str(tmp_path / "carapace.json")
    (tmp_path / "carapace.json5").write_text("""// comment
{ gateway: { port: 4242, auth: { token: 'SECRET-1', mode: 'token' }, control: { enabled: true } },
  providers: { openai: { apiKey: 'SECRET-2' } }, }""")
    path = _cara.config_path(str(tmp_path))
    assert path == str(tmp_path / "carapace.json5")
    cfg = _cara.load_config(path)
    red = _cara.redact(cfg)
    assert "SECRET" not in repr(red)
    assert red["gateway"]["port"] == 4242 and red["gateway"]["auth"]["mode"] == "token"
    assert _cara.gateway_facts(cfg) == {"port": 4242, "bind": "loopback", "control_enabled": True, "auth_mode": "token",
                                        "hooks_enabled": False}
    assert _cara.gateway_secret(cfg, environ={}) == "SECRET-1"
    assert _cara.gateway_secret(cfg, environ={"CARAPACE_GATEWAY_TOKEN": "env"}) == "env"


def test_unparseable_config_is_an_error(tmp_path):
    (tmp_path / "carapace.json5").write_text("{ gateway: ")
    with pytest.raises(_cara.CaraError, match="does not parse"):
        _cara.load_config(str(tmp_path / "carapace.json5"))


def test_gateway_defaults_and_bad_port():
    assert _cara.gateway_facts({})["port"] == 18789
    assert _cara.gateway_facts({"gateway": {"port": 70000}})["port"] == 18789
    assert _cara.gateway_facts({"gateway": {"auth": {"password": "x"}}})["auth_mode"] == "password"


@pytest.mark.parametrize("system,machine,asset", [
    ("Linux", "x86_64", "cara-x86_64-linux"), ("Linux", "aarch64", "cara-aarch64-linux"),
    ("Darwin", "arm64", "cara-aarch64-darwin"), ("Windows", "AMD64", "cara-x86_64-windows.exe"),
    ("Linux", "armv7l", None), ("FreeBSD", "x86_64", None)])
def test_platform_asset(system, machine, asset):
    assert _cara.platform_asset(system, machine) == asset


def test_daemon_running_by_lock_and_by_pid(tmp_path):
    assert _cara.daemon_running(str(tmp_path))[0] is False
    lock = tmp_path / _cara.DAEMON_LOCK
    lock.write_text("")
    holder = subprocess.Popen([sys.executable, "-c", (  # pylint: disable=consider-using-with
        "import fcntl,sys,time\nf=open(sys.argv[1],'r+')\nfcntl.flock(f,fcntl.LOCK_EX)\nprint('held',flush=True)\n"
        "time.sleep(60)"), str(lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        running, detail = _cara.daemon_running(str(tmp_path))
        assert running is True and "lock" in detail
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    assert _cara.daemon_running(str(tmp_path))[0] is False
    (tmp_path / "daemon.pid").write_text("%d\n" % os.getpid())
    assert _cara.daemon_running(str(tmp_path)) == (True, "daemon.pid names live process %d" % os.getpid())
    (tmp_path / "daemon.pid").write_text("1\n")  # pid 1 never counts (cara's own rule)
    assert _cara.daemon_running(str(tmp_path))[0] is False
    # a probe must not keep the lock: the daemon can still take it exclusively afterwards
    with open(lock, "r+", encoding="utf-8") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_cli_status_falls_back_to_text_on_v080(tmp_path):
    """A release without `status --json` (clap usage error, exit 2) is read through the text block."""
    fake = tmp_path / "cara"
    fake.write_text("#!/bin/sh\nfor a in \"$@\"; do [ \"$a\" = --json ] && { echo 'error: unexpected argument' >&2; exit 2; }; done\n"
                    "printf 'Carapace gateway status\\n  Version:  0.8.0\\n  Status:   ok\\n'\n")
    fake.chmod(0o755)
    res = _cara.CaraCLI(str(fake), str(tmp_path)).status(port=1234)
    assert res["format"] == "text" and res["health"] == {"version": "0.8.0", "status": "ok"}
    assert res["argv"][-2:] == ["--port", "1234"]
