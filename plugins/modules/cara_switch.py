#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: carapace.fleet maintainers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: cara_switch
short_description: Install a verified Carapace binary side by side and switch the active C(cara) atomically
version_added: 0.1.0
description:
  - Installs a verified C(cara) binary as O(install_root)/releases/<tag>/cara (mode 0755, owned by the user the module
    runs as) and points the active path O(bin_path) at it. The switch is atomic, a symlink created under a temporary
    name in the same directory and renamed over O(bin_path), so O(bin_path) exists at every moment.
  - Fails closed. O(src) is hashed and must equal O(sha256); the copy is hashed as it is written and again once written,
    and only then renamed into place. On any mismatch nothing is installed and nothing is switched.
  - Records the active and the previous release (tag and sha256) in O(install_root)/state.json (written atomically,
    mode 0644), so O(state=previous) can switch back to the release that was active before the last switch.
  - Never leaves C(cara.bak) or C(cara.old) beside the active path. A HEAD C(cara) deletes such files at every start
    and v0.8.0 deletes every C(*.bak) and C(*.old) in the binary's directory, so old releases live under
    O(install_root)/releases/ instead.
  - When O(bin_path) is a regular file (a manual install) or a symlink to a binary outside O(install_root), that binary
    is first copied to O(install_root)/releases/v<version>/cara (its version from C(cara --version), else
    C(unknown-<first 8 hex digits of its sha256>)), so it stays available as the previous release.
  - Keeps the newest O(keep) releases and removes older ones, never the active, the previous or the one this run
    installs.
author:
  - carapace.fleet maintainers (@carapace-fleet)
extends_documentation_fragment:
  - carapace.fleet.host_layout
attributes:
  check_mode:
    support: full
    description:
      - Hashes O(src) and the installed releases and reports what would be installed, adopted, switched, recorded and
        removed; writes nothing. A O(src) that does not exist yet (an earlier copy task skipped in check mode) is
        reported as a warning.
  diff_mode:
    support: full
    description: Shows O(bin_path) before and after (kind, target, tag, sha256) and the installed releases.
  idempotent:
    support: full
    description:
      - With O(state=present) a release that is already active with the matching digest is reported unchanged.
      - With O(state=previous) a second run after a switch back is reported unchanged; it does not switch forward again.
options:
  src:
    description:
      - Path, on the managed host, of the verified binary to install, for example the staged
        C(<state_dir>/updates/cara-<version>) copied there from the controller's C(cara_release) cache.
      - Required with O(state=present) and O(state=installed). It may be missing when the release is already installed
        with the expected digest.
    type: path
  sha256:
    description:
      - Expected sha256 (64 hex digits) of the binary, the digest C(cara_release) verified.
      - Both O(src) and the installed copy are hashed against it; a mismatch fails and switches nothing.
      - Required with O(state=present) and O(state=installed).
    type: str
  tag:
    description:
      - Release tag, the name of the directory under O(install_root)/releases, for example C(v0.9.0).
      - Required with O(state=present) and O(state=installed).
    type: str
  keep:
    description:
      - How many releases to keep under O(install_root)/releases, oldest removed first.
      - The active release, the previous one and the one this run installs are never removed, even when that keeps more.
    type: int
    default: 3
  state:
    description:
      - V(present) installs O(tag) and makes it the active release.
      - V(previous) switches back to the release recorded as previous (O(src), O(sha256) and O(tag) are not used); after
        that no previous release is recorded until the next switch forward, and the release switched away from is
        reported as RV(rolled_back_from).
      - V(installed) installs O(tag) without switching to it.
    type: str
    choices: [present, previous, installed]
    default: present
notes:
  - Stop the service before switching when the host runs a single daemon; the running process keeps the binary it
    started from either way, and runs the new one from its next start.
  - Stage the verified file as C(<state_dir>/updates/cara-<version>), where C(cara update) stages it, and install from
    there; that keeps C(updates/transaction.json) valid for C(cara) itself.
seealso:
  - module: carapace.fleet.cara_release
  - module: carapace.fleet.cara_health
"""

EXAMPLES = r"""
- name: Install v0.9.0 from the staged, verified file and make it active
  carapace.fleet.cara_switch:
    src: /var/lib/carapace/updates/cara-0.9.0
    sha256: "{{ release.assets['cara-x86_64-linux'].sha256 }}"
    tag: v0.9.0

