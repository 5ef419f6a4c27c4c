#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: carapace.fleet maintainers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: cara_health
short_description: Gate a Carapace host on its health endpoints, C(cara status) and C(cara verify), under one deadline
version_added: 0.1.0
description:
  - Runs the checks of Carapace's release policy after an upgrade or a rollback, in this order, all under one deadline
    of O(timeout) seconds, and stops at the first failure.
  - V(health) polls C(GET /health) until it answers with a JSON body and, when O(expected_version) is set, reports that
    version (a leading C(v) is ignored on either side).
  - V(ready) polls C(GET /health/ready) until it answers 200 (503 means not ready; its body says why).
  - V(status) runs C(cara status --port <port> --host <host>), with C(--json) where the installed release has it
    (v0.9.0+) and the text output otherwise (v0.8.0), and checks the version it reports.
  - V(verify) runs C(cara verify --outcome <o> --port <port>) for each outcome of O(verify_outcomes) (by default
    V(auto), then V(autonomy)), each bounded by O(verify_timeout); the V(autonomy) outcome runs only when the config
    enables C(gateway.control) (the C(/control) routes it needs exist only then); otherwise it is skipped, saying why.
  - "The PASS/FAIL/SKIP lines of C(cara verify) are returned as structured results. A failing check fails the task with
    that check's own text (cara's FAIL line, its C(next step:) hint, cara's error output) and the operator's next step."
  - V(health) and V(ready) are polled, since a daemon that has just started needs a moment; C(cara status) and
    C(cara verify) run once each, and are killed if they are still running at the deadline.
  - Never changes anything on the host itself, so the task always reports C(changed=false).
author:
  - carapace.fleet maintainers (@carapace-fleet)
extends_documentation_fragment:
  - carapace.fleet.host_layout
attributes:
  check_mode:
    support: full
    description:
      - Runs V(health), V(ready) and V(status), which only read. Skips every C(cara verify) outcome and says so
        in RV(skipped), since C(cara verify) leaves traces in the daemon's state (a control task in
        C(tasks/queue.json), a chat session and usage counters, or a C(/hooks/wake) call that wakes the agent).
  diff_mode:
    support: none
    description: Nothing changes, so there is no diff.
  idempotent:
    support: full
    description: Read-only; always reports C(changed=false).
options:
  port:
    description: Gateway port. Defaults to C(gateway.port) of the config, else 18789.
    type: int
  host:
    description:
      - Address of the gateway for the HTTP checks and C(cara status --host).
      - C(cara verify) always targets 127.0.0.1 (it has no host option).
    type: str
    default: 127.0.0.1
  expected_version:
    description:
      - Version C(/health) and C(cara status) must report, for example C(0.9.0) or C(v0.9.0).
      - When unset, any version passes.
    type: str
  checks:
    description:
      - The checks to run; they always run in this order. V(verify) runs C(cara verify --outcome <o>) for each
        outcome of O(verify_outcomes), in turn.
      - V(verify_auto) and V(verify_autonomy) are shorthands for V(verify) with only that outcome.
    type: list
    elements: str
    choices: [health, ready, status, verify, verify_auto, verify_autonomy]
    default: [health, ready, status, verify]
  verify_outcomes:
    description:
      - The C(cara verify) outcomes V(verify) runs. The release policy asks for V(auto) and V(autonomy).
      - V(auto) is usually V(local-chat) (cara picks it from the config), a round trip through the LLM
        provider - it costs a model call and fails when the provider is slow or down.
      - Each outcome's result is returned under C(checks.verify_<outcome>) (V(local-chat) as C(verify_local_chat)).
    type: list
    elements: str
    choices: [auto, local-chat, hooks, autonomy, discord, telegram, matrix]
    default: [auto, autonomy]
  verify_timeout:
    description:
      - Seconds one C(cara verify) may take, inside the one deadline O(timeout). cara itself waits up to 45 s for a
        local-chat model reply and up to 70 s for an autonomy task.
    type: int
    default: 80
  timeout:
    description:
      - Seconds for all checks together (one deadline), counted from the start of the task.
      - C(cara verify --outcome autonomy) alone may take up to 70 seconds when the agent is slow.
    type: int
    default: 120
  interval:
    description: Seconds between two attempts of a polled check (V(health), V(ready)).
    type: float
    default: 1.0
  gateway_token:
    description:
      - Gateway token for C(cara verify), passed to C(cara) in the environment as E(CARAPACE_GATEWAY_TOKEN), never
        on the command line. Never logged or returned.
      - When unset, C(cara) uses its usual sources (environment, C(gateway.auth.token) or C(gateway.auth.password)).
    type: str
  soak:
    description:
      - Seconds to keep watching a host that passed the checks (a canary's soak). Every O(soak_interval) seconds the
        V(health) and V(ready) checks of O(checks) run again, each round under a deadline of O(soak_interval) (at
        least 5 s). A host that stops answering, reports another version or is not ready for that long has degraded,
        and the task fails with that round's check (cause as the check's, RV(soak) says when).
      - V(0) (the default) checks once. The C(cara verify) checks are not repeated (each costs a model call).
    type: int
    default: 0
    version_added: 0.3.0
  soak_interval:
    description: Seconds between two rounds of the soak.
    type: float
    default: 5.0
    version_added: 0.3.0
  fail_on_gate:
    description:
      - Fail the task when the gate does not pass (the default). V(false) returns the verdict instead (RV(passed)
        false, with C(msg) and C(cause)), for callers to whom a failing gate is an expected outcome, such as a
        rollback drill.
    type: bool
    default: true
