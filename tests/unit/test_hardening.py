"""Regression tests of issue 12 (hardening): strict inputs, bounded work, no leaks.

Each test names the item of the issue it covers.
"""

import hashlib
import io
import json
import os
import pwd
import tarfile
import threading

import pytest

from ansible_collections.carapace.fleet.plugins.module_utils import (
    _backup, _backup_restore, _hostinfo, _lock, _switch, _transaction, _verify, _version)
from ansible_collections.carapace.fleet.plugins.module_utils._report import Report

RUN = {"id": "run-1", "kind": "upgrade", "target": "v0.9.0", "started": "2026-11-24T06:00:00Z"}


def _row(host, result="upgraded", **extra):
    base = {"host": host, "from": "v0.8.0", "to": "v0.9.0", "result": result, "phase": "applied", "downtime_s": 2.5,
            "rto_s": None, "sha256": "ab" * 32, "log_index": 7, "backup": "/var/backups/carapace/b.tar.gz"}
    base.update(extra)
    return base


# -- item 11: tag and version patterns match the whole string -------------------------------------------------------

@pytest.mark.parametrize("check", [_version.check_tag, _backup.check_tag, _switch.check_tag])
def test_item11_a_tag_with_a_trailing_newline_is_refused(check):
    assert check("v0.9.0") == "v0.9.0"
    with pytest.raises(Exception):
        check("v0.9.0\n")


def test_item11_tag_used_as_a_directory_name_keeps_its_exact_text():
    # parse_version strips command output on purpose; the tag checks behind paths do not
    assert _version.normalize_tag(" v0.9.0\n") == "v0.9.0"
    with pytest.raises(ValueError):
        _verify.release_identity("puremachinery/carapace", "v0.9.0\n")


def test_item11_repo_and_digest_patterns_match_the_whole_string():
    with pytest.raises(ValueError):
        _verify.check_repo("owner/name\n")
    assert _verify.parse_sha256sums("%s  cara\n" % ("a" * 64)) == {"cara": ["a" * 64]}
    assert _verify.parse_sha256sums("%s\n  cara\n" % ("a" * 64)) == {}


# -- item 8: a FIFO at src does not hang cara_switch ---------------------------------------------------------------

def _in_thread(func):
    """Run func in a thread; if it blocks, unblock a FIFO reader by opening the FIFO for writing, and say so."""
    outcome = {}

    def target():
        try:
            outcome["value"] = func()
        except Exception as exc:  # the test inspects what was raised
            outcome["error"] = exc

    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    worker.join(30)
    return worker, outcome


@pytest.mark.parametrize("state", ["present", "installed"])
def test_item8_a_fifo_at_src_is_refused_not_read(tmp_path, state):
    fifo = tmp_path / "cara-fifo"
    os.mkfifo(fifo)
    switcher = _switch.Switcher(str(tmp_path / "opt"), str(tmp_path / "cara"), version_of=lambda path: None)
    worker, outcome = _in_thread(lambda: switcher.present(str(fifo), "a" * 64, "v0.9.0", switch=state == "present"))
    if worker.is_alive():  # release the blocked open so the thread ends, then fail
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        worker.join(30)
        pytest.fail("cara_switch blocked opening the FIFO at src")
    assert isinstance(outcome.get("error"), _switch.SwitchError), outcome
    assert outcome["error"].cause == "not_a_file"
    assert "not a regular file" in outcome["error"].message


def test_item8_src_that_is_a_symlink_is_refused(tmp_path):
    real = tmp_path / "real"
    real.write_bytes(b"x")
    link = tmp_path / "link"
    os.symlink(real, link)
    with pytest.raises(_switch.SwitchError) as info:
        _switch.install_file(str(link), str(tmp_path / "dest" / "cara"), hashlib.sha256(b"x").hexdigest())
    assert info.value.cause == "not_a_file"


# -- item 9: deeply nested JSON is bad input, not a traceback --------------------------------------------------------

DEEP = b"[" * 20000 + b"]" * 20000                      # past the parser's recursion limit
DEEP_OBJECT = b'{"a": ' * 20000 + b"1" + b"}" * 20000
# parses, but nested deeper than any of our files, so copying or walking it recursively would fail later
MEDIUM = b'{"id": "x", "fleet": {"deep": ' + b"[" * 900 + b"]" * 900 + b"}}"


