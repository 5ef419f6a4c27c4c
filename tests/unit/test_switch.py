"""module_utils/_switch.py: verified installs, the atomic symlink switch, previous/retention, adoption, refusals."""

import hashlib
import json
import os
import stat
import threading

import pytest

from ansible_collections.carapace.fleet.plugins.module_utils import _switch
from ansible_collections.carapace.fleet.plugins.module_utils._switch import SwitchError, Switcher


def sha(data):
    return hashlib.sha256(data).hexdigest()


class Host:
    """install_root, bin dir and a staging dir under tmp_path; fake `cara --version` answers by content."""

    def __init__(self, tmp_path):
        self.root = tmp_path
        self.install_root = tmp_path / "opt" / "carapace"
        self.bin_dir = tmp_path / "bin"
        self.bin_dir.mkdir()
        self.bin_path = self.bin_dir / "cara"
        self.stage = tmp_path / "stage"
        self.stage.mkdir()
        self.versions = {}  # sha256 -> version that `--version` reports
        self.version_calls = []

    def release(self, version, data=None):
        data = data or ("#!/bin/sh\necho cara %s\n" % version).encode()
        path = self.stage / ("cara-" + version)
        if not path.exists() or path.read_bytes() != data:
            path.write_bytes(data)
        self.versions[sha(data)] = version
        return str(path), sha(data)

    def version_of(self, path):
        self.version_calls.append(path)
        with open(path, "rb") as f:
            return self.versions.get(sha(f.read()))

    def switcher(self, **kwargs):
        kwargs.setdefault("version_of", self.version_of)
        return Switcher(str(self.install_root), str(self.bin_path), **kwargs)

    def present(self, version, check_mode=False, **kwargs):
        src, digest = self.release(version)
        return self.switcher(check_mode=check_mode, **kwargs).present(src, digest, "v" + version)

    def link(self):
        return os.readlink(self.bin_path)

    def rel(self, tag):
        return str(self.install_root / "releases" / tag / "cara")

    def state(self):
        return json.loads((self.install_root / "state.json").read_text())

    def snapshot(self):
        """Every path under tmp_path but the staging dir, with its type, mode, link target or content digest."""
        out = {}
        for base, dirs, files in os.walk(self.root):
            if base == str(self.root) and "stage" in dirs:
                dirs.remove("stage")
            for name in dirs + files:
                path = os.path.join(base, name)
                st = os.lstat(path)
                if stat.S_ISLNK(st.st_mode):
                    out[path] = ("link", os.readlink(path))
                elif stat.S_ISDIR(st.st_mode):
                    out[path] = ("dir", st.st_mode)
                else:
                    with open(path, "rb") as f:
                        out[path] = ("file", st.st_mode, sha(f.read()), st.st_mtime_ns)
        return out

    def assert_no_backup_names(self):
        for base, dirs, files in os.walk(self.root):
            for name in dirs + files:
                low = name.lower()
                assert not low.endswith((".bak", ".old")), os.path.join(base, name)
        assert sorted(os.listdir(self.bin_dir)) == ["cara"]  # no temp links left either


@pytest.fixture
def host(tmp_path):
    return Host(tmp_path)


# -- install and switch ------------------------------------------------------------------------------------------

def test_first_install_switches_and_records(host):
    res = host.present("0.9.0")
    assert res["changed"] is True
    assert host.link() == host.rel("v0.9.0")
    installed = os.stat(host.rel("v0.9.0"))
    assert stat.S_IMODE(installed.st_mode) == 0o755 and installed.st_uid == os.getuid()
    assert stat.S_IMODE(os.stat(host.install_root / "state.json").st_mode) == 0o644
    state = host.state()
    assert state["active"] == {"tag": "v0.9.0", "sha256": host.release("0.9.0")[1], "path": host.rel("v0.9.0")}
    assert state["previous"] is None and state["schemaVersion"] == 1
    assert res["diff"]["before"]["kind"] == "missing" and res["diff"]["after"]["target"] == host.rel("v0.9.0")
    assert res["diff"]["after"]["sha256"] == host.release("0.9.0")[1]
    host.assert_no_backup_names()


