"""module_utils/_health.py: the deadline-bounded waiter, the HTTP probes and the gate's logic (no daemon needed)."""

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from ansible_collections.carapace.fleet.plugins.module_utils import _health, _version
from ansible_collections.carapace.fleet.plugins.module_utils._health import Deadline, HealthGate, wait_until


class FakeClock:
    """A monotonic clock that only moves when the code under test sleeps (or a probe says it took time)."""

    def __init__(self):
        self.now = 1000.0
        self.sleeps = []

    def __call__(self):
        return self.now

    def sleep(self, seconds):
        assert seconds >= 0
        self.sleeps.append(seconds)
        self.now += seconds


# -- the waiter ------------------------------------------------------------------------------------------------------

def test_deadline_counts_down_and_never_goes_negative():
    clock = FakeClock()
    deadline = Deadline(10, clock)
    assert deadline.remaining() == 10 and not deadline.expired() and deadline.elapsed() == 0
    clock.now += 4
    assert deadline.remaining() == 6 and deadline.elapsed() == 4
    clock.now += 10
    assert deadline.remaining() == 0 and deadline.expired()


def test_done_at_first_attempt_returns_without_sleeping():
    clock = FakeClock()
    res = wait_until(lambda: (True, "up"), Deadline(5, clock), interval=1, sleep=clock.sleep)
    assert res.done and res.value == "up" and res.attempts == 1 and res.error is None
    assert clock.sleeps == []


def test_polls_until_done():
    clock = FakeClock()
    answers = iter([(False, 1), (False, 2), (True, 3)])
    res = wait_until(lambda: next(answers), Deadline(60, clock), interval=2, sleep=clock.sleep)
    assert res.done and res.value == 3 and res.attempts == 3
    assert clock.sleeps == [2, 2] and res.elapsed == 4


def test_deadline_respected_and_last_observation_returned():
    clock = FakeClock()
    deadline = Deadline(10, clock)
    seen = []

    def probe():
        seen.append(clock.now)
        return False, {"attempt": len(seen)}

    res = wait_until(probe, deadline, interval=3, sleep=clock.sleep)
    assert not res.done
    assert res.value == {"attempt": len(seen)}  # the last observation, not the first
    # attempts at 0, 3, 6, 9 and one last at the deadline (10): never a sleep past it
    assert [t - 1000.0 for t in seen] == [0, 3, 6, 9, 10]
    assert clock.sleeps == [3, 3, 3, 1]
    assert clock.now == deadline.at and res.elapsed == 10 and res.attempts == 5


def test_slow_probe_consumes_the_deadline_too():
    clock = FakeClock()

    def probe():
        clock.now += 4  # each attempt itself takes 4 s
        return False, clock.now

    res = wait_until(probe, Deadline(10, clock), interval=1, sleep=clock.sleep)
    assert not res.done and res.elapsed >= 10
    assert res.attempts == 3  # 0-4, sleep 1, 5-9, sleep 1, 10-14: no sleep after the deadline
    assert clock.sleeps == [1, 1]


def test_at_least_one_attempt_when_the_deadline_has_passed():
    clock = FakeClock()
    deadline = Deadline(0, clock)
    res = wait_until(lambda: (True, "ok"), deadline, interval=1, sleep=clock.sleep)
    assert res.done and res.attempts == 1
    res = wait_until(lambda: (False, "no"), deadline, interval=1, sleep=clock.sleep)
    assert not res.done and res.attempts == 1 and res.value == "no" and clock.sleeps == []


def test_transient_exceptions_are_attempts_and_polling_goes_on():
    clock = FakeClock()
    script = [ConnectionRefusedError("refused"), (False, "503"), ValueError("bad json"), (True, "200")]

    def probe():
        step = script.pop(0)
        if isinstance(step, Exception):
            raise step
        return step

    res = wait_until(probe, Deadline(30, clock), interval=1, sleep=clock.sleep)
    assert res.done and res.value == "200" and res.attempts == 4 and res.error is None


def test_exception_on_the_last_attempt_is_reported_with_the_last_observation():
    clock = FakeClock()
    calls = []

    def probe():
        calls.append(1)
        if len(calls) == 1:
            return False, "not ready"
        raise ConnectionResetError("reset by peer")

    res = wait_until(probe, Deadline(2, clock), interval=1, sleep=clock.sleep)
    assert not res.done
    assert res.value == "not ready"  # last observation a probe returned
    assert res.error == "ConnectionResetError: reset by peer"


