"""module_utils/_cara.py: parsing cara's outputs, config handling and daemon detection (no daemon needed)."""

import fcntl
import os
import subprocess
import sys

import pytest

from ansible_collections.carapace.fleet.plugins.module_utils import _cara, _version

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
    assert _version.version_from_output("cara 0.9.0\n") == "0.9.0"
    assert _version.version_from_output("cara 0.1.0-preview3") == "0.1.0-preview3"
    assert _version.version_from_output("carapace 0.9.0") is None
    assert _version.version_from_output("") is None


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


# -- v0.8.0 writes no daemon.pid and holds no lock: the process table and the gateway port (cara-contract 10) --------

def _fake_daemon(tmp_path, state_dir, argv_tail=("start",), env_state=True):
    """A real process that looks like `cara start` (argv) with CARAPACE_STATE_DIR set, listening on a loopback port."""
    script = tmp_path / "cara"
    script.write_text("import socket,sys,time\ns=socket.socket()\ns.bind(('127.0.0.1',0))\ns.listen()\n"
                      "print(s.getsockname()[1],flush=True)\ntime.sleep(60)\n")
    env = dict(os.environ)
    if env_state:
        env["CARAPACE_STATE_DIR"] = str(state_dir)
    proc = subprocess.Popen([sys.executable, str(script)] + list(argv_tail), env=env,  # pylint: disable=consider-using-with
                            stdout=subprocess.PIPE, text=True)
    port = int(proc.stdout.readline())
    return proc, port


def test_find_daemon_without_pid_file_by_process_and_by_port(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    proc, port = _fake_daemon(tmp_path, state)
    try:
        found = _cara.find_daemon(str(state), port)
        assert found["running"] is True and found["how"] == "process" and found["pid"] == proc.pid
        assert _cara.daemon_running(str(state))[0] is True  # no port needed for the process table
        other = tmp_path / "other"
        other.mkdir()
        # another state dir: not this daemon by its environment, but whatever holds the gateway port counts
        by_port = _cara.find_daemon(str(other), port)
        assert by_port["running"] is True and by_port["how"] == "port" and by_port["pid"] == proc.pid
        assert _cara.find_daemon(str(other), None)["running"] is False
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    gone = _cara.find_daemon(str(state), port)
    assert gone["running"] is False and gone["pid"] is None and "nothing listening on port %d" % port in gone["detail"]


def test_find_daemon_ignores_other_cara_commands(tmp_path):
    """A `cara status` or `cara backup` with the same state dir is not the daemon."""
    state = tmp_path / "state"
    state.mkdir()
    proc, _port = _fake_daemon(tmp_path, state, argv_tail=("status",))
    try:
        assert _cara.daemon_processes(str(state)) == []
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


# -- config as cara resolves it ($include, env section, ${VAR}; section 2.2) -------------------------------------------

def test_load_config_resolves_includes_env_section_and_variables(tmp_path):
    (tmp_path / "gateway.json5").write_text("{ gateway: { port: 1111, control: { enabled: false } } }")
    cfg_file = tmp_path / "carapace.json5"
    cfg_file.write_text("// comment\n{ $include: 'gateway.json5', env: { PORT_FROM_CFG: 'x' },\n"
                        "  gateway: { control: { enabled: true }, auth: { token: '${GW_TOKEN}' } } }")
    cfg = _cara.load_config(str(cfg_file), environ={"GW_TOKEN": "s3cret"})
    assert _cara.gateway_facts(cfg)["port"] == 1111  # from the included file
    assert _cara.gateway_facts(cfg)["control_enabled"] is True  # local keys win over included ones
    assert cfg["gateway"]["auth"]["token"] == "s3cret"
    with pytest.raises(_cara.CaraError, match=r"\$\{GW_TOKEN\}"):
        _cara.load_config(str(cfg_file), environ={})


def test_load_config_rejects_a_directory_and_non_utf8(tmp_path):
    (tmp_path / "dir.json5").mkdir()
    with pytest.raises(_cara.CaraError, match="is a directory"):
        _cara.load_config(str(tmp_path / "dir.json5"))
    (tmp_path / "bad.json5").write_bytes(b"{ a: '\xff' }")
    with pytest.raises(_cara.CaraError, match="not UTF-8"):
        _cara.load_config(str(tmp_path / "bad.json5"))


def test_read_config_without_json5_asks_cara(tmp_path, monkeypatch):
    """A host whose Python lacks json5 must not call a valid JSON5 config unparseable: cara shows it instead."""
    cfg_file = tmp_path / "carapace.json5"
    cfg_file.write_text("{ gateway: { port: 2222 } }  // JSON5, not JSON")
    monkeypatch.setattr(_cara, "json5", None)
    fake = tmp_path / "cara"
    fake.write_text("#!/bin/sh\n[ \"$1 $2\" = 'config show' ] && { echo '{\"gateway\": {\"port\": 2222}}'; exit 0; }\nexit 1\n")
    fake.chmod(0o755)
    cli = _cara.CaraCLI(str(fake), str(tmp_path), str(cfg_file))
    assert _cara.gateway_facts(_cara.read_config(cli))["port"] == 2222
    fake.write_text("#!/bin/sh\necho 'Error: boom' >&2\nexit 1\n")
    with pytest.raises(_cara.CaraError) as info:
        _cara.read_config(cli)
    assert "no json5 module" in str(info.value) and "config show" in str(info.value) and "python3-json5" in str(info.value)
    # plain JSON needs no json5 at all
    cfg_file.write_text('{"gateway": {"port": 3333}}')
    assert _cara.gateway_facts(_cara.read_config(cli))["port"] == 3333
