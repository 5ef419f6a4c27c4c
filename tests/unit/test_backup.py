"""module_utils/_backup.py: archive validation, the index, retention, refusals and the state snapshot round trip.

The `cara` used here is a release of the test double run as a CLI (no daemon), both flavors where they differ.
"""

import datetime
import fcntl
import io
import json
import os
import stat
import tarfile

import pytest

from ansible_collections.carapace.fleet.plugins.module_utils import _backup, _backup_restore, _cara
from cara_double import build_release

MARKER = b"carapace-backup v1\ncreated=20260101T000000Z\n"


def make_tar(path, members, marker=True):
    """members: (name, kind, payload); kind file|dir|symlink|hardlink|fifo|chr, payload bytes or link target."""
    with tarfile.open(path, "w:gz", format=tarfile.GNU_FORMAT) as tar:
        if marker:
            info = tarfile.TarInfo(".carapace-backup")
            info.size = len(MARKER)
            tar.addfile(info, io.BytesIO(MARKER))
        for name, kind, payload in members:
            info = tarfile.TarInfo(name)
            if kind == "file":
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
                continue
            info.type = {"dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE,
                         "fifo": tarfile.FIFOTYPE, "chr": tarfile.CHRTYPE}[kind]
            if kind in ("symlink", "hardlink"):
                info.linkname = payload
            tar.addfile(info)
    return str(path)


class Clock:
    """A `now` for HostBackup that advances one minute per call (distinct archive names and created times)."""

    def __init__(self):
        self.moment = datetime.datetime(2026, 8, 18, 10, 0, 0, tzinfo=datetime.timezone.utc)

    def __call__(self):
        self.moment += datetime.timedelta(minutes=1)
        return self.moment


@pytest.fixture(scope="module")
def releases(tmp_path_factory):
    root = tmp_path_factory.mktemp("releases")
    return {"head": str(build_release("0.9.0", root / "head" / "cara")),
            "v0.8.0": str(build_release("0.8.0", root / "v080" / "cara"))}