def test_other_exceptions_propagate_at_once():
    clock = FakeClock()
    calls = []

    def probe():
        calls.append(1)
        raise TypeError("a bug in the probe")

    with pytest.raises(TypeError):
        wait_until(probe, Deadline(30, clock), interval=1, sleep=clock.sleep)
    assert len(calls) == 1 and clock.sleeps == []


def test_transient_types_are_configurable():
    clock = FakeClock()
    script = [KeyError("x"), (True, 1)]

    def probe():
        step = script.pop(0)
        if isinstance(step, Exception):
            raise step
        return step

    res = wait_until(probe, Deadline(5, clock), interval=1, sleep=clock.sleep, transient=(KeyError,))
    assert res.done and res.attempts == 2


def test_real_clock_waits_until_the_deadline():
    deadline = Deadline(0.2)
    res = wait_until(lambda: (False, None), deadline, interval=0.05)
    assert not res.done and res.attempts >= 2
    assert deadline.expired() and res.elapsed >= 0.2


# -- probes ----------------------------------------------------------------------------------------------------------

def fake_get(status, body):
    def get(url, timeout):
        if isinstance(status, Exception):
            raise status
        return status, body if isinstance(body, str) else json.dumps(body)
    return get


@pytest.mark.parametrize("reported,expected,ok", [
    ("0.9.0", "0.9.0", True), ("0.9.0", "v0.9.0", True), ("v0.9.0", "0.9.0", True), ("0.8.0", "0.9.0", False),
    ("0.9.0", None, True), ("0.9.0-preview1", "0.9.0", False),
])
def test_probe_health_version(reported, expected, ok):
    done, obs = _health.probe_health("http://x/health", expected, 1, fake_get(200, {"status": "ok", "version": reported}))
    assert done is ok and obs["version"] == reported and obs["status_code"] == 200
    if not ok:
        assert obs["error"] == "version mismatch: /health reports version %s, expected %s" % (reported, expected.lstrip("v"))


def test_probe_health_failures():
    done, obs = _health.probe_health("u", None, 1, fake_get(OSError("no answer from u: refused"), ""))
    assert not done and "refused" in obs["error"] and obs["status_code"] is None
    done, obs = _health.probe_health("u", None, 1, fake_get(500, "boom"))
    assert not done and obs["error"] == "/health answered HTTP 500: boom"
    done, obs = _health.probe_health("u", None, 1, fake_get(200, "<html>"))
    assert not done and "not a JSON object" in obs["error"]


def test_probe_ready():
    done, obs = _health.probe_ready("u", 1, fake_get(200, {"status": "ready"}))
    assert done and obs["body"] == {"status": "ready"}
    done, obs = _health.probe_ready("u", 1, fake_get(503, {"status": "not_ready", "checks": {"storageWritable": False}}))
    assert not done and obs["status_code"] == 503 and obs["body"]["checks"] == {"storageWritable": False}
    assert obs["error"].startswith("/health/ready answered 503 (not ready): ") and "storageWritable" in obs["error"]
    done, obs = _health.probe_ready("u", 1, fake_get(404, ""))
    assert not done and obs["error"] == "/health/ready answered HTTP 404: "


def test_bare_version():
    assert _version.bare_version("v0.9.0") == _version.bare_version(" 0.9.0") == _version.bare_version("V0.9.0") == "0.9.0"
    assert _version.bare_version(None) is None


def test_base_url_brackets_ipv6():
    assert _health.base_url("127.0.0.1", 18789) == "http://127.0.0.1:18789"
    assert _health.base_url("::1", 1) == "http://[::1]:1"


@pytest.fixture
def http_server():
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            code = 503 if self.path == "/health/ready" else 200
            data = json.dumps({"path": self.path}).encode()
            self.send_response(code)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_http_get_returns_error_statuses_and_raises_oserror_on_no_answer(http_server, monkeypatch):
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")  # loopback checks never go through a proxy
    port = http_server.server_address[1]
    assert _health.http_get("http://127.0.0.1:%d/health" % port, 2) == (200, '{"path": "/health"}')
    assert _health.http_get("http://127.0.0.1:%d/health/ready" % port, 2) == (503, '{"path": "/health/ready"}')
    http_server.shutdown()
    http_server.server_close()
    with pytest.raises(OSError):
        _health.http_get("http://127.0.0.1:%d/health" % port, 2)


