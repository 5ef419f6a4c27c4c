#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: carapace.fleet maintainers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: cara_transaction
short_description: Create, advance, fail, resume or clear Carapace's update transaction on a host
version_added: 0.1.0
description:
  - Manages C({state_dir}/updates/transaction.json), the update transaction that Carapace's own updater
    (C(cara update)) keeps, in Carapace's own schema (camelCase keys in C(cara)'s order, phases C(created),
    C(downloading), C(downloaded), C(verified), C(applying), C(applied), C(failed), states C(in_progress),
    C(applied), C(failed), C(attempt)/C(maxAttempts), C(retryable), C(lastError)).
  - C(cara) reads the same file, so every write satisfies its load-time validation (version path-safe, a known
    C(assetName), C(stagedPath) = C({state_dir}/updates/cara-<version>), C(bundlePath) = the same + C(.bundle),
    C(sha256) 64 hex or null, C(attempt) <= C(maxAttempts), C(updatedAtMs) >= C(startedAtMs)), keeps keys this
    module does not know, and is atomic (temporary file in C(updates/), fsync, rename, fsync of the directory,
    mode 0600, never following a symlink).
  - Every call holds the flock on C({state_dir}/updates/update.lock.lock), the lock C(cara update) takes, while it
    reads and writes; when another process holds it the task fails at once (retryable).
  - C(state_dir) and C(updates/) must be real directories owned by the user running the task, as C(cara) requires;
    their group and other permission bits are removed, as C(cara) does. Run the task as the user C(cara) runs as.
  - "carapace.fleet's own facts live under one extra key, C(fleet): what O(facts) passes (run id, previous version
    and digest, backup path, timings) plus C(phase_entered_ms), C(failed_phase) and C(history) (the attempts), which
    the module maintains. A transaction without C(fleet) was started by C(cara update) itself (RV(owner)=C(cara)):
    the module reports it, refuses to drive it, and replaces or removes it only with O(force)."
  - Phases only move forward. O(action=fail) marks any phase failed (from C(applied) only non-retryable, for a health
    gate that failed after the switch). O(action=resume) starts the next attempt of an in-progress or retryable
    failed transaction; it re-hashes the staged file against the recorded sha256 and reports in RV(resume_from)
    the phase to continue from (C(downloading) when the file is missing, changed or has no recorded digest).
    When C(attempt) has reached C(maxAttempts) the transaction is marked failed, non-retryable, and the task fails
    with C(update transaction retry budget exhausted (3/3)).
  - A file C(cara) would reject (bad JSON, wrong fields, larger than 64 KiB, a symlink) is a terminal error; the
    message says what is wrong. Inspect it, then remove it or use O(action=clear) with O(force=true).
author:
  - carapace.fleet maintainers (@carapace-fleet)
extends_documentation_fragment:
  - carapace.fleet.host_layout
attributes:
  check_mode:
    support: full
    description:
      - Reads the file and returns the transaction the action would write, with C(would ...) actions; creates, chmods
        and writes nothing.
      - The lock is taken (non-blocking) only when its file already exists, so a running update fails the check
        as it would fail the real run; check mode never creates the lock file.
  diff_mode:
    support: full
    description: Shows the transaction before and after.
  idempotent:
    support: partial
    description:
      - Advancing to the phase the transaction is in with the same data, failing it again with the same error, creating
        when a created transaction for the same version exists, and clearing when there is no file report
        C(changed=false).
      - O(action=resume) always starts a new attempt, and so does O(action=create) over a transaction for the same
        version that is past C(created) (it resumes it, as C(cara update) does).