notes:
  - C(cara verify) starts an embedded gateway when nothing answers on the port. The module treats that as a failure
    (the result would not speak for the daemon), which can only happen if the daemon stops between the checks.
  - "For O(timeout) the role's default is generous: a daemon that needs a slow start (migrations) passes as soon as it
    answers, and a failed gate costs at most O(timeout)."
seealso:
  - module: carapace.fleet.cara_switch
  - name: Carapace release policy
    description: Post-upgrade verification and rollback runbook (docs/release.md in the Carapace repository).
    link: https://github.com/puremachinery/carapace/blob/master/docs/release.md
"""

EXAMPLES = r"""
- name: Gate the host on the new release
  carapace.fleet.cara_health:
    expected_version: "{{ cara_target_version }}"
    gateway_token: "{{ cara_gateway_token }}"
    timeout: 180

- name: Only the HTTP checks, quickly, e.g. while a daemon starts
  carapace.fleet.cara_health:
    checks: [health, ready]
    timeout: 30
    interval: 0.5
"""

RETURN = r"""
passed:
  description: Whether every selected check passed (skipped ones do not count against it).
  returned: always
  type: bool
elapsed:
  description: Seconds the checks took, all together.
  returned: always
  type: float
  sample: 2.47
timeout:
  description: The deadline in seconds.
  returned: always
  type: int
version:
  description: Version C(/health) reported (without a leading C(v)), or V(null) when it did not answer.
  returned: always
  type: str
  sample: 0.9.0
expected_version:
  description: The version that was required, without a leading C(v), or V(null).
  returned: always
  type: str
url:
  description: Base URL of the HTTP checks.
  returned: always
  type: str
  sample: http://127.0.0.1:18789
port:
  description: Port that was checked.
  returned: always
  type: int
checks:
  description:
    - One entry per selected check, keyed by name (V(health), V(ready), V(status), then C(verify_<outcome>) per verify
      outcome, for example V(verify_auto), V(verify_autonomy), V(verify_local_chat)).
    - Every entry has C(result) (V(pass), V(fail), V(skip) or V(not_run) after an earlier failure), C(detail) and
      C(duration) (seconds); a failed one also C(cause) and C(next_step).
    - V(health) and V(ready) add C(url), C(status_code), C(body) and C(attempts); V(health) adds C(version).
    - V(status) adds C(argv), C(rc), C(format) (V(json) or V(text)), C(health) (the parsed C(/health) part), C(stdout),
      C(stderr).
    - The verify checks add C(argv), C(rc), C(outcome) (as cara resolved it), C(stdout), C(stderr) and C(summary), a list
      of C({result, name, detail, next_step}) for cara's C([PASS]), C([FAIL]) and C([SKIP]) lines.
  returned: always
  type: dict
  sample:
    health: {result: pass, detail: /health answered with version 0.9.0 (as expected), version: 0.9.0, attempts: 1}
    verify_autonomy:
      result: skip
      detail: "gateway.control.enabled is not true in /var/lib/carapace/carapace.json5: ..."
skipped:
  description: Checks that were skipped, with the reason.
  returned: always
  type: dict
  sample: {verify_autonomy: gateway.control.enabled is not true in /var/lib/carapace/carapace.json5}
failed_check:
  description: Name of the check that failed, or V(null).
  returned: always
  type: str
next_step:
  description: On failure, what the operator should do next.
  returned: failure
  type: str
soak:
  description: The soak (O(soak) > 0 and the checks passed first) - whether the host held, for how long, in how many rounds.
  returned: when soak > 0 and the first checks passed
  type: dict
  sample: {passed: true, rounds: 7, held_s: 30.1, failed_after_s: null}