def test_bounded_runner_kills_at_the_timeout_and_keeps_partial_output():
    code = "import sys, time; print('started', flush=True); time.sleep(30)"
    rc, out, err = _health.bounded_runner([sys.executable, "-c", code], None, 0.5)
    assert rc == _health.TIMEOUT_RC and out == "started\n" and "deadline" in err


def test_bounded_runner_reports_a_missing_binary():
    rc, out, err = _health.bounded_runner(["/nonexistent/cara", "status"], None, 5)
    assert rc == 127 and out == "" and "/nonexistent/cara" in err


def test_scrub_replaces_secrets_everywhere():
    value = {"a": ["tok-1 here", {"b": "x tok-1"}], "n": 3, "c": None}
    assert _health.scrub(value, ["tok-1", None, ""]) == {"a": ["******** here", {"b": "x ********"}], "n": 3, "c": None}


# -- the gate with fake cara and fake HTTP ----------------------------------------------------------------------------

VERIFY_PASS = """
Outcome verification summary
----------------------------
Outcome: {outcome}
Gateway port: 18789

[PASS] Gateway reachability: gateway healthy at 127.0.0.1:18789 (v0.9.0)
[PASS] Task terminal proof: done

Outcome verification passed.
"""

VERIFY_FAIL = """
Outcome verification summary
----------------------------
Outcome: autonomy
Gateway port: 18789

[PASS] Gateway reachability: gateway healthy at 127.0.0.1:18789 (v0.9.0)
[PASS] Task start proof: task 7 attempts=1
[FAIL] Task terminal proof: task 7 ended in state failed: agent turn failed
      next step: inspect the task with GET /control/tasks/7

Next help path: https://example.invalid/help
"""


class FakeCLI:
    """Stands in for _cara.CaraCLI: canned answers, records the timeout it was given for each command."""

    def __init__(self, verify=None, status_rc=0, status_version="0.9.0", verify_stderr=None):
        self.timeout = None
        self.calls = []
        self.verify_out = verify or {}
        self.status_rc = status_rc
        self.status_version = status_version
        self.verify_stderr = verify_stderr or {}

    def status(self, port=None, host=None):
        self.calls.append(("status", port, host, self.timeout))
        health = {"status": "ok", "version": self.status_version} if self.status_rc == 0 else None
        return {"argv": ["cara", "status", "--port", str(port), "--json"], "rc": self.status_rc, "format": "json",
                "health": health, "stdout": json.dumps({"health": health}) if health else "",
                "stderr": "" if self.status_rc == 0 else "Could not connect to carapace at 127.0.0.1:%d" % port}

    def verify(self, outcome, port=None):
        from ansible_collections.carapace.fleet.plugins.module_utils._cara import parse_verify
        self.calls.append(("verify", outcome, port, self.timeout))
        out = self.verify_out.get(outcome, VERIFY_PASS.format(outcome="local-chat" if outcome == "auto" else outcome))
        res = {"argv": ["cara", "verify", "--outcome", outcome], "rc": 0 if "passed." in out else 1, "stdout": out,
               "stderr": self.verify_stderr.get(outcome, "" if "passed." in out else 'Error: "outcome verification failed"')}
        res.update(parse_verify(out))
        res["passed"] = res["passed"] and res["rc"] == 0
        return res


def gate(cli, clock, get, **kwargs):
    kwargs.setdefault("control_enabled", True)
    return HealthGate(cli, port=18789, timeout=kwargs.pop("timeout", 30), interval=1, get=get, sleep=clock.sleep,
                      clock=clock, config_path="/etc/carapace.json5", **kwargs)


def healthy_get(version="0.9.0"):
    def get(url, timeout):
        if url.endswith("/health/ready"):
            return 200, json.dumps({"status": "ready"})
        return 200, json.dumps({"status": "ok", "version": version})
    return get