- name: Pre-install the next release on every host without switching
  carapace.fleet.cara_switch:
    src: /var/lib/carapace/updates/cara-0.9.1
    sha256: "{{ next_sha256 }}"
    tag: v0.9.1
    state: installed

- name: Roll back to the release that was active before the last switch
  carapace.fleet.cara_switch:
    state: previous
"""

RETURN = r"""
bin_path:
  description: The active path.
  returned: always
  type: str
  sample: /usr/local/bin/cara
target:
  description: The release binary this run installed (V(installed)), switched to, or would switch to.
  returned: always
  type: str
  sample: /opt/carapace/releases/v0.9.0/cara
tag:
  description: Tag of the active release after the run, as recorded in C(state.json).
  returned: always
  type: str
  sample: v0.9.0
sha256:
  description: sha256 of the active release after the run, as recorded.
  returned: always
  type: str
active:
  description: The active release record C({tag, sha256, path}).
  returned: always
  type: dict
previous:
  description: The release recorded as previous (what O(state=previous) switches to), or V(null).
  returned: always
  type: dict
rolled_back_from:
  description: After O(state=previous), the release switched away from; else V(null).
  returned: always
  type: dict
history:
  description:
    - The releases that were active before, newest first (never the active one). A switch back with O(state=previous)
      keeps the older ones, so the next rollback still knows the release before.
  returned: always
  type: list
  elements: dict
adopted:
  description: The manual install found at O(bin_path) and kept as a release (C(tag), C(sha256), C(version), C(from)), or V(null).
  returned: always
  type: dict
removed:
  description: Tags of releases removed (or that would be removed) by retention.
  returned: always
  type: list
  elements: str
releases:
  description: Tags installed under O(install_root)/releases after the run, oldest first.
  returned: always
  type: list
  elements: str
state_file:
  description: Path of C(state.json).
  returned: always
  type: str
actions:
  description: What the run did (or, in check mode, would do).
  returned: always
  type: list
  elements: str
diff:
  description: O(bin_path) before and after (C(kind), C(target), C(tag), C(sha256)) and the installed C(releases).
  returned: always
  type: dict
cause:
  description:
    - On failure, a machine-readable cause, one of C(digest_mismatch), C(missing_src), C(not_a_file), C(no_previous),
      C(missing_release), C(corrupt_state), C(adoption_conflict), C(bin_path_not_a_file), C(io_error), C(bad_argument).
  returned: failure
  type: str
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.carapace.fleet.plugins.module_utils import _layout
from ansible_collections.carapace.fleet.plugins.module_utils._paths import path_problem
from ansible_collections.carapace.fleet.plugins.module_utils._switch import SwitchError, Switcher
from ansible_collections.carapace.fleet.plugins.module_utils._version import version_from_output


def main():
    module = AnsibleModule(
        argument_spec=_layout.host_argument_spec(
            src=dict(type="path"),
            sha256=dict(type="str"),
            tag=dict(type="str"),
            keep=dict(type="int", default=3),
            state=dict(type="str", choices=["present", "previous", "installed"], default="present"),
        ),
        required_if=[("state", "present", ("src", "sha256", "tag")), ("state", "installed", ("src", "sha256", "tag"))],
        supports_check_mode=True,
    )
    p = module.params
    problem = path_problem(p)
    if problem:
        module.fail_json(msg=problem, cause="bad_argument")

    def version_of(path):
        rc, out, _err = module.run_command([path, "--version"], check_rc=False)
        return version_from_output(out) if rc == 0 else None

    switcher = None
    try:
        switcher = Switcher(p["install_root"], p["bin_path"], keep=p["keep"], version_of=version_of,
                            check_mode=module.check_mode)
        if p["state"] == "previous":
            result = switcher.previous()
        else:
            result = switcher.present(p["src"], p["sha256"], p["tag"], switch=p["state"] == "present")
    except SwitchError as exc:
        module.fail_json(msg=exc.message, cause=exc.cause, actions=switcher.actions if switcher else [])
    except OSError as exc:
        module.fail_json(msg="cannot update %s or %s: %s. Check that both are writable by the user the task runs as "
                         "(become), then re-run; the active link is either the old or the new release, never missing."
                         % (p["install_root"], p["bin_path"], exc), cause="io_error", actions=switcher.actions if switcher else [])
    for warning in result.pop("warnings"):
        module.warn(warning)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
