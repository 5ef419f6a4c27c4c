"""Versions, ordering, the N-1 contract and upgrade-path planning (module_utils/_version.py and its filter)."""

import pytest

from ansible_collections.carapace.fleet.plugins.filter.cara_upgrade_path import FilterModule, cara_upgrade_path
from ansible_collections.carapace.fleet.plugins.module_utils import _version
from ansible_collections.carapace.fleet.plugins.module_utils._version import parse_version, plan_upgrade

KNOWN = ["v0.7.0", "v0.8.0", "v0.9.0", "v0.9.1"]
# Carapace's real tags (cara-contract.md section 8), with two previews and v0.9.0 added.
REAL = ["v0.1.0-preview1", "v0.1.0-preview2", "v0.1.0-preview12", "v0.1.0", "v0.2.0", "v0.3.0", "v0.4.0", "v0.4.1",
        "v0.5.0", "v0.6.0", "v0.7.0", "v0.8.0", "v0.9.0"]
KEYS = {"from", "to", "steps", "in_contract", "chain", "reason", "cause", "expect_version"}


# -- parsing -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,fields,tag", [
    ("v0.9.0", (0, 9, 0, None), "v0.9.0"),
    ("0.9.0", (0, 9, 0, None), "v0.9.0"),
    (" 0.8.0\n", (0, 8, 0, None), "v0.8.0"),
    ("v0.1.0-preview12", (0, 1, 0, "preview12"), "v0.1.0-preview12"),
    ("1.0.0-rc.1", (1, 0, 0, "rc.1"), "v1.0.0-rc.1"),
    ("v10.20.30", (10, 20, 30, None), "v10.20.30"),
])
def test_parse(text, fields, tag):
    v = parse_version(text)
    assert (v.major, v.minor, v.patch, v.pre) == fields
    assert v.tag == tag and v.version == tag[1:]
    assert v.line == fields[:2]
    assert v.is_preview is (fields[3] is not None)
    assert _version.normalize_tag(text) == tag


@pytest.mark.parametrize("text", ["", "latest", "v0.9", "0.9.0.1", "V0.9.0", "vv0.9.0", "v01.2.3", "v0.9.0-",
                                  "v0.9.0+build", "cara 0.9.0", None, 9, "v0.9.0/../x"])
def test_parse_refuses_what_is_not_a_version(text):
    with pytest.raises(ValueError, match="not a Carapace version"):
        parse_version(text)


def test_ordering_follows_semver_with_natural_preview_numbers():
    shuffled = ["v1.0.0", "v0.10.0", "v0.1.0", "v0.1.0-preview12", "v0.9.1", "v0.1.0-preview2", "v1.0.0-rc.2",
                "v0.9.0", "v1.0.0-rc.10", "0.2.0", "v0.1.0-preview1"]
    assert _version.sort_tags(shuffled) == [
        "v0.1.0-preview1", "v0.1.0-preview2", "v0.1.0-preview12", "v0.1.0", "v0.2.0", "v0.9.0", "v0.9.1", "v0.10.0",
        "v1.0.0-rc.2", "v1.0.0-rc.10", "v1.0.0"]
    assert _version.compare("0.9.0", "v0.9.0") == 0
    assert _version.compare("v0.10.0", "v0.9.9") == 1
    assert _version.compare("v0.1.0-preview12", "v0.1.0") == -1
    assert parse_version("0.9.0") == parse_version("v0.9.0")
    assert len({parse_version("0.9.0"), parse_version("v0.9.0")}) == 1
    assert _version.sort_tags(["v0.9.0", "0.9.0"]) == ["v0.9.0"]


def test_newest_by_line_ignores_previews():
    newest = _version.newest_by_line(REAL + ["v0.9.2-preview1"])
    assert newest[(0, 4)].tag == "v0.4.1"
    assert newest[(0, 9)].tag == "v0.9.0"
    assert newest[(0, 1)].tag == "v0.1.0"
    assert sorted(newest) == [(0, n) for n in range(1, 10)]


