"""Conformance of the `cara` double: `cara status` (spec 1.3) and `cara verify` (spec 1.7), both flavors."""
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

STATUS_DOWN = ("Could not connect to carapace at {host}:{port}\n  Error: error sending request: Connection refused "
               "(os error 111)\n\nIs the server running? Start it with: cara start\n")


@pytest.fixture
def host(cara_host):
    return cara_host


@pytest.fixture
def any_host(cara_hosts):
    """For behaviour with no flavor difference in the spec: one flavor is enough."""
    return cara_hosts("0.9.0")


def control(port, **auth):
    return {"gateway": {"port": port, "control": {"enabled": True}, "auth": auth}}


class StubHealth(BaseHTTPRequestHandler):
    """A fake gateway whose /health answers what the test asks for."""
    reply = (200, b"{}")

    def do_GET(self):
        status, body = self.reply
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        """Quiet."""


@pytest.fixture
def stub_gateway():
    """Factory: stub_gateway(status, body) -> port of a server answering every GET with that reply."""
    servers = []

    def make(status, body):
        handler = type("Stub", (StubHealth,), {"reply": (status, body)})
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(server)
        return server.server_address[1]
    yield make
    for server in servers:
        server.shutdown()
        server.server_close()


# -- status --------------------------------------------------------------------------------------------------------

def test_status_text(host):
    host.start()
    result = host.run("status")
    lines = result.stdout.splitlines()
    assert result.returncode == 0 and result.stderr == ""
    assert lines[:2] == ["Carapace gateway status", "======================="]
    assert lines[2] == "  Version:  %s" % host.version
    assert re.fullmatch(r"  Uptime:   \d+s", lines[3])
    assert lines[4:] == ["  Address:  127.0.0.1:%d" % host.port, "  Status:   ok"]


def test_status_shows_control_info_only_without_auth(host):
    host.write_config(control(host.port, mode="none"))
    host.start()
    lines = host.run("status").stdout.splitlines()
    assert lines[6] == "  Channels: 0/0 connected"
    assert re.fullmatch(r"  Platform: linux \(\w+\)", lines[7])


def test_status_hides_control_info_behind_token(host):
    host.write_config(control(host.port, token="t"))
    host.start()
    assert "Channels:" not in host.run("status").stdout


@pytest.mark.parametrize("flag", ["-p", "--port"])
def test_status_port_flag_and_host(host, flag):
    host.start()
    other = host.free_port()
    host.write_config({"gateway": {"port": other}})
    assert host.run("status", flag, str(host.port)).returncode == 0
    assert host.run("status", flag, str(host.port), "--host", "127.0.0.1").returncode == 0
    down = host.run("status", "--host", "127.0.0.1")
    assert (down.returncode, down.stdout) == (1, "")
    assert down.stderr == STATUS_DOWN.format(host="127.0.0.1", port=other)


def test_status_default_port_is_18789_without_config(host):
    host.config_file.unlink()
    result = host.run("status")
    assert result.stderr.startswith("Could not connect to carapace at 127.0.0.1:18789\n")


