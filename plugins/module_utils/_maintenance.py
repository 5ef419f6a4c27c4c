# -*- coding: utf-8 -*-
# Copyright: carapace.fleet maintainers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Maintenance windows: "Sat 02:00-04:00", "Mon-Fri 22:00-01:30 Europe/Berlin", "daily 03:00-03:30".

Domain logic only (no Ansible imports). A window is a set of days, a start and an end time of day (HH:MM or
HH:MM:SS) in one time zone; an end at or before the start crosses midnight and belongs to the start's day. Several
windows are separated by `;` (or given as a list). `judge(spec, tz, now)` says whether `now` is inside one of them,
when that window closes, or when the next one opens.
"""

from __future__ import annotations

import datetime
import re

try:
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError
except ImportError:  # pragma: no cover - Python < 3.9 has no zoneinfo; the controller runs 3.11
    ZoneInfo = None
    ZoneInfoNotFoundError = Exception

from ansible_collections.carapace.fleet.plugins.module_utils._errors import FleetError

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_NAMES = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
_TIME = r"(\d{1,2}):(\d{2})(?::(\d{2}))?"
_ONE = re.compile(r"^\s*(?:(?P<days>[A-Za-z*][A-Za-z,*\s-]*?)\s+)?(?P<start>%s)\s*-\s*(?P<end>%s)(?:\s+(?P<tz>\S+))?\s*$"
                  % (_TIME, _TIME))
EXAMPLE = 'e.g. "Sat 02:00-04:00", "Mon-Fri 22:00-01:30 Europe/Berlin" or "daily 03:00-03:30"'


class WindowError(FleetError):
    """A window that cannot be read (cause `bad_window`) or a time zone that is not known (cause `bad_timezone`)."""


def _day(word, text):
    key = word.strip().lower()
    if key in DAYS:
        return DAYS.index(key)
    if key in _NAMES:
        return _NAMES.index(key)
    raise WindowError("bad_window", "maintenance window %r: %r is not a day (Mon .. Sun); %s" % (text, word, EXAMPLE))


def _days(field, text):
    if field is None or field.strip().lower() in ("daily", "*", "every day"):
        return frozenset(range(7))
    out = set()
    for part in field.split(","):
        if "-" in part:
            first, last = part.split("-", 1)
            a, b = _day(first, text), _day(last, text)
            out.update((a + i) % 7 for i in range((b - a) % 7 + 1))  # Fri-Mon wraps over the week's end
        else:
            out.add(_day(part, text))
    return frozenset(out)


def _seconds(hours, minutes, secs, text, allow_24=False):
    h, m, s = int(hours), int(minutes), int(secs or 0)
    if (h == 24 and allow_24 and m == 0 and s == 0) or (h < 24 and m < 60 and s < 60):
        return h * 3600 + m * 60 + s
    raise WindowError("bad_window", "maintenance window %r: %02d:%02d is not a time of day; %s" % (text, h, m, EXAMPLE))


def zone(name):
    """The tzinfo of an IANA name ("UTC", "Europe/Berlin")."""
    if ZoneInfo is None:
        raise WindowError("bad_timezone", "this Python has no zoneinfo; use Python 3.9 or later on the controller")
    try:
        return ZoneInfo(str(name))
    except (ZoneInfoNotFoundError, ValueError, OSError) as exc:
        raise WindowError("bad_timezone", "time zone %r is not known on the controller (%s); use an IANA name such as "
                          "UTC or Europe/Berlin (Debian: package tzdata)" % (name, exc)) from exc


def parse(spec, tz="UTC"):
    """[(days, start_s, end_s, tzinfo, text)] of a window spec (string with `;` separators, or a list)."""
    items = spec if isinstance(spec, (list, tuple)) else str(spec or "").split(";")
    out = []
    for text in (str(t).strip() for t in items):
        if not text:
            continue
        match = _ONE.match(text)
        if not match:
            raise WindowError("bad_window", "maintenance window %r cannot be read; %s" % (text, EXAMPLE))
        start = _seconds(*(match.group("start").split(":") + [None])[:3], text)
        end = _seconds(*(match.group("end").split(":") + [None])[:3], text, allow_24=True)
        if start == end % 86400 and end != 86400:
            raise WindowError("bad_window", "maintenance window %r is empty (it ends when it starts); %s" % (text, EXAMPLE))
        out.append((_days(match.group("days"), text), start, end, zone(match.group("tz") or tz), text))
    return out


def _bounds(day, start, end, tzinfo):
    """(opens, closes) of the window that starts on local date `day`."""
    midnight = datetime.datetime.combine(day, datetime.time(), tzinfo=tzinfo)
    length = (end - start) % 86400 or 86400  # only 00:00-24:00 gets here: the whole day
    opens = midnight + datetime.timedelta(seconds=start)
    return opens, opens + datetime.timedelta(seconds=length)


def judge(spec, tz="UTC", now=None):
    """Whether `now` (aware datetime; default: the clock) is inside the window. An empty spec is always open.

    Returns {open, closes (ISO, when open), opens (ISO of the next opening, when closed), windows (the texts)}."""
    windows = parse(spec, tz)
    now = now or datetime.datetime.now(datetime.timezone.utc)
    if not windows:
        return {"open": True, "closes": None, "opens": None, "windows": [], "now": now.isoformat()}
    current, upcoming = None, None
    for days, start, end, tzinfo, _text in windows:
        local = now.astimezone(tzinfo)
        for offset in range(-1, 8):  # yesterday's window may still run past midnight
            day = local.date() + datetime.timedelta(days=offset)
            if day.weekday() not in days:
                continue
            opens, closes = _bounds(day, start, end, tzinfo)
            if opens <= now < closes:
                current = closes if current is None or closes > current else current
            elif opens > now and (upcoming is None or opens < upcoming):
                upcoming = opens
    return {"open": current is not None, "closes": current.isoformat() if current else None,
            "opens": None if current else (upcoming.isoformat() if upcoming else None),
            "windows": [w[4] for w in windows], "now": now.isoformat()}
