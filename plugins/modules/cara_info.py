#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: carapace.fleet maintainers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: cara_info
short_description: Read-only facts about a Carapace host (binary, config, daemon, update markers, releases, backups)
version_added: 0.1.0
description:
  - Reports what an upgrade or a rollback needs to know about one host running Carapace (C(cara)), without changing
    anything.
  - The installed version (C(cara --version)), the binary at O(bin_path) (symlink target, real path, sha256).
  - The config file (JSON5) with every secret redacted, and its gateway facts (port, bind, control routes, auth mode).
    The whole value under a secret-looking key (C(auth), C(secrets), C(credentials), C(token), C(password), C(key),
    C(Authorization), ...) is redacted, objects and lists included; so are PEM blocks, any string that contains a
    secret, and the credentials of URLs (C(https://user:password@host)), in every fact and error message.
    Tokens, passwords, keys and every value of the top-level C(env) map are replaced by C(********); any other string
    that contains one of those secrets is redacted too.
  - Whether the daemon runs - the daemon lock C(.matrix-rekey.lock.lock) in O(state_dir) is held, or C(daemon.pid)
    names a live process (v0.9.0+); v0.8.0 writes neither, so also a C(cara start) process
    with this state dir, or anything listening on the gateway port.
  - C(cara)'s update markers in C(<state_dir>/updates/) (C(transaction.json), C(rollback.json),
    C(startup_health_failure.json)), the releases kept under O(install_root)C(/releases/<tag>/cara) and the backups
    recorded by M(carapace.fleet.cara_backup).
  - Never fails because of the host's state. On a host without C(cara) it returns RV(installed=false); a corrupt or
    unreadable file is reported in the matching C(*_error) value.
author:
  - carapace.fleet maintainers (@carapace-fleet)
extends_documentation_fragment:
  - carapace.fleet.host_layout
attributes:
  check_mode:
    support: full
    description: The module only reads; check mode returns the same facts.
  diff_mode:
    support: none
    description: Nothing changes, so there is no diff.
  idempotent:
    support: full
    description: Always C(changed=false).
options:
  wait_window:
    description:
      - Seconds to wait for a downtime window of M(carapace.fleet.cara_apply) that is still running on the host (a run
        that lost its controller) before the facts are read. V(0) does not wait.
      - RV(window) says whether one still runs after that.
    type: int
    default: 0
notes:
  - C(cara --version) is the only command run. Nothing is written.
seealso:
  - module: carapace.fleet.cara_backup
  - module: carapace.fleet.cara_restore
"""

EXAMPLES = r"""
- name: Read the host's Carapace facts
  carapace.fleet.cara_info:
  register: cara

- name: Refuse a host that is in the middle of cara's own update
  ansible.builtin.assert:
    that:
      - cara.rollback_marker is none or cara.rollback_marker.startupState == 'rolled_back'
    fail_msg: cara's own update is pending on this host; let it finish or roll it back first.

- name: Local test host layout
  carapace.fleet.cara_info:
    bin_path: /srv/cara/bin/cara
    state_dir: /srv/cara/state
    install_root: /srv/cara/opt
    backup_dir: /srv/cara/backups
"""

RETURN = r"""
installed:
  description: Whether an executable file is at O(bin_path).
  returned: always
  type: bool
version:
  description: Version from C(cara --version) (without C(v)); V(null) when not installed or it does not answer.
  returned: always
  type: str
  sample: 0.9.0
version_error:
  description: What C(cara --version) answered when it was not C(cara <version>).
  returned: when the binary did not answer as cara does
  type: str
tag:
  description: The version as a release tag (C(v<version>)), the tag M(carapace.fleet.cara_backup) names backups with.
  returned: always
  type: str
  sample: v0.9.0
bin_path:
  description: O(bin_path).
  returned: always
  type: str
bin_exists:
  description: Whether anything (even a dangling symlink) is at O(bin_path).
  returned: always
  type: bool
bin_is_symlink:
  description: Whether O(bin_path) is a symlink.
  returned: always
  type: bool
symlink_target:
  description: The symlink's target as written in the link, when O(bin_path) is a symlink.
  returned: always
  type: str
  sample: /opt/carapace/releases/v0.9.0/cara
real_path:
  description: The file O(bin_path) resolves to.
  returned: always
  type: str
sha256:
  description: sha256 of the real binary.
  returned: always
  type: str
size:
  description: Size of the real binary in bytes.
  returned: always
  type: int
config_path:
  description: The config file that was read.
  returned: always
  type: str
config_exists:
  description: Whether it exists.
  returned: always
  type: bool
config:
  description: The parsed config with secrets redacted (C({}) when there is no config file).
  returned: always
  type: dict
  sample: {"gateway": {"port": 18789, "auth": {"mode": "token", "token": "********"}}}
config_error:
  description: Why the config could not be read or parsed (then RV(config) and RV(gateway) are V(null)).
  returned: always
  type: str
gateway:
  description: Gateway facts of the config (cara's defaults where unset).
  returned: always
  type: dict
  contains:
    port:
      description: C(gateway.port), default 18789.
      type: int
    bind:
      description: C(gateway.bind), default C(loopback).
      type: str
    control_enabled:
      description: C(gateway.control.enabled).
      type: bool
    auth_mode:
      description: C(gateway.auth.mode), else C(password) when a password is set, else C(token).
      type: str
    hooks_enabled:
      description: C(gateway.hooks.enabled).
      type: bool
state_dir:
  description: O(state_dir).
  returned: always
  type: str
state_dir_exists:
  description: Whether it is a directory.
  returned: always
  type: bool
daemon:
  description:
    - Whether the daemon runs. v0.9.0+ (HEAD) holds a daemon lock and writes C(daemon.pid); v0.8.0 has
      neither, so the process table and the gateway port are read as well.
  returned: always
  type: dict
  contains:
    running:
      description:
        - The daemon lock is held, C(daemon.pid) names a live process, a C(cara start) process runs with this
          state dir as E(CARAPACE_STATE_DIR), or something listens on the gateway port.
      type: bool
    how:
      description: Which of those found it, V(lock), V(pid_file), V(process) or V(port); V(null) when not running.
      type: str
    detail:
      description: The same, in words.
      type: str
    pid:
      description: The daemon's PID when known (the port holder's PID is only visible to its own user and root).
      type: int
transaction:
  description: C(<state_dir>/updates/transaction.json) as parsed, V(null) when absent or corrupt.
  returned: always
  type: dict
transaction_error:
  description: Why C(transaction.json) could not be used (corrupt, symlink, too large); V(null) otherwise.
  returned: always
  type: str
rollback_marker:
  description: C(<state_dir>/updates/rollback.json) (HEAD releases write it after C(cara update)), V(null) when absent.
  returned: always
  type: dict
rollback_marker_error:
  description: Why C(rollback.json) could not be used; V(null) otherwise.
  returned: always
  type: str
startup_health_failure:
  description: C(<state_dir>/updates/startup_health_failure.json), V(null) when absent.
  returned: always
  type: dict
startup_health_failure_error:
  description: Why C(startup_health_failure.json) could not be used; V(null) otherwise.
  returned: always
  type: str
install_root:
  description: O(install_root).
  returned: always
  type: str
releases:
  description: Releases kept under O(install_root)C(/releases/<tag>/cara), oldest first.
  returned: always
  type: list
  elements: dict
  contains:
    tag:
      description: Directory name (the release tag).
      type: str
    path:
      description: The binary.
      type: str
    sha256:
      description: Its sha256.
      type: str
    size:
      description: Its size in bytes.
      type: int
    active:
      description: Whether O(bin_path) resolves to it.
      type: bool
active_release:
  description: Tag of the active release, when O(bin_path) resolves into O(install_root).
  returned: always
  type: str
switch:
  description:
    - The record M(carapace.fleet.cara_switch) keeps in O(install_root)C(/state.json) - C(active), C(previous) and
      C(rolledBackFrom), each V(null) or C({tag, sha256, path}). V(null) when there is no such file.
  returned: always
  type: dict
  sample: {"active": {"tag": "v0.9.0", "sha256": "9f2c...", "path": "/opt/carapace/releases/v0.9.0/cara"},
           "previous": {"tag": "v0.8.0", "sha256": "1a2b...", "path": "/opt/carapace/releases/v0.8.0/cara"}}
switch_error:
  description: Why O(install_root)C(/state.json) could not be used; V(null) otherwise.
  returned: always
  type: str
backup_dir:
  description: O(backup_dir).
  returned: always
  type: str
disk_free_mb:
  description: Free space in MiB on the filesystem of O(backup_dir) (or its nearest existing parent); V(null) if unknown.
  returned: always
  type: int
state_size_mb:
  description: Size of the regular files under O(state_dir) in MiB, rounded up - about what one state snapshot needs.
  returned: always
  type: int
backups:
  description:
    - Entries of O(backup_dir)C(/index.json), oldest first, as M(carapace.fleet.cara_backup) returns them, each with
      C(exists) (and C(snapshot.exists)). Archives are not re-hashed here; M(carapace.fleet.cara_restore) does that.
  returned: always
  type: list
  elements: dict
backups_error:
  description: Why the backup index could not be read; V(null) otherwise.
  returned: always
  type: str
window:
  description:
    - The downtime window record of M(carapace.fleet.cara_apply) (O(install_root)C(/window.json)) as C(record) (V(null)
      when none ran), whether a window still runs (C(running)), the seconds waited for it (C(waited_s)), and
      C(error) when the record could not be read.
  returned: always
  type: dict
platform_asset:
  description: The release asset name for this host's platform (C(cara-<arch>-<os>)), V(null) if cara has none.
  returned: always
  type: str
  sample: cara-x86_64-linux
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.carapace.fleet.plugins.module_utils import _cara, _hostinfo, _layout, _window
from ansible_collections.carapace.fleet.plugins.module_utils._paths import path_problem


def main():
    module = AnsibleModule(
        argument_spec=_layout.host_argument_spec(
            wait_window=dict(type="int", default=0),
        ),
        supports_check_mode=True,
    )
    p = module.params
    problem = path_problem(p)
    if problem:
        module.fail_json(msg=problem, cause="bad_argument")
    record = _window.Record(p["install_root"])
    still, waited = record.wait(p["wait_window"]) if p["wait_window"] > 0 else (record.running(), 0)
    try:
        window = {"record": record.read(), "running": still, "waited_s": waited, "error": None}
    except _window.WindowError as exc:
        window = {"record": None, "running": still, "waited_s": waited, "error": exc.message}
    facts = _hostinfo.gather(p["bin_path"], p["state_dir"], p["config_path"], p["install_root"], p["backup_dir"],
                             runner=_cara.tolerant_module_runner(module))
    module.exit_json(changed=False, window=window, **facts)


if __name__ == "__main__":
    main()
