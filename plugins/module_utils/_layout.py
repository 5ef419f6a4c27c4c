# -*- coding: utf-8 -*-
# Copyright: carapace.fleet maintainers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

"""The host layout: the options every module of the carapace.fleet.host action group takes (doc fragment
carapace.fleet.host_layout), so that one module_defaults entry serves the whole group."""

from __future__ import annotations

import copy

# The defaults are the ones the roles' cara_bin_path, cara_state_dir, cara_install_root and cara_backup_dir have.
HOST_LAYOUT_ARGUMENT_SPEC = dict(
    bin_path=dict(type="path", default="/usr/local/bin/cara"),
    state_dir=dict(type="path", default="/var/lib/carapace"),
    config_path=dict(type="path"),
    install_root=dict(type="path", default="/opt/carapace"),
    backup_dir=dict(type="path", default="/var/backups/carapace"),
)


def host_argument_spec(**options):
    """A module's argument_spec: the host layout plus the module's own `options` (which must not redefine it)."""
    clash = sorted(set(options) & set(HOST_LAYOUT_ARGUMENT_SPEC))
    if clash:
        raise ValueError("options of the host layout redefined: %s" % ", ".join(clash))
    spec = copy.deepcopy(HOST_LAYOUT_ARGUMENT_SPEC)
    spec.update(options)
    return spec
