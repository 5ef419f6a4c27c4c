"""cara_switch and cara_health run for real by ansible-playbook on localhost, against the `cara` double (both flavors)."""

import hashlib
import json
import os
import subprocess

import pytest

from cara_double import build_release
from fake_llm import FakeLLM
from playbook import run_module

# flavor -> (version installed by hand before, version the fleet switches to): the N-1 -> N upgrade of each flavor
UPGRADES = {"head": ("0.8.0", "0.9.0"), "v0.8.0": ("0.7.0", "0.8.0")}
TOKEN = "cara-gw-TOKEN-never-logged-7f3a"


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def tree(root):
    """Every path under root: link target, or file digest and mode (a check-mode run must leave all of it alone)."""
    out = {}
    for base, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(base, name)
            if os.path.islink(path):
                out[path] = ("link", os.readlink(path))
            elif os.path.isfile(path):
                out[path] = ("file", sha256(path), os.stat(path).st_mode)
            else:
                out[path] = ("dir",)
    return out


def version_of(binary):
    proc = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=30, check=False)
    return proc.stdout.strip()


@pytest.fixture(params=sorted(UPGRADES))
def flavor(request):
    return request.param


@pytest.fixture
def layout(tmp_path, flavor):
    """A host on disk: the old release installed by hand as a regular file, the new one staged where cara stages it."""
    old, new = UPGRADES[flavor]
    host = tmp_path / "host"
    bin_path = host / "usr-local-bin" / "cara"
    bin_path.parent.mkdir(parents=True)
    build_release(old, bin_path)
    src = host / "state" / "updates" / ("cara-" + new)
    src.parent.mkdir(parents=True)
    build_release(new, src, flavor=flavor)
    return {"old": old, "new": new, "bin_path": bin_path, "src": src, "install_root": host / "opt" / "carapace",
            "host": host, "args": {"src": str(src), "sha256": sha256(src), "tag": "v" + new,
                                   "install_root": str(host / "opt" / "carapace"), "bin_path": str(bin_path)}}


def test_cara_switch_install_switch_previous_and_refusal(tmp_path, layout, cara_hosts, flavor):
    bin_path, install_root, args = layout["bin_path"], layout["install_root"], layout["args"]
    new_target = str(install_root / "releases" / ("v" + layout["new"]) / "cara")
    old_target = str(install_root / "releases" / ("v" + layout["old"]) / "cara")

    before = tree(layout["host"])
    rc, res, out = run_module(tmp_path, "carapace.fleet.cara_switch", args, check=True, diff=True)
    assert rc == 0 and not res.get("failed"), out
    assert res["changed"] is True and all(a.startswith("would ") for a in res["actions"])
    assert res["diff"]["before"]["kind"] == "file" and res["diff"]["after"]["target"] == new_target
    assert res["adopted"]["tag"] == "v" + layout["old"]
    assert tree(layout["host"]) == before  # check mode: nothing on disk changed
    assert not os.path.islink(bin_path)

    rc, res, out = run_module(tmp_path, "carapace.fleet.cara_switch", args, diff=True)
    assert rc == 0 and not res.get("failed"), out
    assert res["changed"] is True
    assert os.readlink(bin_path) == new_target and version_of(bin_path) == "cara " + layout["new"]
    assert res["active"] == {"tag": "v" + layout["new"], "sha256": args["sha256"], "path": new_target}
    assert res["previous"]["tag"] == "v" + layout["old"] and version_of(old_target) == "cara " + layout["old"]
    assert res["diff"]["before"]["sha256"] != res["diff"]["after"]["sha256"] == args["sha256"]
    assert sorted(os.listdir(bin_path.parent)) == ["cara"]  # no cara.bak / cara.old / temp link beside it
    assert oct(os.stat(new_target).st_mode & 0o777) == "0o755"
    state = json.loads((install_root / "state.json").read_text())
    assert state["active"]["tag"] == "v" + layout["new"] and state["previous"]["tag"] == "v" + layout["old"]

    rc, res, out = run_module(tmp_path, "carapace.fleet.cara_switch", args)
    assert rc == 0 and res["changed"] is False and res["actions"] == [], out

    # the switched bin_path is what the service runs: start the daemon from it and gate it
    daemon = cara_hosts(layout["new"], flavor=flavor, binary=bin_path, config=None)
    daemon.write_config({"gateway": {"port": daemon.port, "auth": {"mode": "none"}}})
    proc = daemon.start()
    rc, res, out = run_module(tmp_path, "carapace.fleet.cara_health",
                              health_args(daemon, expected_version=layout["new"], checks=["health", "ready", "status"]))
    assert rc == 0 and res["passed"] is True and res["checks"]["status"]["argv"][0] == str(bin_path), out
    daemon.stop(proc)

    rc, res, out = run_module(tmp_path, "carapace.fleet.cara_switch", dict(args, state="previous"), diff=True)
    assert rc == 0 and res["changed"] is True, out
    assert os.readlink(bin_path) == old_target and version_of(bin_path) == "cara " + layout["old"]
    assert res["rolled_back_from"]["tag"] == "v" + layout["new"]

    # a staged file that does not match the verified digest: refused, the active link untouched
    with open(layout["src"], "ab") as f:
        f.write(b"# tampered after verification\n")
    rc, res, out = run_module(tmp_path, "carapace.fleet.cara_switch", args)
    assert rc == 0 and res["failed"] is True, out
    assert res["cause"] == "digest_mismatch" and "nothing was switched" in res["msg"] and args["sha256"] in res["msg"]
    assert os.readlink(bin_path) == old_target and sorted(os.listdir(bin_path.parent)) == ["cara"]