options:
  action:
    description:
      - V(create) starts a transaction for O(version), phase C(created), attempt 1. Over an existing transaction it
        follows C(cara)'s decision table - an applied or non-retryable failed one, or one for another version or asset,
        is replaced; an in-progress or retryable failed one for the same version is resumed (see V(resume)); one in phase
        C(created) for the same version is kept.
      - V(advance) moves it forward to O(phase).
      - V(fail) marks it failed with O(error) and O(retryable).
      - V(resume) starts its next attempt and reports RV(resume_from).
      - V(clear) deletes the file (as C(cara) does after a successful update).
    type: str
    required: true
    choices: [create, advance, fail, resume, clear]
  version:
    description:
      - Target version, with or without a leading C(v) (stored without). Required with O(action=create); with the other
        actions, when given, it must be the transaction's version.
    type: str
  asset_name:
    description:
      - Release asset of the host's platform, stored as C(assetName). C(cara) refuses a transaction for another
        platform's asset, so the module warns when it is not this host's.
      - Defaults to C(cara-x86_64-linux) with O(action=create); with the other actions, when given, it must be the
        transaction's.
    type: str
    choices: [cara-x86_64-linux, cara-aarch64-linux, cara-x86_64-darwin, cara-aarch64-darwin, cara-x86_64-windows.exe]
  phase:
    description:
      - The phase to advance to (O(action=advance)); the same phase again changes nothing, an earlier one is refused.
        V(applied) also sets the state C(applied).
    type: str
    choices: [downloading, downloaded, verified, applying, applied]
  sha256:
    description:
      - sha256 of the staged binary C({state_dir}/updates/cara-<version>), recorded with O(phase=downloaded) (or with
        O(phase=verified) when none was recorded). After C(downloaded) it may not change.
    type: str
  error:
    description: What failed, stored as C(lastError) (O(action=fail), required there).
    type: str
  retryable:
    description:
      - Whether the failure is retryable (O(action=fail)). A retryable failed transaction can be resumed; a
        non-retryable one only replaced. An applied transaction can only fail non-retryable.
    type: bool
    default: false
  facts:
    description:
      - carapace.fleet's facts to merge under the transaction's C(fleet) key (nested dictionaries are merged, other
        values replaced), for example C(run_id), C(from_version), C(from_sha256), C(backup), C(timings).
      - C(phase_entered_ms), C(failed_phase) and C(history) are maintained by the module and may not be set.
    type: dict
  max_attempts:
    description: C(maxAttempts) of a new transaction (C(cara) always uses 3). An existing transaction keeps its own.
    type: int
    default: 3
  force:
    description:
      - With O(action=create), replace whatever transaction is there (an invalid file, C(cara)'s own pending update, or
        a resumable one of ours) with a fresh one.
      - With O(action=clear), also remove an invalid file (a symlink is removed, not followed) or C(cara)'s own pending
        transaction.
    type: bool
    default: false
notes:
  - The lock is held for the duration of one task, not across tasks.
  - Phases may be skipped forward (for example C(created) straight to C(verified) when the binary was staged and verified
    before); C(sha256) is then recorded with the first phase that gives it.
  - C(cara) resumes an in-progress transaction, and a retryable failed one with attempts left, by itself whenever its
    daemon starts (RV(resume_pending)). Resume it, or fail it with O(retryable=false), before C(cara) starts on the host.
  - The module never sets C(applyConfirmedUntilMs), so a C(cara) (HEAD) daemon that starts while one of our transactions
    is C(in_progress) marks it failed instead of applying it. Released v0.8.0 has no such guard; never start the daemon
    while a transaction is C(in_progress) (persist C(applied) right after the switch, before the start).
seealso:
  - name: Carapace update transaction
    description: The transaction engine of cara update (src/update/mod.rs in the Carapace repository).
    link: https://github.com/puremachinery/carapace/blob/master/src/update/mod.rs
"""

EXAMPLES = r"""
- name: Start the transaction for the upgrade
  carapace.fleet.cara_transaction:
    state_dir: /var/lib/carapace
    action: create
    version: v0.9.0
    asset_name: cara-x86_64-linux
    facts:
      run_id: "{{ cara_fleet_run.id }}"
      from_version: 0.8.0
      from_sha256: "{{ cara_info.sha256 }}"
  become: true
  become_user: cara
  register: cara_tx

- name: The verified binary is staged
  carapace.fleet.cara_transaction:
    state_dir: /var/lib/carapace
    action: advance
    phase: downloaded
    sha256: "{{ release.assets['cara-x86_64-linux'].sha256 }}"
  become: true
  become_user: cara

- name: Record a failed health gate after the rollback
  carapace.fleet.cara_transaction:
    state_dir: /var/lib/carapace
    action: fail
    error: "health gate failed: /health/ready answered 503; rolled back to v0.8.0"
    retryable: false
    facts:
      rolled_back_to: 0.8.0
  become: true
  become_user: cara

- name: Resume an interrupted upgrade
  carapace.fleet.cara_transaction:
    state_dir: /var/lib/carapace
    action: resume
    version: v0.9.0
  become: true
  become_user: cara
  register: cara_tx_resumed   # cara_tx_resumed.resume_from says where to continue

- name: Clear it after the gate passed
  carapace.fleet.cara_transaction:
    state_dir: /var/lib/carapace
    action: clear
  become: true
  become_user: cara
"""

RETURN = r"""
transaction:
  description:
    - The transaction after the action (what check mode would write), in cara's schema; V(null) after O(action=clear)
      or when there is none.
    - On failure, the transaction as it is on disk.
  returned: always
  type: dict
  sample:
    id: 0b6d1c52-3f0e-4a6e-9f7e-2f1c0d9a8b7c
    version: 0.9.0
    assetName: cara-x86_64-linux
    state: in_progress
    attempt: 1
    maxAttempts: 3
    startedAtMs: 1767225600000
    updatedAtMs: 1767225604210
    stagedPath: /var/lib/carapace/updates/cara-0.9.0
    bundlePath: /var/lib/carapace/updates/cara-0.9.0.bundle
    sha256: 9f2c0e7d8a5b4c3e2f1a0b9c8d7e6f5a4b3c2d1e0f9a8b7c6d5e4f3a2b1c0d9e
    lastError: null
    phase: verified
    retryable: true
    fleet:
      run_id: 20261124T060000Z-1a2b
      from_version: 0.8.0
      phase_entered_ms: {created: 1767225600000, downloaded: 1767225603000, verified: 1767225604210}
      history:
        - {event: created, attempt: 1, at_ms: 1767225600000}
