"""Maintenance windows (module_utils/_maintenance.py and the cara_maintenance_window filter): days, ranges, windows
that cross midnight, time zones (a DST change included), several windows, and every refusal."""
import datetime

import pytest
from ansible.errors import AnsibleFilterError

from ansible_collections.carapace.fleet.plugins.filter.cara_maintenance_window import cara_maintenance_window
from ansible_collections.carapace.fleet.plugins.module_utils._maintenance import WindowError, judge, parse

UTC = datetime.timezone.utc


def at(text):
    """An aware UTC time from 'YYYY-MM-DD HH:MM[:SS]' (2026-12-05 is a Saturday)."""
    return datetime.datetime.fromisoformat(text).replace(tzinfo=UTC)


@pytest.mark.parametrize("spec, now, is_open", [
    ("Sat 02:00-04:00", "2026-12-05 01:59:59", False),
    ("Sat 02:00-04:00", "2026-12-05 02:00", True),
    ("Sat 02:00-04:00", "2026-12-05 03:59:59", True),
    ("Sat 02:00-04:00", "2026-12-05 04:00", False),      # the end is not inside
    ("Sat 02:00-04:00", "2026-12-06 03:00", False),      # Sunday
    ("saturday 02:00-04:00", "2026-12-05 03:00", True),
    ("Mon-Fri 09:00-17:00", "2026-12-04 12:00", True),   # Friday
    ("Mon-Fri 09:00-17:00", "2026-12-05 12:00", False),  # Saturday
    ("Fri-Mon 09:00-17:00", "2026-12-06 12:00", True),   # wraps over the week end: Sunday
    ("Fri-Mon 09:00-17:00", "2026-12-08 12:00", False),  # Tuesday
    ("Sat,Sun 09:00-10:00", "2026-12-06 09:30", True),
    ("Fri 23:00-01:00", "2026-12-05 00:30", True),       # crosses midnight: belongs to Friday
    ("Fri 23:00-01:00", "2026-12-04 00:30", False),      # Friday 00:30 is Thursday's night
    ("daily 00:00-24:00", "2026-12-05 23:59:59", True),
    ("03:00:00-03:00:30", "2026-12-05 03:00:29", True),  # every day, to the second
    ("03:00:00-03:00:30", "2026-12-05 03:00:30", False),
    ("Sat 02:00-04:00 Europe/Berlin", "2026-12-05 01:30", True),   # 02:30 in Berlin (UTC+1)
    ("Sat 02:00-04:00 Europe/Berlin", "2026-12-05 03:30", False),  # 04:30 in Berlin
    ("Sun 01:00-04:00 Europe/Berlin", "2026-03-29 01:30", True),   # 03:30 CEST, the night clocks go forward
    ("Sat 02:00-03:00; Sun 02:00-03:00", "2026-12-06 02:30", True),
    ("", "2026-12-05 12:00", True),                      # no window: always open
])
def test_judge(spec, now, is_open):
    assert judge(spec, "UTC", at(now))["open"] is is_open


def test_an_open_window_says_when_it_closes_and_a_closed_one_when_the_next_opens():
    got = judge("Sat 02:00-04:00", "Europe/Berlin", at("2026-12-05 01:30"))
    assert got["open"] and got["closes"] == "2026-12-05T04:00:00+01:00" and got["opens"] is None
    got = judge("Sat 02:00-04:00", "UTC", at("2026-12-05 04:00"))
    assert not got["open"] and got["opens"] == "2026-12-12T02:00:00+00:00" and got["closes"] is None
    assert got["windows"] == ["Sat 02:00-04:00"]


def test_overlapping_windows_close_at_the_later_end():
    got = judge(["Sat 02:00-04:00", "Sat 03:00-05:00"], "UTC", at("2026-12-05 03:30"))
    assert got["closes"] == "2026-12-05T05:00:00+00:00"


@pytest.mark.parametrize("spec, cause", [
    ("Sat", "bad_window"),
    ("Sat 2-4", "bad_window"),
    ("Xyz 02:00-04:00", "bad_window"),
    ("Sat 25:00-26:00", "bad_window"),
    ("Sat 02:60-04:00", "bad_window"),
    ("Sat 02:00-02:00", "bad_window"),
    ("Sat 02:00-04:00 Mars/Olympus", "bad_timezone"),
])
def test_refusals_name_the_cause_and_the_expected_form(spec, cause):
    with pytest.raises(WindowError) as err:
        parse(spec)
    assert err.value.cause == cause
    assert "Sat 02:00-04:00" in err.value.message or "IANA" in err.value.message


def test_the_filter_refuses_instead_of_guessing():
    with pytest.raises(AnsibleFilterError, match="bad_window"):
        cara_maintenance_window("at night")
    with pytest.raises(AnsibleFilterError, match="no UTC offset"):
        cara_maintenance_window("Sat 02:00-04:00", now="2026-12-05T03:00:00")
    assert cara_maintenance_window("Sat 02:00-04:00", "UTC", now="2026-12-05T03:00:00+00:00")["open"] is True
    assert cara_maintenance_window("Sat 02:00-04:00", now="2026-12-05T03:00:00+00:00")["open"] is True
