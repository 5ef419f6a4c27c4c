"""The shared module_utils pieces: the atomic-write helper (_atomic), the error base (_errors) and the one tag and
version API (_version) that _hostinfo, _backup, _transaction, _health and _switch use."""

import errno
import os
import stat

import pytest

from ansible_collections.carapace.fleet.plugins.module_utils import (
    _atomic, _backup, _cara, _download, _errors, _hostinfo, _lock, _notes, _release, _switch, _transaction,
    _transaction_model, _verify, _version)

# -- _atomic ------------------------------------------------------------------------------------------------------


def test_write_file_writes_with_mode_and_leaves_no_temp_file(tmp_path):
    target = tmp_path / "state.json"
    _atomic.write_file(str(target), "{}\n", mode=0o640)
    assert target.read_text() == "{}\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    _atomic.write_file(str(target), b"second", mode=0o600)
    assert target.read_bytes() == b"second" and stat.S_IMODE(target.stat().st_mode) == 0o600
    assert sorted(os.listdir(tmp_path)) == ["state.json"]


def test_write_file_fsyncs_the_file_before_the_rename_and_then_the_directory(tmp_path, monkeypatch):
    target = tmp_path / "index.json"
    events = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd):
        st = os.fstat(fd)
        events.append("fsync dir" if stat.S_ISDIR(st.st_mode) else "fsync file")
        return real_fsync(fd)

    def rename(*args, **kwargs):
        events.append("rename")
        return real_rename(*args, **kwargs)

    monkeypatch.setattr(_atomic.os, "fsync", fsync)
    monkeypatch.setattr(_atomic.os, "rename", rename)
    _atomic.write_file(str(target), "data")
    assert events == ["fsync file", "rename", "fsync dir"]
    assert target.read_text() == "data"


def test_write_file_refuses_a_symlinked_target_and_leaves_both_ends_alone(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("root's file")
    link = tmp_path / "index.json"
    link.symlink_to(victim)
    with pytest.raises(OSError) as info:
        _atomic.write_file(str(link), "planted")
    assert info.value.errno == errno.ELOOP
    assert victim.read_text() == "root's file"
    assert os.path.islink(link) and os.readlink(link) == str(victim)
    assert sorted(os.listdir(tmp_path)) == ["index.json", "victim"]


def test_replace_symlink_replaces_the_link_itself_never_its_target(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("root's file")
    link = tmp_path / "member"
    link.symlink_to(victim)
    _atomic.write_file(str(link), "restored", mode=0o600, replace_symlink=True)
    assert victim.read_text() == "root's file"
    assert not os.path.islink(link) and link.read_text() == "restored"


def test_a_failure_in_the_block_keeps_the_old_file_and_removes_the_temp_file(tmp_path):
    target = tmp_path / "report.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with _atomic.atomic_file(str(target), mode=0o644) as handle:
            handle.write(b"half")
            raise RuntimeError("stop")
    assert target.read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["report.json"]


def test_a_temp_name_planted_as_a_symlink_is_never_written_through(tmp_path, monkeypatch):
    victim = tmp_path / "victim"
    victim.write_text("root's file")
    names = iter(["planted", "fresh"])
    monkeypatch.setattr(_atomic, "_temp_name", lambda prefix, suffix: prefix + next(names) + suffix)
    os.symlink(str(victim), str(tmp_path / ".t.planted.tmp"))
    _atomic.write_file(str(tmp_path / "t"), "new")
    assert victim.read_text() == "root's file"
    assert (tmp_path / "t").read_text() == "new"


def test_dir_fd_relative_write_with_owner_and_mtime(tmp_path):
    fd = os.open(str(tmp_path), os.O_RDONLY | os.O_DIRECTORY)
    try:
        uid, gid = os.getuid(), os.getgid()
        _atomic.write_file("transaction.json", b"{}", mode=0o600, dir_fd=fd, owner=(uid, gid), mtime=1_000_000)
    finally:
        os.close(fd)
    st = os.stat(tmp_path / "transaction.json")
    assert (st.st_uid, st.st_gid, int(st.st_mtime)) == (uid, gid, 1_000_000)
    with pytest.raises(ValueError):
        _atomic.write_file("sub/x", b"", dir_fd=0)


def test_replace_with_symlink_swaps_atomically(tmp_path):
    link = tmp_path / "cara"
    _atomic.replace_with_symlink("releases/v0.8.0/cara", str(link), prefix=".cara.switch-")
    assert os.readlink(link) == "releases/v0.8.0/cara"
    _atomic.replace_with_symlink("releases/v0.9.0/cara", str(link), prefix=".cara.switch-")
    assert os.readlink(link) == "releases/v0.9.0/cara"
    assert sorted(os.listdir(tmp_path)) == ["cara"]


# -- _errors ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("make", [
    lambda: _backup.BackupError("tampered", "m", path="/x"),
    lambda: _transaction.TransactionError("lock_held", "m", retryable=True),
    lambda: _switch.SwitchError("bad_argument", "m"),
    lambda: _download.FetchError("timeout", "m"),
    lambda: _verify.VerifyError("malformed_bundle", "m"),
    lambda: _notes.NotesError("bad_source", "m"),
    lambda: _release.ReleaseError("digest_mismatch", "m", asset="cara-x86_64-linux"),
    lambda: _lock.LockHeld("m"),
    lambda: _cara.CaraError("m"),
], ids=["backup", "transaction", "switch", "fetch", "verify", "notes", "release", "lock", "cara"])
def test_every_error_is_a_fleet_error_with_cause_and_message(make):
    exc = make()
    assert isinstance(exc, _errors.FleetError)
    assert isinstance(exc.cause, str) and exc.cause
    assert exc.message == str(exc) == "m"


