# -*- coding: utf-8 -*-
# Copyright: carapace.fleet maintainers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""HTTP helpers shared by the modules that fetch from mirrors (cara_release, cara_release_notes).

Domain logic only (no Ansible imports): the client that opens one URL is passed in.
- redact_url: credentials in URLs (https://user:password@host/) never reach a result or an error message.
"""

from __future__ import annotations

import re

REDACTED_USERINFO = "********"
_USERINFO_RE = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)([^/?#@\s\"'<>]*)@")


def redact_url(text):
    """`text` with the userinfo of every URL in it replaced: https://u:p@host/x -> https://********@host/x."""
    if not isinstance(text, str):
        return text
    return _USERINFO_RE.sub(lambda m: m.group(1) + REDACTED_USERINFO + "@", text)
