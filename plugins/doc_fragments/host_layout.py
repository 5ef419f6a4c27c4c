# -*- coding: utf-8 -*-
# Copyright: carapace.fleet maintainers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations


class ModuleDocFragment:
    """Where Carapace lives on a host: the options every module of the carapace.fleet.host action group takes."""

    DOCUMENTATION = r"""
options:
  bin_path:
    description:
      - The active C(cara) binary, a symlink to the active release under O(install_root) once a release has been
        switched to by M(carapace.fleet.cara_switch). Modules that run C(cara) run this binary.
    type: path
    default: /usr/local/bin/cara
  state_dir:
    description:
      - Carapace's state directory, exactly as the daemon gets it in E(CARAPACE_STATE_DIR) (update transactions live in
        C(<state_dir>/updates/)).
    type: path
    default: /var/lib/carapace
  config_path:
    description:
      - The config file (E(CARAPACE_CONFIG_PATH) of the daemon).
      - Defaults to O(state_dir)C(/carapace.json5) when it exists, else O(state_dir)C(/carapace.json), as C(cara)
        resolves it.
    type: path
  install_root:
    description:
      - Where releases are kept, one per C(<install_root>/releases/<tag>/cara), with the switch record
        C(<install_root>/state.json).
    type: path
    default: /opt/carapace
  backup_dir:
    description:
      - Private directory of the backups and their C(index.json) written by M(carapace.fleet.cara_backup). Must not be
        O(state_dir) itself.
    type: path
    default: /var/backups/carapace
notes:
  - Every module of the action group C(carapace.fleet.host) takes the host layout options O(bin_path), O(state_dir),
    O(config_path), O(install_root) and O(backup_dir), so that one C(module_defaults) entry
    (C(group/carapace.fleet.host)) states the layout once for a play, a block or a role. A module ignores the ones it
    has no use for.
attributes:
  action_group:
    description: Use C(group/carapace.fleet.host) in C(module_defaults) to set the host layout options once.
    support: full
    membership:
      - carapace.fleet.host
"""