def test_gate_all_pass():
    clock, cli = FakeClock(), FakeCLI()
    res = gate(cli, clock, healthy_get(), expected_version="v0.9.0").run()
    assert res["passed"] and res["failed_check"] is None and res["version"] == "0.9.0"
    assert [r["result"] for r in res["checks"].values()] == ["pass"] * 5
    assert list(res["checks"]) == ["health", "ready", "status", "verify_auto", "verify_autonomy"]
    assert res["checks"]["verify_autonomy"]["summary"][-1] == {"result": "PASS", "name": "Task terminal proof",
                                                               "detail": "done", "next_step": None}
    assert [c[:2] for c in cli.calls] == [("status", 18789), ("verify", "auto"), ("verify", "autonomy")]
    assert res["skipped"] == {}


def test_gate_skips_autonomy_without_control_and_says_why():
    clock, cli = FakeClock(), FakeCLI()
    res = gate(cli, clock, healthy_get(), control_enabled=False).run()
    assert res["passed"]
    record = res["checks"]["verify_autonomy"]
    assert record["result"] == "skip" and "gateway.control.enabled is not true in /etc/carapace.json5" in record["detail"]
    assert res["skipped"] == {"verify_autonomy": record["detail"]}
    assert ("verify", "autonomy") not in [c[:2] for c in cli.calls]
    assert "verify_autonomy skipped: gateway.control.enabled" in res["msg"]


def test_gate_check_mode_skips_verify_with_the_reason():
    clock, cli = FakeClock(), FakeCLI()
    res = gate(cli, clock, healthy_get(), verify_skip_reason="check mode: not run").run()
    assert res["passed"] and [c[0] for c in cli.calls] == ["status"]
    assert res["skipped"] == {"verify_auto": "check mode: not run", "verify_autonomy": "check mode: not run"}


def test_gate_runs_only_selected_checks_in_canonical_order():
    clock, cli = FakeClock(), FakeCLI()
    res = gate(cli, clock, healthy_get(), checks=["verify_auto", "health"]).run()
    assert list(res["checks"]) == ["health", "verify_auto"] and res["passed"]
    with pytest.raises(ValueError):
        gate(cli, clock, healthy_get(), checks=["healthz"])


def test_gate_version_mismatch_polls_until_the_deadline_and_names_both_versions():
    clock, cli = FakeClock(), FakeCLI()
    res = gate(cli, clock, healthy_get("0.8.0"), expected_version="0.9.0", timeout=5).run()
    assert not res["passed"] and res["failed_check"] == "health" and res["cause"] == "version_mismatch"
    assert "/health reports version 0.8.0, expected 0.9.0" in res["msg"]
    assert "restart the service" in res["next_step"]
    assert res["elapsed"] == 5 and res["checks"]["health"]["attempts"] == 6
    assert [r["result"] for r in res["checks"].values()] == ["fail"] + ["not_run"] * 4
    assert cli.calls == []


def test_gate_waits_for_a_starting_daemon():
    clock, cli = FakeClock(), FakeCLI()
    start_at = clock.now + 3

    def get(url, timeout):
        if clock.now < start_at:
            raise OSError("no answer from %s: [Errno 111] Connection refused" % url)
        if url.endswith("/ready") and clock.now < start_at + 2:
            return 503, json.dumps({"status": "not_ready"})
        return healthy_get()(url, timeout)

    res = gate(cli, clock, get).run()
    assert res["passed"] and res["checks"]["health"]["attempts"] == 4 and res["checks"]["ready"]["attempts"] == 3


def test_gate_ready_never_fails_at_the_deadline_with_the_503_body():
    clock, cli = FakeClock(), FakeCLI()

    def get(url, timeout):
        if url.endswith("/ready"):
            return 503, json.dumps({"status": "not_ready", "checks": {"storageWritable": False}})
        return healthy_get()(url, timeout)

    res = gate(cli, clock, get, timeout=8).run()
    assert res["failed_check"] == "ready" and res["cause"] == "not_ready" and res["elapsed"] == 8
    assert "503 (not ready)" in res["msg"] and "storageWritable" in res["msg"]
    assert res["checks"]["ready"]["body"]["status"] == "not_ready"