@pytest.mark.parametrize("content", [DEEP, DEEP_OBJECT, MEDIUM])
def test_item9_nested_transaction_is_corrupt_and_clear_force_removes_it(tmp_path, content):
    state = tmp_path / "state"
    (state / "updates").mkdir(parents=True, mode=0o700)
    path = state / "updates" / "transaction.json"
    path.write_bytes(content)
    path.chmod(0o600)
    with pytest.raises(_transaction.TransactionError) as info:
        _transaction.run(str(state), "clear")
    assert info.value.cause == "corrupt"
    result = _transaction.run(str(state), "clear", force=True)
    assert result["changed"] is True
    assert not path.exists()


@pytest.mark.parametrize("content", [DEEP, MEDIUM])
def test_item9_nested_backup_index_is_corrupt(tmp_path, content):
    (tmp_path / "index.json").write_bytes(content)
    with pytest.raises(_backup.BackupError) as info:
        _backup.read_index(str(tmp_path))
    assert info.value.cause == "index_corrupt"


@pytest.mark.parametrize("content", [DEEP, MEDIUM])
def test_item9_nested_switch_state_is_corrupt(tmp_path, content):
    switcher = _switch.Switcher(str(tmp_path / "opt"), str(tmp_path / "cara"), version_of=lambda path: None)
    os.makedirs(os.path.dirname(switcher.state_path))
    with open(switcher.state_path, "wb") as f:
        f.write(content)
    with pytest.raises(_switch.SwitchError) as info:
        switcher.read_state()
    assert info.value.cause == "corrupt_state"


@pytest.mark.parametrize("content", [DEEP, MEDIUM])
def test_item9_nested_lock_is_corrupt_and_taken_over(tmp_path, content):
    path = tmp_path / "run.lock"
    path.write_bytes(content)
    assert _lock.read(str(path))["corrupt"] is True


@pytest.mark.parametrize("content", [DEEP, MEDIUM])
def test_item9_nested_json_marker_is_reported_corrupt(tmp_path, content):
    path = tmp_path / "rollback.json"
    path.write_bytes(content)
    value, error = _hostinfo.read_json_marker(str(path))
    assert value is None and "corrupt" in error


# -- item 13: lock guards and temporary files are never opened through a symlink ------------------------------------

def test_item13_lock_guard_symlink_is_not_followed(tmp_path):
    path = tmp_path / "run.lock"
    planted = tmp_path / "planted-by-guard"
    os.symlink(planted, str(path) + ".guard")
    with pytest.raises(OSError):
        _lock.acquire(str(path), "run-1", os.getpid())
    assert not os.path.lexists(planted)
    with pytest.raises(OSError):
        _lock.release(str(path), "run-1")
    assert not os.path.lexists(planted)


def test_item13_lock_temp_file_symlink_is_not_followed(tmp_path):
    path = tmp_path / "run.lock"
    victim = tmp_path / "victim"
    victim.write_text("keep me\n")
    os.symlink(victim, "%s.%d.tmp" % (path, os.getpid()))  # the temp name the lock used to write through
    _lock.acquire(str(path), "run-1", os.getpid())
    assert victim.read_text() == "keep me\n"
    assert _lock.read(str(path))["run_id"] == "run-1"


def test_item13_report_lock_symlink_is_not_followed(tmp_path):
    planted = tmp_path / "planted-by-report"
    os.symlink(planted, tmp_path / ".report.lock")
    with pytest.raises(OSError):
        Report(str(tmp_path)).write(RUN, row=_row("a"))
    assert not os.path.lexists(planted)


def test_item13_switch_lock_symlink_is_not_followed(tmp_path):
    root = tmp_path / "opt"
    root.mkdir()
    planted = tmp_path / "planted-by-switch"
    os.symlink(planted, root / _switch.LOCK_FILE)
    switcher = _switch.Switcher(str(root), str(tmp_path / "cara"), version_of=lambda path: None)
    with pytest.raises(Exception):
        switcher.present(str(tmp_path / "missing"), "a" * 64, "v0.9.0")
    assert not os.path.lexists(planted)