def test_second_run_is_idempotent_and_writes_nothing(host):
    host.present("0.9.0")
    before = host.snapshot()
    res = host.present("0.9.0")
    assert res["changed"] is False and res["actions"] == []
    assert host.snapshot() == before
    assert res["diff"]["before"] == res["diff"]["after"]


def test_upgrade_records_previous_and_previous_switches_back_once(host):
    host.present("0.8.0")
    res = host.present("0.9.0")
    assert res["previous"]["tag"] == "v0.8.0" and res["active"]["tag"] == "v0.9.0"
    res = host.switcher().previous()
    assert res["changed"] is True and host.link() == host.rel("v0.8.0")
    assert res["active"]["tag"] == "v0.8.0" and res["previous"] is None and res["rolled_back_from"]["tag"] == "v0.9.0"
    before = host.snapshot()
    res = host.switcher().previous()  # idempotent: does not switch forward again
    assert res["changed"] is False and host.link() == host.rel("v0.8.0") and host.snapshot() == before
    # the next forward switch records the rolled-back-to release as previous again
    res = host.present("0.9.1")
    assert res["previous"]["tag"] == "v0.8.0" and res["rolled_back_from"] is None
    host.assert_no_backup_names()


def test_previous_without_a_record_refuses(host):
    host.present("0.9.0")
    with pytest.raises(SwitchError) as info:
        host.switcher().previous()
    assert info.value.cause == "no_previous" and "state=present" in info.value.message
    assert host.link() == host.rel("v0.9.0")


def test_previous_refuses_a_tampered_release(host):
    host.present("0.8.0")
    host.present("0.9.0")
    with open(host.rel("v0.8.0"), "ab") as f:
        f.write(b"# tampered\n")
    with pytest.raises(SwitchError) as info:
        host.switcher().previous()
    assert info.value.cause == "digest_mismatch"
    assert host.link() == host.rel("v0.9.0")


def test_previous_refuses_a_removed_release(host):
    host.present("0.8.0")
    host.present("0.9.0")
    os.unlink(host.rel("v0.8.0"))
    with pytest.raises(SwitchError) as info:
        host.switcher().previous()
    assert info.value.cause == "missing_release" and host.link() == host.rel("v0.9.0")


def test_installed_does_not_switch(host):
    host.present("0.8.0")
    src, digest = host.release("0.9.0")
    res = host.switcher().present(src, digest, "v0.9.0", switch=False)
    assert res["changed"] is True and host.link() == host.rel("v0.8.0")
    assert os.path.exists(host.rel("v0.9.0")) and host.state()["active"]["tag"] == "v0.8.0"
    res = host.switcher().present(src, digest, "v0.9.0", switch=False)
    assert res["changed"] is False


# -- fail closed ---------------------------------------------------------------------------------------------------

def test_src_digest_mismatch_refuses_and_changes_nothing(host):
    host.present("0.8.0")
    before = host.snapshot()
    src, _digest = host.release("0.9.0")
    before = host.snapshot()
    with pytest.raises(SwitchError) as info:
        host.switcher().present(src, "0" * 64, "v0.9.0")
    assert info.value.cause == "digest_mismatch" and "0" * 64 in info.value.message
    assert host.snapshot() == before and host.link() == host.rel("v0.8.0")
    assert not os.path.exists(host.install_root / "releases" / "v0.9.0")


def test_install_file_never_renames_a_mismatching_copy(host):
    src, digest = host.release("0.9.0")
    dest = host.install_root / "releases" / "v0.9.0" / "cara"
    with pytest.raises(SwitchError):
        _switch.install_file(src, str(dest), "f" * 64)
    assert os.listdir(dest.parent) == []  # no temp file, no dest
    assert _switch.install_file(src, str(dest), digest) == digest and os.listdir(dest.parent) == ["cara"]


