# -*- coding: utf-8 -*-
# Copyright: carapace.fleet maintainers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The carapace.fleet.cara_maintenance_window filter: is the controller's clock inside a maintenance window
(docs: the .yml beside)."""

from __future__ import annotations

import datetime

from ansible.errors import AnsibleFilterError

from ansible_collections.carapace.fleet.plugins.module_utils._maintenance import WindowError, judge


def cara_maintenance_window(spec, tz="UTC", now=None):
    """{open, closes, opens, windows, now} of `spec` at `now` (ISO 8601 with an offset; default: the clock)."""
    when = None
    if now:
        try:
            when = datetime.datetime.fromisoformat(str(now))
        except ValueError as exc:
            raise AnsibleFilterError("cara_maintenance_window: now=%r is not an ISO 8601 time" % now) from exc
        if when.tzinfo is None:
            raise AnsibleFilterError("cara_maintenance_window: now=%r has no UTC offset" % now)
    try:
        return judge(spec, tz or "UTC", when)
    except WindowError as exc:
        raise AnsibleFilterError("%s (cause: %s)" % (exc.message, exc.cause)) from exc


class FilterModule:
    """carapace.fleet filters."""

    def filters(self):
        return {"cara_maintenance_window": cara_maintenance_window}