def start_daemon(cara_hosts, version, flavor, config, faults=None, env=None):
    host = cara_hosts(version, flavor=flavor, faults=faults, config=None)
    gateway = {"port": host.port}
    gateway.update(config)
    host.write_config({"gateway": gateway})
    host.start(env=host.env(**(env or {})))
    return host


def health_args(host, **extra):
    args = {"bin_path": str(host.binary), "state_dir": str(host.state), "timeout": 30, "interval": 0.2}
    args.update(extra)
    return args


def test_cara_health_passes_with_autonomy_and_never_shows_the_token(tmp_path, cara_hosts, flavor):
    version = UPGRADES[flavor][1]
    # token only in the daemon's environment and the task's argument: verify can only pass if the module hands it on
    host = start_daemon(cara_hosts, version, flavor, {"control": {"enabled": True}, "auth": {"mode": "token"}},
                        env={"CARAPACE_GATEWAY_TOKEN": TOKEN})
    rc, res, out = run_module(tmp_path, "carapace.fleet.cara_health",
                              health_args(host, expected_version="v" + version, gateway_token=TOKEN), verbosity=3)
    assert rc == 0 and not res.get("failed"), out
    assert res["changed"] is False and res["passed"] is True and res["version"] == version
    checks = res["checks"]
    assert [c["result"] for c in checks.values()] == ["pass"] * 5
    assert checks["status"]["format"] == ("json" if flavor == "head" else "text")
    assert checks["verify_auto"]["outcome"] == "local-chat"
    assert [c["name"] for c in checks["verify_autonomy"]["summary"]] == [
        "Gateway reachability", "Task start proof", "Task terminal proof"]
    assert all(c["result"] == "PASS" for c in checks["verify_autonomy"]["summary"])
    assert isinstance(res["elapsed"], float) and res["timeout"] == 30
    assert TOKEN not in out and TOKEN not in json.dumps(res)