@pytest.fixture
def host(tmp_path, monkeypatch):
    """A stopped host's state dir, with files `cara backup` covers and files only the snapshot covers."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    state = tmp_path / "state"
    for sub in ("sessions", "tasks", "cron", "credentials", "updates", "matrix"):
        (state / sub).mkdir(parents=True)
    os.chmod(state, 0o700)
    files = {
        "carapace.json5": b'{gateway: {port: 18789, auth: {token: "tok-123456"}}}\n',
        "sessions/s1.json": b'{"id": "s1"}\n', "sessions/s1.jsonl": b'{"role": "user"}\n',
        "tasks/queue.json": b'{"schemaVersion": 1, "tasks": []}\n', "cron/jobs.json": b'{"version": 1, "jobs": []}\n',
        "usage.json": b'{"version": 1}\n', "credentials/index.json": b'{"creds": ["a"]}\n',
        "auth_profiles.json": b'{"profiles": {}}\n', "matrix/recovery.key": b"secret-key\n",
        "updates/transaction.json": b'{"state": "applied"}\n', "audit.jsonl": b'{"event": "gateway_start"}\n',
        "daemon.pid": b"999999\n", ".matrix-rekey.lock.lock": b"",
    }
    for rel, data in files.items():
        (state / rel).write_bytes(data)
        os.chmod(state / rel, 0o600)
    return state


def cli_for(binary, state):
    return _cara.CaraCLI(binary, str(state))


def tree(root):
    """{relative path: (bytes, mode)} of every regular file under root."""
    found = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            full = os.path.join(dirpath, name)
            found[os.path.relpath(full, root)] = (open(full, "rb").read(), stat.S_IMODE(os.lstat(full).st_mode))
    return found


# -- archive validation ------------------------------------------------------------------------------------------------

def test_valid_archive_manifest_and_sections(tmp_path):
    path = make_tar(tmp_path / "ok.tar.gz", [("sessions", "dir", None), ("sessions/a.json", "file", b"{}"),
                                             ("./tasks/queue.json", "file", b"[]"),
                                             ("sessions/link", "symlink", "a.json")])
    checked = _backup.validate_archive(path)
    assert checked["sections"] == ["sessions", "tasks"]
    assert checked["marker"].startswith("carapace-backup v1")
    assert _backup.file_manifest(checked["manifest"]) == {
        "sessions/a.json": "44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a",
        "tasks/queue.json": "4f53cda18c2baa0c0354bb5f9a3ecbe5ed12ab4d8e11ba873c2f11161202b945"}
    assert checked["manifest"]["sessions/link"]["type"] == "symlink"


@pytest.mark.parametrize("member", [
    ("../x", "file", b"evil"),
    ("sessions/../../x", "file", b"evil"),
    ("/etc/x", "file", b"evil"),
    ("C:/x", "file", b"evil"),
    ("sessions/out", "symlink", "../../etc/passwd"),
    ("sessions/abs", "symlink", "/etc/passwd"),
    ("sessions/empty", "symlink", ""),
    ("sessions/hard", "hardlink", "/etc/passwd"),
    ("sessions/hard", "hardlink", "../outside"),
    ("sessions/fifo", "fifo", None),
    ("sessions/dev", "chr", None),
], ids=["dotdot", "nested-dotdot", "absolute", "drive", "symlink-out", "symlink-abs", "symlink-empty",
        "hardlink-abs", "hardlink-dotdot", "fifo", "device"])
def test_unsafe_members_are_refused_and_nothing_is_written(tmp_path, member):
    path = make_tar(tmp_path / "bad.tar.gz", [("sessions/ok.json", "file", b"{}"), member])
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(_backup.BackupError) as info:
        _backup.validate_archive(path)
    assert info.value.cause == "unsafe_member"
    assert member[0] in info.value.message and "pick another backup" in info.value.message
    assert sorted(os.listdir(tmp_path)) == before


def test_marker_missing_and_corrupt_archives(tmp_path):
    path = make_tar(tmp_path / "nomarker.tar.gz", [("sessions/a.json", "file", b"{}")], marker=False)
    with pytest.raises(_backup.BackupError) as info:
        _backup.validate_archive(path)
    assert info.value.cause == "marker_missing"
    (tmp_path / "garbage.tar.gz").write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(_backup.BackupError) as info:
        _backup.validate_archive(str(tmp_path / "garbage.tar.gz"))
    assert info.value.cause == "invalid_archive"
    snapshot_like = make_tar(tmp_path / "snap.tar.gz", [("a", "file", b"x")])
    with pytest.raises(_backup.BackupError) as info:
        _backup.validate_archive(snapshot_like, _backup.SNAPSHOT_MARKER)
    assert info.value.cause == "marker_missing"


def test_links_refused_where_the_archive_kind_never_has_them(tmp_path):
    path = make_tar(tmp_path / "l.tar.gz", [("sessions/link", "symlink", "a.json")])
    with pytest.raises(_backup.BackupError) as info:
        _backup.validate_archive(path, allow_links=False)
    assert info.value.cause == "unsafe_member"


# -- backup dir and index ----------------------------------------------------------------------------------------------

def test_private_dir_created_tightened_and_refused(tmp_path):
    target = tmp_path / "a" / "backups"
    assert _backup.check_private_dir(str(target), check_mode=True) == [
        "would create backup directory %s (0700)" % target]
    assert not target.exists()
    _backup.check_private_dir(str(target))
    assert stat.S_IMODE(target.stat().st_mode) == 0o700
    os.chmod(target, 0o755)
    assert "from 0755 to 0700" in _backup.check_private_dir(str(target))[0]
    assert stat.S_IMODE(target.stat().st_mode) == 0o700
    assert _backup.check_private_dir(str(target)) == []

    link = tmp_path / "link"
    link.symlink_to(target)
    with pytest.raises(_backup.BackupError) as info:
        _backup.check_private_dir(str(link))
    assert info.value.cause == "unsafe_dir" and "symlink" in info.value.message
    (tmp_path / "file").write_text("x")
    with pytest.raises(_backup.BackupError):
        _backup.check_private_dir(str(tmp_path / "file"))


def test_foreign_owned_backup_dir_is_refused(tmp_path):
    if os.geteuid() == 0:
        foreign = tmp_path / "foreign"
        foreign.mkdir(mode=0o700)
        os.chown(foreign, 65534, 65534)
    else:
        foreign = "/"  # owned by root, not by us
    with pytest.raises(_backup.BackupError) as info:
        _backup.check_private_dir(str(foreign))
    assert info.value.cause == "unsafe_dir" and "owned by uid" in info.value.message


def test_index_round_trip_mode_and_corruption(tmp_path):
    assert _backup.read_index(str(tmp_path)) == {"format": 1, "backups": []}
    entry = {"path": str(tmp_path / "b.tar.gz"), "sha256": "a" * 64, "created_epoch": 20, "tag": "v0.9.0",
             "extra": {"kept": True}}
    older = dict(entry, path=str(tmp_path / "a.tar.gz"), created_epoch=10)
    _backup.write_index(str(tmp_path), {"format": 1, "backups": [entry, older]})
    index_file = tmp_path / "index.json"
    assert stat.S_IMODE(index_file.stat().st_mode) == 0o600
    index = _backup.read_index(str(tmp_path))
    assert [e["created_epoch"] for e in index["backups"]] == [10, 20]  # oldest first
    assert index["backups"][1]["extra"] == {"kept": True}
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]

    index_file.write_text("{not json")
    with pytest.raises(_backup.BackupError) as info:
        _backup.read_index(str(tmp_path))
    assert info.value.cause == "index_corrupt" and "move it aside" in info.value.message
    index_file.write_text(json.dumps({"backups": [{"path": "x", "sha256": "short", "created_epoch": 1, "tag": "v"}]}))
    with pytest.raises(_backup.BackupError):
        _backup.read_index(str(tmp_path))
    index_file.unlink()
    (tmp_path / "elsewhere.json").write_text(json.dumps({"backups": []}))
    index_file.symlink_to(tmp_path / "elsewhere.json")
    with pytest.raises(_backup.BackupError) as info:
        _backup.read_index(str(tmp_path))
    assert "symlink" in info.value.message


def test_retention_split_keeps_newest():
    entries = [{"created_epoch": n, "path": "p%d" % n} for n in (3, 1, 2, 5, 4)]
    kept, dropped = _backup.retention_split(entries, 2)
    assert [e["created_epoch"] for e in kept] == [4, 5]
    assert [e["created_epoch"] for e in dropped] == [1, 2, 3]


# -- HostBackup ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flavor", ["head", "v0.8.0"])
def test_backup_indexes_sha256_and_retention_removes_oldest(tmp_path, host, releases, flavor):
    backups = tmp_path / "backups"
    clock = Clock()
    results = [_backup.HostBackup(cli_for(releases[flavor], host), str(host), str(backups), retention=2,
                                  now=clock).run() for _unused in range(3)]
    tag = "v0.9.0" if flavor == "head" else "v0.8.0"
    paths = [r["backup"]["path"] for r in results]
    assert [os.path.basename(p) for p in paths] == ["carapace-backup-%s-20260818T10%02d00Z.tar.gz" % (tag, m)
                                                    for m in (1, 2, 3)]
    assert not os.path.exists(paths[0]) and results[2]["removed"] == [paths[0]]
    index = _backup.read_index(str(backups))
    assert [e["path"] for e in index["backups"]] == paths[1:]
    for entry in index["backups"]:
        assert _backup.sha256_file(entry["path"]) == (entry["sha256"], entry["size"])
        assert stat.S_IMODE(os.stat(entry["path"]).st_mode) == 0o600
        assert entry["sections"] == ["sessions", "config", "cron", "tasks", "usage"]
        assert entry["tag"] == tag and entry["snapshot"] is None
    assert stat.S_IMODE(backups.stat().st_mode) == 0o700
    assert results[2]["diff"] == {"before": {"backups": paths[:2]}, "after": {"backups": paths[1:]}}


def test_backup_check_mode_writes_nothing(tmp_path, host, releases):
    backups = tmp_path / "backups"
    result = _backup.HostBackup(cli_for(releases["head"], host), str(host), str(backups),
                                include_state_snapshot=True).run(check_mode=True)
    assert result["changed"] is True
    assert result["backup"]["path"].startswith(str(backups) + "/carapace-backup-v0.9.0-")
    assert result["backup"]["snapshot"]["path"].startswith(str(backups) + "/carapace-state-v0.9.0-")
    assert any(a.startswith("would run") for a in result["actions"])
    assert not backups.exists()


@pytest.mark.parametrize("flavor", ["head", "v0.8.0"])
def test_backup_refused_while_daemon_lock_is_held(tmp_path, host, releases, flavor):
    fd = os.open(str(host / ".matrix-rekey.lock.lock"), os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with pytest.raises(_backup.BackupError) as info:
            _backup.HostBackup(cli_for(releases[flavor], host), str(host), str(tmp_path / "b")).run()
        assert info.value.cause == "daemon_running" and "Stop the service first" in info.value.message
        assert not (tmp_path / "b").exists()
        warned = _backup.HostBackup(cli_for(releases[flavor], host), str(host), str(tmp_path / "b"))
        warned.run(check_mode=True)
        assert "daemon is running" in warned.warnings[0]
    finally:
        os.close(fd)


def test_symlinked_backup_dir_refused_by_backup_and_restore(tmp_path, host, releases):
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(_backup.BackupError) as info:
        _backup.HostBackup(cli_for(releases["head"], host), str(host), str(tmp_path / "link")).run()
    assert info.value.cause == "unsafe_dir"
    assert os.listdir(real) == []
    with pytest.raises(_backup.BackupError) as info:
        _backup_restore.HostRestore(cli_for(releases["head"], host), str(host), str(tmp_path / "link")).run()
    assert info.value.cause == "unsafe_dir"


def test_reuse_within_same_content_then_new_after_a_change(tmp_path, host, releases):
    backups = str(tmp_path / "backups")

    def run(**kwargs):
        return _backup.HostBackup(cli_for(releases["head"], host), str(host), backups, reuse_within=3600,
                                  **kwargs).run()
    first = run(include_state_snapshot=True)
    again = run(include_state_snapshot=True)
    assert again["changed"] is False and again["backup"]["path"] == first["backup"]["path"]
    without_snapshot_wanted = run()
    assert without_snapshot_wanted["changed"] is False
    (host / "credentials" / "index.json").write_text('{"creds": ["b"]}')  # only the snapshot covers it
    # the first entry's snapshot is stale now: never reused, even when no snapshot is asked for
    stale = run()
    assert stale["changed"] is True and stale["backup"]["snapshot"] is None
    changed = run(include_state_snapshot=True)
    assert changed["changed"] is True
    assert changed["backup"]["path"] not in (first["backup"]["path"], stale["backup"]["path"])
    (host / "tasks" / "queue.json").write_text('{"schemaVersion": 1, "tasks": [1]}')
    assert run()["changed"] is True
    assert len(_backup.read_index(backups)["backups"]) == 4


# -- HostRestore --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flavor", ["head", "v0.8.0"])
def test_snapshot_round_trip_is_byte_identical(tmp_path, host, releases, flavor):
    backups = str(tmp_path / "backups")
    cli = cli_for(releases[flavor], host)
    _backup.HostBackup(cli, str(host), backups, include_state_snapshot=True).run()
    before = tree(host)

    (host / "sessions" / "s1.json").write_text("corrupt")
    (host / "sessions" / "s1.jsonl").unlink()
    (host / "credentials" / "index.json").unlink()
    (host / "auth_profiles.json").write_text("{}")
    os.chmod(host / "matrix" / "recovery.key", 0o644)
    (host / "credentials" / "added-after.json").write_text("new")
    (host / "agents" / "deep").mkdir(parents=True)
    (host / "agents" / "deep" / "x").write_text("new")
    (host / "updates" / "transaction.json").write_text('{"state": "in_progress"}')
    (host / "audit.jsonl").write_text("appended later\n")

    plan = _backup_restore.HostRestore(cli, str(host), backups).run(check_mode=True)
    assert plan["changed"] is True and (host / "sessions" / "s1.json").read_text() == "corrupt"
    assert set(plan["snapshot"]["remove"]) == {"credentials/added-after.json", "agents/deep/x"}

    result = _backup_restore.HostRestore(cli, str(host), backups).run()
    assert result["changed"] is True
    assert result["restored"] == ["sessions", "config", "cron", "tasks", "usage"]
    after = tree(host)
    # the excluded files kept their newer content; everything else is the backup's, bytes and modes
    assert after.pop("updates/transaction.json")[0] == b'{"state": "in_progress"}'
    assert after.pop("audit.jsonl")[0] == b"appended later\n"
    before.pop("updates/transaction.json")
    before.pop("audit.jsonl")
    assert after == before
    assert not (host / "agents").exists()

    again = _backup_restore.HostRestore(cli, str(host), backups).run()
    assert again["changed"] is False and again["restored"] == []


def test_restore_refuses_tampered_unknown_and_running(tmp_path, host, releases):
    backups = tmp_path / "backups"
    cli = cli_for(releases["v0.8.0"], host)
    entry = _backup.HostBackup(cli, str(host), str(backups)).run()["backup"]
    (host / "tasks" / "queue.json").write_text("corrupt")

    copy = tmp_path / "copy.tar.gz"
    copy.write_bytes(open(entry["path"], "rb").read())
    with pytest.raises(_backup.BackupError) as info:
        _backup_restore.HostRestore(cli, str(host), str(backups), backup=str(copy)).run()
    assert info.value.cause == "unknown_backup" and "allow_unindexed" in info.value.message
    unindexed = _backup_restore.HostRestore(cli, str(host), str(backups), backup=str(copy), allow_unindexed=True)
    assert unindexed.run(check_mode=True)["changed"] is True

    with open(entry["path"], "ab") as handle:
        handle.write(b"tampered")
    with pytest.raises(_backup.BackupError) as info:
        _backup_restore.HostRestore(cli, str(host), str(backups)).run()
    assert info.value.cause == "tampered" and entry["sha256"] in info.value.message
    assert (host / "tasks" / "queue.json").read_text() == "corrupt"

    os.unlink(entry["path"])
    with pytest.raises(_backup.BackupError) as info:
        _backup_restore.HostRestore(cli, str(host), str(backups)).run()
    assert info.value.cause == "missing_archive"

    # v0.8.0's own restore has no guard: ours refuses while the daemon lock is held
    fd = os.open(str(host / ".matrix-rekey.lock.lock"), os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with pytest.raises(_backup.BackupError) as info:
            _backup_restore.HostRestore(cli, str(host), str(backups), backup=str(copy), allow_unindexed=True).run()
        assert info.value.cause == "daemon_running"
    finally:
        os.close(fd)
    assert (host / "tasks" / "queue.json").read_text() == "corrupt"
    restored = _backup_restore.HostRestore(cli, str(host), str(backups), backup=str(copy), allow_unindexed=True).run()
    assert restored["changed"] is True and "tasks" in restored["restored"]
    assert (host / "tasks" / "queue.json").read_text() == '{"schemaVersion": 1, "tasks": []}\n'


def test_unindexed_archive_with_traversal_is_refused_before_cara_runs(tmp_path, host, releases):
    evil = make_tar(tmp_path / "evil.tar.gz", [("sessions/../../../escape", "file", b"x")])
    with pytest.raises(_backup.BackupError) as info:
        _backup_restore.HostRestore(cli_for(releases["head"], host), str(host), str(tmp_path / "b"), backup=evil,
                                    allow_unindexed=True).run()
    assert info.value.cause == "unsafe_member"
    assert not (tmp_path / "escape").exists()


def test_latest_and_tag_selection(tmp_path, host, releases):
    backups = str(tmp_path / "backups")
    clock = Clock()
    old = _backup.HostBackup(cli_for(releases["v0.8.0"], host), str(host), backups, now=clock).run()["backup"]
    new = _backup.HostBackup(cli_for(releases["head"], host), str(host), backups, now=clock).run()["backup"]
    cli = cli_for(releases["head"], host)
    assert _backup_restore.HostRestore(cli, str(host), backups).select()[0]["path"] == new["path"]
    assert _backup_restore.HostRestore(cli, str(host), backups, tag="v0.8.0").select()[0]["path"] == old["path"]
    assert _backup_restore.HostRestore(cli, str(host), backups, backup=os.path.basename(old["path"])).select()[0] == old
    with pytest.raises(_backup.BackupError) as info:
        _backup_restore.HostRestore(cli, str(host), backups, tag="v0.7.0").select()
    assert info.value.cause == "no_backup"


def test_snapshot_restore_refuses_a_symlinked_state_subdir(tmp_path, host, releases):
    backups = str(tmp_path / "backups")
    cli = cli_for(releases["head"], host)
    _backup.HostBackup(cli, str(host), backups, include_state_snapshot=True).run()
    victim = tmp_path / "victim"
    victim.mkdir()
    for path in (host / "credentials").iterdir():
        path.unlink()
    (host / "credentials").rmdir()
    (host / "credentials").symlink_to(victim)
    with pytest.raises(_backup.BackupError) as info:
        _backup_restore.HostRestore(cli, str(host), backups).run()
    assert info.value.cause == "unsafe_dir" and "credentials" in info.value.message
    assert os.listdir(victim) == []


def test_snapshot_excludes_pid_locks_and_patterns(tmp_path, host):
    patterns = _backup.snapshot_patterns(["updates", "audit.jsonl"], str(host), str(host / "inner-backups"))
    assert patterns == ["daemon.pid", "*.lock", "updates", "audit.jsonl", "inner-backups"]
    manifest, skipped = _backup.walk_state(str(host), patterns)
    assert "daemon.pid" not in manifest and ".matrix-rekey.lock.lock" not in manifest
    assert not [n for n in manifest if n.startswith("updates")] and "audit.jsonl" not in manifest
    assert "credentials/index.json" in manifest and "auth_profiles.json" in manifest and skipped == []
    with pytest.raises(_backup.BackupError):
        _backup.snapshot_patterns([], str(host), str(host))


def test_parse_cara_backup_and_restore_output():
    backup = _cara.parse_backup_output("Backup created successfully\n  Path: /b/x.tar.gz\n  Size: 1.2 KB (1234)\n"
                                       "  Included: sessions, config, usage\n")
    assert backup == {"path": "/b/x.tar.gz", "size": 1234, "included": ["sessions", "config", "usage"]}
    assert _cara.parse_backup_output("  Included: (empty)\n")["included"] == []
    restore = _cara.parse_restore_output("Restore completed successfully\n  Restored: sessions, tasks\n  Sessions: 2\n")
    assert restore == {"restored": ["sessions", "tasks"], "sessions": 2}
    assert _cara.parse_restore_output("  Restored: (nothing)\n") == {"restored": [], "sessions": 0}
