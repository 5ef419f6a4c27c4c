#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: carapace.fleet maintainers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: cara_restore
short_description: Restore a verified Carapace backup with cara restore --force, and its state snapshot
version_added: 0.1.0
description:
  - Restores a backup made by M(carapace.fleet.cara_backup), the restore step of Carapace's rollback runbook.
  - Before anything is touched, the archive must be in O(backup_dir)C(/index.json), its sha256 must equal the recorded
    one, and every member must be safe (relative path, no C(..), no absolute path, no symlink or hard link, no
    device or fifo) with the C(.carapace-backup) marker present. An archive that is not indexed or that changed is
    refused, with the cause and the next step.
  - Running as root, it refuses (cause C(wrong_user)) to restore under a directory that another user owns or can
    write - the state dir, the config's directory, or any directory above them - and names the user to become. That
    user could swap files for symlinks to root's files while the restore writes. Run it as the state dir's owner
    (C(become_user), the roles' C(cara_state_user)), as C(cara) itself requires.
  - Requires the daemon to be stopped, for every release - v0.8.0's C(cara restore) has no guard of its own. Running
    means the daemon lock is held or C(daemon.pid) is live (v0.9.0+), or, since v0.8.0 writes neither,
    a C(cara start) process runs with this state dir or something listens on the gateway port.
  - Runs C(cara restore <archive> --force). The path is positional and C(--force) is needed - the runbook's
    C(cara restore --path ...) is not valid syntax and C(cara restore) without C(--force) restores nothing. C(cara)
    merges - files in the archive are rewritten, others are left alone.
  - When the index entry has a state snapshot (O(restore_snapshot)), the snapshot is then restored - O(state_dir) is
    made exactly the snapshot for everything it covers. Files and directories in the snapshot are written back with
    their bytes, modes and modification times (and owners, when the task runs as root); covered files and
    directories that the snapshot does not have are removed. What the snapshot excluded (C(daemon.pid), C(*.lock)
    and the C(snapshot_exclude) patterns recorded at backup time, by default C(updates) and C(audit.jsonl)) is neither
    written nor removed, and symlinks are left alone (a symlinked directory on a path the snapshot needs is refused).
  - Files are written through a temporary file and a rename, so no symlink is ever followed in O(state_dir).
author:
  - carapace.fleet maintainers (@carapace-fleet)
extends_documentation_fragment:
  - carapace.fleet.host_layout
attributes:
  check_mode:
    support: full
    description: Verifies the backup and reports the files that differ and what would be restored; restores nothing.
  diff_mode:
    support: full
    description: For each file that differs, its sha256 before and the backup's after (C((absent)) when missing).
  idempotent:
    support: full
    description:
      - Compares the files the backup covers with the disk first (sha256 of every restore target, and for a snapshot
        also modes, directories and files to remove). When they are equal nothing runs and C(changed=false).
options:
  backup:
    description:
      - V(latest) for the newest entry of the index (of O(tag) when given), or the path of an archive. A relative path
        is taken inside O(backup_dir).
    type: str
    default: latest
  tag:
    description: With O(backup=latest), the newest backup of this tag; with a path, the entry must have this tag.
    type: str
  restore_snapshot:
    description: Restore the entry's state snapshot too, when it has one.
    type: bool
    default: true
  allow_unindexed:
    description:
      - Restore an archive that is not in the index (an operator's own C(cara backup)). Its sha256 cannot be checked;
        its member paths and marker still are. Only O(backup) given as a path; no snapshot is restored.
    type: bool
    default: false
notes:
  - C(cara restore) writes C(memory/) into C($HOME/.config/carapace/memory) of the user running the task; run the task
    as the daemon's user (C(become_user)). When it runs as root anyway, files C(cara restore) rewrote inside
    O(state_dir) are given back to the owner of O(state_dir).
  - After the restore the module compares again; any file that still differs from the backup fails the task.
seealso:
  - module: carapace.fleet.cara_backup
  - module: carapace.fleet.cara_info
"""

EXAMPLES = r"""
- name: Roll the state back to the backup taken before the upgrade
  carapace.fleet.cara_restore:
    backup: "{{ backup.backup.path }}"

- name: Newest backup of the previous release
  carapace.fleet.cara_restore:
    backup: latest
    tag: v0.8.0

- name: An operator's own archive, not made by cara_backup
  carapace.fleet.cara_restore:
    backup: /root/carapace-backup.tar.gz
    allow_unindexed: true
"""

RETURN = r"""
backup:
  description: The index entry restored (for an unindexed archive - C(path), C(sha256), C(size), C(indexed=false)).
  returned: success
  type: dict
sections:
  description: Sections the archive holds.
  returned: success
  type: list
  elements: str
restored:
  description: Sections C(cara restore) reported as restored (its C(Restored:) line); empty when it did not run.
  returned: success
  type: list
  elements: str
  sample: [sessions, config, tasks, usage]
sessions:
  description: Sessions C(cara restore) reported (its C(Sessions:) line), 0 when absent.
  returned: success
  type: int
differences:
  description: Restore targets whose content differed from the archive before the run.
  returned: success
  type: list
  elements: str
snapshot:
  description:
    - The state snapshot's restore, V(null) when the entry has none. C(path), and the relative paths it wrote
      (C(write)), changed the mode of (C(chmod)), created (C(mkdir)) and removed (C(remove), C(rmdir)).
  returned: success
  type: dict
actions:
  description: What the run did (or would do).
  returned: always
  type: list
  elements: str
cause:
  description:
    - On failure, one of C(unknown_backup), C(tampered), C(missing_archive), C(no_backup), C(unsafe_member),
      C(marker_missing), C(invalid_archive), C(daemon_running), C(unsafe_dir), C(index_corrupt), C(cara_failed),
      C(restore_incomplete), C(wrong_user), C(io_error), C(bad_argument).
  returned: failure
  type: str
"""

import traceback

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.carapace.fleet.plugins.module_utils import _backup_restore, _cara, _layout
from ansible_collections.carapace.fleet.plugins.module_utils._paths import path_problem


def main():
    module = AnsibleModule(
        argument_spec=_layout.host_argument_spec(
            backup=dict(type="str", default="latest"),
            tag=dict(type="str"),
            restore_snapshot=dict(type="bool", default=True),
            allow_unindexed=dict(type="bool", default=False),
        ),
        supports_check_mode=True,
    )
    p = module.params
    problem = path_problem(p)
    if problem:
        module.fail_json(msg=problem, cause="bad_argument")
    cli = _cara.CaraCLI(p["bin_path"], p["state_dir"], p["config_path"], runner=_cara.tolerant_module_runner(module))
    job = _backup_restore.HostRestore(cli, p["state_dir"], p["backup_dir"], backup=p["backup"], tag=p["tag"],
                                      allow_unindexed=p["allow_unindexed"], restore_snapshot=p["restore_snapshot"])
    try:
        result = job.run(check_mode=module.check_mode)
    except _backup_restore.BackupError as exc:
        module.fail_json(msg=exc.message, cause=exc.cause, actions=job.actions, **exc.extra)
    except OSError as exc:
        module.fail_json(msg="restore into %s failed: %s. The state may be partly restored; fix the cause, then run "
                         "the restore again (it only rewrites what still differs)." % (p["state_dir"], exc),
                         cause="io_error", actions=job.actions, exception=traceback.format_exc())
    for warning in result.pop("warnings"):
        module.warn(warning)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