def test_status_json(host):
    host.write_config(control(host.port, mode="local"))
    host.start()
    result = host.run("status", "--json")
    if host.flavor == "v0.8.0":
        assert result.returncode == 2 and "unexpected argument '--json'" in result.stderr
        return
    report = json.loads(result.stdout)
    assert result.returncode == 0 and list(report) == ["controlStatus", "health"]
    assert report["health"]["version"] == host.version and report["controlStatus"]["ok"] is True
    assert result.stdout == json.dumps(report, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def test_status_json_without_control(host):
    host.start()
    result = host.run("status", "--json")
    if host.flavor == "head":
        assert list(json.loads(result.stdout)) == ["health"]
    else:
        assert result.returncode == 2


def test_status_non_2xx(host, stub_gateway):
    port = stub_gateway(503, b"down for maintenance")
    result = host.run("status", "-p", str(port))
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == "Health endpoint returned HTTP 503 Service Unavailable: down for maintenance\n"


def test_status_body_not_json(host, stub_gateway):
    port = stub_gateway(200, b"<html>")
    result = host.run("status", "-p", str(port))
    assert result.returncode == 1 and result.stderr.startswith('Error: "error decoding response body')


def test_status_strips_terminal_escapes(host, stub_gateway):
    port = stub_gateway(200, json.dumps({"status": "ok\x1b[31m", "version": "1\x07.0", "uptimeSeconds": 3725}).encode())
    lines = host.run("status", "-p", str(port)).stdout.splitlines()
    assert lines[2] == "  Version:  1.0" and lines[3] == "  Uptime:   1h 2m 5s" and lines[5] == "  Status:   ok[31m"


@pytest.mark.parametrize("seconds, text", [(59, "59s"), (61, "1m 1s"), (3600, "1h 0m 0s"), (90061, "1d 1h 1m 1s")])
def test_status_uptime_format(any_host, stub_gateway, seconds, text):
    host = any_host
    port = stub_gateway(200, json.dumps({"status": "ok", "version": "x", "uptimeSeconds": seconds}).encode())
    assert host.run("status", "-p", str(port)).stdout.splitlines()[3] == "  Uptime:   " + text


# -- verify --------------------------------------------------------------------------------------------------------

def summary(result):
    """The check lines of a verify run."""
    return [line for line in result.stdout.splitlines() if line.startswith("[")]


def header(outcome, port):
    return "\nOutcome verification summary\n----------------------------\nOutcome: %s\nGateway port: %d\n\n" % (outcome, port)


def test_verify_autonomy_passes_against_running_daemon(host):
    host.write_config(control(host.port, token="t"))
    host.start()
    result = host.run("verify", "--outcome", "autonomy")
    assert result.returncode == 0 and result.stderr == ""
    assert result.stdout.startswith(header("autonomy", host.port))
    assert result.stdout.endswith("\n\nOutcome verification passed.\n")
    checks = summary(result)
    assert [c.split(":")[0] for c in checks] == ["[PASS] Gateway reachability", "[PASS] Task start proof",
                                                 "[PASS] Task terminal proof"]
    assert "reached state done" in checks[2]
    queue = json.loads((host.state / "tasks" / "queue.json").read_text())
    assert queue[0]["payload"] == {"kind": "agentTurn", "message": "verify-autonomy"}
    assert queue[0]["policy"] == {"maxAttempts": 1, "maxTotalRuntimeMs": 60000, "maxTurns": 1,
                                  "maxRunTimeoutSeconds": 30}
    assert queue[0]["policyExplicit"] is True


def test_verify_autonomy_uses_env_token(host):
    host.write_config(control(host.port, token="cfg"))
    host.start(env=host.env(CARAPACE_GATEWAY_TOKEN="env"))
    assert host.run("verify", "--outcome", "autonomy").returncode == 1
    assert host.run("verify", "--outcome", "autonomy", env=host.env(CARAPACE_GATEWAY_TOKEN="env")).returncode == 0


def test_verify_autonomy_needs_control_enabled(host):
    host.start()
    result = host.run("verify", "--outcome", "autonomy")
    assert result.returncode == 1
    assert result.stderr == 'Error: "outcome verification failed"\n'
    assert summary(result)[1].startswith("[FAIL] Task creation: POST /control/tasks returned HTTP 404")
    assert "      next step: set gateway.control.enabled: true" in result.stdout
    assert "\nNext help path: https://" in result.stdout


def test_verify_starts_embedded_gateway_when_down(host):
    host.write_config(control(host.port, token="t"))
    result = host.run("verify", "--outcome", "autonomy", "-p", str(host.port))
    assert result.returncode == 0, result.stderr
    assert result.stderr == "Starting embedded gateway on port %d...\n" % host.port
    assert summary(result)[0].startswith("[PASS] Gateway reachability: embedded gateway healthy")
    assert not (host.state / "daemon.pid").exists()
    assert json.loads((host.state / "tasks" / "queue.json").read_text())[0]["state"] == "done"
    assert host.get("/health") is None


def test_verify_embedded_gateway_and_the_daemon_lock(host):
    """HEAD: the embedded gateway takes the daemon lock too, so it cannot start beside a daemon; v0.8.0 has no
    lock and runs it (spec 1.7, 10)."""
    host.write_config({"gateway": {"port": host.port, "auth": {"mode": "none"}}})
    host.start()
    other = host.free_port()
    result = host.run("verify", "--outcome", "local-chat", "--port", str(other))
    if host.flavor == "head":
        assert result.returncode == 1
        assert summary(result)[0].startswith("[FAIL] Gateway reachability: Matrix rekey lock at ")
        assert "already held" in result.stdout
    else:
        assert result.returncode == 0, result.stdout + result.stderr
        assert summary(result)[0].startswith("[PASS] Gateway reachability: embedded gateway healthy")


def test_verify_local_chat_records_session_and_usage(host):
    host.write_config({"gateway": {"port": host.port, "auth": {"token": "t"}}})
    host.start()
    result = host.run("verify", "--outcome", "local-chat")
    assert result.returncode == 0
    assert summary(result)[1] == "[PASS] Local chat roundtrip: received verification-ok"
    sessions = sorted(p.name for p in (host.state / "sessions").iterdir())
    assert len(sessions) == 2 and sessions[0].endswith(".json") and sessions[1].endswith(".jsonl")
    assert json.loads((host.state / "usage.json").read_text())["totals"]["requests"] == 1


def test_verify_local_chat_without_credentials_fails(host):
    host.start()
    result = host.run("verify", "--outcome", "local-chat")
    assert result.returncode == 1 and summary(result)[1].startswith("[FAIL] Local chat roundtrip")


def test_verify_auto_resolves_local_chat(host):
    host.write_config({"gateway": {"port": host.port, "auth": {"mode": "none"}}})
    host.start()
    result = host.run("verify")
    assert result.returncode == 0 and result.stdout.startswith(header("local-chat", host.port))


def test_verify_auto_resolves_hooks(host):
    host.write_config({"gateway": {"port": host.port, "hooks": {"enabled": True, "token": "hk"}}})
    host.start()
    result = host.run("verify", "--outcome", "auto")
    assert result.returncode == 0 and result.stdout.startswith(header("hooks", host.port))
    assert [c.split(":")[0] for c in summary(result)] == ["[PASS] Gateway reachability", "[PASS] Hooks enabled",
                                                          "[PASS] Hooks token", "[PASS] Signed /hooks/wake"]


def test_verify_hooks_env_token_and_failures(host):
    host.write_config({"gateway": {"port": host.port, "hooks": {"enabled": True}}})
    host.start(env=host.env(CARAPACE_HOOKS_TOKEN="hk"))
    assert summary(host.run("verify", "--outcome", "hooks"))[2].startswith("[FAIL] Hooks token")
    assert host.run("verify", "--outcome", "hooks", env=host.env(CARAPACE_HOOKS_TOKEN="hk")).returncode == 0
    wrong = host.run("verify", "--outcome", "hooks", env=host.env(CARAPACE_HOOKS_TOKEN="nope"))
    assert wrong.returncode == 1 and summary(wrong)[3].startswith("[FAIL] Signed /hooks/wake: POST /hooks/wake returned 401")


def test_verify_hooks_disabled(host):
    host.start()
    result = host.run("verify", "--outcome", "hooks")
    assert result.returncode == 1 and summary(result)[1] == "[FAIL] Hooks enabled: gateway.hooks.enabled is not true"


def test_verify_hooks_ignores_custom_path(host):
    host.write_config({"gateway": {"port": host.port, "hooks": {"enabled": True, "token": "hk", "path": "/in"}}})
    host.start()
    assert host.run("verify", "--outcome", "hooks").returncode == 1
    assert host.get("/in/wake", method="POST", body={}, headers={"Authorization": "Bearer hk"})[0] == 200


def test_verify_bot_outcomes_skip_without_destination(host):
    host.write_config({"gateway": {"port": host.port}, "telegram": {"botToken": "123:abc"}})
    result = host.run("verify")
    assert result.returncode == 0 and result.stdout.startswith(header("telegram", host.port))
    assert result.stdout.endswith("\nOutcome verification passed with skipped checks.\n")
    assert "[SKIP] Send path: no --telegram-to destination given" in result.stdout


def test_verify_bot_outcome_without_token(host):
    result = host.run("verify", "--outcome", "discord")
    assert result.returncode == 1 and summary(result) == ["[FAIL] Bot token: discord.botToken is not configured"]


def test_verify_matrix_is_head_only(host):
    result = host.run("verify", "--outcome", "matrix")
    if host.flavor == "head":
        assert result.returncode == 1 and summary(result)[-1].startswith("[FAIL] Matrix config")
    else:
        assert result.returncode == 2 and "invalid value 'matrix'" in result.stderr
    assert host.run("verify", "--matrix-to", "!r:x").returncode == (1 if host.flavor == "head" else 2)


def test_verify_config_must_load(host):
    host.config_file.write_text("{gateway: ")
    result = host.run("verify")
    assert result.returncode == 1
    assert result.stderr.startswith('Error: "failed to load config: ')
    assert result.stderr.endswith('. Run `cara setup` first."\n')


# -- local-chat through the provider (spec 1.7, 10) ------------------------------------------------------------

def chat_host(cara_hosts, cara_flavor, **kwargs):
    host = cara_hosts(cara_hosts.flavor_versions[cara_flavor], flavor=cara_flavor, **kwargs)
    host.write_config({"gateway": {"port": host.port, "auth": {"token": "t"}}})
    return host


def test_local_chat_is_a_round_trip_through_the_provider(cara_hosts, cara_flavor, llm):
    host = chat_host(cara_hosts, cara_flavor)
    host.start()
    before = llm.chat_requests
    result = host.run("verify", "--outcome", "local-chat", env=host.env(CARAPACE_GATEWAY_TOKEN="t"))
    assert result.returncode == 0, result.stdout
    assert llm.chat_requests == before + 1
    assert llm.stats()["last_messages"][-1] == {"role": "user", "content": "Reply with exactly: verification-ok"}


def test_local_chat_fails_when_the_provider_fails(cara_hosts, cara_flavor, llm):
    host = chat_host(cara_hosts, cara_flavor)
    host.start()
    llm.set_faults(fail=True)
    result = host.run("verify", "--outcome", "local-chat")
    assert result.returncode == 1 and result.stderr == 'Error: "outcome verification failed"\n'
    assert summary(result)[1].startswith("[FAIL] Local chat roundtrip: agent run failed: Ollama API returned HTTP 500")
    assert json.loads((host.state / "usage.json").read_text())["totals"]["requests"] == 0


def test_local_chat_passes_slowly_with_a_slow_provider(any_host, llm):
    host = any_host
    host.write_config({"gateway": {"port": host.port, "auth": {"mode": "none"}}})
    host.start()
    llm.set_faults(delay_s=3.0)
    result = host.run("verify", "--outcome", "local-chat")
    assert result.returncode == 0 and summary(result)[1] == "[PASS] Local chat roundtrip: received verification-ok"


def test_local_chat_fails_when_the_provider_is_down(any_host):
    host = any_host
    host.write_config({"gateway": {"port": host.port, "auth": {"mode": "none"}},
                       "providers": {"ollama": {"baseUrl": "http://127.0.0.1:%d" % host.free_port()}}})
    host.start()
    result = host.run("verify")
    assert result.returncode == 1
    assert summary(result)[1].startswith("[FAIL] Local chat roundtrip: agent run failed: Ollama request to ")


def test_local_chat_with_a_provider_the_double_cannot_call(any_host):
    host = any_host
    host.write_config({"gateway": {"port": host.port, "auth": {"mode": "none"}}, "providers": {}})
    host.start(env=host.env(ANTHROPIC_API_KEY="sk-test"))
    result = host.run("verify")
    assert result.returncode == 1 and "the anthropic provider is configured" in summary(result)[1]


def test_local_chat_reply_must_be_exact(any_host):
    """A provider that answers something else fails the check (the fake repeats only `Reply with exactly: X`)."""
    host = any_host
    host.write_config({"gateway": {"port": host.port, "auth": {"mode": "none"}}})
    host.start()
    status, _headers, body = host.get("/__double/chat", method="POST", body={"message": "hello"})
    assert status == 200 and json.loads(body)["reply"] == "Hello from the fake LLM."


def test_embedded_gateway_without_provider(cara_hosts, cara_flavor):
    host = chat_host(cara_hosts, cara_flavor, llm=False)
    result = host.run("verify", "--outcome", "local-chat")
    assert result.returncode == 1
    assert summary(result)[0].startswith("[FAIL] Gateway reachability: No LLM provider configured. Configure at least")
    assert host.get("/health") is None and not (host.state / "daemon.pid").exists()


def test_embedded_gateway_pid_guard_is_head_only(cara_hosts, cara_flavor, llm):
    """While verify's embedded gateway runs, HEAD has daemon.pid and the lock; v0.8.0 has neither."""
    host = chat_host(cara_hosts, cara_flavor)
    llm.set_faults(delay_s=1.5)
    proc = host.spawn("verify", "--outcome", "local-chat", env=host.env(CARAPACE_GATEWAY_TOKEN="t"))
    host.wait_for(lambda: host.get("/health"), what="the embedded gateway")
    assert (host.state / "daemon.pid").exists() == (cara_flavor == "head")
    assert (host.state / ".matrix-rekey.lock.lock").exists() == (cara_flavor == "head")
    assert proc.wait(timeout=60) == 0
    assert not (host.state / "daemon.pid").exists()
