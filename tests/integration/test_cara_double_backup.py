"""Conformance of the `cara` double: `cara backup` (spec 1.4) and `cara restore` (spec 1.5), both flavors."""
import io
import json
import os
import re
import tarfile

import pytest

MARKER_RE = r"carapace-backup v1\ncreated=\d{8}T\d{6}Z\n"


@pytest.fixture
def host(cara_host):
    return cara_host


def seed_state(host):
    """State files as a stopped daemon leaves them (plus one memory file under $HOME)."""
    files = {
        "sessions/s1.json": '{"id": "s1"}\n', "sessions/s1.jsonl": '{"role": "user"}\n',
        "sessions/.crypto-manifest": "manifest\n", "sessions/s2.json": '{"id": "s2"}\n',
        "cron/jobs.json": '[{"id": "j1"}]\n',
        "tasks/queue.json": '[]\n',
        "usage.json": '{"version": 1, "totals": {"requests": 7}}\n',
        "updates/transaction.json": "{}\n", "audit.jsonl": "{}\n",
    }
    for name, text in files.items():
        (host.state / name).parent.mkdir(parents=True, exist_ok=True)
        (host.state / name).write_text(text)
    memory = host.home / ".config" / "carapace" / "memory"
    memory.mkdir(parents=True)
    (memory / "notes.md").write_text("remember\n")
    return files


def archive_names(path):
    with tarfile.open(path, "r:gz") as tar:
        return [m.name for m in tar.getmembers()]


def make_archive(path, entries, marker=True):
    """A hand-made tar.gz: entries is a list of (name, bytes or None for a directory)."""
    with tarfile.open(path, "w:gz") as tar:
        for name, data in ([(".carapace-backup", b"carapace-backup v1\ncreated=20260101T000000Z\n")] if marker else []) + entries:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


# -- backup --------------------------------------------------------------------------------------------------------

def test_backup_default_name_contents_and_report(host):
    seed_state(host)
    result = host.run("backup")
    assert result.returncode == 0 and result.stderr == ""
    lines = result.stdout.splitlines()
    match = re.fullmatch(r"  Path: \./(carapace-backup-\d{8}T\d{6}Z\.tar\.gz)", lines[1])
    assert lines[0] == "Backup created successfully" and match
    archive = host.root / match.group(1)
    size = archive.stat().st_size
    assert lines[2] == "  Size: %.1f KB (%d)" % (size / 1024, size) if size >= 1024 else "  Size: %d B (%d)" % (size, size)
    assert lines[3] == "  Included: sessions, config, memory, cron, tasks, usage"
    with tarfile.open(archive, "r:gz") as tar:
        first = tar.getmembers()[0]
        assert first.name == ".carapace-backup" and first.mode == 0o644 and first.isfile()
        assert re.fullmatch(MARKER_RE, tar.extractfile(first).read().decode())
        names = [m.name for m in tar.getmembers()]
        assert tar.extractfile("usage/usage.json").read() == (host.state / "usage.json").read_bytes()
    for name in ("sessions/s1.json", "sessions/s1.jsonl", "sessions/.crypto-manifest", "config/carapace.json5",
                 "memory/notes.md", "cron/jobs.json", "tasks/queue.json", "usage/usage.json"):
        assert name in names
    assert not [n for n in names if n.startswith(("updates", "audit", "daemon"))]


def test_backup_of_empty_state(host):
    host.config_file.unlink()
    out = host.root / "b.tar.gz"
    result = host.run("backup", "-o", str(out))
    assert result.returncode == 0 and result.stdout.splitlines()[3] == "  Included: (empty)"
    assert archive_names(out) == [".carapace-backup"]


def test_backup_output_flag(host):
    out = host.root / "x" / "b.tar.gz"
    out.parent.mkdir()
    result = host.run("backup", "--output", str(out))
    assert result.returncode == 0 and result.stdout.splitlines()[1] == "  Path: %s" % out
    assert archive_names(out)[0] == ".carapace-backup"


def test_backup_existing_output(host):
    out = host.root / "b.tar.gz"
    out.write_text("precious")
    result = host.run("backup", "-o", str(out))
    if host.flavor == "head":
        assert result.returncode == 1 and out.read_text() == "precious"
        assert result.stderr == ('Error: "refusing to overwrite existing file %s (pass --force to overwrite)"\n' % out)
        assert host.run("backup", "-o", str(out), "--force").returncode == 0
    else:  # v0.8.0 silently truncates and has no --force
        assert result.returncode == 0
        assert host.run("backup", "-o", str(out), "--force").returncode == 2
    assert archive_names(out)[0] == ".carapace-backup"