owner:
  description:
    - Who drives the transaction - V(fleet) (this collection; it has the C(fleet) key), V(cara) (C(cara update) itself),
      V(unknown) (the file is invalid) or V(null) (no transaction).
  returned: always
  type: str
resume_pending:
  description: Whether C(cara) would resume the transaction by itself at its next start (C(in_progress), or failed,
    retryable and attempts left).
  returned: success
  type: bool
resume_from:
  description:
    - With O(action=resume), and O(action=create) - the phase the transaction is in now, from which the caller
      continues (C(created) for a new one). Only the phases whose staged file was re-hashed and matched are kept;
      otherwise C(downloading).
  returned: success
  type: str
  sample: verified
resume_reason:
  description: Why RV(resume_from) is what it is (for example that the staged file is missing or changed).
  returned: success
  type: str
resumed:
  description: Whether the call started a new attempt of an existing transaction.
  returned: success
  type: bool
transaction_path:
  description: The transaction file.
  returned: always
  type: str
  sample: /var/lib/carapace/updates/transaction.json
actions:
  description: What the call did (or, in check mode, would do).
  returned: success
  type: list
  elements: str
cause:
  description:
    - On failure, a machine-readable cause, one of C(lock_held), C(insecure_dir), C(state_dir_missing), C(corrupt),
      C(foreign), C(no_transaction), C(version_mismatch), C(bad_transition), C(not_resumable), C(budget_exhausted),
      C(bad_argument), C(io_error).
  returned: failure
  type: str
retryable:
  description: On failure, whether running the task again later can succeed without the operator acting.
  returned: failure
  type: bool
"""

import os
import traceback

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.carapace.fleet.plugins.module_utils import _layout
from ansible_collections.carapace.fleet.plugins.module_utils import _transaction as txn
from ansible_collections.carapace.fleet.plugins.module_utils._paths import path_problem


def main():
    module = AnsibleModule(
        argument_spec=_layout.host_argument_spec(
            action=dict(type="str", required=True, choices=list(txn.ACTIONS)),
            version=dict(type="str"),
            asset_name=dict(type="str", choices=list(txn.ASSET_NAMES)),
            phase=dict(type="str", choices=list(txn.ADVANCE_PHASES)),
            sha256=dict(type="str"),
            error=dict(type="str"),
            retryable=dict(type="bool", default=False),
            facts=dict(type="dict"),
            max_attempts=dict(type="int", default=txn.DEFAULT_MAX_ATTEMPTS),
            force=dict(type="bool", default=False),
        ),
        required_if=[("action", "create", ["version"]), ("action", "advance", ["phase"]), ("action", "fail", ["error"])],
        supports_check_mode=True,
    )
    p = module.params
    problem = path_problem(p)
    if problem:
        module.fail_json(msg=problem, cause="bad_argument")
    path = os.path.join(os.path.normpath(os.path.abspath(p["state_dir"])), txn.UPDATES_DIR, txn.TX_NAME)
    try:
        result = txn.run(p["state_dir"], p["action"], version=p["version"], asset_name=p["asset_name"], phase=p["phase"],
                         sha256=p["sha256"], error=p["error"], retryable=p["retryable"], facts=p["facts"],
                         max_attempts=p["max_attempts"], force=p["force"], check_mode=module.check_mode)
    except txn.TransactionError as exc:
        module.fail_json(msg=exc.message, cause=exc.cause, retryable=exc.retryable, changed=exc.changed,
                         transaction=exc.transaction, transaction_path=path,
                         owner="unknown" if exc.cause == "corrupt" else txn.owner(exc.transaction))
    except OSError as exc:
        module.fail_json(msg="cannot use the update transaction %s: %s. Check that state_dir is cara's state directory and "
                         "that this task runs as the user cara runs as; then run it again." % (path, exc),
                         cause="io_error", retryable=True, changed=False, transaction=None, owner=None,
                         transaction_path=path, exception=traceback.format_exc())
    for warning in result.pop("warnings"):
        module.warn(warning)
    before = result.pop("before")
    result["diff"] = {"before": before, "after": result["transaction"],
                      "before_header": result["transaction_path"], "after_header": result["transaction_path"]}
    module.exit_json(**result)


if __name__ == "__main__":
    main()