# -- item 12: the fleet report keeps every host's row, and text cannot forge lines in report.md ---------------------

def test_item12_hosts_that_sanitise_alike_keep_their_own_rows(tmp_path):
    rep = Report(str(tmp_path))
    rep.write(RUN, row=_row("web/1", "failed", error="gate failed"))
    report, _changed = rep.write(RUN, row=_row("web_1"))
    assert sorted(h["host"] for h in report["hosts"]) == ["web/1", "web_1"]
    assert report["summary"]["failed"] == 1 and report["summary"]["ok"] is False
    assert "NEEDS ATTENTION" in (tmp_path / "report.md").read_text()
    # the same rows again change nothing
    assert rep.write(RUN, rows=[_row("web/1", "failed", error="gate failed"), _row("web_1")])[1] is False


def test_item12_newlines_in_host_names_or_errors_do_not_forge_report_lines(tmp_path):
    forged_host = "evil\n| other | v0.8.0 | v0.9.0 | upgraded | applied | - | - | - | - | - |"
    forged_error = "boom\n- outcome: OK\n\n## All good\r\n\x1b[2Jcleared"
    Report(str(tmp_path)).write(dict(RUN, id="run-7\n- outcome: OK"),
                                rows=[_row(forged_host, "failed", error=forged_error), _row("good")])
    lines = (tmp_path / "report.md").read_text().split("\n")
    assert [line for line in lines if line.startswith("- outcome:")] == ["- outcome: NEEDS ATTENTION"]
    assert not any(line.startswith("| other |") for line in lines)
    assert not any(line.startswith("## All good") for line in lines)
    assert "\r" not in "".join(lines) and "\x1b" not in "".join(lines)
    rows = [line for line in lines if line.startswith("| ") and "v0.9.0" in line]
    assert len(rows) == 2
    assert any("evil\\n" in line for line in rows)
    assert any(line.startswith("- **evil\\n") and "boom\\n- outcome: OK" in line for line in lines)


# -- item 6: cara_info leaks no secret -------------------------------------------------------------------------------

SECRET_CONFIG = """{
  gateway: {port: 18790, bind: "loopback", auth: {mode: "token", token: "tok-AAAA1"}, hooks: {token: "hook-BBBB2"}},
  secrets: {anything: "sec-CCCC3", nested: {deep: "sec-DDDD4"}, list: ["sec-EEEE5"]},
  credentials: {provider: {value: "cred-FFFF6"}},
  providers: {openai: {key: "key-GGGG7", headers: {Authorization: "Bearer auth-HHHH8"}, model: "gpt"}},
  tls: {cert: "-----BEGIN PRIVATE KEY-----\\nMIIpem-IIII9\\n-----END PRIVATE KEY-----\\n"},
  webhook: "https://alice:pw-JJJJ10@hooks.example.com/wake",
  note: "plain text",
}
"""
LEAKS = ["AAAA1", "BBBB2", "CCCC3", "DDDD4", "EEEE5", "FFFF6", "GGGG7", "HHHH8", "IIII9", "JJJJ10", "alice"]


def test_item6_cara_info_redacts_secret_subtrees_pem_blocks_and_url_credentials(tmp_path):
    state = tmp_path / "state"
    (state / "updates").mkdir(parents=True)
    (state / "carapace.json5").write_text(SECRET_CONFIG)
    (state / "updates" / "transaction.json").write_text(json.dumps(
        {"lastError": "download from https://alice:pw-JJJJ10@mirror.example.com/cara failed"}))
    facts = _hostinfo.gather(str(tmp_path / "bin" / "cara"), str(state), install_root=str(tmp_path / "opt"),
                             backup_dir=str(tmp_path / "backups"))
    text = json.dumps(facts)
    assert [leak for leak in LEAKS if leak in text] == []
    assert facts["config"]["note"] == "plain text"
    assert facts["config"]["providers"]["openai"]["model"] == "gpt"
    assert facts["config"]["webhook"].endswith("@hooks.example.com/wake")
    assert facts["gateway"]["port"] == 18790 and facts["gateway"]["auth_mode"] == "token"
    assert "mirror.example.com" in facts["transaction"]["lastError"]