cause:
  description:
    - On failure, a machine-readable cause, one of C(health_unreachable), C(version_mismatch), C(not_ready),
      C(status_failed), C(verify_failed), C(daemon_down), C(deadline), C(config), C(not_installed), C(bad_argument).
  returned: failure
  type: str
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.carapace.fleet.plugins.module_utils import _layout
from ansible_collections.carapace.fleet.plugins.module_utils._health import (CHECKS, DEFAULT_OUTCOMES, DEFAULT_VERIFY_TIMEOUT,
                                                                             OUTCOMES, GateSetupError, build_gate, soak)
from ansible_collections.carapace.fleet.plugins.module_utils._paths import path_problem

CHECK_MODE_REASON = ("check mode: `cara verify` is not run, since it leaves traces in the daemon's state (a control task, "
                     "a chat session and usage counters, or a /hooks/wake call)")


def main():
    module = AnsibleModule(
        argument_spec=_layout.host_argument_spec(
            port=dict(type="int"),
            host=dict(type="str", default="127.0.0.1"),
            expected_version=dict(type="str"),
            checks=dict(type="list", elements="str", choices=list(CHECKS), default=["health", "ready", "status", "verify"]),
            verify_outcomes=dict(type="list", elements="str", choices=list(OUTCOMES), default=list(DEFAULT_OUTCOMES)),
            verify_timeout=dict(type="int", default=DEFAULT_VERIFY_TIMEOUT),
            timeout=dict(type="int", default=120),
            interval=dict(type="float", default=1.0),
            gateway_token=dict(type="str", no_log=True),
            soak=dict(type="int", default=0),
            soak_interval=dict(type="float", default=5.0),
            fail_on_gate=dict(type="bool", default=True),
        ),
        supports_check_mode=True,
    )
    p = module.params
    problem = path_problem(p)
    if problem:
        module.fail_json(msg=problem, cause="bad_argument")
    if p["timeout"] <= 0 or p["interval"] <= 0 or p["verify_timeout"] <= 0 or p["soak"] < 0 or p["soak_interval"] <= 0:
        module.fail_json(msg="timeout, interval, verify_timeout and soak_interval must be positive, soak not negative",
                         cause="bad_argument")
    if p["port"] is not None and not 1 <= p["port"] <= 65535:
        module.fail_json(msg="port %s is not a TCP port (1-65535)" % p["port"], cause="bad_argument")
    if not p["checks"]:
        module.fail_json(msg="checks is empty: name at least one of %s" % ", ".join(CHECKS), cause="bad_argument")
    if p["expected_version"] and not {"health", "status"} & set(p["checks"]):
        module.fail_json(msg="expected_version is checked by the health and status checks; select one of them",
                         cause="bad_argument")

    try:
        gate = build_gate(p["bin_path"], p["state_dir"], p["config_path"], expected_version=p["expected_version"],
                          checks=p["checks"], timeout=p["timeout"], interval=p["interval"], port=p["port"],
                          host=p["host"], verify_outcomes=p["verify_outcomes"], verify_timeout=p["verify_timeout"],
                          gateway_token=p["gateway_token"],
                          verify_skip_reason=CHECK_MODE_REASON if module.check_mode else None)
    except GateSetupError as exc:
        module.fail_json(msg=exc.message, cause=exc.cause)
    result = gate.run()
    if result["passed"] and p["soak"] > 0:
        result = _soak(module, p, result)
    msg = result.pop("msg")
    if not result["passed"] and p["fail_on_gate"]:
        module.fail_json(msg=msg, changed=False, **result)
    module.exit_json(msg=msg, changed=False, **result)


def _soak(module, p, first):
    """Re-run the HTTP checks for p["soak"] seconds; the first round that fails is the result (the host degraded)."""
    checks = [c for c in ("health", "ready") if c in p["checks"]]
    if not checks:
        module.fail_json(msg="soak re-checks health and ready: select at least one of them in checks", cause="bad_argument")
    round_timeout = max(5, int(p["soak_interval"]))

    def make_gate():
        return build_gate(p["bin_path"], p["state_dir"], p["config_path"], expected_version=p["expected_version"],
                          checks=checks, timeout=round_timeout, interval=p["interval"], port=p["port"], host=p["host"])

    try:
        held = soak(make_gate, p["soak"], p["soak_interval"])
    except GateSetupError as exc:
        module.fail_json(msg=exc.message, cause=exc.cause)
    last = held.pop("last")
    if held["passed"]:
        first["soak"] = held
        first["msg"] = "%s; held for %.0fs (%d rounds of %s)" % (
            first["msg"], held["held_s"], held["rounds"], ", ".join(checks))
        return first
    last["soak"] = held
    last["msg"] = "degraded during the soak, %.0fs after the checks passed: %s" % (held["failed_after_s"], last["msg"])
    return last


if __name__ == "__main__":
    main()
