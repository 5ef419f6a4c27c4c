# -*- coding: utf-8 -*-
# Copyright: carapace.fleet maintainers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The carapace.fleet.cara_upgrade_path filter: plan a Carapace upgrade on the controller (docs: the .yml beside)."""

from __future__ import annotations

from ansible.module_utils.parsing.convert_bool import boolean

from ansible_collections.carapace.fleet.plugins.module_utils._version import plan_upgrade


def cara_upgrade_path(installed, target, known_tags, allow_preview=False, allow_downgrade=False, allow_chain=True):
    """Plan the upgrade of a host from `installed` to `target`. Refusals are returned (steps None), never raised,
    so that a play can assert on the plan and show its reason."""
    flags = {"allow_preview": allow_preview, "allow_downgrade": allow_downgrade, "allow_chain": allow_chain}
    for name, value in flags.items():
        try:
            flags[name] = boolean(value, strict=True)
        except TypeError:
            return {"from": installed, "to": target, "steps": None, "in_contract": False, "chain": False,
                    "reason": "refused: %s=%r is not a boolean; set it to true or false." % (name, value),
                    "cause": "invalid", "expect_version": None}
    return plan_upgrade(installed, target, known_tags, **flags)


class FilterModule:
    """carapace.fleet filters."""

    def filters(self):
        return {"cara_upgrade_path": cara_upgrade_path}