def test_item6_config_errors_do_not_echo_url_credentials(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    (state / "carapace.json5").write_text('{gateway: {port: 1}, webhook: "https://alice:pw-JJJJ10@x.example.com/" ,,}')
    facts = _hostinfo.gather(str(tmp_path / "bin" / "cara"), str(state), install_root=str(tmp_path / "opt"),
                             backup_dir=str(tmp_path / "backups"))
    assert facts["config_error"]
    assert "JJJJ10" not in json.dumps(facts) and "alice" not in json.dumps(facts)


# -- item 2: root-safe restore ---------------------------------------------------------------------------------------

class _NoCara:
    """A CaraCLI stand-in that records what would have run: the refusals must come before `cara restore`."""

    binary = "/nonexistent/cara"

    def __init__(self, config_path):
        self.config_path = config_path
        self.calls = []

    def run(self, *args, **kwargs):
        self.calls.append(args)
        return {"rc": 0, "stdout": "Restore completed successfully\n  Restored: (nothing)\n", "stderr": ""}


def _foreign_owned(path):
    """Make `path` owned by a user other than root (as root: nobody); return that user's name (or uid)."""
    if os.geteuid() == 0:
        os.chown(path, 65534, 65534)
    uid = os.lstat(path).st_uid
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _cara_archive(path, members):
    marker = b"carapace-backup v1\ncreated=20260101T000000Z\n"
    with tarfile.open(path, "w:gz", format=tarfile.GNU_FORMAT) as tar:
        info = tarfile.TarInfo(".carapace-backup")
        info.size = len(marker)
        tar.addfile(info, io.BytesIO(marker))
        for name, kind, payload in members:
            info = tarfile.TarInfo(name)
            if kind == "file":
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
            else:
                info.type = tarfile.SYMTYPE if kind == "symlink" else tarfile.LNKTYPE
                info.linkname = payload
                tar.addfile(info)
    return str(path)


def _restore(tmp_path, state, archive_members=(("usage/usage.json", "file", b"{}\n"),)):
    backups = tmp_path / "backups"
    backups.mkdir(mode=0o700, exist_ok=True)
    archive = _cara_archive(backups / "b.tar.gz", archive_members)
    cli = _NoCara(str(state / "carapace.json5"))
    return cli, _backup_restore.HostRestore(cli, str(state), str(backups), backup=archive, allow_unindexed=True)


def test_item2_root_refuses_to_restore_over_a_state_dir_another_user_owns(tmp_path, monkeypatch):
    state = tmp_path / "state"
    state.mkdir()
    owner = _foreign_owned(state)
    monkeypatch.setattr(os, "geteuid", lambda: 0)  # what cara_restore sees when it runs as root
    cli, job = _restore(tmp_path, state)
    with pytest.raises(_backup.BackupError) as info:
        job.run()
    assert info.value.cause == "wrong_user"
    assert owner in info.value.message and "become" in info.value.message
    assert cli.calls == []


def test_item2_root_refuses_when_a_parent_of_the_state_dir_belongs_to_another_user(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    state = home / "state"
    state.mkdir()
    owner = _foreign_owned(home)  # its owner could swap state/ for a symlink at any time
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    cli, job = _restore(tmp_path, state)
    with pytest.raises(_backup.BackupError) as info:
        job.run()
    assert info.value.cause == "wrong_user" and owner in info.value.message and str(home) in info.value.message
    assert cli.calls == []


@pytest.mark.parametrize("kind,target", [("symlink", "a.json"), ("hardlink", "sessions/a.json")])
def test_item2_link_members_in_a_cara_archive_are_refused(tmp_path, kind, target):
    state = tmp_path / "state"
    state.mkdir()
    cli, job = _restore(tmp_path, state, [("sessions/a.json", "file", b"{}\n"), ("sessions/link", kind, target)])
    with pytest.raises(_backup.BackupError) as info:
        job.run()
    assert info.value.cause == "unsafe_member" and "sessions/link" in info.value.message
    assert cli.calls == []
