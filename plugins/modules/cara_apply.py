#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: carapace.fleet maintainers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: cara_apply
short_description: Run a Carapace host's whole downtime window on the host, with its own rollback
version_added: 0.2.0
description:
  - Runs the downtime window of the release policy's runbook in one task on the host, so that it costs one task's
    overhead and does not depend on the controller once it has started. Launched with C(async), it finishes even
    when the controller dies or the connection drops.
  - V(upgrade) runs stop, backup (M(carapace.fleet.cara_backup)'s backup and state snapshot), the transaction's
    C(applying), the switch (M(carapace.fleet.cara_switch)), C(applied), start, and the gate
    (M(carapace.fleet.cara_health)'s checks under one deadline), then clears the transaction as C(cara) does.
  - When any of it fails after the stop, it rolls back by itself. It keeps the evidence in O(backup_dir), marks the
    transaction failed and not retryable with the rollback pending, switches back to O(from_tag) (checked against
    O(from_sha256)), restores the backup with C(cara restore --force) and its snapshot, starts, verifies, and records
    the rollback as done. A backup that did not complete is not restored, since the state was never touched.
  - V(rollback) runs the rollback runbook as one window - stop, switch back, restore O(backup_path), make an open
    transaction of ours terminal, start, verify. If that fails, the host is brought back up on O(from_tag).
  - V(acknowledge) marks the finished window as reported by O(run_id), so that a later run does not report it again.
  - "Every phase is persisted as it happens: the transaction's phases in C(<state_dir>/updates/transaction.json),
    and the window's own record in O(install_root)C(/window.json): run id, pid, phases with start and end times,
    and the outcome. While the window runs it holds the flock on O(install_root)C(/window.lock); a second window on
    the host is refused (cause C(window_running)) and M(carapace.fleet.cara_info) with C(wait_window) waits for it."
  - The service is stopped and started as the task's user (root for systemd). Every C(cara) command and every write
    to the state and the backups runs as O(state_user), in a child process that dropped to that user.
author:
  - carapace.fleet maintainers (@carapace-fleet)
extends_documentation_fragment:
  - carapace.fleet.host_layout
attributes:
  check_mode:
    support: full
    description: Reports the window it would run and changes nothing (nothing is stopped, written or locked).
  diff_mode:
    support: none
    description: The result's RV(phases) say what changed, step by step.
  idempotent:
    support: none
    description: Every V(upgrade) and V(rollback) runs a window (it stops and starts the service).
options:
  action:
    description:
      - V(upgrade), V(rollback) or V(acknowledge) (see above).
    type: str
    required: true
    choices: [upgrade, rollback, acknowledge]
  tag:
    description:
      - The release tag the window goes to, for example C(v0.9.0). Required for V(upgrade) and V(rollback).
    type: str
  src:
    description:
      - The verified binary to switch to - for V(upgrade) the staged C(<state_dir>/updates/cara-<version>); for
        V(rollback) with O(switch=present) the kept or fetched copy of O(tag).
    type: path
  sha256:
    description: The verified sha256 of O(src).
    type: str
  switch:
    description:
      - How V(rollback) gets O(tag) back - V(present) installs O(src) and switches to it, V(previous) switches back
        to the release recorded as previous, V(none) switches nothing (O(tag) is already active).
    type: str
    choices: [present, previous, none]
    default: present
  from_tag:
    description:
      - The release the host runs before the window. V(upgrade) rolls back to it; V(rollback) comes back up on it when
        the rollback fails. Required for V(upgrade).
    type: str
  from_src:
    description: The kept binary of O(from_tag), by default O(install_root)C(/releases/<from_tag>/cara).
    type: path
  from_sha256:
    description:
      - The sha256 of O(from_tag)'s binary, read before the window. The way back is refused when the kept copy does
        not match it. Required for V(upgrade).
    type: str
  asset_name:
    description: The release asset of the host, as the transaction records it.
    type: str
    default: cara-x86_64-linux
  keep:
    description: Releases kept under O(install_root) after the switch (M(carapace.fleet.cara_switch)'s C(keep)).
    type: int
    default: 3
  backup_retention:
    description: Backups kept in O(backup_dir) for this release (M(carapace.fleet.cara_backup)'s C(retention)).
    type: int
    default: 5
  state_snapshot:
    description: Take the full state snapshot with the backup, for a byte-identical rollback.
    type: bool
    default: true
  backup_path:
    description:
      - V(upgrade) - a backup taken earlier for this transaction (a resumed window); no new backup is taken.
      - V(rollback) - the backup to restore. Empty - nothing is restored.
    type: str
    default: ""
  service_manager:
    description: How cara runs on the host - a systemd unit, or the service script of C(carapace.fleet.cara_service).
    type: str
    choices: [systemd, process]
    default: systemd
  service_name:
    description: The systemd unit (without C(.service)).
    type: str
    default: cara
  service_script:
    description: The service script (O(service_manager=process)).
    type: path
    default: /run/carapace/cara-service
  service_log:
    description: The log the service script writes (O(service_manager=process)), for the evidence.
    type: path
    default: /run/carapace/cara.log
  state_user:
    description:
      - The account that owns the state. C(cara) commands and state writes run as this user. Empty means the task's
        user.
    type: str
    default: ""
  health_timeout:
    description: The gate's one deadline in seconds (V(rollback) - its verify's deadline).
    type: int
    default: 120
  rollback_timeout:
    description: The deadline of the verify after V(upgrade)'s own rollback.
    type: int
    default: 120
  verify_outcomes:
    description: The C(cara verify) outcomes of the gate.
    type: list
    elements: str
    choices: [auto, local-chat, hooks, autonomy, discord, telegram, matrix]
    default: [auto, autonomy]
  verify_timeout:
    description: Seconds one C(cara verify) may take, inside the deadline.
    type: int
    default: 80
  gateway_token:
    description: Gateway token for C(cara verify) (passed in the environment; never logged or returned).
    type: str
  auto_rollback:
    description: V(upgrade) rolls back by itself after a failure after the stop. V(false) leaves the host stopped.
    type: bool
    default: true
  fail_on_gate:
    description:
      - Fail the task when the gate failed (after the rollback). V(false) returns RV(outcome=rolled_back) without a
        failure, for a rollback drill; any other failure still fails.
    type: bool
    default: true
  down_at:
    description: When the service went down (epoch seconds) if an earlier run stopped it; else the window's start.
    type: float
  run_id:
    description: The fleet run's id, kept in the window record and the evidence file name.
    type: str
    default: ""
  reason:
    description: Why the host is rolled back, recorded in the transaction it closes.
    type: str
    default: rollback
  host_name:
    description: The host's name in the evidence (the roles pass C(inventory_hostname)). Empty - the machine's hostname.
    type: str
    default: ""
notes:
  - Launch it with C(async) (longer than the stop, the backup and the deadlines together) and C(poll), as the roles
    do. The window then keeps going without the controller, and the next run finds its record.
seealso:
  - module: carapace.fleet.cara_info
  - module: carapace.fleet.cara_switch
  - module: carapace.fleet.cara_health
"""

EXAMPLES = r"""
- name: Upgrade the host to v0.9.0 in one window, even if the controller goes away
  carapace.fleet.cara_apply:
    action: upgrade
    tag: v0.9.0
    src: /var/lib/carapace/updates/cara-0.9.0
    sha256: "{{ release.assets['cara-x86_64-linux'].sha256 }}"
    from_tag: v0.8.0
    from_sha256: "{{ info.sha256 }}"
    state_user: cara
    run_id: "{{ run_id }}"
  become: true
  async: 900
  poll: 1
  register: window

- name: Roll back to the previous release and restore the backup
  carapace.fleet.cara_apply:
    action: rollback
    tag: v0.8.0
    switch: previous
    backup_path: /var/backups/carapace/cara-backup-v0.8.0-20261203T020000Z.tar.gz
    from_tag: v0.9.0
    from_sha256: "{{ info.sha256 }}"
    state_user: cara
  become: true
  async: 600
  poll: 1
"""

RETURN = r"""
outcome:
  description: V(upgraded), V(rolled_back) (back on the release it ran, or on O(tag) for V(rollback)) or V(failed).
  returned: success or failure of a window
  type: str
phases:
  description: Each step with C(phase), C(start) and C(end) (epoch seconds), C(ok) and, when it failed, C(error).
  returned: success or failure of a window
  type: list
  elements: dict
down_at:
  description: When the window began, just before the stop (epoch seconds).
  returned: success or failure of a window
  type: float
up_at:
  description: When the gate (or the rollback's verify) passed.
  returned: success or failure of a window
  type: float
downtime_s:
  description: V(upgrade) - from before the stop to the gate passed.
  returned: success or failure of a window
  type: float
rto_s:
  description: The recovery time of the rollback, from before the first stop to its verify passed.
  returned: success or failure of a window
  type: float
backup:
  description: The backup archive of the window (taken, reused or restored).
  returned: success or failure of a window
  type: str
backup_entry:
  description: V(upgrade) - the backup taken, as M(carapace.fleet.cara_backup) returns it (with its C(snapshot)).
  returned: success or failure of a window
  type: dict
evidence:
  description: The evidence file kept in O(backup_dir) after a failure (error, failing check's output, log tail).
  returned: success or failure of a window
  type: str
gate:
  description: The last gate's (or verify's) result, as M(carapace.fleet.cara_health) returns it.
  returned: success or failure of a window
  type: dict
failed_check:
  description: The check that failed, or V(null).
  returned: success or failure of a window
  type: str
error:
  description: What failed first, with the phase.
  returned: success or failure of a window
  type: str
rollback_error:
  description: What failed in the rollback after a failed upgrade, or V(null).
  returned: success or failure of a window
  type: str
restored:
  description: V(rollback) - what the restore did (C(backup.path), C(restored), C(snapshot)), or V(null).
  returned: success or failure of a window
  type: dict
rollback:
  description: V(upgrade) - its own rollback after a failure (C(ok), C(error), C(rto_s), C(restored), C(gate)), or V(null).
  returned: success or failure of a window
  type: dict
attempt:
  description: V(upgrade) - the transaction's attempt the window applied (or failed).
  returned: success or failure of a window
  type: int
record:
  description: The window record, O(install_root)C(/window.json), or (V(acknowledge)) its content.
  returned: always
  type: raw
verdict:
  description:
    - V(pass) when the task succeeded (upgraded; rolled back by V(rollback); a drill's failed gate, rolled back),
      else V(fail). The same as the task's failure, kept for callers that register the result with C(failed_when).
  returned: success or failure of a window
  type: str
cause:
  description: On a refusal or failure, a machine-readable cause (C(window_running), C(bad_argument), C(gate_failed), ...).
  returned: failure
  type: str
"""

import os
import time

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.carapace.fleet.plugins.module_utils import _atomic, _cara, _layout, _window
from ansible_collections.carapace.fleet.plugins.module_utils import _transaction as txn
from ansible_collections.carapace.fleet.plugins.module_utils._as_user import call_as
from ansible_collections.carapace.fleet.plugins.module_utils._backup import HostBackup
from ansible_collections.carapace.fleet.plugins.module_utils._backup_restore import HostRestore
from ansible_collections.carapace.fleet.plugins.module_utils._errors import FleetError
from ansible_collections.carapace.fleet.plugins.module_utils._health import OUTCOMES, build_gate
from ansible_collections.carapace.fleet.plugins.module_utils._hostinfo import read_json_marker
from ansible_collections.carapace.fleet.plugins.module_utils._paths import path_problem
from ansible_collections.carapace.fleet.plugins.module_utils._switch import Switcher
from ansible_collections.carapace.fleet.plugins.module_utils._version import bare_version, version_from_output


class StepError(FleetError):
    pass


class Ops:
    """The window's steps on this host, built on the other module_utils; root-side steps run here, the rest as
    the state user (call_as)."""

    def __init__(self, module):
        self.m = module
        self.p = module.params
        self.user = self.p["state_user"]

    def _cli(self):
        p = self.p
        return _cara.CaraCLI(p["bin_path"], p["state_dir"], p["config_path"], runner=_cara.tolerant_module_runner(self.m))

    def _service(self, verb):
        p = self.p
        argv = (["systemctl", verb, p["service_name"]] if p["service_manager"] == "systemd"
                else [p["service_script"], verb])
        rc, out, err = self.m.run_command(argv)
        if rc != 0:
            raise StepError("%s_failed" % verb, "`%s` failed (rc %s): %s" % (" ".join(argv), rc, (err or out).strip()[-800:]))
        return {"argv": argv, "stdout": out.strip()[-400:]}

    def stop(self):
        return self._service("stop")

    def start(self):
        return self._service("start")

    def backup(self):
        p = self.p

        def run():
            job = HostBackup(self._cli(), p["state_dir"], p["backup_dir"], tag=p["from_tag"],
                             retention=p["backup_retention"], include_state_snapshot=p["state_snapshot"])
            return job.run()["backup"]
        return call_as(self.user, run)

    def _tx(self, action, **kw):
        p = self.p
        return call_as(self.user, txn.run, p["state_dir"], action, **kw)

    def advance(self, phase, facts):
        p = self.p

        def run():
            # A resumed window finds the transaction where the interrupted one left it: a phase already passed is
            # not written again (phases only move forward).
            tx, _error = read_json_marker(os.path.join(p["state_dir"], txn.UPDATES_DIR, txn.TX_NAME))
            if tx and tx.get("phase") in txn.ADVANCE_PHASES and \
                    txn.ADVANCE_PHASES.index(tx["phase"]) > txn.ADVANCE_PHASES.index(phase):
                return {"transaction": tx, "changed": False}
            return txn.run(p["state_dir"], "advance", phase=phase, version=p["tag"], asset_name=p["asset_name"],
                           facts={k: v for k, v in (facts or {}).items() if v is not None} or None)
        return call_as(self.user, run)

    def clear(self):
        return self._tx("clear")

    def fail_tx(self, error, facts):
        return self._tx("fail", error=error, retryable=False, facts=facts)

    def close(self, reason):
        """Make an open transaction of ours terminal before a start (cara resumes it by itself at start)."""
        p = self.p

        def run():
            tx, _error = read_json_marker(os.path.join(p["state_dir"], txn.UPDATES_DIR, txn.TX_NAME))
            if not tx or "fleet" not in tx or not txn.resume_pending(tx):
                return {"closed": False}
            txn.run(p["state_dir"], "fail", error="%s; the update to %s was abandoned" % (reason, tx.get("version")),
                    retryable=False)
            return {"closed": True}
        return call_as(self.user, run)

    def switch(self, how, src, sha256, tag):
        p = self.p

        def version_of(path):
            rc, out, _err = self.m.run_command([path, "--version"], check_rc=False)
            return version_from_output(out) if rc == 0 else None
        switcher = Switcher(p["install_root"], p["bin_path"], keep=p["keep"], version_of=version_of)
        if how == "back":  # undo this window's switch: nothing when it never happened, else back to the previous
            cur = switcher.read_state()
            active = (cur or {}).get("active") or {}
            previous = (cur or {}).get("previous") or {}
            if active.get("tag") == tag and active.get("sha256") == sha256:
                return {"tag": tag, "sha256": sha256, "target": active.get("path"), "actions": []}
            how = "previous" if previous.get("tag") == tag and previous.get("sha256") == sha256 else "present"
        if how == "previous":
            result = switcher.previous()
        else:
            result = switcher.present(src or switcher.release_path(tag), sha256, tag)
        return {k: result.get(k) for k in ("tag", "sha256", "target", "actions")}

    def restore(self, path):
        p = self.p

        def run():
            job = HostRestore(self._cli(), p["state_dir"], p["backup_dir"], backup=path, restore_snapshot=True)
            result = job.run()
            # {backup: {path}, snapshot} as cara_restore returns them: the drill judges the snapshot's restore
            return {"backup": {"path": path}, "restored": result.get("restored"), "changed": result.get("changed"),
                    "snapshot": result.get("snapshot")}
        return call_as(self.user, run)

    def gate(self, tag, timeout, what):
        p = self.p

        def run():
            # polled every 0.25 s: inside the window each second of polling is a second of downtime
            gate = build_gate(p["bin_path"], p["state_dir"], p["config_path"], expected_version=bare_version(tag),
                              timeout=timeout, interval=0.25, verify_outcomes=p["verify_outcomes"],
                              verify_timeout=p["verify_timeout"], gateway_token=p["gateway_token"])
            return gate.run()
        result = call_as(self.user, run)
        if not result.get("passed"):
            raise _window.GateFailed(result, what)
        return result

    def log_tail(self):
        p = self.p
        argv = (["journalctl", "-u", p["service_name"], "-n", "50", "--no-pager"] if p["service_manager"] == "systemd"
                else ["tail", "-n", "50", p["service_log"]])
        rc, out, _err = self.m.run_command(argv)
        return out.splitlines() if rc == 0 else []

    def evidence(self, data):
        p = self.p
        data = dict(data, host=p["host_name"] or os.uname()[1], log_tail=self.log_tail())
        name = "evidence-%s-%s.json" % (p["run_id"] or time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()), p["tag"])
        path = os.path.join(p["backup_dir"], name)

        def run():
            marker, _err = read_json_marker(os.path.join(p["state_dir"], txn.UPDATES_DIR, "startup_health_failure.json"))
            _atomic.write_file(path, self.m.jsonify(dict(data, startup_health_failure=marker)), mode=0o600)
            return path
        return call_as(self.user, run)


def _argument_spec():
    return _layout.host_argument_spec(
        action=dict(type="str", required=True, choices=["upgrade", "rollback", "acknowledge"]),
        tag=dict(type="str"),
        src=dict(type="path"),
        sha256=dict(type="str"),
        switch=dict(type="str", choices=["present", "previous", "none"], default="present"),
        from_tag=dict(type="str"),
        from_src=dict(type="path"),
        from_sha256=dict(type="str"),
        asset_name=dict(type="str", default="cara-x86_64-linux"),
        keep=dict(type="int", default=3),
        backup_retention=dict(type="int", default=5),
        state_snapshot=dict(type="bool", default=True),
        backup_path=dict(type="str", default=""),
        service_manager=dict(type="str", choices=["systemd", "process"], default="systemd"),
        service_name=dict(type="str", default="cara"),
        service_script=dict(type="path", default="/run/carapace/cara-service"),
        service_log=dict(type="path", default="/run/carapace/cara.log"),
        state_user=dict(type="str", default=""),
        health_timeout=dict(type="int", default=120),
        rollback_timeout=dict(type="int", default=120),
        verify_outcomes=dict(type="list", elements="str", choices=list(OUTCOMES), default=["auto", "autonomy"]),
        verify_timeout=dict(type="int", default=80),
        gateway_token=dict(type="str", no_log=True),
        auto_rollback=dict(type="bool", default=True),
        fail_on_gate=dict(type="bool", default=True),
        down_at=dict(type="float"),
        run_id=dict(type="str", default=""),
        reason=dict(type="str", default="rollback"),
        host_name=dict(type="str", default=""),
    )


def _message(p, result):
    outcome = result["outcome"]
    if outcome == "upgraded":
        return "upgraded to %s (downtime %ss)" % (p["tag"], result["downtime_s"])
    if p["action"] == "rollback":
        if outcome == "rolled_back":
            return "rolled back to %s (RTO %ss)" % (p["tag"], result["rto_s"])
        where = (result.get("recovered") or {}).get("to")
        return ("the rollback to %s failed (%s). %s Fix the cause, then re-run the rollback for this host."
                % (p["tag"], result["error"], "The host was brought back up on %s." % where if where
                   else "cara was started again on the binary at %s." % p["bin_path"]))
    if outcome == "rolled_back":
        kept = "" if (result.get("rollback") or {}).get("restored") else (
            "; no backup was restored (the backup of this run did not complete, so the state was left untouched)")
        return ("upgrade to %s failed (%s). Rolled back to %s (RTO %ss)%s. Evidence: %s."
                % (p["tag"], result["error"], p["from_tag"], result["rto_s"], kept, result["evidence"] or "-"))
    if not p["auto_rollback"]:
        return ("upgrade to %s failed (%s). The service was stopped and NOT rolled back (auto_rollback is false): run "
                "playbooks/rollback.yml for this host. Evidence: %s." % (p["tag"], result["error"], result["evidence"] or "-"))
    return ("upgrade to %s failed (%s). The rollback failed too: %s. Evidence: %s."
            % (p["tag"], result["error"], result["rollback_error"], result["evidence"] or "-"))


def main():
    module = AnsibleModule(
        argument_spec=_argument_spec(),
        required_if=[("action", "upgrade", ("tag", "src", "sha256", "from_tag", "from_sha256")),
                     ("action", "rollback", ("tag",)), ("action", "acknowledge", ("run_id",))],
        supports_check_mode=True,
    )
    p = module.params
    problem = path_problem(p)
    if problem:
        module.fail_json(msg=problem, cause="bad_argument")
    if p["action"] == "rollback" and p["switch"] == "present" and not p["sha256"]:
        module.fail_json(msg="switch=present needs sha256 (and src or a kept copy of tag)", cause="bad_argument")
    record = _window.Record(p["install_root"])
    if p["action"] == "acknowledge":
        if module.check_mode:
            data = record.read()
            module.exit_json(changed=bool(data and data.get("state") == "done" and not data.get("acknowledged_by")),
                             record=data)
        changed, data = record.acknowledge(p["run_id"])
        module.exit_json(changed=changed, record=data)
    if module.check_mode:
        module.exit_json(changed=True, outcome=None, msg="would run the %s window to %s" % (p["action"], p["tag"]),
                         record=record.path, phases=[])
    if p["action"] == "upgrade" and not p["from_src"]:
        p["from_src"] = os.path.join(p["install_root"], "releases", p["from_tag"], "cara")
    try:
        record.acquire()
    except _window.WindowError as exc:
        module.fail_json(msg=exc.message, cause=exc.cause, record=exc.record, changed=False)
    try:
        window = _window.Window(Ops(module), record, p)
        result = window.upgrade() if p["action"] == "upgrade" else window.rollback()
    finally:
        record.release()
    msg = _message(p, result)
    failed = result["outcome"] != "upgraded" and not (result["outcome"] == "rolled_back" and (
        p["action"] == "rollback" or (not p["fail_on_gate"] and result["failed_check"] is not None
                                      and (result["error"] or "").startswith("gate:"))))
    if failed:
        module.fail_json(msg=msg, changed=True, verdict="fail",
                         cause=(result["gate"] or {}).get("cause") or "window_failed", **result)
    module.exit_json(msg=msg, changed=True, verdict="pass", **result)


if __name__ == "__main__":
    main()