def test_reported_version_quirk_of_v0_4_1():
    assert _version.reported_version("v0.4.1") == "0.4.0"
    assert _version.reported_version("v0.4.0") == "0.4.0"
    assert _version.reported_version("0.9.0") == "0.9.0"


# -- the N-1 contract ----------------------------------------------------------------------------------------------

def test_next_line_is_in_contract():
    plan = plan_upgrade("0.8.0", "v0.9.0", KNOWN)
    assert set(plan) == KEYS
    assert plan["from"] == "v0.8.0" and plan["to"] == "v0.9.0"
    assert plan["steps"] == ["v0.9.0"]
    assert plan["in_contract"] is True and plan["chain"] is False and plan["cause"] is None
    assert "N-1 -> N" in plan["reason"]
    assert plan["expect_version"] == "0.9.0"


@pytest.mark.parametrize("installed,target", [("v0.9.0", "v0.9.1"), ("0.4.0", "v0.4.1")])
def test_patch_upgrade_is_in_contract(installed, target):
    plan = plan_upgrade(installed, target, REAL + ["v0.9.1"])
    assert plan["steps"] == [target] and plan["in_contract"] is True and plan["chain"] is False
    assert "patch upgrade" in plan["reason"]


def test_chain_over_one_line():
    plan = plan_upgrade("v0.7.0", "v0.9.0", KNOWN)
    assert plan["steps"] == ["v0.8.0", "v0.9.0"]
    assert plan["in_contract"] is True and plan["chain"] is True and plan["cause"] is None
    assert "v0.8.0 -> v0.9.0" in plan["reason"]


def test_chain_takes_the_newest_tag_of_each_line_in_between():
    plan = plan_upgrade("0.3.0", "v0.6.0", REAL)
    assert plan["steps"] == ["v0.4.1", "v0.5.0", "v0.6.0"]
    assert plan["chain"] is True and plan["in_contract"] is True
    plan = plan_upgrade("0.1.0", "v0.9.0", REAL)
    assert plan["steps"] == ["v0.2.0", "v0.3.0", "v0.4.1", "v0.5.0", "v0.6.0", "v0.7.0", "v0.8.0", "v0.9.0"]


def test_chain_ends_at_the_target_not_the_newest_of_its_line():
    plan = plan_upgrade("v0.7.0", "v0.9.0", KNOWN)
    assert plan["steps"][-1] == "v0.9.0"
    plan = plan_upgrade("v0.7.0", "v0.9.1", KNOWN)
    assert plan["steps"] == ["v0.8.0", "v0.9.1"]


def test_chain_skips_preview_only_lines():
    plan = plan_upgrade("v0.8.0", "v1.0.0", ["v0.8.0", "v0.9.0-preview1", "v1.0.0"])
    assert plan["steps"] == ["v1.0.0"] and plan["chain"] is False and plan["in_contract"] is True


def test_lines_come_from_the_known_tags_not_arithmetic():
    known = ["v0.8.0", "v0.9.0", "v0.9.3", "v1.0.0", "v1.2.0"]
    plan = plan_upgrade("v0.9.3", "v1.0.0", known)  # no 0.10 exists: 0.9 -> 1.0 is N-1 -> N
    assert plan["steps"] == ["v1.0.0"] and plan["in_contract"] is True and plan["chain"] is False
    plan = plan_upgrade("v1.0.0", "v1.2.0", known)  # no 1.1 exists: 1.0 -> 1.2 is N-1 -> N
    assert plan["steps"] == ["v1.2.0"] and plan["chain"] is False
    plan = plan_upgrade("v0.8.0", "v1.2.0", known)
    assert plan["steps"] == ["v0.9.3", "v1.0.0", "v1.2.0"] and plan["chain"] is True
    # with a 0.10 line the same jump is a chain
    plan = plan_upgrade("v0.9.3", "v1.0.0", known + ["v0.10.0", "v0.10.1"])
    assert plan["steps"] == ["v0.10.1", "v1.0.0"] and plan["chain"] is True