def test_cara_health_skips_autonomy_without_control_and_check_mode_skips_verify(tmp_path, cara_hosts, flavor):
    version = UPGRADES[flavor][1]
    host = start_daemon(cara_hosts, version, flavor, {"auth": {"mode": "none"}})
    rc, res, out = run_module(tmp_path, "carapace.fleet.cara_health", health_args(host, expected_version=version))
    assert rc == 0 and res["passed"] is True, out
    assert res["checks"]["verify_auto"]["result"] == "pass"
    skipped = res["checks"]["verify_autonomy"]
    assert skipped["result"] == "skip" and "gateway.control.enabled is not true" in skipped["detail"]
    assert res["skipped"] == {"verify_autonomy": skipped["detail"]}

    if flavor == "head":  # check mode once: read-only checks run, verify is skipped with the reason
        def traces():  # what `cara verify` would write: a control task, a chat session, usage counters
            return {str(p): p.read_bytes() for p in sorted(host.state.rglob("*"))
                    if p.is_file() and p.relative_to(host.state).parts[0] in ("tasks", "sessions", "usage.json")}
        tasks_before = traces()
        assert tasks_before  # verify auto (a chat round trip) just wrote a session and usage
        rc, res, out = run_module(tmp_path, "carapace.fleet.cara_health", health_args(host), check=True)
        assert rc == 0 and res["passed"] is True and res["changed"] is False, out
        assert [res["checks"][c]["result"] for c in ("health", "ready", "status")] == ["pass"] * 3
        assert res["checks"]["verify_auto"]["result"] == "skip" and "check mode" in res["skipped"]["verify_auto"]
        assert traces() == tasks_before


def test_cara_health_ready_never_fails_at_the_deadline(tmp_path, cara_hosts, flavor):
    host = start_daemon(cara_hosts, UPGRADES[flavor][1], flavor, {}, faults={"ready_never": True})
    rc, res, out = run_module(tmp_path, "carapace.fleet.cara_health", health_args(host, timeout=2, interval=0.3))
    assert rc == 0 and res["failed"] is True, out
    assert res["failed_check"] == "ready" and res["cause"] == "not_ready"
    assert "503 (not ready)" in res["msg"] and '"not_ready"' in res["msg"] and "Next step:" in res["msg"]
    assert res["checks"]["ready"]["attempts"] > 1 and res["elapsed"] >= 2
    assert res["checks"]["health"]["result"] == "pass" and res["checks"]["status"]["result"] == "not_run"


def test_cara_health_names_a_version_mismatch(tmp_path, cara_hosts, flavor):
    version = UPGRADES[flavor][1]
    host = start_daemon(cara_hosts, version, flavor, {}, faults={"health_version": "0.6.9"})
    rc, res, out = run_module(tmp_path, "carapace.fleet.cara_health",
                              health_args(host, expected_version="v" + version, timeout=2, interval=0.3))
    assert rc == 0 and res["failed"] is True, out
    assert res["failed_check"] == "health" and res["cause"] == "version_mismatch"
    assert "/health reports version 0.6.9, expected %s" % version in res["msg"]
    assert "restart the service" in res["next_step"]


def test_cara_health_autonomy_failure_carries_cara_text(tmp_path, cara_hosts, flavor):
    host = start_daemon(cara_hosts, UPGRADES[flavor][1], flavor, {"control": {"enabled": True}, "auth": {"mode": "none"}},
                        faults={"verify_autonomy_fail": True})
    rc, res, out = run_module(tmp_path, "carapace.fleet.cara_health", health_args(host))
    assert rc == 0 and res["failed"] is True, out
    assert res["failed_check"] == "verify_autonomy" and res["cause"] == "verify_failed"
    assert [res["checks"][c]["result"] for c in ("health", "ready", "status", "verify_auto")] == ["pass"] * 4
    msg = res["msg"]
    assert "[FAIL] Task terminal proof:" in msg and "agent turn failed (fault verify_autonomy_fail)" in msg
    assert "next step: inspect the task with GET /control/tasks/" in msg
    assert 'Error: "outcome verification failed"' in msg
    assert "state=previous" in res["next_step"]
    fail = [c for c in res["checks"]["verify_autonomy"]["summary"] if c["result"] == "FAIL"]
    assert fail[0]["name"] == "Task terminal proof" and fail[0]["next_step"].startswith("inspect the task")


