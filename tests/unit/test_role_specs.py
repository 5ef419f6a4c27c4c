"""The roles' argument specs against their defaults: a required variable has no default anywhere (issue 15), so
argument spec validation refuses a run without it instead of running on an empty value; every entry point has a
description (antsibull-docs requires one)."""

import glob
import os

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ROLES = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "roles", "*")))


def _load(path):
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f) or {}


def _role_values(role):
    """Variables the role's defaults/ and vars/ set."""
    values = {}
    for kind in ("defaults", "vars"):
        for path in glob.glob(os.path.join(ROOT, "roles", role, kind, "*.yml")):
            values.update(_load(path))
    return values


def test_every_role_is_checked():
    assert ROLES == ["cara_rollback", "cara_schedule", "cara_service", "cara_upgrade"]


@pytest.mark.parametrize("role", ROLES)
def test_required_variables_have_no_default(role):
    specs = _load(os.path.join(ROOT, "roles", role, "meta", "argument_specs.yml"))["argument_specs"]
    values = _role_values(role)
    required = set()
    for entry, spec in specs.items():
        for name, option in spec.get("options", {}).items():
            if option.get("required"):
                required.add(name)
                assert "default" not in option, (role, entry, name)
    assert not required & set(values), (role, sorted(required & set(values)))
    if role == "cara_upgrade":
        assert "cara_upgrade_version" in required


@pytest.mark.parametrize("role", ROLES)
def test_every_entry_point_is_described(role):
    specs = _load(os.path.join(ROOT, "roles", role, "meta", "argument_specs.yml"))["argument_specs"]
    for entry, spec in specs.items():
        assert spec.get("short_description") and spec.get("description"), (role, entry)