def test_error_subclasses_keep_their_own_facts():
    assert _backup.BackupError("tampered", "m", path="/x").extra == {"path": "/x"}
    err = _transaction.TransactionError("budget_exhausted", "m", transaction={"a": 1})
    assert (err.retryable, err.transaction, err.changed) == (False, {"a": 1}, False)
    assert _release.ReleaseError("x", "m", asset="a").asset == "a"
    assert _lock.LockHeld("m").cause == "lock_held" and _cara.CaraError("m").cause == "cara"


# -- _version: one API, one order -------------------------------------------------------------------------------------

ORDERED = ["v0.8.0", "v0.9.0-preview2", "v0.9.0-preview12", "v0.9.0-rc.1", "v0.9.0-rc.2", "v0.9.0-rc.10", "v0.9.0",
           "v0.9.1", "v0.10.0-preview1", "v0.10.0", "v1.0.0"]


def test_semver_order_a_preview_sorts_before_its_release():
    assert _version.compare("v0.9.0-rc.1", "v0.9.0") == -1
    assert _version.compare("0.9.0", "v0.9.0") == 0
    assert _version.sort_tags(reversed(ORDERED)) == ORDERED
    assert _version.parse_version("v0.9.0-rc.1").is_preview and not _version.parse_version("v0.9.0").is_preview


def test_hostinfo_and_version_agree_on_the_order_of_installed_releases(tmp_path):
    root = tmp_path / "install"
    names = list(reversed(ORDERED)) + ["nightly", "0.7.0"]
    for name in names:
        (root / "releases" / name).mkdir(parents=True)
        (root / "releases" / name / "cara").write_bytes(name.encode())
    listed = [r["tag"] for r in _hostinfo.kept_releases(str(root), str(tmp_path / "bin" / "cara"))]
    # versions in the order _version gives them (a bare 0.7.0 is a version too), then other names
    assert listed == ["0.7.0"] + ORDERED + ["nightly"]
    assert listed[:-1] == sorted(listed[:-1], key=_version.parse_version)
    assert listed == sorted(names, key=_version.sort_key)


def test_the_modules_tag_checks_are_the_version_api():
    for bad in ("0.9.0", "v0.9", "v0.9.0/..", "v01.0.0", " v0.9.0"):
        with pytest.raises(ValueError):
            _version.check_tag(bad)
        with pytest.raises(_backup.BackupError):
            _backup.check_tag(bad)
        with pytest.raises(ValueError):
            _verify.check_tag(bad)
    assert _backup.check_tag("v0.9.0-rc.1") == _verify.check_tag("v0.9.0-rc.1") == "v0.9.0-rc.1"
    assert _version.is_preview("v0.9.0-rc.1") and not _version.is_preview("v0.9.0")


def test_version_helpers_that_replaced_per_module_copies():
    assert _version.version_from_output("cara 0.9.0-rc.1\nbuilt ...") == "0.9.0-rc.1"
    assert _version.version_from_output("carapace 0.9.0") is None
    assert _version.bare_version(" V0.9.0 ") == "0.9.0" and _version.bare_version(None) is None
    assert _version.tag_for_version("0.9.0") == "v0.9.0" and _version.tag_for_version("0.9.0+x/y") == "v0.9.0_x_y"
    assert _version.normalize_version("v0.9.0") == "0.9.0"
    with pytest.raises(ValueError):
        _version.normalize_version("..")
    assert _transaction_model.staged_path("/s", "0.9.0+x").endswith("/updates/cara-0.9.0_x")