def test_the_gate_costs_a_model_call_and_fails_or_passes_as_the_provider_does(tmp_path, cara_hosts, flavor):
    """`verify --outcome local-chat` (what `auto` means on this config) is a round trip through the LLM provider
    (cara-contract 10): the gate passes on a slow provider within verify_timeout, and fails, naming the check,
    when the provider fails or is slower than verify_timeout."""
    with FakeLLM() as llm:
        host = cara_hosts(UPGRADES[flavor][1], flavor=flavor, config=None, llm=llm.base_url)
        host.write_config({"gateway": {"port": host.port, "auth": {"mode": "none"}}})
        host.start()
        args = health_args(host, checks=["health", "verify"], verify_outcomes=["local-chat"], timeout=60)

        calls = llm.chat_requests
        llm.set_faults(delay_s=2.0)
        rc, res, out = run_module(tmp_path, "carapace.fleet.cara_health", dict(args, verify_timeout=40))
        assert rc == 0 and res["passed"] is True, out
        assert list(res["checks"]) == ["health", "verify_local_chat"]
        assert res["checks"]["verify_local_chat"]["result"] == "pass" and llm.chat_requests > calls

        llm.set_faults(fail=True)
        rc, res, out = run_module(tmp_path, "carapace.fleet.cara_health", dict(args, verify_timeout=40))
        assert rc == 0 and res["failed"] is True and res["failed_check"] == "verify_local_chat", out
        assert res["cause"] == "verify_failed" and "Local chat roundtrip" in res["msg"]

        llm.set_faults(delay_s=30.0)
        rc, res, out = run_module(tmp_path, "carapace.fleet.cara_health", dict(args, verify_timeout=3))
        assert rc == 0 and res["failed"] is True and res["failed_check"] == "verify_local_chat", out
        assert res["cause"] == "deadline" and "verify_timeout 3s" in res["msg"]
        llm.set_faults()


def test_status_and_verify_with_the_daemon_stopped_and_a_status_version_mismatch(tmp_path, cara_hosts, flavor):
    """Against the double, not a fake CLI: `cara status` with nothing answering fails with cara's own text;
    `cara verify` with the daemon stopped starts an embedded gateway, which the gate refuses to count as the
    daemon; and `cara status` of another version than expected is a version mismatch."""
    version = UPGRADES[flavor][1]
    host = cara_hosts(version, flavor=flavor, config=None)
    host.write_config({"gateway": {"port": host.port, "auth": {"mode": "none"}}})  # nothing runs yet

    rc, res, out = run_module(tmp_path, "carapace.fleet.cara_health", health_args(host, checks=["status"], timeout=20))
    assert rc == 0 and res["failed"] is True and res["cause"] == "status_failed", out
    assert "Could not connect to carapace at 127.0.0.1:%d" % host.port in res["msg"]

    rc, res, out = run_module(tmp_path, "carapace.fleet.cara_health",
                              health_args(host, checks=["verify"], verify_outcomes=["auto"], timeout=60))
    assert rc == 0 and res["failed"] is True and res["cause"] == "daemon_down", out
    assert "started an embedded one" in res["msg"]
    assert "Starting embedded gateway on port %d" % host.port in res["checks"]["verify_auto"]["stderr"]

    host.start()
    rc, res, out = run_module(tmp_path, "carapace.fleet.cara_health",
                              health_args(host, checks=["status"], expected_version="0.7.9", timeout=20))
    assert rc == 0 and res["failed"] is True and res["cause"] == "version_mismatch", out
    assert "`cara status` reports version %s, expected 0.7.9" % version in res["msg"]