def test_installed_version_missing_from_the_known_tags_still_plans():
    plan = plan_upgrade("0.8.0", "v0.9.0", ["v0.9.0"])  # e.g. a HEAD build that reports 0.8.0
    assert plan["steps"] == ["v0.9.0"] and plan["in_contract"] is True
    plan = plan_upgrade("0.6.0", "v0.9.0", KNOWN)
    assert plan["steps"] == ["v0.7.0", "v0.8.0", "v0.9.0"]


def test_chain_refused_when_not_allowed_lists_the_intermediate_tags():
    plan = plan_upgrade("0.3.0", "v0.6.0", REAL, allow_chain=False)
    assert plan["steps"] is None and plan["cause"] == "chain" and plan["chain"] is True
    assert plan["in_contract"] is False
    assert "v0.4.1, v0.5.0" in plan["reason"]
    assert "allow_chain=true" in plan["reason"]
    # a single line step does not need the chain
    assert plan_upgrade("0.8.0", "v0.9.0", KNOWN, allow_chain=False)["steps"] == ["v0.9.0"]


def test_same_version_is_a_no_op():
    for installed in ("0.9.0", "v0.9.0", "0.9.0\n"):
        plan = plan_upgrade(installed, "v0.9.0", KNOWN)
        assert plan["steps"] == [] and plan["cause"] is None and plan["in_contract"] is True
        assert "already at v0.9.0" in plan["reason"]


# -- refusals ------------------------------------------------------------------------------------------------------

def test_preview_target_refused_unless_allowed():
    known = KNOWN + ["v0.9.2-preview1"]
    plan = plan_upgrade("0.9.1", "v0.9.2-preview1", known)
    assert plan["steps"] is None and plan["cause"] == "preview"
    assert "v0.9.2-preview1 is a preview" in plan["reason"] and "allow_preview=true" in plan["reason"]
    plan = plan_upgrade("0.9.1", "v0.9.2-preview1", known, allow_preview=True)
    assert plan["steps"] == ["v0.9.2-preview1"] and plan["in_contract"] is False and plan["cause"] is None
    assert plan["expect_version"] == "0.9.2-preview1"


def test_preview_installed_refused_unless_allowed():
    plan = plan_upgrade("0.1.0-preview12", "v0.1.0", REAL)
    assert plan["steps"] is None and plan["cause"] == "preview"
    assert "v0.1.0-preview12 is a preview" in plan["reason"]
    plan = plan_upgrade("0.1.0-preview12", "v0.1.0", REAL, allow_preview=True)
    assert plan["steps"] == ["v0.1.0"] and plan["in_contract"] is False
    # a preview jump is one direct step, never a chain
    plan = plan_upgrade("0.1.0-preview12", "v0.3.0", REAL, allow_preview=True)
    assert plan["steps"] == ["v0.3.0"] and plan["chain"] is False


def test_preview_to_preview_names_both():
    plan = plan_upgrade("v0.1.0-preview1", "v0.1.0-preview2", REAL)
    assert plan["cause"] == "preview"
    assert "v0.1.0-preview1 and v0.1.0-preview2 are preview releases" in plan["reason"]


def test_downgrade_refused_unless_allowed():
    plan = plan_upgrade("0.9.1", "v0.9.0", KNOWN)
    assert plan["steps"] is None and plan["cause"] == "downgrade" and plan["in_contract"] is False
    assert "older than the installed v0.9.1" in plan["reason"]
    assert "rollback" in plan["reason"] and "allow_downgrade=true" in plan["reason"]
    plan = plan_upgrade("0.9.1", "v0.8.0", KNOWN, allow_downgrade=True)
    assert plan["steps"] == ["v0.8.0"] and plan["in_contract"] is False and plan["chain"] is False
    assert "restore the backup" in plan["reason"]


