#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: carapace.fleet maintainers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: cara_backup
short_description: Back up a stopped Carapace host with cara backup, verify the archive and keep an index
version_added: 0.1.0
description:
  - Runs C(cara backup -o <backup_dir>/carapace-backup-<tag>-<UTC YYYYMMDDTHHMMSSZ>.tar.gz), the backup step of
    Carapace's release policy, then checks the archive before it is trusted - the C(.carapace-backup) marker is there
    and every member path is safe (relative, no C(..), no absolute path, no link pointing outside, no device or fifo).
  - Records the archive's sha256, size, tag, creation time and path in O(backup_dir)C(/index.json) (mode 0600), which
    M(carapace.fleet.cara_restore) checks before it restores anything. O(backup_dir) is created 0700; an existing one
    must be a real directory owned by the user running the task (its mode is tightened to 0700). A symlinked
    O(backup_dir) is refused.
  - Keeps the newest O(retention) backups; older archives, their snapshots and their index entries are removed.
  - Requires the daemon to be stopped. Carapace's unreleased HEAD refuses a backup while its daemon runs; released
    v0.8.0 has no such guard, so this module enforces it for every release. Running means the daemon lock is held
    or C(daemon.pid) is live (v0.9.0+), or, since v0.8.0 writes neither, a C(cara start)
    process runs with this state dir or something listens on the gateway port.
  - With O(include_state_snapshot), also writes C(carapace-state-<tag>-<UTC>.tar.gz), a full snapshot of O(state_dir),
    recorded in the same index entry. C(cara backup) leaves out C(credentials/), C(auth_profiles.json), C(matrix/),
    device and pairing files and more; the snapshot holds them so a rollback can put the state dir back byte for
    byte. It never holds C(daemon.pid) nor the lock files (C(*.lock)), nor what O(snapshot_exclude) names.
author:
  - carapace.fleet maintainers (@carapace-fleet)
extends_documentation_fragment:
  - carapace.fleet.host_layout
attributes:
  check_mode:
    support: full
    description: Checks the daemon, the directory and the index, and reports the archive names it would write and the
      backups retention would remove. Writes nothing.
  diff_mode:
    support: full
    description: The list of indexed archives before and after.
  idempotent:
    support: partial
    description:
      - Every run writes a new backup (a backup is a point in time), unless O(reuse_within) is set.
      - With O(reuse_within), a run finds the newest indexed backup of the same tag and state dir taken within that
        many seconds whose archive still matches its sha256 and whose content equals what C(cara backup) (and the
        snapshot) would archive now, and returns it with C(changed=false).
options:
  tag:
    description:
      - Tag in the archive name and the index, C(vMAJOR.MINOR.PATCH).
      - Defaults to the installed version (C(cara --version)) as C(v<version>), the version the state belongs to.
    type: str
  retention:
    description: How many backups to keep in O(backup_dir), the new one included (at least 1).
    type: int
    default: 5
  include_state_snapshot:
    description: Also snapshot the whole O(state_dir) (see the description), for a byte-identical rollback.
    type: bool
    default: false
  snapshot_exclude:
    description:
      - Paths relative to O(state_dir) (shell patterns, matched against the path and each of its parents) the state
        snapshot leaves out and a snapshot restore leaves alone. C(daemon.pid) and C(*.lock) are always left out.
      - The default leaves out C(updates) - the update machinery's own files (C(transaction.json), C(rollback.json),
        staged binaries), which must follow the update in progress rather than go back in time (an older in-progress
        C(transaction.json) would make C(cara) resume an update at its next start) - and C(audit.jsonl), which is
        evidence and is never rolled back.
    type: list
    elements: str
    default: [updates, audit.jsonl]
  reuse_within:
    description:
      - Seconds within which an existing backup is reused instead of taking a new one (see idempotence above).
      - V(0) always takes a new backup.
    type: int
    default: 0
notes:
  - Archives are made 0600; they hold the config and sessions, which may hold secrets.
  - C(cara backup) also archives C($HOME/.config/carapace/memory) of the user running the task.
    Run the task as the daemon's user (C(become_user)) so that this is the daemon's memory.
  - An archive with an unsafe member or without the marker is removed and the task fails; nothing is recorded.
seealso:
  - module: carapace.fleet.cara_restore
  - module: carapace.fleet.cara_info
"""

EXAMPLES = r"""
- name: Back up the stopped host before the upgrade, with a full state snapshot
  carapace.fleet.cara_backup:
    include_state_snapshot: true
    retention: 3
  register: backup

