"""The host layout: the action group carapace.fleet.host, its doc fragment and its shared argument spec."""

import importlib
import os

import pytest
import yaml

from ansible_collections.carapace.fleet.plugins.doc_fragments.host_layout import ModuleDocFragment
from ansible_collections.carapace.fleet.plugins.module_utils import _layout

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODULES = sorted(name[:-3] for name in os.listdir(os.path.join(ROOT, "plugins", "modules")) if name.endswith(".py"))
HOST_MODULES = ["cara_apply", "cara_backup", "cara_health", "cara_info", "cara_restore", "cara_switch", "cara_transaction"]


class _Captured(Exception):
    pass


def _argument_spec(name, monkeypatch):
    """The argument_spec the module `name` builds its AnsibleModule with."""
    module = importlib.import_module("ansible_collections.carapace.fleet.plugins.modules." + name)
    seen = {}

    def fake(**kwargs):
        seen.update(kwargs)
        raise _Captured()

    monkeypatch.setattr(module, "AnsibleModule", fake)
    with pytest.raises(_Captured):
        module.main()
    return seen["argument_spec"]


def _doc(name):
    module = importlib.import_module("ansible_collections.carapace.fleet.plugins.modules." + name)
    return yaml.safe_load(module.DOCUMENTATION)


def test_the_group_in_runtime_yml_is_the_host_modules():
    with open(os.path.join(ROOT, "meta", "runtime.yml"), encoding="utf-8") as handle:
        runtime = yaml.safe_load(handle)
    assert sorted(runtime["action_groups"]["host"]) == HOST_MODULES


@pytest.mark.parametrize("name", MODULES)
def test_every_host_module_uses_the_fragment_and_the_shared_spec(name, monkeypatch):
    doc = _doc(name)
    spec = _argument_spec(name, monkeypatch)
    fragments = doc.get("extends_documentation_fragment", [])
    if name in HOST_MODULES:
        assert "carapace.fleet.host_layout" in fragments
        # the module documents none of the layout options itself: the fragment does, once
        assert not set(doc.get("options") or {}) & set(_layout.HOST_LAYOUT_ARGUMENT_SPEC)
        for option, option_spec in _layout.HOST_LAYOUT_ARGUMENT_SPEC.items():
            assert spec[option] == option_spec
    else:
        # controller-side modules (lock, report, release, notes) are not in the group and take no layout option
        assert "carapace.fleet.host_layout" not in fragments
        assert not set(spec) & set(_layout.HOST_LAYOUT_ARGUMENT_SPEC)


def test_the_fragment_documents_the_spec_and_the_group():
    doc = yaml.safe_load(ModuleDocFragment.DOCUMENTATION)
    assert set(doc["options"]) == set(_layout.HOST_LAYOUT_ARGUMENT_SPEC)
    for option, option_spec in _layout.HOST_LAYOUT_ARGUMENT_SPEC.items():
        assert doc["options"][option]["type"] == option_spec["type"]
        assert doc["options"][option].get("default") == option_spec.get("default")
    assert doc["attributes"]["action_group"]["membership"] == ["carapace.fleet.host"]


def test_the_role_defaults_match_the_module_defaults():
    names = {"bin_path": "cara_bin_path", "state_dir": "cara_state_dir", "install_root": "cara_install_root",
             "backup_dir": "cara_backup_dir"}
    for role in ("cara_upgrade", "cara_rollback"):
        with open(os.path.join(ROOT, "roles", role, "defaults", "main.yml"), encoding="utf-8") as handle:
            defaults = yaml.safe_load(handle)
        for option, variable in names.items():
            assert defaults[variable] == _layout.HOST_LAYOUT_ARGUMENT_SPEC[option]["default"]


def test_a_module_cannot_redefine_a_layout_option():
    with pytest.raises(ValueError, match="state_dir"):
        _layout.host_argument_spec(state_dir=dict(type="path", required=True))
    spec = _layout.host_argument_spec(tag=dict(type="str"))
    spec["bin_path"]["default"] = "/elsewhere"
    assert _layout.HOST_LAYOUT_ARGUMENT_SPEC["bin_path"]["default"] == "/usr/local/bin/cara"