def test_downgrade_to_a_preview_needs_both_opt_ins():
    plan = plan_upgrade("v0.1.0", "v0.1.0-preview12", REAL, allow_downgrade=True)
    assert plan["cause"] == "preview"
    plan = plan_upgrade("v0.1.0", "v0.1.0-preview12", REAL, allow_preview=True)
    assert plan["cause"] == "downgrade"
    plan = plan_upgrade("v0.1.0", "v0.1.0-preview12", REAL, allow_preview=True, allow_downgrade=True)
    assert plan["steps"] == ["v0.1.0-preview12"]


def test_unknown_target_refused_with_the_known_list():
    plan = plan_upgrade("0.8.0", "v0.9.5", ["v0.9.1", "v0.8.0", "v0.9.0", "v0.7.0"])
    assert plan["steps"] is None and plan["cause"] == "unknown_target"
    assert "v0.9.5 is not a known release" in plan["reason"]
    assert "Known tags: v0.7.0, v0.8.0, v0.9.0, v0.9.1." in plan["reason"]
    # even when the host already reports that version: the list is wrong, say so
    assert plan_upgrade("0.9.5", "v0.9.5", KNOWN)["cause"] == "unknown_target"


@pytest.mark.parametrize("installed,target,known,needle", [
    ("", "v0.9.0", KNOWN, "installed version"),
    (None, "v0.9.0", KNOWN, "installed version"),
    ("0.8.0", "latest", KNOWN, "target"),
    ("0.8.0", "v0.9.0", "v0.8.0,v0.9.0", "must be a list"),
    ("0.8.0", "v0.9.0", ["v0.8.0", "nightly", "v0.9.0"], "'nightly'"),
])
def test_invalid_input_is_a_refusal_not_an_exception(installed, target, known, needle):
    plan = plan_upgrade(installed, target, known)
    assert set(plan) == KEYS
    assert plan["steps"] is None and plan["cause"] == "invalid"
    assert needle in plan["reason"] and plan["reason"].startswith("refused:")


# -- v0.4.1 reports 0.4.0 ------------------------------------------------------------------------------------------

def test_v0_4_1_reporting_0_4_0_plans_to_the_next_line():
    plan = plan_upgrade("0.4.0", "v0.5.0", REAL)
    assert plan["steps"] == ["v0.5.0"] and plan["in_contract"] is True and plan["chain"] is False
    assert plan["from"] == "v0.4.0"
    assert "v0.4.1 reports 0.4.0 too" in plan["reason"]
    # the same host known by its tag: no ambiguity to mention
    plan = plan_upgrade("v0.4.1", "v0.5.0", REAL)
    assert plan["steps"] == ["v0.5.0"] and "reports" not in plan["reason"]


def test_target_v0_4_1_expects_0_4_0_from_the_binary():
    plan = plan_upgrade("0.3.0", "v0.4.1", REAL)
    assert plan["steps"] == ["v0.4.1"] and plan["expect_version"] == "0.4.0"
    assert plan_upgrade("v0.4.1", "v0.4.1", REAL)["steps"] == []


# -- the filter ----------------------------------------------------------------------------------------------------

def test_filter_is_registered_and_returns_the_plan():
    filters = FilterModule().filters()
    assert filters["cara_upgrade_path"] is cara_upgrade_path
    assert cara_upgrade_path("v0.7.0", "v0.9.0", KNOWN) == plan_upgrade("v0.7.0", "v0.9.0", KNOWN)


def test_filter_accepts_ansible_booleans_and_refuses_others():
    plan = cara_upgrade_path("0.9.1", "v0.9.0", KNOWN, allow_downgrade="yes")
    assert plan["steps"] == ["v0.9.0"]
    plan = cara_upgrade_path("0.7.0", "v0.9.0", KNOWN, allow_chain="false")
    assert plan["cause"] == "chain"
    plan = cara_upgrade_path("0.8.0", "v0.9.0", KNOWN, allow_preview="maybe")
    assert plan["steps"] is None and plan["cause"] == "invalid" and "allow_preview" in plan["reason"]
