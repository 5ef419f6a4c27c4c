"""Conformance of the `cara` double: releases, version, CLI conventions, daemon lifecycle, HTTP (spec 1.0-1.2, 1.10, 2)."""
import fcntl
import json
import os
import platform
import re
import shutil
import signal
import socket
import stat

import pytest

from cara_double import build_release, default_flavor

SUBDIRS = ("sessions", "cron", "tasks", "activity", "plugins", "credentials", "matrix", "agents", "updates")


@pytest.fixture
def host(cara_host):
    return cara_host


@pytest.fixture
def any_host(cara_hosts):
    """For behaviour with no flavor difference in the spec (paths, bind modes): one flavor is enough."""
    return cara_hosts("0.9.0")


# -- releases ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("version, expected", [("v0.7.0", "v0.8.0"), ("0.8.0", "v0.8.0"), ("v0.9.0", "head"),
                                               ("0.9.1", "head"), ("1.0.0", "head"), ("0.10.0", "head")])
def test_flavor_follows_version(version, expected):
    assert default_flavor(version) == expected


def test_build_release_bakes_header_and_is_executable(tmp_path):
    path = build_release("v0.9.1", tmp_path / "cara", faults={"ready_never": True})
    text = path.read_text()
    assert text.startswith("#!/usr/bin/env python3\n")
    assert stat.S_IMODE(path.stat().st_mode) == 0o755
    assert "VERSION = '0.9.1'" in text and "FLAVOR = 'head'" in text and "FAULTS = {'ready_never': True}" in text


def test_build_release_is_reproducible(tmp_path):
    first = build_release("0.8.0", tmp_path / "a").read_bytes()
    assert first == build_release("0.8.0", tmp_path / "b").read_bytes()
    assert first != build_release("0.8.0", tmp_path / "c", flavor="head").read_bytes()


@pytest.mark.parametrize("kwargs", [{"flavor": "v0.7.0"}, {"faults": {"no_such_fault": 1}},
                                    {"faults": {"start_fail_ms": "10"}}, {"faults": {"ready_never": 1}},
                                    {"faults": {"migrate_state": 1}}, {"faults": {"migrate_state": False}},
                                    {"faults": {"stop_delay_s": 12.5}}, {"faults": {"stop_delay_s": "1"}}])
def test_build_release_rejects_bad_switches(tmp_path, kwargs):
    with pytest.raises(ValueError):
        build_release("0.9.0", tmp_path / "cara", **kwargs)


# -- version (spec 1.1) --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_version_flag(host, flag):
    result = host.run(flag)
    assert (result.returncode, result.stdout, result.stderr) == (0, "cara %s\n" % host.version, "")


def test_version_subcommand_block(host):
    result = host.run("version")
    arch = {"amd64": "x86_64", "arm64": "aarch64"}.get(platform.machine().lower(), platform.machine().lower())
    lines = result.stdout.splitlines()
    assert result.returncode == 0 and len(lines) == 4
    assert lines[0] == "cara %s" % host.version
    assert lines[1] == "  Build date: unknown"
    assert re.fullmatch(r"  Git commit: [0-9a-f]{8}", lines[2])
    assert lines[3] == "  Platform:   linux (%s)" % arch


# -- CLI conventions (spec 1.0, 1.8) ---------------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["frobnicate"], "error: unrecognized subcommand 'frobnicate'"),
    (["start", "--port", "1"], "error: unexpected argument '--port' found"),
    (["restore", "--path", "x.tar.gz"], "error: unexpected argument '--path' found"),
    (["status", "--port", "notaport"], "error: "),
    (["verify", "--outcome", "carrier-pigeon"], "error: invalid value 'carrier-pigeon' for '--outcome <OUTCOME>'"),
])
def test_usage_errors_exit_2(host, args, message):
    result = host.run(*args)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith(message)
    assert "For more information, try '--help'." in result.stderr


def test_update_is_a_documented_gap(host):
    result = host.run("update", "--check")
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.startswith('Error: "`cara update` is not implemented by the carapace.fleet cara double')


def test_flavor_specific_subcommands(host):
    result = host.run("matrix")
    assert result.returncode == (1 if host.flavor == "head" else 2)


# -- daemon lifecycle (spec 1.2, 2.3) ----------------------------------------------------------------------------

