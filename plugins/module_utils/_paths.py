# -*- coding: utf-8 -*-
# Copyright: carapace.fleet maintainers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Checks of the filesystem paths the host modules are given.

Domain logic only (no Ansible imports). An empty path would mean the task's working directory and a relative one
a directory under it: a restore or a switch there rewrites whatever happens to be in it. Both are refused.
"""

from __future__ import annotations

import os

# The path parameters every host module that takes them checks; config_path only when it is given.
PATH_PARAMS = ("state_dir", "backup_dir", "install_root", "bin_path", "config_path")


def path_problem(params, names=PATH_PARAMS):
    """An operator-facing message for the first of `names` in `params` that is empty or relative, else None.

    A name absent from `params` is skipped, and so is config_path when it is None (not given).
    """
    for name in names:
        if name not in params:
            continue
        value = params[name]
        if value is None and name == "config_path":
            continue
        if not isinstance(value, str) or not value.strip():
            return ("%s is empty: it must be an absolute path (an empty path would mean the task's working directory)"
                    % name)
        if not os.path.isabs(value):
            return ("%s %r is relative: it must be an absolute path such as %s (a relative one would be resolved "
                    "against the task's working directory)" % (name, value, _EXAMPLES.get(name, "/var/lib/carapace")))
    return None


_EXAMPLES = {"state_dir": "/var/lib/carapace", "backup_dir": "/var/backups/carapace", "install_root": "/opt/carapace",
             "bin_path": "/usr/local/bin/cara", "config_path": "/var/lib/carapace/carapace.json5"}
