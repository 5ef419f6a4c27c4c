#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: carapace.fleet maintainers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: cara_lock
short_description: Controller-side lock so two carapace.fleet runs on one inventory never overlap
version_added: 0.1.0
description:
  - Scheduled rollouts and drills (cron, AWX/AAP) can start while an earlier run still works on the same hosts. The
    playbooks of this collection take this lock first and fail at once when another live run holds it.
  - The lock is a JSON file naming the run id and the top-level C(ansible-playbook) process holding it (pid, start
    time and boot id), found by walking up from the module's process. Only a lock whose process is gone (a killed
    run) is stale, and it is taken over with a warning; a pid reused by another process does not hold the lock.
  - Runs on the controller (C(delegate_to) C(localhost), C(run_once)).
author:
  - carapace.fleet maintainers (@carapace-fleet)
attributes:
  check_mode:
    support: full
    description: Checks the lock and reports what would happen; takes or drops nothing.
  diff_mode:
    support: none
    description: Nothing to diff; the result carries the lock or report content.
  idempotent:
    support: full
    description: Taking a lock the same run already holds, or dropping one it does not, changes nothing.
options:
  path:
    description: Lock file on the controller.
    type: path
    required: true
  run_id:
    description: Identifier of this run (the playbooks use one per ansible-playbook invocation).
    type: str
    required: true
  state:
    description: V(present) takes the lock, V(absent) drops it when this run holds it.
    type: str
    choices: [present, absent]
    default: present
"""

EXAMPLES = r"""
- name: Take the fleet lock for this run
  carapace.fleet.cara_lock:
    path: "{{ cara_fleet_lock_path }}"
    run_id: "{{ cara_fleet_run.id }}"
  delegate_to: localhost
  run_once: true
"""

RETURN = r"""
holder:
  description: The lock's content after the call (run_id, pid, start_time, boot_id, host, started), or V(null) after
    release.
  returned: always
  type: dict
stale:
  description: Whether a stale lock of a dead run was taken over.
  returned: always
  type: bool
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.carapace.fleet.plugins.module_utils import _lock


def main():
    module = AnsibleModule(
        argument_spec=dict(
            path=dict(type="path", required=True),
            run_id=dict(type="str", required=True),
            state=dict(type="str", choices=["present", "absent"], default="present"),
        ),
        supports_check_mode=True,
    )
    p = module.params
    if module.check_mode:
        holder = _lock.read(p["path"])
        mine = bool(holder) and holder.get("run_id") == p["run_id"]
        if p["state"] == "present" and holder and not mine and _lock.holder_alive(holder):
            module.fail_json(msg=_lock.held_message(p["path"], holder), holder=holder)
        module.exit_json(changed=(not mine) if p["state"] == "present" else mine, holder=holder, stale=False)
    try:
        if p["state"] == "present":
            pid = _lock.playbook_pid()
            if pid is None:
                module.fail_json(msg="cannot find the ansible-playbook process this task runs under, so the lock %s "
                                 "could not name the run and would exclude nothing. Run cara_lock on the controller "
                                 "(delegate_to: localhost with connection local)." % p["path"])
            changed, previous, stale = _lock.acquire(p["path"], p["run_id"], pid)
            if stale:
                module.warn("took over a stale lock %s of run %s (process %s is gone)"
                            % (p["path"], previous.get("run_id"), previous.get("pid")))
            module.exit_json(changed=changed, holder=_lock.read(p["path"]), stale=stale)
        changed = _lock.release(p["path"], p["run_id"])
        module.exit_json(changed=changed, holder=None, stale=False)
    except _lock.LockHeld as exc:
        module.fail_json(msg=str(exc), holder=_lock.read(p["path"]))
    except OSError as exc:
        module.fail_json(msg="cannot use lock file %s: %s" % (p["path"], exc))


if __name__ == "__main__":
    main()
