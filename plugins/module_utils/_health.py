# -*- coding: utf-8 -*-
# Copyright: carapace.fleet maintainers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The post-upgrade health gate of Carapace's release policy, under one deadline.

Domain logic only (no Ansible imports). Two parts:

- the waiter: `Deadline` and `wait_until(probe, deadline, interval)`, the one polling loop of the collection
  (kubernetes.core's waiter is the model): call a probe until it reports done or the deadline passes, sleeping
  `interval` between attempts, and hand back the last observation either way;
- the gate: `HealthGate` runs, in this order and all under the same deadline, `GET /health` (answers, and with the
  expected version), `GET /health/ready` (200), `cara status` (`--json` where the release has it),
  `cara verify --outcome auto` and `cara verify --outcome autonomy`, and returns one structured result per check.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import time
import urllib.error
import urllib.request

from ansible_collections.carapace.fleet.plugins.module_utils import _cara
from ansible_collections.carapace.fleet.plugins.module_utils._cara import DEFAULT_PORT
from ansible_collections.carapace.fleet.plugins.module_utils._errors import FleetError
from ansible_collections.carapace.fleet.plugins.module_utils._version import bare_version

CHECKS = ("health", "ready", "status", "verify", "verify_auto", "verify_autonomy")
# `cara verify --outcome` values (1.7); `matrix` exists at HEAD only. The policy's gate is auto + autonomy.
OUTCOMES = ("auto", "local-chat", "hooks", "autonomy", "discord", "telegram", "matrix")
DEFAULT_OUTCOMES = ("auto", "autonomy")
# cara waits up to 45 s for a local-chat reply and polls an autonomy task for up to 70 s (1.7).
DEFAULT_VERIFY_TIMEOUT = 80
POLLED = ("health", "ready")  # transient while a daemon starts: polled until the deadline
REDACTED = "********"
TIMEOUT_RC = 124
MAX_BODY = 64 * 1024
MIN_COMMAND_TIMEOUT = 0.5

ROLLBACK_HINT = ("If the release itself is at fault, roll this host back: carapace.fleet.cara_switch with "
                 "state=previous, then `cara restore <pre-upgrade backup> --force` (the rollback runbook).")


# -- the waiter ------------------------------------------------------------------------------------------------------

class Deadline:
    """One point in time that every check of a run shares (monotonic clock)."""

    def __init__(self, timeout, clock=time.monotonic):
        self.clock = clock
        self.timeout = float(timeout)
        self.started = clock()
        self.at = self.started + self.timeout

    def remaining(self):
        return max(0.0, self.at - self.clock())

    def expired(self):
        return self.clock() >= self.at

    def elapsed(self):
        return self.clock() - self.started


class WaitResult:
    """What `wait_until` saw: done or not, the last observation, how many attempts, the last probe error."""

    def __init__(self, done, value, attempts, elapsed, error):
        self.done = done
        self.value = value
        self.attempts = attempts
        self.elapsed = elapsed
        self.error = error

    def __repr__(self):
        return "WaitResult(done=%r, attempts=%d, elapsed=%.3f, error=%r, value=%r)" % (
            self.done, self.attempts, self.elapsed, self.error, self.value)


def wait_until(probe, deadline, interval=1.0, transient=(OSError, ValueError), sleep=time.sleep):
    """Call `probe()` until it returns `(True, observation)` or `deadline` passes; returns a WaitResult.

    - At least one attempt is made, even with a deadline already passed; after a failed attempt the waiter sleeps
      `min(interval, time left)`, so it never sleeps past the deadline, and makes one last attempt at it.
    - `value` is the last observation a probe returned (also on timeout), `error` the text of the exception the most
      recent attempt raised (None when it returned).
    - Exceptions of the `transient` types (network and parse errors) count as a "not yet" attempt and polling goes
      on; any other exception is a bug, not a state of the host, and propagates at once.
    """
    attempts = 0
    value = None
    error = None
    while True:
        attempts += 1
        try:
            done, value = probe()
            error = None
        except transient as exc:
            done, error = False, "%s: %s" % (type(exc).__name__, exc)
        if done:
            return WaitResult(True, value, attempts, deadline.elapsed(), None)
        remaining = deadline.remaining()
        if remaining <= 0:
            return WaitResult(False, value, attempts, deadline.elapsed(), error)
        sleep(min(interval, remaining))


# -- HTTP probes (loopback, plain HTTP as cara itself uses, 1.3 and 1.10) ---------------------------------------------

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never send loopback checks through a proxy


def base_url(host, port):
    if ":" in host and not host.startswith("["):
        host = "[%s]" % host
    return "http://%s:%d" % (host, int(port))


def http_get(url, timeout):
    """(status, body text) of one GET. An HTTP error status is an answer, not an exception; no answer raises OSError."""
    request = urllib.request.Request(url, headers={"Accept": "application/json", "User-Agent": "carapace.fleet cara_health"})
    try:
        with _OPENER.open(request, timeout=timeout) as resp:
            return resp.status, resp.read(MAX_BODY).decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        try:
            body = exc.read(MAX_BODY).decode("utf-8", "replace")
        finally:
            exc.close()
        return exc.code, body
    except urllib.error.URLError as exc:
        raise OSError("no answer from %s: %s" % (url, exc.reason)) from exc
    except http.client.HTTPException as exc:  # a malformed or cut-off answer
        raise OSError("broken HTTP answer from %s: %s: %s" % (url, type(exc).__name__, exc)) from exc


def _json_object(text):
    try:
        data = json.loads(text)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def probe_health(url, expected_version, timeout, get=http_get):
    """One look at /health: (ok, observation). ok = 2xx, a JSON object, and the expected version when one is given."""
    obs = {"url": url, "status_code": None, "version": None, "body": None, "error": None}
    try:
        status, body = get(url, timeout)
    except OSError as exc:
        obs["error"] = str(exc)
        return False, obs
    obs["status_code"] = status
    data = _json_object(body)
    obs["body"] = data if data is not None else body[:2000]
    if not 200 <= status < 300:
        obs["error"] = "/health answered HTTP %d: %s" % (status, body[:500].strip())
        return False, obs
    if data is None:
        obs["error"] = "/health answered HTTP %d with a body that is not a JSON object: %r" % (status, body[:200])
        return False, obs
    obs["version"] = data.get("version")
    if expected_version and bare_version(obs["version"]) != bare_version(expected_version):
        obs["error"] = "version mismatch: /health reports version %s, expected %s" % (obs["version"], bare_version(expected_version))
        return False, obs
    return True, obs


def probe_ready(url, timeout, get=http_get):
    """One look at /health/ready: (ok, observation). 200 = ready; 503 = not ready (its body says why)."""
    obs = {"url": url, "status_code": None, "body": None, "error": None}
    try:
        status, body = get(url, timeout)
    except OSError as exc:
        obs["error"] = str(exc)
        return False, obs
    obs["status_code"] = status
    data = _json_object(body)
    obs["body"] = data if data is not None else body[:2000]
    if status == 200:
        return True, obs
    if status == 503:
        obs["error"] = "/health/ready answered 503 (not ready): %s" % body[:500].strip()
    else:
        obs["error"] = "/health/ready answered HTTP %d: %s" % (status, body[:500].strip())
    return False, obs


# -- running cara under the deadline ----------------------------------------------------------------------------------

def _text(data):
    if data is None:
        return ""
    return data.decode("utf-8", "replace") if isinstance(data, bytes) else data


def bounded_runner(argv, env, timeout):
    """Run a command with a hard timeout (the time left before the gate's deadline): (rc, stdout, stderr).

    A command still running at the timeout is killed and reported with rc 124 and what it printed so far; a command
    that cannot be started at all gets rc 127.
    """
    try:
        proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout, check=False,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        return (TIMEOUT_RC, _text(exc.stdout),
                _text(exc.stderr) + "\n(killed after %.1fs: the health gate's deadline was reached)" % timeout)
    except OSError as exc:
        return 127, "", "cannot run %s: %s" % (argv[0], exc)
    return proc.returncode, proc.stdout, proc.stderr


def scrub(value, secrets):
    """A copy of value (str, list, dict) with every secret string replaced by ********."""
    secrets = [s for s in secrets if isinstance(s, str) and s]
    if not secrets:
        return value
    if isinstance(value, str):
        for secret in secrets:
            value = value.replace(secret, REDACTED)
        return value
    if isinstance(value, list):
        return [scrub(v, secrets) for v in value]
    if isinstance(value, dict):
        return {k: scrub(v, secrets) for k, v in value.items()}
    return value


def verify_check(outcome):
    """The result key of one verify outcome: verify_auto, verify_autonomy, verify_local_chat, ..."""
    return "verify_" + outcome.replace("-", "_")


def _lines(text, limit=20):
    lines = [line.rstrip() for line in (text or "").splitlines() if line.strip()]
    return lines[-limit:]


# -- the gate ---------------------------------------------------------------------------------------------------------

class HealthGate:
    """Runs the selected checks in the order of CHECKS under one deadline; stops at the first failure.

    `cli` is a `_cara.CaraCLI` (its runner should honour timeouts: `bounded_runner`). `verify_skip_reason`, when set,
    skips both `cara verify` checks with that reason (check mode); `control_enabled` False skips the autonomy check.
    """

    def __init__(self, cli, *, host="127.0.0.1", port=DEFAULT_PORT, expected_version=None,
                 checks=("health", "ready", "status", "verify"), timeout=120, interval=1.0, control_enabled=False,
                 config_path=None, verify_skip_reason=None, request_timeout=5.0, secrets=(),
                 verify_outcomes=DEFAULT_OUTCOMES, verify_timeout=DEFAULT_VERIFY_TIMEOUT, get=http_get,
                 sleep=time.sleep, clock=time.monotonic):
        unknown = [c for c in checks if c not in CHECKS] + [o for o in verify_outcomes if o not in OUTCOMES]
        if unknown:
            raise ValueError("unknown check(s) or outcome(s) %s; checks: %s; outcomes: %s"
                             % (", ".join(unknown), ", ".join(CHECKS), ", ".join(OUTCOMES)))
        self.cli = cli
        self.host = host
        self.port = int(port)
        self.expected_version = bare_version(expected_version) if expected_version else None
        # `verify` runs each of verify_outcomes in turn; verify_auto / verify_autonomy are shorthands for one outcome
        outcomes = list(verify_outcomes) if "verify" in checks else []
        outcomes += [o for o in ("auto", "autonomy") if "verify_" + o in checks and o not in outcomes]
        self.outcomes = {verify_check(o): o for o in outcomes}
        self.checks = [c for c in ("health", "ready", "status") if c in checks] + list(self.outcomes)
        self.verify_timeout = verify_timeout
        self.timeout = timeout
        self.interval = interval
        self.control_enabled = control_enabled
        self.config_path = config_path
        self.verify_skip_reason = verify_skip_reason
        self.request_timeout = request_timeout
        self.secrets = [s for s in secrets if isinstance(s, str) and s]
        self.get = get
        self.sleep = sleep
        self.clock = clock
        self.deadline = None
        self.url = base_url(host, port)
        self.reported_version = None

    # each check returns a record {"result": pass|fail|skip, "detail", ...}; a failing one also "cause", "next_step"
    def run(self):
        self.deadline = Deadline(self.timeout, self.clock)
        records = {}
        failed = None
        for name in self.checks:
            if failed:
                records[name] = {"result": "not_run", "detail": "not run: the %s check failed first" % failed}
                continue
            started = self.deadline.elapsed()
            if name not in POLLED and self.deadline.expired():
                record = self._fail("deadline", "the deadline of %ss passed before this check could start" % self.timeout,
                                    "raise timeout, or find out why the checks before it took so long")
            elif name in self.outcomes:
                record = self._check_verify(self.outcomes[name])
            else:
                record = getattr(self, "_check_" + name)()
            record["duration"] = round(self.deadline.elapsed() - started, 3)
            records[name] = scrub(record, self.secrets)
            if record["result"] == "fail":
                failed = name
        result = {
            "passed": failed is None,
            "elapsed": round(self.deadline.elapsed(), 3),
            "timeout": self.timeout,
            "checks": records,
            "failed_check": failed,
            "version": self.reported_version,
            "expected_version": self.expected_version,
            "url": self.url,
            "port": self.port,
            "skipped": {n: r["detail"] for n, r in records.items() if r["result"] == "skip"},
        }
        if failed:
            record = records[failed]
            result["cause"] = record["cause"]
            result["next_step"] = record["next_step"]
            result["msg"] = scrub("health check '%s' failed after %.1fs (deadline %ss): %s Next step: %s"
                                  % (failed, result["elapsed"], self.timeout, record["detail"], record["next_step"]),
                                  self.secrets)
        else:
            result["msg"] = "all checks passed in %.1fs (%s)%s" % (
                result["elapsed"], ", ".join(n for n, r in records.items() if r["result"] == "pass"),
                "".join("; %s skipped: %s" % (n, why) for n, why in result["skipped"].items()))
        return result

    @staticmethod
    def _fail(cause, detail, next_step, **extra):
        record = {"result": "fail", "detail": detail, "cause": cause, "next_step": next_step}
        record.update(extra)
        return record

    @staticmethod
    def _pass(detail, **extra):
        record = {"result": "pass", "detail": detail}
        record.update(extra)
        return record

    def _poll(self, probe):
        return wait_until(probe, self.deadline, self.interval, sleep=self.sleep)

    def _request_timeout(self):
        return max(0.1, min(self.request_timeout, self.deadline.remaining() or 0.1))

    def _check_health(self):
        url = self.url + "/health"
        waited = self._poll(lambda: probe_health(url, self.expected_version, self._request_timeout(), self.get))
        obs = waited.value or {}
        extra = {"url": url, "attempts": waited.attempts, "status_code": obs.get("status_code"),
                 "version": obs.get("version"), "body": obs.get("body")}
        if obs.get("version") is not None:
            self.reported_version = bare_version(obs["version"])
        if waited.done:
            want = " (as expected)" if self.expected_version else ""
            return self._pass("/health answered with version %s%s" % (obs.get("version"), want), **extra)
        error = waited.error or obs.get("error") or "no answer"
        if obs.get("version") is not None and self.expected_version and obs.get("status_code") == 200:
            return self._fail(
                "version_mismatch", "%s (for %.1fs, %d attempts)" % (error, waited.elapsed, waited.attempts),
                "the daemon on port %d still runs %s: restart the service so it runs the switched binary, and check "
                "that bin_path points to the %s release (carapace.fleet.cara_switch). %s"
                % (self.port, obs.get("version"), self.expected_version, ROLLBACK_HINT), **extra)
        return self._fail(
            "health_unreachable", "/health on %s did not answer as expected within %ss (%d attempts); last error: %s"
            % (self.url, self.timeout, waited.attempts, error),
            "check that the daemon runs (service status, its log) and listens on port %d (gateway.port); a release "
            "that does not start is rolled back. %s" % (self.port, ROLLBACK_HINT), **extra)

    def _check_ready(self):
        url = self.url + "/health/ready"
        waited = self._poll(lambda: probe_ready(url, self._request_timeout(), self.get))
        obs = waited.value or {}
        extra = {"url": url, "attempts": waited.attempts, "status_code": obs.get("status_code"), "body": obs.get("body")}
        if waited.done:
            return self._pass("/health/ready answered 200 (ready)", **extra)
        error = waited.error or obs.get("error") or "no answer"
        return self._fail(
            "not_ready", "/health/ready was not ready within %ss (%d attempts); last answer: %s"
            % (self.timeout, waited.attempts, error),
            "read the body's checks: the state dir must be writable by the daemon, the LLM provider reachable and "
            "(v0.9.0+) no channel in Error state; fix that and re-run the gate. %s" % ROLLBACK_HINT, **extra)

    def _set_command_timeout(self, cap=None):
        remaining = self.deadline.remaining()
        self.cli.timeout = max(MIN_COMMAND_TIMEOUT, min(remaining, cap) if cap else remaining)

    def _check_status(self):
        self._set_command_timeout()
        res = self.cli.status(port=self.port, host=self.host)
        extra = {"argv": res["argv"], "rc": res["rc"], "format": res.get("format"), "health": res.get("health"),
                 "stdout": res["stdout"], "stderr": res["stderr"]}
        said = " | ".join(_lines(res["stderr"]) or _lines(res["stdout"]))
        if res["rc"] == TIMEOUT_RC:
            return self._fail("deadline", "`%s` did not finish before the deadline: %s" % (" ".join(res["argv"]), said),
                              "raise timeout, or find out why the gateway answers slowly", **extra)
        if res["rc"] != 0:
            return self._fail("status_failed", "`%s` exited %s: %s" % (" ".join(res["argv"]), res["rc"], said),
                              "follow cara's own message above; `cara status` only reads /health, so the daemon "
                              "stopped answering or the port is wrong. %s" % ROLLBACK_HINT, **extra)
        version = (res.get("health") or {}).get("version")
        if self.expected_version and bare_version(version) != self.expected_version:
            return self._fail("version_mismatch", "`cara status` reports version %s, expected %s" % (version, self.expected_version),
                              "restart the service so it runs the switched binary. %s" % ROLLBACK_HINT, **extra)
        return self._pass("`cara status` (%s) reports version %s, status %s"
                          % (res.get("format"), version, (res.get("health") or {}).get("status")), **extra)

    def _check_verify(self, outcome):
        if outcome != "autonomy" or self.verify_skip_reason or self.control_enabled:
            return self._verify(outcome)
        return {"result": "skip", "outcome": "autonomy",
                "detail": "gateway.control.enabled is not true in %s: `cara verify --outcome autonomy` needs the "
                          "/control routes, which only exist when control is enabled" % (self.config_path or "the config"),
                "next_step": "enable gateway.control (and gateway auth) to have autonomy verified"}

    def _verify(self, outcome):
        if self.verify_skip_reason:
            return {"result": "skip", "outcome": outcome, "detail": self.verify_skip_reason, "next_step": None}
        # its own bounded wait inside the deadline: a local-chat outcome waits on a model call (up to 45 s in cara)
        self._set_command_timeout(self.verify_timeout)
        res = self.cli.verify(outcome, port=self.port)
        summary = res.get("checks") or []
        extra = {"argv": res["argv"], "rc": res["rc"], "outcome": res.get("outcome") or outcome, "summary": summary,
                 "stdout": res["stdout"], "stderr": res["stderr"]}
        command = "cara verify --outcome %s --port %d" % (outcome, self.port)
        fails = [c for c in summary if c["result"] == "FAIL"]
        fail_text = "; ".join("[FAIL] %s: %s%s" % (c["name"], c["detail"], " (next step: %s)" % c["next_step"] if c["next_step"] else "")
                              for c in fails)
        said = " | ".join(_lines(res["stderr"]))
        if "Starting embedded gateway" in (res["stderr"] or ""):
            return self._fail("daemon_down", "`%s` found no gateway answering on port %d and started an embedded one, so "
                              "its result does not speak for the daemon: %s" % (command, self.port, fail_text or said),
                              "check that the daemon is still running (it answered /health earlier in this gate)", **extra)
        if res["rc"] == TIMEOUT_RC:
            return self._fail("deadline", "`%s` did not finish within %.0fs (verify_timeout %ss, or the gate's deadline): %s"
                              % (command, self.cli.timeout, self.verify_timeout, fail_text or said),
                              "raise verify_timeout or timeout (cara waits up to 45 s for a local-chat model reply and up "
                              "to 70 s for an autonomy task), or find out why the model or agent is slow", **extra)
        if res["rc"] != 0 or not res.get("passed"):
            detail = "`%s` failed (exit %s)" % (command, res["rc"])
            if fail_text:
                detail += ": " + fail_text
            if said:
                detail += "; cara said: " + said
            first_hint = next((c["next_step"] for c in fails if c["next_step"]), None)
            return self._fail("verify_failed", detail,
                              "%s. %s" % (("do what cara's next step says (%s)" % first_hint) if first_hint
                                          else "follow cara's message above", ROLLBACK_HINT), **extra)
        skips = [c for c in summary if c["result"] == "SKIP"]
        detail = "`%s` passed (outcome %s, %d checks passed" % (command, extra["outcome"],
                                                                sum(1 for c in summary if c["result"] == "PASS"))
        detail += ", %d skipped by cara: %s)" % (len(skips), "; ".join("%s: %s" % (c["name"], c["detail"]) for c in skips)) if skips else ")"
        return self._pass(detail, **extra)


# -- one gate, as cara_health and cara_apply build it -----------------------------------------------------------------

class GateSetupError(FleetError):
    """The gate cannot be built (unreadable config, no executable binary): `cause` as cara_health reports it."""


def build_gate(bin_path, state_dir, config_path=None, expected_version=None, checks=("health", "ready", "status", "verify"),
               timeout=120, interval=1.0, port=None, host="127.0.0.1", verify_outcomes=DEFAULT_OUTCOMES,
               verify_timeout=DEFAULT_VERIFY_TIMEOUT, gateway_token=None, verify_skip_reason=None):
    """The HealthGate for one host: config read (as cara reads it), port and control routes from it, the secrets to
    scrub from every record. Raises GateSetupError."""
    config_file = _cara.config_path(state_dir, config_path)
    extra_env = {"CARAPACE_GATEWAY_TOKEN": gateway_token} if gateway_token else {}
    cli = _cara.CaraCLI(bin_path, state_dir, config=config_file, runner=bounded_runner, extra_env=extra_env,
                        timeout=timeout)
    try:
        cfg = _cara.read_config(cli, cli.env())
    except _cara.CaraError as exc:
        raise GateSetupError("config", "%s. cara itself would fall back to an empty config or refuse to start; fix the "
                             "file (or pass config_path) and re-run the gate." % exc) from exc
    facts = _cara.gateway_facts(cfg)
    if {"status", "verify", "verify_auto", "verify_autonomy"} & set(checks) and not os.access(bin_path, os.X_OK):
        raise GateSetupError("not_installed", "%s is not an executable cara binary, so `cara status` and `cara verify` "
                             "cannot run. Install a release with carapace.fleet.cara_switch, or set bin_path." % bin_path)
    secrets = [gateway_token, _cara.gateway_secret(cfg, environ={})]
    return HealthGate(cli, host=host, port=port or facts["port"], expected_version=expected_version, checks=checks,
                      timeout=timeout, interval=interval, control_enabled=facts["control_enabled"],
                      config_path=config_file, verify_skip_reason=verify_skip_reason, secrets=secrets,
                      verify_outcomes=verify_outcomes, verify_timeout=verify_timeout)


def soak(make_gate, hold, interval, clock=time.monotonic, sleep=time.sleep):
    """Keep re-checking a host that passed its gate for `hold` seconds (a canary's soak): `make_gate()` builds a fresh
    HealthGate (health and ready, a short deadline each) per round. Stops at the first round that fails: the host
    degraded. Returns {passed, rounds, held_s, failed_after_s, last}; `last` is the last round's gate result."""
    started = clock()
    rounds, last = 0, None
    while True:
        last = make_gate().run()
        rounds += 1
        held = clock() - started
        if not last["passed"]:
            return {"passed": False, "rounds": rounds, "held_s": round(held, 3), "failed_after_s": round(held, 3),
                    "last": last}
        if held >= hold:
            return {"passed": True, "rounds": rounds, "held_s": round(held, 3), "failed_after_s": None, "last": last}
        sleep(max(0.0, min(interval, hold - held)))