def test_a_tampered_installed_copy_is_replaced_from_src(host):
    host.present("0.9.0")
    with open(host.rel("v0.9.0"), "ab") as f:
        f.write(b"# tampered\n")
    res = host.present("0.9.0")
    assert res["changed"] is True and any("replacing a copy" in a for a in res["actions"])
    assert _switch.hash_file(host.rel("v0.9.0")) == host.release("0.9.0")[1]


def test_missing_src_is_fine_only_when_already_installed(host):
    src, digest = host.release("0.9.0")
    host.switcher().present(src, digest, "v0.9.0")
    os.unlink(src)
    assert host.switcher().present(src, digest, "v0.9.0")["changed"] is False
    with pytest.raises(SwitchError) as info:
        host.switcher().present(src, "a" * 64, "v0.9.1")
    assert info.value.cause == "missing_src"


@pytest.mark.parametrize("bad", [{"tag": "../etc"}, {"tag": ".hidden"}, {"tag": "v1/2"}, {"sha256": "abc"}])
def test_bad_arguments_refused(host, bad):
    src, digest = host.release("0.9.0")
    args = dict(src=src, sha256=digest, tag="v0.9.0")
    args.update(bad)
    with pytest.raises(SwitchError) as info:
        host.switcher().present(**args)
    assert info.value.cause == "bad_argument" and not os.path.exists(host.install_root / "releases")


def test_corrupt_state_refuses_and_leaves_the_link(host):
    host.present("0.8.0")
    (host.install_root / "state.json").write_text("{not json")
    with pytest.raises(SwitchError) as info:
        host.present("0.9.0")
    assert info.value.cause == "corrupt_state" and host.link() == host.rel("v0.8.0")


def test_bin_path_directory_refused(host):
    host.bin_path.mkdir()
    with pytest.raises(SwitchError) as info:
        host.present("0.9.0")
    assert info.value.cause == "bin_path_not_a_file"


# -- check mode ----------------------------------------------------------------------------------------------------

def test_check_mode_predicts_without_touching_anything(host):
    host.present("0.8.0")
    before = host.snapshot()
    res = host.present("0.9.0", check_mode=True)
    assert res["changed"] is True and all(a.startswith("would ") for a in res["actions"])
    assert host.snapshot() == before
    assert res["diff"]["after"]["target"] == host.rel("v0.9.0") and res["diff"]["before"]["target"] == host.rel("v0.8.0")
    assert res["active"]["tag"] == "v0.9.0" and res["previous"]["tag"] == "v0.8.0"
    assert res["releases"] == ["v0.8.0", "v0.9.0"]
    real = host.present("0.9.0")
    assert [a[len("would "):] for a in res["actions"]] == real["actions"]
    assert real["diff"]["after"] == dict(res["diff"]["after"])


def test_check_mode_previous(host):
    host.present("0.8.0")
    host.present("0.9.0")
    before = host.snapshot()
    res = host.switcher(check_mode=True).previous()
    assert res["changed"] is True and host.snapshot() == before
    assert res["diff"]["after"]["target"] == host.rel("v0.8.0")


def test_check_mode_with_src_not_yet_there_warns(host):
    res = host.switcher(check_mode=True).present(str(host.stage / "absent"), "b" * 64, "v0.9.0")
    assert res["changed"] is True and "does not exist" in res["warnings"][0]
    assert not os.path.exists(host.install_root)


# -- adoption of a manual install --------------------------------------------------------------------------------

def test_regular_file_bin_path_is_adopted_as_previous(host):
    manual = b"#!/bin/sh\necho cara 0.8.0 manual\n"
    host.bin_path.write_bytes(manual)
    os.chmod(host.bin_path, 0o755)
    host.versions[sha(manual)] = "0.8.0"
    res = host.present("0.9.0")
    assert res["adopted"] == {"tag": "v0.8.0", "sha256": sha(manual), "version": "0.8.0", "from": str(host.bin_path)}
    assert res["previous"]["tag"] == "v0.8.0" and os.path.islink(host.bin_path)
    with open(host.rel("v0.8.0"), "rb") as f:
        assert f.read() == manual
    assert stat.S_IMODE(os.stat(host.rel("v0.8.0")).st_mode) == 0o755
    host.assert_no_backup_names()
    host.switcher().previous()
    assert host.link() == host.rel("v0.8.0")


