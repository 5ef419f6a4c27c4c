"""module_utils/_hostinfo.py: facts of a host without cara, redaction, update markers, kept releases."""

import json
import os

from ansible_collections.carapace.fleet.plugins.module_utils import _cara, _hostinfo
from cara_double import build_release

TOKEN = "tok-0123456789abcdef"


def test_host_without_cara_reports_installed_false(tmp_path):
    facts = _hostinfo.gather(str(tmp_path / "bin" / "cara"), str(tmp_path / "state"),
                             install_root=str(tmp_path / "opt"), backup_dir=str(tmp_path / "backups"))
    assert facts["installed"] is False and facts["version"] is None and facts["sha256"] is None
    assert facts["state_dir_exists"] is False and facts["daemon"]["running"] is False
    assert facts["config"] == {} and facts["config_error"] is None and facts["gateway"]["port"] == 18789
    assert facts["transaction"] is None and facts["transaction_error"] is None
    assert facts["releases"] == [] and facts["backups"] == [] and facts["backups_error"] is None
    assert facts["state_size_mb"] == 0 and facts["disk_free_mb"] > 0


def test_redaction_covers_secret_keys_env_and_copies():
    cfg = {"gateway": {"port": 1, "auth": {"mode": "token", "token": TOKEN}, "hooks": {"token": "hook-secret-1"}},
           "env": {"ANTHROPIC_KEY": "sk-ant-xyz", "PLAIN": "also-redacted"},
           "channels": [{"botToken": "bot-123456"}], "notes": "the token is %s" % TOKEN}
    safe = _hostinfo.redact_config(cfg)
    text = json.dumps(safe)
    for secret in (TOKEN, "hook-secret-1", "sk-ant-xyz", "also-redacted", "bot-123456"):
        assert secret not in text
    # the whole auth subtree is redacted (issue 12 item 6); its mode is in the gateway facts
    assert safe["gateway"]["port"] == 1 and safe["gateway"]["auth"] == _cara.REDACTED
    assert cfg["gateway"]["auth"]["token"] == TOKEN  # the caller's dict is untouched


def test_installed_host_facts(tmp_path):
    release = tmp_path / "opt" / "releases" / "v0.9.0" / "cara"
    build_release("0.9.0", release)
    build_release("0.8.0", tmp_path / "opt" / "releases" / "v0.8.0" / "cara")
    (tmp_path / "bin").mkdir()
    os.symlink(release, tmp_path / "bin" / "cara")
    state = tmp_path / "state"
    (state / "updates").mkdir(parents=True)
    (state / "carapace.json5").write_text('{gateway: {port: 4242, control: {enabled: true}, auth: {token: "%s"}}}'
                                          % TOKEN)
    (state / "updates" / "transaction.json").write_text("{corrupt")
    (state / "updates" / "rollback.json").write_text(json.dumps({"startupState": "pending"}))
    (state / "updates" / "startup_health_failure.json").write_bytes(b" " * (70 * 1024))
    facts = _hostinfo.gather(str(tmp_path / "bin" / "cara"), str(state), install_root=str(tmp_path / "opt"),
                             backup_dir=str(tmp_path / "backups"))
    assert facts["installed"] is True and facts["version"] == "0.9.0" and facts["tag"] == "v0.9.0"
    assert facts["bin_is_symlink"] is True and facts["symlink_target"] == str(release)
    assert facts["real_path"] == str(release) and len(facts["sha256"]) == 64
    assert facts["gateway"] == {"port": 4242, "bind": "loopback", "control_enabled": True, "auth_mode": "token",
                                "hooks_enabled": False}
    assert TOKEN not in json.dumps(facts)
    assert facts["state_size_mb"] == 1  # the 70 KiB marker, rounded up
    assert facts["transaction"] is None and "corrupt" in facts["transaction_error"]
    assert facts["rollback_marker"] == {"startupState": "pending"}
    assert "larger than" in facts["startup_health_failure_error"]
    assert [(r["tag"], r["active"]) for r in facts["releases"]] == [("v0.8.0", False), ("v0.9.0", True)]
    assert facts["active_release"] == "v0.9.0"
    assert facts["switch"] is None and facts["switch_error"] is None
    record = {"active": {"tag": "v0.9.0"}, "previous": {"tag": "v0.8.0"}}
    (tmp_path / "opt" / "state.json").write_text(json.dumps(record))
    assert _hostinfo.gather(str(tmp_path / "bin" / "cara"), str(state), install_root=str(tmp_path / "opt"),
                            backup_dir=str(tmp_path / "backups"))["switch"] == record


def test_broken_binary_and_config_are_errors_not_failures(tmp_path):
    binary = tmp_path / "cara"
    binary.write_text("#!/bin/sh\necho nope\nexit 3\n")
    os.chmod(binary, 0o755)
    state = tmp_path / "state"
    state.mkdir()
    (state / "carapace.json5").write_text('{gateway: {auth: {token: "%s"' % TOKEN)
    (tmp_path / "backups").mkdir()
    (tmp_path / "backups" / "index.json").write_text("[]")
    facts = _hostinfo.gather(str(binary), str(state), install_root=str(tmp_path), backup_dir=str(tmp_path / "backups"))
    assert facts["installed"] is True and facts["version"] is None and "rc 3" in facts["version_error"]
    assert facts["config"] is None and facts["gateway"] is None and "does not parse" in facts["config_error"]
    assert TOKEN not in json.dumps(facts)
    assert "corrupt" in facts["backups_error"]