- name: Re-runs of the play within 30 minutes reuse the backup when nothing changed
  carapace.fleet.cara_backup:
    reuse_within: 1800
"""

RETURN = r"""
backup:
  description: The index entry of the backup taken (or reused; in check mode, the one that would be written).
  returned: success
  type: dict
  contains:
    path:
      description: The archive.
      type: str
      sample: /var/backups/carapace/carapace-backup-v0.8.0-20260818T101500Z.tar.gz
    file:
      description: Its file name.
      type: str
    tag:
      description: Release tag the state belongs to.
      type: str
      sample: v0.8.0
    cara_version:
      description: C(cara --version) of the binary that made the backup.
      type: str
    sha256:
      description: sha256 of the archive (V(null) in check mode).
      type: str
    size:
      description: Size in bytes (V(null) in check mode).
      type: int
    created:
      description: UTC creation time, ISO 8601.
      type: str
      sample: "2026-08-18T10:15:00Z"
    created_epoch:
      description: The same as Unix seconds.
      type: int
    state_dir:
      description: The state directory that was backed up.
      type: str
    config_path:
      description: The config file C(cara backup) was pointed at.
      type: str
    sections:
      description: Sections in the archive (C(sessions), C(config), C(memory), C(cron), C(tasks), C(usage)).
      type: list
      elements: str
    files:
      description: Number of files in the archive (the marker left out).
      type: int
    content_digest:
      description: sha256 over the archive's file names and contents; compared with the disk for idempotence.
      type: str
    cara_output:
      description: C(cara backup)'s own report (C(path), C(size), C(included)).
      type: dict
    snapshot:
      description:
        - The state snapshot (V(null) without O(include_state_snapshot)) - C(path), C(file), C(sha256), C(size),
          C(files), C(content_digest) (names, contents and modes of files and directories), C(excluded) (the
          patterns in force) and C(skipped) (symlinks and special files it could not hold).
      type: dict
removed:
  description: Files removed by retention (or, in check mode, that would be).
  returned: success
  type: list
  elements: str
actions:
  description: What the run did (or would do).
  returned: always
  type: list
  elements: str
diff:
  description: Indexed archives before and after (C(backups) lists of paths).
  returned: success
  type: dict
cause:
  description:
    - On failure, one of C(daemon_running), C(not_installed), C(cara_failed), C(unsafe_dir), C(index_corrupt),
      C(unsafe_member), C(marker_missing), C(invalid_archive), C(io_error), C(bad_argument).
  returned: failure
  type: str
"""

import traceback

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.carapace.fleet.plugins.module_utils import _backup, _cara, _layout
from ansible_collections.carapace.fleet.plugins.module_utils._paths import path_problem


def main():
    module = AnsibleModule(
        argument_spec=_layout.host_argument_spec(
            tag=dict(type="str"),
            retention=dict(type="int", default=5),
            include_state_snapshot=dict(type="bool", default=False),
            snapshot_exclude=dict(type="list", elements="str", default=list(_backup.DEFAULT_SNAPSHOT_EXCLUDE)),
            reuse_within=dict(type="int", default=0),
        ),
        supports_check_mode=True,
    )
    p = module.params
    problem = path_problem(p)
    if problem:
        module.fail_json(msg=problem, cause="bad_argument")
    try:
        if p["tag"]:
            _backup.check_tag(p["tag"])
    except _backup.BackupError as exc:
        module.fail_json(msg=exc.message, cause=exc.cause, actions=[])
    cli = _cara.CaraCLI(p["bin_path"], p["state_dir"], p["config_path"], runner=_cara.tolerant_module_runner(module))
    job = _backup.HostBackup(cli, p["state_dir"], p["backup_dir"], tag=p["tag"], retention=p["retention"],
                             include_state_snapshot=p["include_state_snapshot"], snapshot_exclude=p["snapshot_exclude"],
                             reuse_within=p["reuse_within"])
    try:
        result = job.run(check_mode=module.check_mode)
    except _backup.BackupError as exc:
        module.fail_json(msg=exc.message, cause=exc.cause, actions=job.actions, **exc.extra)
    except OSError as exc:
        module.fail_json(msg="backup of %s into %s failed: %s. Check that the directories exist and are writable by "
                         "this user; no index entry was written for an incomplete backup."
                         % (p["state_dir"], p["backup_dir"], exc), cause="io_error", actions=job.actions,
                         exception=traceback.format_exc())
    for warning in result.pop("warnings"):
        module.warn(warning)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