def test_adoption_of_an_unknown_binary_uses_its_digest(host):
    manual = b"not cara at all\n"
    host.bin_path.write_bytes(manual)
    res = host.present("0.9.0")
    assert res["adopted"]["tag"] == "unknown-" + sha(manual)[:8] and res["adopted"]["version"] is None
    assert os.path.exists(host.rel("unknown-" + sha(manual)[:8]))


def test_adoption_does_not_overwrite_a_different_release_of_the_same_version(host):
    host.present("0.8.0")
    state = host.state()
    os.unlink(host.bin_path)
    manual = b"#!/bin/sh\necho cara 0.8.0 (a local build)\n"
    host.bin_path.write_bytes(manual)
    host.versions[sha(manual)] = "0.8.0"
    res = host.present("0.9.0")
    tag = "v0.8.0-" + sha(manual)[:8]
    assert res["adopted"]["tag"] == tag and res["previous"]["tag"] == tag
    assert _switch.hash_file(host.rel("v0.8.0")) == state["active"]["sha256"]  # untouched


def test_adopting_the_same_binary_as_the_target_is_not_a_previous(host):
    src, digest = host.release("0.9.0")
    with open(src, "rb") as f:
        host.bin_path.write_bytes(f.read())
    res = host.switcher().present(src, digest, "v0.9.0")
    assert res["adopted"]["tag"] == "v0.9.0" and res["previous"] is None and host.link() == host.rel("v0.9.0")


def test_check_mode_adoption_touches_nothing(host):
    host.bin_path.write_bytes(b"#!/bin/sh\n")
    before = host.snapshot()
    res = host.present("0.9.0", check_mode=True)
    assert res["adopted"] is not None and host.snapshot() == before and not os.path.islink(host.bin_path)


# -- retention ----------------------------------------------------------------------------------------------------

def age(host, tag, seconds_ago):
    path = host.rel(tag)
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns - seconds_ago * 10 ** 9))


def test_retention_removes_oldest_beyond_keep(host):
    for i, version in enumerate(["0.6.0", "0.7.0", "0.8.0"]):
        host.present(version)
        age(host, "v" + version, 100 - i)
    res = host.present("0.9.0", keep=3)
    assert res["removed"] == ["v0.6.0"] and res["releases"] == ["v0.7.0", "v0.8.0", "v0.9.0"]
    assert not os.path.exists(host.install_root / "releases" / "v0.6.0")


def test_retention_never_removes_active_or_previous(host):
    host.present("0.7.0")
    host.present("0.8.0")
    age(host, "v0.8.0", 1000)  # previous is the oldest by far
    res = host.present("0.9.0", keep=1)
    assert res["removed"] == ["v0.7.0"]
    assert sorted(res["releases"]) == ["v0.8.0", "v0.9.0"]
    host.switcher(keep=1).previous()
    assert host.link() == host.rel("v0.8.0")


def test_check_mode_predicts_retention(host):
    for version in ["0.6.0", "0.7.0", "0.8.0"]:
        host.present(version)
    before = host.snapshot()
    res = host.present("0.9.0", check_mode=True, keep=2)
    assert res["removed"] == ["v0.6.0", "v0.7.0"] and host.snapshot() == before
    assert res["releases"] == ["v0.8.0", "v0.9.0"]
    assert any(a.startswith("would remove old release") for a in res["actions"])


def test_keep_must_be_positive(host):
    with pytest.raises(SwitchError):
        host.switcher(keep=0)


# -- atomicity and recovery ----------------------------------------------------------------------------------