@pytest.mark.parametrize("args", [[], ["start"]])
def test_start_pid_file_and_lock_are_head_only_and_sigterm_exits_0(host, args):
    """HEAD's DaemonPidGuard writes daemon.pid and holds the lock; v0.8.0 has neither (spec 1.2 step 6, 10)."""
    proc = host.start(*args)
    lock = host.state / ".matrix-rekey.lock.lock"
    if host.flavor == "head":
        assert (host.state / "daemon.pid").read_text() == "%d\n" % proc.pid
        with open(lock, "r+") as handle:
            with pytest.raises(BlockingIOError):
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    else:
        assert not (host.state / "daemon.pid").exists() and not lock.exists()
    assert stat.S_IMODE(host.state.stat().st_mode) == 0o700
    for name in SUBDIRS:
        assert stat.S_IMODE((host.state / name).stat().st_mode) == 0o700, name
    assert host.stop(proc) == 0
    assert not (host.state / "daemon.pid").exists()
    assert host.get("/health") is None
    if host.flavor == "head":
        with open(lock, "r+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_sigint_also_stops_cleanly(host):
    proc = host.start()
    assert host.stop(proc, signal.SIGINT) == 0
    assert not (host.state / "daemon.pid").exists()


def test_banner_logs_are_json_lines_on_stdout(host):
    proc = host.start()
    host.stop(proc)
    messages = [json.loads(line)["fields"]["message"] for line in host.stdout(proc).splitlines()]
    assert "Carapace gateway v%s" % host.version in messages
    assert "Listening on 127.0.0.1:%d" % host.port in messages
    assert "State directory: %s" % host.state in messages


def test_dev_mode_logs_plaintext(any_host):
    host = any_host
    proc = host.start(env=host.env(CARAPACE_DEV="1"))
    host.stop(proc)
    assert " INFO carapace: Listening on 127.0.0.1:%d" % host.port in host.stdout(proc)


def test_second_daemon_on_same_state_dir(host):
    """HEAD: the daemon lock refuses a second daemon; v0.8.0 has no lock and runs both (spec 10)."""
    first = host.start()
    port = host.free_port()
    host.write_config({"gateway": {"port": port}})
    if host.flavor == "head":
        second = host.run("start")
        assert second.returncode == 1
        assert "is already held — another carapace daemon is running" in second.stderr
        assert (host.state / "daemon.pid").read_text() == "%d\n" % first.pid
    else:
        second = host.start(port=port)
        assert host.get("/health")[0] == 200 and host.http_get(port, "/health")[0] == 200
        assert host.stop(second) == 0 and host.stop(first) == 0


def test_refuses_state_dir_owned_by_another_user(host):
    host.state.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        os.chown(host.state, 4242, 4242)
        state = host.state
    else:  # an unprivileged run cannot give a dir away; a root-owned one is foreign to it
        state = "/"
    result = host.run("start", env=host.env(CARAPACE_STATE_DIR=str(state)))
    assert result.returncode == 1
    assert "is owned by uid" in result.stderr and "refusing to start" in result.stderr
    assert not (host.state / "sessions").exists()


def test_refuses_symlinked_state_subdir(any_host, tmp_path):
    host = any_host
    host.state.mkdir(parents=True, exist_ok=True)
    (tmp_path / "elsewhere").mkdir()
    (host.state / "sessions").symlink_to(tmp_path / "elsewhere")
    result = host.run("start")
    assert result.returncode == 1 and "is a symlink; refusing to start" in result.stderr


def test_schema_error_aborts_startup(host):
    host.write_config({"gateway": {"port": 70000}})
    result = host.run("start")
    assert result.returncode == 1
    assert result.stderr == 'Error: "Configuration contains errors — aborting startup"\n'
    assert "gateway.port" in result.stdout


def test_bad_auth_mode_aborts_startup(any_host):
    host = any_host
    host.write_config({"gateway": {"port": host.port, "auth": {"mode": "kerberos"}}})
    assert host.run("start").returncode == 1


def test_port_in_use_fails_and_cleans_up(host):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", host.port))
        busy.listen()
        result = host.run("start")
    assert result.returncode == 1 and "failed to bind 127.0.0.1:%d" % host.port in result.stderr
    assert not (host.state / "daemon.pid").exists()


@pytest.mark.parametrize("bind, listening", [("loopback", "127.0.0.1"), ("localhost", "127.0.0.1"),
                                             ("all", "0.0.0.0"), ("0.0.0.0", "0.0.0.0"), ("127.0.0.1", "127.0.0.1")])
def test_gateway_bind(any_host, bind, listening):
    host = any_host
    host.write_config({"gateway": {"port": host.port, "bind": bind}})
    proc = host.start()
    host.stop(proc)
    assert "Listening on %s:%d" % (listening, host.port) in host.stdout(proc)


def test_bind_literal_with_port(any_host):
    host = any_host
    port = host.free_port()
    host.write_config({"gateway": {"bind": "127.0.0.1:%d" % port}})
    proc = host.start(port=port)
    assert host.stop(proc) == 0


# -- config resolution (spec 2.2) -------------------------------------------------------------------------------

def provider(host):
    """The config section naming the host's LLM provider (a config written by hand needs one, spec 10)."""
    return {"providers": {"ollama": {"baseUrl": host.llm_url}}}


def test_config_path_prefers_json5_then_json(any_host):
    host = any_host
    host.config_file.unlink()
    assert host.run("config", "path").stdout == "%s\n" % (host.state / "carapace.json")
    (host.state / "carapace.json").write_text(json.dumps({"gateway": {"port": host.port}, **provider(host)}))
    proc = host.start()
    assert host.stop(proc) == 0
    host.write_config({"gateway": {"port": host.port}})
    assert host.run("config", "path").stdout == "%s\n" % host.config_file


def test_config_path_env_wins(any_host, tmp_path):
    host = any_host
    custom = tmp_path / "custom.json5"
    port = host.free_port()
    custom.write_text("{gateway: {port: %d}, // comment\n providers: %s}" % (port, json.dumps(provider(host)["providers"])))
    env = host.env(CARAPACE_CONFIG_PATH=str(custom))
    assert host.run("config", "path", env=env).stdout == "%s\n" % custom
    proc = host.start(env=env, port=port)
    assert host.stop(proc) == 0


def test_default_state_dir_is_xdg_config_home(any_host, tmp_path):
    host = any_host
    xdg = tmp_path / "xdg"
    (xdg / "carapace").mkdir(parents=True)
    port = host.free_port()
    (xdg / "carapace" / "carapace.json5").write_text(json.dumps({"gateway": {"port": port}, **provider(host)}))
    env = host.env(CARAPACE_STATE_DIR=None, XDG_CONFIG_HOME=str(xdg))
    proc = host.start(env=env, port=port)
    assert (xdg / "carapace" / "daemon.pid").read_text() == "%d\n" % proc.pid
    assert host.stop(proc) == 0


def test_default_state_dir_is_home_dot_config(any_host):
    host = any_host
    port = host.free_port()
    base = host.home / ".config" / "carapace"
    base.mkdir(parents=True)
    (base / "carapace.json").write_text(json.dumps({"gateway": {"port": port}, **provider(host)}))
    proc = host.start(env=host.env(CARAPACE_STATE_DIR=None), port=port)
    assert (base / "daemon.pid").exists() and host.stop(proc) == 0


def test_config_includes_and_env_substitution(any_host, tmp_path):
    host = any_host
    (host.state / "net.json5").write_text("{gateway: {port: ${DOUBLE_PORT}}}".replace("${DOUBLE_PORT}", str(host.port)))
    host.config_file.write_text('{"$include": "net.json5", gateway: {auth: {token: "${DOUBLE_TOKEN}"}}}')
    assert host.run("config", "get", "gateway.auth.token").stdout == '"${DOUBLE_TOKEN}"\n'
    assert host.run("config", "get", "gateway.port").returncode == 1
    shown = host.run("config", "show", env=host.env(DOUBLE_TOKEN="t0k"))
    assert json.loads(shown.stdout)["gateway"] == {"port": host.port, "auth": {"token": "[REDACTED]"}}
    missing = host.run("config", "show")
    assert missing.returncode == 1 and "DOUBLE_TOKEN" in missing.stderr


def test_config_get_missing_key(any_host):
    host = any_host
    result = host.run("config", "get", "gateway.bind")
    assert (result.returncode, result.stderr) == (1, "Key not found: gateway.bind\n")


# -- HTTP endpoints (spec 1.10) ---------------------------------------------------------------------------------

def test_health_endpoints(host):
    host.start()
    for path in ("/health", "/health/live"):
        status, headers, body = host.get(path)
        data = json.loads(body)
        assert status == 200 and headers["Content-Type"] == "application/json"
        assert set(data) == {"status", "version", "uptimeSeconds"}
        assert data["status"] == "ok" and data["version"] == host.version
        assert isinstance(data["uptimeSeconds"], int)
    status, headers, body = host.get("/health/ready")
    assert status == 200 and json.loads(body)["status"] == "ready" and "Retry-After" not in headers
    status, headers, body = host.get("/metrics")
    assert status == 200 and headers["Content-Type"] == "text/plain; version=0.0.4"
    assert 'carapace_build_info{version="%s"} 1' % host.version in body.decode()
    for path in ("/healthz", "/ready", "/readyz", "/livez", "/control/status", "/control/tasks"):
        assert host.get(path)[0] == 404, path


def test_ready_is_503_when_state_dir_unwritable(host):
    host.start()
    shutil.rmtree(host.state)
    status, headers, body = host.get("/health/ready")
    assert status == 503 and headers["Retry-After"] == "5"
    assert json.loads(body)["status"] == "not_ready"
    assert host.get("/health")[0] == 200


def control_config(port, **auth):
    return {"gateway": {"port": port, "control": {"enabled": True}, "auth": auth}}


def test_control_status_requires_bearer_token(host):
    host.write_config(control_config(host.port, token="cfg-token"))
    host.start()
    assert host.get("/control/status")[0] == 401
    assert host.get("/control/status", headers={"Authorization": "Bearer wrong"})[0] == 401
    status, _unused, body = host.get("/control/status", headers={"Authorization": "Bearer cfg-token"})
    data = json.loads(body)
    assert status == 200 and data["ok"] is True and data["version"] == host.version
    assert {"startedAt", "uptimeSeconds", "connectedChannels", "totalChannels"} <= set(data)
    assert data["runtime"]["name"] == "carapace" and data["runtime"]["platform"] == "linux"
    assert {"storageWritable", "diskFreeBytes", "memoryRssBytes", "openFds"} <= set(data["diagnostics"])


def test_env_token_takes_precedence(host):
    host.write_config(control_config(host.port, token="cfg-token"))
    host.start(env=host.env(CARAPACE_GATEWAY_TOKEN="env-token"))
    assert host.get("/control/status", headers={"Authorization": "Bearer cfg-token"})[0] == 401
    assert host.get("/control/status", headers={"Authorization": "Bearer env-token"})[0] == 200


def test_password_mode(any_host):
    host = any_host
    host.write_config(control_config(host.port, password="pw"))
    host.start()
    assert host.get("/control/status", headers={"Authorization": "Bearer pw"})[0] == 200
    assert host.get("/control/status")[0] == 401


@pytest.mark.parametrize("mode", ["none", "local"])
def test_auth_mode_none_lets_loopback_in(any_host, mode):
    host = any_host
    host.write_config(control_config(host.port, mode=mode))
    host.start()
    assert host.get("/control/status")[0] == 200


def test_token_mode_without_token_refuses_everyone(any_host):
    host = any_host
    host.write_config(control_config(host.port))
    host.start()
    assert host.get("/control/status", headers={"Authorization": "Bearer "})[0] == 401


def test_control_tasks_lifecycle_persists_queue(host):
    host.write_config(control_config(host.port, token="t"))
    host.start()
    auth = {"Authorization": "Bearer t"}
    assert host.get("/control/tasks", method="POST", body={"payload": {"kind": "agentTurn"}})[0] == 401
    status, _unused, body = host.get("/control/tasks", method="POST", headers=auth,
                                     body={"payload": {"kind": "agentTurn", "message": "hi"}, "policy": {"maxAttempts": 1}})
    task = json.loads(body)
    assert status == 201 and task["state"] in ("queued", "running", "done")

    def finished():
        got = json.loads(host.get("/control/tasks/%s" % task["id"], headers=auth)[2])
        return got if got["state"] == "done" else None
    done = host.wait_for(finished, what="the task to finish")
    assert done["attempts"] == 1 and done["payload"] == {"kind": "agentTurn", "message": "hi"}
    listed = json.loads(host.get("/control/tasks", headers=auth)[2])["tasks"]
    assert [t["id"] for t in listed] == [task["id"]]
    queue = json.loads((host.state / "tasks" / "queue.json").read_text())
    assert isinstance(queue, list) and queue[0]["state"] == "done" and queue[0]["attempts"] == 1
    assert list(queue[0]) == ["id", "state", "attempts", "nextRunAtMs", "lastError", "payload", "createdAtMs",
                              "updatedAtMs", "policy", "policyExplicit"]
    assert host.get("/control/tasks/nope", headers=auth)[0] == 404


def test_hooks_wake_route(host):
    host.write_config({"gateway": {"port": host.port, "hooks": {"enabled": True, "token": "hk"}}})
    host.start()
    assert host.get("/hooks/wake", method="POST", body={"text": "x"})[0] == 401
    assert host.get("/hooks/wake", method="POST", body={"text": "x"}, headers={"Authorization": "Bearer hk"})[0] == 200


def test_start_creates_no_task_or_cron_file(host):
    """A missing tasks/queue.json or cron/jobs.json is an empty list; a start writes neither (src/tasks/mod.rs)."""
    proc = host.start()
    host.stop(proc)
    assert not (host.state / "tasks" / "queue.json").exists() and not (host.state / "cron" / "jobs.json").exists()
    assert json.loads((host.state / "usage.json").read_text())["totals"]["requests"] == 0


def write_queue(host, tasks):
    (host.state / "tasks").mkdir(parents=True, exist_ok=True)
    (host.state / "tasks" / "queue.json").write_text(json.dumps(tasks, indent=2) + "\n")


def durable_task(task_id, state="done", **extra):
    return dict({"id": task_id, "state": state, "attempts": 1, "nextRunAtMs": None, "lastError": None,
                 "payload": {"kind": "agentTurn", "message": "hello"}, "createdAtMs": 1, "updatedAtMs": 2,
                 "policy": {"maxAttempts": 3, "maxTotalRuntimeMs": 60000, "maxTurns": 1, "maxRunTimeoutSeconds": 30}},
                **extra)


def test_bare_array_queue_is_read_and_left_alone(host):
    """A queue of finished tasks in the real format is loaded as is and not rewritten by a start."""
    host.write_config(control_config(host.port, token="t"))
    write_queue(host, [durable_task("a"), durable_task("b", state="failed", lastError="boom")])
    before = (host.state / "tasks" / "queue.json").read_bytes()
    proc = host.start()
    listed = json.loads(host.get("/control/tasks", headers={"Authorization": "Bearer t"})[2])["tasks"]
    assert [(t["id"], t["state"]) for t in listed] == [("a", "done"), ("b", "failed")]
    host.stop(proc)
    assert (host.state / "tasks" / "queue.json").read_bytes() == before


def test_running_task_is_recovered_and_unknown_keys_dropped(host, llm):
    """`running` at load becomes retry_wait ("recovered after restart") and is run again; serde drops unknown keys."""
    host.write_config(control_config(host.port, token="t"))
    write_queue(host, [durable_task("r", state="running", futureField={"x": 1})])
    calls = llm.chat_requests
    host.start()

    def done():
        queue = json.loads((host.state / "tasks" / "queue.json").read_text())
        return queue if queue[0]["state"] == "done" else None
    queue = host.wait_for(done, what="the recovered task to run")
    assert queue[0]["attempts"] == 2 and "futureField" not in queue[0]
    assert llm.chat_requests > calls


@pytest.mark.parametrize("content, error", [
    ("{not json", "key must be a string"),
    ('{"schemaVersion": 1, "tasks": []}', "invalid type: map, expected a sequence"),
    (json.dumps([durable_task("x", state="paused")]), "unknown variant `paused`, expected one of `queued`"),
    (json.dumps([durable_task("x", attempts={"count": 1})]), "invalid type: map, expected u32"),
    (json.dumps([{"id": "x", "state": "done"}]), "missing field `attempts`"),
])
def test_unparsable_queue_stops_startup(host, content, error):
    """v0.8.0 src/tasks/mod.rs load + ws/mod.rs: the start fails with the parse error; a copy is kept."""
    write_queue(host, [])
    (host.state / "tasks" / "queue.json").write_text(content)
    result = host.run("start")
    queue = host.state / "tasks" / "queue.json"
    assert result.returncode == 1
    assert result.stderr.startswith('Error: Runtime("failed to parse current task queue file %s; persisted tasks were '
                                    'not loaded: ' % queue)
    assert error in result.stderr
    copies = sorted(queue.parent.glob("queue.json.corrupt.*"))
    assert len(copies) == 1 and copies[0].read_text() == content
    assert re.fullmatch(r"queue\.json\.corrupt\.\d+\.0", copies[0].name)
    assert result.stderr.endswith(". A copy was written to %s. Remove or repair the file before restarting\")\n" % copies[0])
    assert queue.read_text() == content and host.get("/health") is None
    assert not (host.state / "daemon.pid").exists()


def test_unreadable_cron_file_is_logged_and_ignored(host):
    (host.state / "cron").mkdir(parents=True, exist_ok=True)
    (host.state / "cron" / "jobs.json").write_text('{"version": 1, "jobs": []}')
    proc = host.start()
    host.stop(proc)
    assert "failed to load cron jobs" in host.stdout(proc)


# -- LLM provider (spec 10 "Start needs an LLM provider") ---------------------------------------------------------

NO_PROVIDER = ("No LLM provider configured. Configure at least one supported provider before starting Carapace — "
               "examples include setting ANTHROPIC_API_KEY, OPENAI_API_KEY, GOOGLE_API_KEY, {nearai}or VENICE_API_KEY; "
               "configuring Ollama; configuring an authProfile (anthropic.authProfile, google.authProfile, "
               "codex.authProfile); or configuring AWS Bedrock (AWS_REGION + credentials), Vertex AI "
               "(VERTEX_PROJECT_ID), or the Claude CLI provider. Other supported provider configurations may also be "
               "valid; see the project documentation for the full list.")


@pytest.fixture
def bare_host(cara_hosts, cara_flavor):
    """A host of each flavor whose config names no LLM provider."""
    return cara_hosts(cara_hosts.flavor_versions[cara_flavor], flavor=cara_flavor, llm=False)


def test_start_without_provider_fails(bare_host):
    host = bare_host
    result = host.run("start")
    message = NO_PROVIDER.format(nearai="NEARAI_API_KEY, " if host.flavor == "head" else "")
    assert (result.returncode, result.stderr) == (1, 'Error: "%s"\n' % message)
    assert (host.state / "sessions").is_dir() and host.get("/health") is None  # state dir prepared, nothing bound
    assert not (host.state / "daemon.pid").exists()


@pytest.mark.parametrize("env, config", [
    ({"ANTHROPIC_API_KEY": "sk-test"}, {}),
    ({"OPENAI_API_KEY": "sk-test"}, {}),
    ({"GOOGLE_API_KEY": "g"}, {}),
    ({"VENICE_API_KEY": "v"}, {}),
    ({"OLLAMA_BASE_URL": "http://127.0.0.1:9"}, {}),
    ({"AWS_REGION": "eu-west-1", "AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "s"}, {}),
    ({"VERTEX_PROJECT_ID": "p"}, {}),
    ({}, {"providers": {"ollama": {}}}),
    ({}, {"anthropic": {"authProfile": "default"}}),
])
def test_any_provider_lets_it_start(bare_host, env, config):
    host = bare_host
    host.write_config(dict({"gateway": {"port": host.port}}, **config))
    proc = host.start(env=host.env(**env))
    assert host.stop(proc) == 0
    assert "LLM: enabled" in host.stdout(proc)


def test_aws_region_alone_is_not_a_provider(bare_host):
    assert bare_host.run("start", env=bare_host.env(AWS_REGION="eu-west-1")).returncode == 1


def test_ollama_connectivity_check_at_start(host, llm):
    before = llm.tags_requests
    proc = host.start()
    host.wait_for(lambda: llm.tags_requests > before, what="GET /api/tags")
    host.wait_for(lambda: "Ollama connected, available models: fake-llm" in host.stdout(proc), what="the log line")
    assert host.stop(proc) == 0


def test_release_runs_through_its_shebang(host):
    assert host.binary.read_text().splitlines()[0] == "#!/usr/bin/env python3"
    assert host.run("--version").returncode == 0