def test_backup_output_symlink(host):
    target = host.root / "target"
    target.write_text("t")
    link = host.root / "link.tar.gz"
    link.symlink_to(target)
    result = host.run("backup", "-o", str(link))
    if host.flavor == "head":
        assert result.returncode == 1 and "refusing to follow symlink at output path" in result.stderr
        assert target.read_text() == "t"
    else:
        assert result.returncode == 0 and archive_names(target)[0] == ".carapace-backup"


def test_backup_refuses_while_daemon_runs(host):
    proc = host.start()
    result = host.run("backup", "-o", str(host.root / "b.tar.gz"))
    if host.flavor == "head":
        assert result.returncode == 1
        assert result.stderr.startswith('Error: "refusing to back up state while daemon is running: ')
        assert not (host.root / "b.tar.gz").exists()
    else:  # v0.8.0 has no guard: it archives the state under the running daemon
        assert result.returncode == 0 and "Backup created successfully" in result.stdout
        assert archive_names(host.root / "b.tar.gz")[0] == ".carapace-backup"
    host.stop(proc)
    assert host.run("backup", "-o", str(host.root / "c.tar.gz")).returncode == 0


def test_daemon_running_detected_by_pid_file_alone(host):
    """No lock holder, but daemon.pid names a live process: still "running" (spec 2.3)."""
    host.state.mkdir(exist_ok=True)
    (host.state / "daemon.pid").write_text("%d\n" % os.getpid())
    result = host.run("backup", "-o", str(host.root / "b.tar.gz"))
    assert result.returncode == (1 if host.flavor == "head" else 0)
    (host.state / "daemon.pid").write_text("1\n")
    assert host.run("backup", "-o", str(host.root / "c.tar.gz")).returncode == 0


# -- restore -------------------------------------------------------------------------------------------------------

def test_restore_missing_file(host):
    result = host.run("restore", "nope.tar.gz")
    assert (result.returncode, result.stdout, result.stderr) == (1, "", "Backup file not found: nope.tar.gz\n")


def test_restore_requires_path(host):
    assert host.run("restore").returncode == 2


def test_restore_without_marker(host):
    archive = make_archive(host.root / "b.tar.gz", [("sessions/a.json", b"{}")], marker=False)
    result = host.run("restore", str(archive), "--force")
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == ("Invalid backup: archive does not contain a carapace backup marker.\n"
                             "The file may be corrupt or was not created by `cara backup`.\n")


@pytest.mark.parametrize("name", ["../evil.json", "/etc/evil.json", "sessions/../../evil.json"])
def test_restore_rejects_unsafe_paths(host, name):
    archive = make_archive(host.root / "b.tar.gz", [("sessions/ok.json", b"{}"), (name, b"x")])
    result = host.run("restore", str(archive), "--force")
    assert result.returncode == 1 and result.stderr == 'Error: "invalid path in backup: %s"\n' % name
    assert not (host.state / "sessions" / "ok.json").exists()


def test_restore_not_a_gzip(host):
    (host.root / "b.tar.gz").write_text("plain text")
    result = host.run("restore", str(host.root / "b.tar.gz"))
    assert result.returncode == 1 and result.stderr.startswith('Error: "failed to read backup archive')


def test_restore_without_force_only_prints_notice(host):
    seed_state(host)
    archive = host.root / "b.tar.gz"
    host.run("backup", "-o", str(archive))
    (host.state / "cron" / "jobs.json").write_text("changed\n")
    result = host.run("restore", str(archive))
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == ("This will overwrite existing data with the contents of: %s\n"
                             "Sections to restore: sessions, config, memory, cron, tasks, usage\n"
                             "Pass --force to proceed without this prompt.\n" % archive)
    assert (host.state / "cron" / "jobs.json").read_text() == "changed\n"


def test_restore_notice_for_marker_only_archive(host):
    archive = make_archive(host.root / "b.tar.gz", [])
    assert "Sections to restore: (none)\n" in host.run("restore", str(archive)).stderr
    result = host.run("restore", str(archive), "--force")
    assert result.stdout == "Restore completed successfully\n  Restored: (nothing)\n"


def test_restore_force_merges(host):
    seed_state(host)
    archive = host.root / "b.tar.gz"
    host.run("backup", "-o", str(archive))
    (host.state / "sessions" / "s1.json").write_text("corrupted")
    (host.state / "sessions" / "s2.json").unlink()
    (host.state / "sessions" / "new.json").write_text("kept")
    (host.state / "usage.json").write_text("{}")
    (host.home / ".config" / "carapace" / "memory" / "notes.md").unlink()
    result = host.run("restore", str(archive), "--force")
    assert result.returncode == 0 and result.stderr == ""
    assert result.stdout == ("Restore completed successfully\n"
                             "  Restored: sessions, config, memory, cron, tasks, usage\n  Sessions: 2\n")
    assert (host.state / "sessions" / "s1.json").read_text() == '{"id": "s1"}\n'
    assert (host.state / "sessions" / "s2.json").exists()
    assert (host.state / "sessions" / "new.json").read_text() == "kept"  # merge: nothing pruned
    assert (host.state / "usage.json").read_text().startswith('{"version": 1')
    assert (host.home / ".config" / "carapace" / "memory" / "notes.md").read_text() == "remember\n"