def test_switch_is_atomic_under_concurrent_readers(host):
    a_src, a_digest = host.release("0.8.0")
    b_src, b_digest = host.release("0.9.0")
    host.switcher().present(a_src, a_digest, "v0.8.0")
    host.switcher().present(b_src, b_digest, "v0.9.0", switch=False)
    targets = {host.rel("v0.8.0"), host.rel("v0.9.0")}
    stop = threading.Event()
    seen, errors = set(), []

    def reader():
        while not stop.is_set():
            try:
                seen.add(os.readlink(host.bin_path))
                with open(host.bin_path, "rb") as f:
                    f.read(1)
            except OSError as exc:  # a missing bin_path, even for an instant, lands here
                errors.append(exc)

    threads = [threading.Thread(target=reader) for _unused in range(2)]
    for thread in threads:
        thread.start()
    try:
        for i in range(300):
            _switch.switch_link(str(host.bin_path), host.rel("v0.9.0" if i % 2 == 0 else "v0.8.0"))
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert errors == []
    assert seen == targets
    host.assert_no_backup_names()


def test_stale_temp_links_from_a_killed_run_are_removed(host):
    host.present("0.8.0")
    stale = host.bin_dir / ".cara.switch-deadbeef0000"
    os.symlink(host.rel("v0.8.0"), stale)
    res = host.present("0.9.0")
    assert not os.path.lexists(stale) and any("stale temporary link" in a for a in res["actions"])
    host.assert_no_backup_names()


def test_link_switched_but_state_not_written_is_reconciled(host):
    host.present("0.8.0")
    src, digest = host.release("0.9.0")
    host.switcher().present(src, digest, "v0.9.0", switch=False)
    _switch.switch_link(str(host.bin_path), host.rel("v0.9.0"))  # a run killed right after the rename
    res = host.switcher().present(src, digest, "v0.9.0")
    assert res["changed"] is True and res["active"]["tag"] == "v0.9.0" and res["previous"]["tag"] == "v0.8.0"
    assert host.switcher().present(src, digest, "v0.9.0")["changed"] is False


def test_symlink_outside_install_root_is_adopted(host):
    outside = host.root / "elsewhere" / "cara"
    outside.parent.mkdir()
    outside.write_bytes(b"#!/bin/sh\necho cara 0.7.0\n")
    host.versions[sha(outside.read_bytes())] = "0.7.0"
    os.symlink(outside, host.bin_path)
    res = host.present("0.9.0")
    assert res["adopted"]["tag"] == "v0.7.0" and res["previous"]["tag"] == "v0.7.0"
    assert outside.exists()  # the foreign file is copied, never moved or deleted


def test_history_keeps_the_release_before_after_a_switch_back(host):
    """v0.8.0 -> v0.9.0 -> v0.9.1, switched back to v0.9.0: the history still names v0.8.0 (issue 13 item 3), and a
    second switch back changes nothing."""
    host.present("0.8.0")
    host.present("0.9.0")
    res = host.present("0.9.1")
    assert [r["tag"] for r in res["history"]] == ["v0.9.0", "v0.8.0"]
    res = host.switcher().previous()
    assert res["active"]["tag"] == "v0.9.0" and res["previous"] is None
    assert [r["tag"] for r in res["history"]] == ["v0.8.0"]
    assert host.state()["history"][0] == {"tag": "v0.8.0", "sha256": host.release("0.8.0")[1], "path": host.rel("v0.8.0")}
    before = host.snapshot()
    assert host.switcher().previous()["changed"] is False and host.snapshot() == before
    # back to v0.8.0 as a named release from its kept copy: the history then names v0.9.0
    res = host.switcher().present(host.rel("v0.8.0"), host.release("0.8.0")[1], "v0.8.0")
    assert res["active"]["tag"] == "v0.8.0" and res["previous"]["tag"] == "v0.9.0"
    assert [r["tag"] for r in res["history"]] == ["v0.9.0"]


def test_a_state_file_without_history_is_not_rewritten(host):
    host.present("0.8.0")
    host.present("0.9.0")
    state = host.state()
    del state["history"]
    (host.install_root / "state.json").write_text(json.dumps(state))
    res = host.present("0.9.0")
    assert res["changed"] is False