def test_gate_unreachable_daemon():
    clock, cli = FakeClock(), FakeCLI()
    res = gate(cli, clock, fake_get(OSError("no answer from u: [Errno 111] Connection refused"), ""), timeout=3).run()
    assert res["cause"] == "health_unreachable" and "Connection refused" in res["msg"]
    assert "check that the daemon runs" in res["next_step"]


def test_gate_commands_get_the_time_left_as_their_timeout():
    clock = FakeClock()
    cli = FakeCLI()
    start_at = clock.now + 20

    def get(url, timeout):
        if clock.now < start_at:
            raise OSError("refused")
        return healthy_get()(url, timeout)

    res = gate(cli, clock, get, timeout=30).run()
    assert res["passed"]
    assert [c[3] for c in cli.calls] == [10, 10, 10]  # the fake commands take no time


def test_gate_deadline_passed_before_a_command_could_start():
    clock, cli = FakeClock(), FakeCLI()

    def get(url, timeout):
        clock.now += 10  # a request that takes all the time there is
        return healthy_get()(url, timeout)

    res = gate(cli, clock, get, timeout=15).run()
    assert res["failed_check"] == "status" and res["cause"] == "deadline" and cli.calls == []


def test_gate_verify_failure_has_the_fail_line_its_next_step_and_cara_stderr():
    clock, cli = FakeClock(), FakeCLI(verify={"autonomy": VERIFY_FAIL})
    res = gate(cli, clock, healthy_get()).run()
    assert res["failed_check"] == "verify_autonomy" and res["cause"] == "verify_failed"
    msg = res["msg"]
    assert "[FAIL] Task terminal proof: task 7 ended in state failed: agent turn failed" in msg
    assert "(next step: inspect the task with GET /control/tasks/7)" in msg
    assert 'cara said: Error: "outcome verification failed"' in msg
    assert "state=previous" in res["next_step"] and "inspect the task with GET /control/tasks/7" in res["next_step"]
    summary = res["checks"]["verify_autonomy"]["summary"]
    assert [c["result"] for c in summary] == ["PASS", "PASS", "FAIL"]


def test_gate_scrubs_secrets_from_results_and_message():
    clock = FakeClock()
    cli = FakeCLI(verify={"auto": VERIFY_FAIL.replace("agent turn failed", "token s3cr3t-TOKEN rejected")})
    res = gate(cli, clock, healthy_get(), secrets=["s3cr3t-TOKEN"]).run()
    assert "s3cr3t-TOKEN" not in json.dumps(res)
    assert "token ******** rejected" in res["msg"]


# -- the soak ----------------------------------------------------------------------------------------------------------

class SoakGate:
    """Stands in for a HealthGate round: passes until round `fail_at` (1-based), each round taking `took` seconds."""

    def __init__(self, clock, fail_at=None, took=0.5):
        self.clock, self.fail_at, self.took, self.rounds = clock, fail_at, took, 0

    def __call__(self):
        return self

    def run(self):
        self.rounds += 1
        self.clock.now += self.took
        passed = self.fail_at is None or self.rounds < self.fail_at
        return {"passed": passed, "msg": "round %d" % self.rounds, "failed_check": None if passed else "ready"}


def test_soak_holds_for_the_whole_time_then_passes():
    clock = FakeClock()
    gate = SoakGate(clock)
    held = _health.soak(gate, hold=30, interval=5, clock=clock, sleep=clock.sleep)
    assert held["passed"] and held["failed_after_s"] is None
    assert held["held_s"] >= 30 and held["rounds"] == gate.rounds == 7  # 0, 5.5, 11, ... until 30 s have passed
    assert all(s <= 5 for s in clock.sleeps)


def test_soak_stops_at_the_first_round_that_fails():
    clock = FakeClock()
    gate = SoakGate(clock, fail_at=3)
    held = _health.soak(gate, hold=600, interval=5, clock=clock, sleep=clock.sleep)
    assert not held["passed"] and held["rounds"] == 3 and held["last"]["failed_check"] == "ready"
    assert held["failed_after_s"] == held["held_s"] < 20  # long before the 600 s


def test_soak_never_sleeps_past_its_end():
    clock = FakeClock()
    held = _health.soak(SoakGate(clock, took=0), hold=12, interval=5, clock=clock, sleep=clock.sleep)
    assert held["passed"] and clock.sleeps == [5, 5, 2]