def test_restore_maps_sections_and_ignores_unknown(host):
    archive = make_archive(host.root / "b.tar.gz", [
        ("usage/", None), ("usage/usage.json", b"U"), ("usage/other.json", b"no"), ("config/renamed.json5", b"{}"),
        ("updates/transaction.json", b"no"), ("stray.txt", b"no"), ("tasks/deep/q.json", b"T")])
    result = host.run("restore", str(archive), "--force")
    assert result.stdout.splitlines()[1] == "  Restored: usage, config, tasks"
    assert (host.state / "usage.json").read_text() == "U"
    assert (host.state / "renamed.json5").read_text() == "{}"  # into the resolved config file's directory
    assert (host.state / "tasks" / "deep" / "q.json").read_text() == "T"
    assert not (host.state / "updates").exists() and not (host.state / "stray.txt").exists()


def test_restore_refuses_while_daemon_runs(host):
    archive = make_archive(host.root / "b.tar.gz", [("cron/jobs.json", b"restored")])
    host.start()
    result = host.run("restore", str(archive), "--force")
    if host.flavor == "head":
        assert result.returncode == 1
        assert result.stderr.startswith('Error: "refusing to restore state while daemon is running: ')
        assert not (host.state / "cron" / "jobs.json").exists()
    else:
        assert result.returncode == 0 and (host.state / "cron" / "jobs.json").read_text() == "restored"


def test_restore_symlinked_section_root(host, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (host.state / "cron").symlink_to(elsewhere)
    archive = make_archive(host.root / "b.tar.gz", [("cron/jobs.json", b"x")])
    result = host.run("restore", str(archive), "--force")
    if host.flavor == "head":
        assert result.returncode == 1 and "refusing to restore into symlinked directory" in result.stderr
        assert not (elsewhere / "jobs.json").exists()
    else:
        assert result.returncode == 0 and (elsewhere / "jobs.json").read_text() == "x"


def test_restore_symlinked_file(host, tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("safe")
    (host.state / "cron").mkdir()
    (host.state / "cron" / "jobs.json").symlink_to(victim)
    archive = make_archive(host.root / "b.tar.gz", [("cron/jobs.json", b"x")])
    result = host.run("restore", str(archive), "--force")
    assert result.returncode == (1 if host.flavor == "head" else 0)
    assert victim.read_text() == ("safe" if host.flavor == "head" else "x")


# -- the round trip of the rollback runbook ----------------------------------------------------------------------

def snapshot(host):
    """Every backed-up file, byte for byte (not the copies cara keeps of an unparsable queue)."""
    files = {}
    for section in ("sessions", "cron", "tasks"):
        for path in sorted((host.state / section).rglob("*")):
            if path.is_file() and ".corrupt." not in path.name:
                files[str(path.relative_to(host.state))] = path.read_bytes()
    files["usage.json"] = (host.state / "usage.json").read_bytes()
    files["config"] = host.config_file.read_bytes()
    return files


def test_round_trip_backup_corrupt_restore_start(host):
    host.write_config({"gateway": {"port": host.port, "control": {"enabled": True}, "auth": {"token": "t"}}})
    proc = host.start()
    assert host.run("verify", "--outcome", "autonomy").returncode == 0   # tasks/queue.json
    assert host.run("verify", "--outcome", "local-chat").returncode == 0  # sessions/, usage.json
    assert host.stop(proc) == 0
    before = snapshot(host)
    assert len([n for n in before if n.startswith("sessions/")]) == 2
    archive = host.root / "pre-upgrade.tar.gz"
    assert host.run("backup", "-o", str(archive)).returncode == 0
    (host.state / "tasks" / "queue.json").write_text("{garbage")
    for path in (host.state / "sessions").iterdir():
        path.unlink()
    (host.state / "usage.json").write_bytes(b"")
    failed = host.run("start")  # an unparsable task queue fails closed, and cara keeps a copy of it
    assert failed.returncode == 1 and "failed to parse current task queue file" in failed.stderr
    assert [p.read_text() for p in (host.state / "tasks").glob("queue.json.corrupt.*")] == ["{garbage"]
    result = host.run("restore", str(archive), "--force")
    assert result.returncode == 0 and "  Sessions: 1" in result.stdout
    proc = host.start()
    assert host.run("status").returncode == 0
    assert host.stop(proc) == 0
    assert snapshot(host) == before
    tasks = json.loads(before["tasks/queue.json"])
    assert [t["state"] for t in tasks] == ["done"]
