# -*- coding: utf-8 -*-
# Copyright: carapace.fleet maintainers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Backups of a Carapace host and their restore (cara-contract.md sections 1.4, 1.5, 2.3; shared/design.md).

Domain logic only (no Ansible imports); `cara` runs through a `_cara.CaraCLI` whose runner the caller passes.

On disk, in a private backup directory (0700, owned by the euid, never a symlink):
- `carapace-backup-<tag>-<UTC YYYYMMDDTHHMMSSZ>.tar.gz`: written by `cara backup -o`, then validated (marker,
  safe member paths) and made 0600;
- optionally `carapace-state-<tag>-<UTC>.tar.gz`: a full snapshot of the state dir (what `cara backup` leaves out:
  credentials/, auth_profiles.json, matrix/, ...), minus the daemon's pid and lock files and the `snapshot_exclude`
  patterns; made by this file, first member `.carapace-fleet-state-snapshot`;
- `index.json` (0600, written tmp + fsync + rename under the flock `.index.lock`): one entry per backup with
  sha256, size, tag, creation time, path, the content digest of the archive, and the snapshot's own facts.

Nothing in an archive is trusted before its recorded sha256 and every member path are checked, and archives are
never unpacked with tarfile's extract: `cara restore` reads the cara archive, this file writes snapshot members one
by one (tmp + rename, no symlink followed).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import fnmatch
import hashlib
import json
import os
import posixpath
import pwd
import re
import stat
import tarfile
import tempfile
import time

from ansible_collections.carapace.fleet.plugins.module_utils import _cara, _safejson
from ansible_collections.carapace.fleet.plugins.module_utils._digest import sha256_file

CARA_MARKER = ".carapace-backup"
SNAPSHOT_MARKER = ".carapace-fleet-state-snapshot"
INDEX_NAME = "index.json"
INDEX_LOCK = ".index.lock"
INDEX_FORMAT = 1
MAX_INDEX_BYTES = 16 * 1024 * 1024
# Never part of a snapshot and never touched by a snapshot restore: the live daemon's pid file and every flock
# sentinel (`.matrix-rekey.lock.lock`, `updates/update.lock.lock`).
ALWAYS_EXCLUDED = ("daemon.pid", "*.lock")
# Left out by default: updates/ belongs to the update in progress (transaction.json, rollback.json, staged
# binaries); putting an older transaction.json back could make cara resume an update at its next start
# (shared/design.md). audit.jsonl is evidence and is never rolled back.
DEFAULT_SNAPSHOT_EXCLUDE = ("updates", "audit.jsonl")
CARA_SECTIONS = ("sessions", "config", "memory", "cron", "tasks", "usage")
_CHUNK = 1 << 20
DIFF_LIMIT = 200  # paths shown in a restore's diff
_HEX64 = re.compile(r"[0-9a-f]{64}")
_UNSAFE_VERSION_CHARS = re.compile(r"[^A-Za-z0-9._-]")
# The release-tag shape of _verify.check_tag, repeated here so host-side modules do not import sigstore.
_TAG_RE = re.compile(r"v(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)(-[0-9A-Za-z][0-9A-Za-z.-]*)?")


class BackupError(Exception):
    """A refusal or failure with a machine-readable cause and a message naming the cause and the next step."""

    def __init__(self, cause, message, **extra):
        super().__init__(message)
        self.cause = cause
        self.message = message
        self.extra = extra


# -- time, names, digests ------------------------------------------------------------------------------------------

def utc_now():
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)


def utc_stamp(moment):
    return moment.strftime("%Y%m%dT%H%M%SZ")


def iso(moment):
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def check_tag(tag):
    """Raise BackupError(bad_argument) unless tag is a release tag, vMAJOR.MINOR.PATCH[-pre]."""
    if not isinstance(tag, str) or not _TAG_RE.fullmatch(tag):
        raise BackupError("bad_argument", "tag %r is not a Carapace release tag: expected vMAJOR.MINOR.PATCH, e.g. "
                          "v0.9.0 (previews: v0.9.0-preview1)." % (tag,))
    return tag


def tag_for_version(version):
    """`0.9.0` -> `v0.9.0`; characters a file name should not carry become `_`."""
    tag = version if version.startswith("v") else "v" + version
    return _UNSAFE_VERSION_CHARS.sub("_", tag)


def archive_names(tag, stamp, index):
    """Archive and snapshot file names; `-<n>` is appended when that second's name is already taken."""
    return ("carapace-backup-%s-%s%s.tar.gz" % (tag, stamp, "-%d" % index if index else ""),
            "carapace-state-%s-%s%s.tar.gz" % (tag, stamp, "-%d" % index if index else ""))


def hash_nofollow(path):
    """(sha256 hex, size) of a regular file, refusing to follow a symlink in the last component."""
    return sha256_file(path, follow=False)


def content_digest(manifest, with_dirs_and_modes=False):
    """sha256 over a manifest {name: {"type", "sha256", "mode"}}: regular files' names and contents, and with
    `with_dirs_and_modes` also directories and permission bits (the snapshot's byte-identical contract)."""
    digest = hashlib.sha256()
    for name in sorted(manifest):
        entry = manifest[name]
        if entry["type"] == "file":
            row = ["f", name, entry["sha256"]] + ([entry["mode"]] if with_dirs_and_modes else [])
        elif entry["type"] == "dir" and with_dirs_and_modes:
            row = ["d", name, entry["mode"]]
        else:
            continue
        digest.update(json.dumps(row).encode("utf-8") + b"\n")
    return digest.hexdigest()


# -- archive validation --------------------------------------------------------------------------------------------

def normalize_member(name):
    """A tar member name as a relative POSIX path without `.` components ("" for the archive root)."""
    return "/".join(part for part in name.split("/") if part not in ("", "."))


def unsafe_path_reason(name):
    """Why an archive path could write outside its root, or None when it is safe (relative, no `..`, no drive)."""
    if not name:
        return "empty name"
    if name.startswith("/"):
        return "absolute path"
    if re.match(r"^[A-Za-z]:", name):
        return "drive-letter path"
    if ".." in name.split("/"):
        return "`..` component"
    return None


def _member_problem(member, norm):
    """Why a member makes an archive unsafe, or None."""
    reason = unsafe_path_reason(member.name)
    if reason:
        return reason
    if member.issym():
        target = member.linkname
        if not target or target.startswith("/"):
            return "symlink to absolute path %r" % target
        resolved = posixpath.normpath(posixpath.join(posixpath.dirname(norm), target))
        if resolved == ".." or resolved.startswith("../"):
            return "symlink pointing outside the archive (%r)" % target
        return None
    if member.islnk():
        reason = unsafe_path_reason(member.linkname)
        return "hard link to %s (%r)" % (reason, member.linkname) if reason else None
    if member.isfile() or member.isdir():
        return None
    return "special file (device, fifo or other non-regular member)"


def validate_archive(path, marker=CARA_MARKER, allow_links=True):
    """Read a tar.gz without extracting it; refuse unsafe members; require `marker` as a regular file.

    Returns {"manifest": {name: {"type", "mode", "size", "sha256", "uid", "gid", "mtime"}}, "sections": [...],
    "marker": text of the marker, "members": n}. Raises BackupError (invalid_archive, unsafe_member, marker_missing).
    """
    manifest, sections, marker_text, count = {}, [], None, 0
    try:
        with tarfile.open(path, "r:gz") as tar:
            for member in tar:
                count += 1
                norm = normalize_member(member.name)
                problem = _member_problem(member, norm)
                if problem is None and not allow_links and (member.issym() or member.islnk()):
                    problem = "link member (this kind of archive never holds links)"
                if problem:
                    raise BackupError("unsafe_member", "%s holds an unsafe member %r: %s. Nothing was restored from it. "
                                      "Do not use this archive; pick another backup." % (path, member.name, problem),
                                      member=member.name)
                if not norm:
                    continue  # the archive root "./"
                entry = {"type": "dir" if member.isdir() else "file" if member.isfile() else
                         "symlink" if member.issym() else "hardlink",
                         "mode": member.mode & 0o7777, "size": member.size if member.isfile() else 0,
                         "uid": member.uid, "gid": member.gid, "mtime": int(member.mtime), "sha256": None}
                if member.isfile():
                    digest = hashlib.sha256()
                    handle = tar.extractfile(member)
                    data = b""
                    for chunk in iter(lambda: handle.read(_CHUNK), b""):
                        digest.update(chunk)
                        if norm == marker and len(data) < 65536:
                            data += chunk
                    entry["sha256"] = digest.hexdigest()
                    if norm == marker:
                        marker_text = data.decode("utf-8", "replace")
                manifest[norm] = entry
                section = norm.split("/", 1)[0]
                if "/" in norm and section in CARA_SECTIONS and section not in sections:
                    sections.append(section)
    except BackupError:
        raise
    except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
        raise BackupError("invalid_archive", "%s is not a readable tar.gz archive (%s). It may be truncated or "
                          "corrupt; pick another backup." % (path, exc))
    if marker not in manifest or manifest[marker]["type"] != "file":
        maker = "`cara backup`" if marker == CARA_MARKER else "cara_backup's state snapshot"
        raise BackupError("marker_missing", "%s has no %s marker, so it was not made by %s. Nothing was restored "
                          "from it; pick a backup made by cara_backup." % (path, marker, maker))
    manifest.pop(marker)
    return {"manifest": manifest, "sections": sections, "marker": marker_text, "members": count}


def file_manifest(manifest):
    """{name: sha256} of the regular files of a manifest."""
    return {name: e["sha256"] for name, e in manifest.items() if e["type"] == "file"}


# -- the private backup directory and its index --------------------------------------------------------------------

def check_private_dir(path, check_mode=False):
    """Make `path` a private directory: refuse a symlink, a non-directory or a foreign owner; create it 0700 or
    tighten its mode to 0700. Returns the actions taken (or, in check mode, that would be taken)."""
    verb = "would " if check_mode else ""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        if not check_mode:
            parent = os.path.dirname(path.rstrip("/")) or "."
            os.makedirs(parent, mode=0o755, exist_ok=True)
            os.mkdir(path, 0o700)
            os.chmod(path, 0o700)
        return ["%screate backup directory %s (0700)" % (verb, path)]
    if stat.S_ISLNK(st.st_mode):
        raise BackupError("unsafe_dir", "backup directory %s is a symlink; refusing to follow it (backups hold "
                          "secrets). Point backup_dir at a real directory owned by uid %d." % (path, os.geteuid()))
    if not stat.S_ISDIR(st.st_mode):
        raise BackupError("unsafe_dir", "backup directory %s exists and is not a directory. Move it away or choose "
                          "another backup_dir." % path)
    if st.st_uid != os.geteuid():
        raise BackupError("unsafe_dir", "backup directory %s is owned by uid %d, not by uid %d that runs the task; "
                          "refusing to use it. chown it to uid %d (mode 0700) or choose another backup_dir."
                          % (path, st.st_uid, os.geteuid(), os.geteuid()))
    if stat.S_IMODE(st.st_mode) != 0o700:
        if not check_mode:
            os.chmod(path, 0o700)
        return ["%schange mode of %s from %04o to 0700" % (verb, path, stat.S_IMODE(st.st_mode))]
    return []


def check_trusted_dir(path):
    """Read side of check_private_dir: an index is only trusted in a real directory that nobody else can write
    (owned by the euid or root, no group/other write bit). A missing directory passes (it has no index)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise BackupError("unsafe_dir", "backup directory %s is a symlink or not a directory; refusing to trust an "
                          "index there. Point backup_dir at the real directory cara_backup wrote." % path)
    if st.st_uid not in (os.geteuid(), 0) or st.st_mode & 0o022:
        raise BackupError("unsafe_dir", "backup directory %s (uid %d, mode %04o) can be written by others, so its "
                          "index cannot be trusted; refusing to restore from it. Make it owned by uid %d with mode "
                          "0700, check its content, then run the restore again."
                          % (path, st.st_uid, stat.S_IMODE(st.st_mode), os.geteuid()))


def _valid_entry(entry):
    return (isinstance(entry, dict) and isinstance(entry.get("path"), str) and isinstance(entry.get("sha256"), str)
            and _HEX64.fullmatch(entry["sha256"]) and isinstance(entry.get("created_epoch"), int)
            and isinstance(entry.get("tag"), str))


def read_index(backup_dir):
    """The index of backup_dir ({"format": 1, "backups": [oldest ... newest]}); empty when absent.

    Raises BackupError(index_corrupt) for a symlink, an oversized file or content that is not a valid index.
    """
    path = os.path.join(backup_dir, INDEX_NAME)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        return {"format": INDEX_FORMAT, "backups": []}
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise BackupError("index_corrupt", "%s is a symlink; refusing to read it. Remove the symlink; the "
                              "archives in %s are untouched." % (path, backup_dir))
        raise BackupError("index_corrupt", "cannot read %s: %s. Check its permissions." % (path, exc.strerror))
    with os.fdopen(fd, "rb") as handle:
        data = handle.read(MAX_INDEX_BYTES + 1)
    problem = None
    if len(data) > MAX_INDEX_BYTES:
        problem = "larger than %d bytes" % MAX_INDEX_BYTES
    else:
        try:
            index = _safejson.loads(data.decode("utf-8"))
        except ValueError as exc:
            problem = "not JSON (%s)" % exc
        else:
            if not isinstance(index, dict) or not isinstance(index.get("backups"), list):
                problem = "not an object with a `backups` list"
            elif not all(_valid_entry(e) for e in index["backups"]):
                problem = "an entry lacks path, tag, a 64-hex sha256 or an integer created_epoch"
    if problem:
        raise BackupError("index_corrupt", "backup index %s is corrupt: %s. Nothing was changed. Inspect it, then "
                          "repair it or move it aside (the archives next to it stay usable with allow_unindexed)."
                          % (path, problem))
    index["backups"].sort(key=lambda e: e["created_epoch"])
    return index


def write_index(backup_dir, index):
    """Atomically replace backup_dir/index.json (tmp + fsync + rename, 0600)."""
    path = os.path.join(backup_dir, INDEX_NAME)
    fd, tmp = tempfile.mkstemp(dir=backup_dir, prefix=".%s." % INDEX_NAME, suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            os.fchmod(handle.fileno(), 0o600)
            handle.write(json.dumps(index, indent=2, sort_keys=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(backup_dir)


def _fsync_dir(path):
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def index_lock(backup_dir):
    """Hold the flock backup_dir/.index.lock (serialises runs that write the same index)."""
    fd = os.open(os.path.join(backup_dir, INDEX_LOCK), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _own_file(backup_dir, path):
    """True when path is a regular file directly inside backup_dir (never a symlink or something elsewhere)."""
    if not path or os.path.dirname(os.path.abspath(path)) != os.path.abspath(backup_dir):
        return False
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def retention_split(entries, keep):
    """(kept, dropped): the newest `keep` entries stay."""
    ordered = sorted(entries, key=lambda e: e["created_epoch"])
    cut = max(len(ordered) - keep, 0)
    return ordered[cut:], ordered[:cut]


def remove_entry_files(backup_dir, entry):
    """Delete an entry's archive and snapshot (only regular files inside backup_dir); returns the removed paths."""
    removed = []
    for path in (entry.get("path"), (entry.get("snapshot") or {}).get("path")):
        if _own_file(backup_dir, path):
            os.unlink(path)
            removed.append(path)
    return removed


def find_entry(index, path):
    """The index entry for an archive path (compared after resolving both), or None."""
    wanted = os.path.realpath(path)
    for entry in reversed(index["backups"]):
        if os.path.realpath(entry["path"]) == wanted:
            return entry
    return None


def latest_entry(index, tag=None):
    candidates = [e for e in index["backups"] if tag is None or e["tag"] == tag]
    return candidates[-1] if candidates else None


# -- what `cara backup` covers, on disk --------------------------------------------------------------------------

def memory_dir(home=None):
    """Agent memory: always $HOME/.config/carapace/memory (section 2.1 exception)."""
    return os.path.join(home or os.path.expanduser("~"), ".config", "carapace", "memory")


def _walk_files(root, prefix):
    """{prefix/relative: absolute path} of the regular files under root (symlinks neither followed nor listed)."""
    found = {}
    if not os.path.isdir(root) or os.path.islink(root):
        return found
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        rel = os.path.relpath(dirpath, root)
        for name in sorted(filenames):
            full = os.path.join(dirpath, name)
            if stat.S_ISREG(os.lstat(full).st_mode):
                found[posixpath.join(prefix, *(() if rel == "." else rel.split(os.sep)), name)] = full
    return found


def cara_sources(state_dir, config_file, home=None):
    """{archive name: path} of every file `cara backup` puts in its archive (section 1.4 step 3)."""
    files = _walk_files(os.path.join(state_dir, "sessions"), "sessions")
    if config_file and os.path.isfile(config_file):
        files["config/" + os.path.basename(config_file)] = config_file
    files.update(_walk_files(memory_dir(home), "memory"))
    files.update(_walk_files(os.path.join(state_dir, "cron"), "cron"))
    files.update(_walk_files(os.path.join(state_dir, "tasks"), "tasks"))
    usage = os.path.join(state_dir, "usage.json")
    if os.path.isfile(usage) and not os.path.islink(usage):
        files["usage/usage.json"] = usage
    return files


def cara_restore_target(name, state_dir, config_file, home=None):
    """Where `cara restore` writes an archive member (section 1.5 step 6); None for entries it ignores."""
    section, _unused, rest = name.partition("/")
    if not rest:
        return None
    if section in ("sessions", "cron", "tasks"):
        return os.path.join(state_dir, section, *rest.split("/"))
    if section == "memory":
        return os.path.join(memory_dir(home), *rest.split("/"))
    if section == "config":
        return os.path.join(os.path.dirname(config_file), *rest.split("/"))
    if section == "usage" and rest == "usage.json":
        return os.path.join(state_dir, "usage.json")
    return None


def disk_file_manifest(sources):
    """{archive name: sha256} for {archive name: path}."""
    return {name: hash_nofollow(path)[0] for name, path in sources.items()}


def cara_differences(files, state_dir, config_file, home=None):
    """The archive files whose restore target does not hold the same bytes: [{"name", "target", "before"}]."""
    differences = []
    for name in sorted(files):
        target = cara_restore_target(name, state_dir, config_file, home)
        if target is None:
            continue
        try:
            st = os.lstat(target)
            before = hash_nofollow(target)[0] if stat.S_ISREG(st.st_mode) else "not a regular file"
        except FileNotFoundError:
            before = None
        if before != files[name]:
            differences.append({"name": name, "target": target, "before": before, "after": files[name]})
    return differences


# -- state snapshots -------------------------------------------------------------------------------------------------

def excluded(rel, patterns):
    """True when rel (POSIX, relative to the state dir) or one of its parents matches an exclusion pattern."""
    parts = rel.split("/")
    for depth in range(1, len(parts) + 1):
        prefix = "/".join(parts[:depth])
        if any(fnmatch.fnmatchcase(prefix, pattern) for pattern in patterns):
            return True
    return False


def walk_state(state_dir, patterns, with_hashes=True):
    """(manifest, skipped): directories and regular files under state_dir not excluded by `patterns`, and the
    relative paths of what a snapshot cannot hold (symlinks, sockets, fifos)."""
    manifest, skipped = {}, []
    if not os.path.isdir(state_dir):
        return manifest, skipped
    for dirpath, dirnames, filenames in os.walk(state_dir, followlinks=False):
        rel_dir = os.path.relpath(dirpath, state_dir)
        base = () if rel_dir == "." else tuple(rel_dir.split(os.sep))
        for name in sorted(dirnames):
            rel = "/".join(base + (name,))
            st = os.lstat(os.path.join(dirpath, name))
            if excluded(rel, patterns):
                dirnames.remove(name)
            elif stat.S_ISLNK(st.st_mode):
                dirnames.remove(name)
                skipped.append(rel)
            else:
                manifest[rel] = {"type": "dir", "mode": stat.S_IMODE(st.st_mode), "uid": st.st_uid, "gid": st.st_gid}
        for name in sorted(filenames):
            rel = "/".join(base + (name,))
            if excluded(rel, patterns):
                continue
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            if not stat.S_ISREG(st.st_mode):
                skipped.append(rel)
                continue
            manifest[rel] = {"type": "file", "mode": stat.S_IMODE(st.st_mode), "uid": st.st_uid, "gid": st.st_gid,
                             "size": st.st_size, "sha256": hash_nofollow(full)[0] if with_hashes else None}
    return manifest, sorted(skipped)


class _HashingReader:
    def __init__(self, handle):
        self.handle = handle
        self.digest = hashlib.sha256()

    def read(self, size=-1):
        data = self.handle.read(size)
        self.digest.update(data)
        return data


def create_snapshot(state_dir, dest, patterns, meta):
    """Write a tar.gz of state_dir (minus `patterns`) to dest atomically (tmp in dest's dir + rename, 0600).

    Returns (manifest, skipped) of what went in: the same shapes as walk_state.
    """
    directory = os.path.dirname(dest)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".carapace-state-", suffix=".tmp")
    manifest, skipped = walk_state(state_dir, patterns, with_hashes=False)
    try:
        with os.fdopen(fd, "wb") as raw:
            with tarfile.open(fileobj=raw, mode="w:gz", format=tarfile.PAX_FORMAT) as tar:
                marker = (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode("utf-8")
                info = tarfile.TarInfo(SNAPSHOT_MARKER)
                info.size, info.mode, info.mtime = len(marker), 0o600, int(time.time())
                tar.addfile(info, _BytesReader(marker))
                for rel in sorted(manifest):
                    entry = manifest[rel]
                    full = os.path.join(state_dir, *rel.split("/"))
                    info = tarfile.TarInfo(rel)
                    info.mode, info.uid, info.gid = entry["mode"], entry["uid"], entry["gid"]
                    if entry["type"] == "dir":
                        info.type = tarfile.DIRTYPE
                        info.mtime = int(os.lstat(full).st_mtime)
                        tar.addfile(info)
                        continue
                    handle_fd = os.open(full, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_NONBLOCK", 0))
                    with os.fdopen(handle_fd, "rb") as handle:
                        st = os.fstat(handle.fileno())
                        info.size, info.mtime = st.st_size, int(st.st_mtime)
                        reader = _HashingReader(handle)
                        tar.addfile(info, reader)
                    entry["sha256"] = reader.digest.hexdigest()
                    entry["size"] = st.st_size
            raw.flush()
            os.fsync(raw.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return manifest, skipped


class _BytesReader:
    def __init__(self, data):
        self.data = data
        self.offset = 0

    def read(self, size=-1):
        end = len(self.data) if size is None or size < 0 else self.offset + size
        chunk = self.data[self.offset:end]
        self.offset += len(chunk)
        return chunk


def _symlinked_parent(state_dir, rel):
    """The first existing component of rel's parents (inside state_dir) that is a symlink, or None."""
    parts = rel.split("/")
    for depth in range(1, len(parts)):
        path = os.path.join(state_dir, *parts[:depth])
        if os.path.islink(path):
            return path
    return None


def plan_snapshot_restore(state_dir, snap_manifest, patterns):
    """What makes state_dir equal to the snapshot for everything the snapshot covers.

    Returns {"write": [rel], "chmod": [rel], "mkdir": [rel], "remove": [rel], "rmdir": [rel]} (files whose bytes
    differ or are missing, mode-only differences, missing directories, covered files and directories the snapshot
    does not have). Raises BackupError(unsafe_dir) where a symlink sits on a path the snapshot needs.
    """
    if os.path.islink(state_dir):
        raise BackupError("unsafe_dir", "state_dir %s is a symlink; refusing to restore a snapshot through it. Make "
                          "it a real directory owned by the daemon's user." % state_dir)
    current, _skipped = walk_state(state_dir, patterns)
    plan = {"write": [], "chmod": [], "mkdir": [], "remove": [], "rmdir": []}
    for rel, want in sorted(snap_manifest.items()):
        link = _symlinked_parent(state_dir, rel)
        if link:
            raise BackupError("unsafe_dir", "%s is a symlink inside state_dir; refusing to restore the snapshot "
                              "through it. Remove the symlink (cara itself refuses symlinked state directories), "
                              "then run the restore again." % link)
        full = os.path.join(state_dir, *rel.split("/"))
        have = current.get(rel)
        if want["type"] == "dir":
            if os.path.islink(full):
                raise BackupError("unsafe_dir", "%s is a symlink where the snapshot has a directory; refusing to "
                                  "follow it. Remove the symlink, then run the restore again." % full)
            if have is None or have["type"] != "dir":
                plan["mkdir"].append(rel)
                if have is not None:
                    plan["remove"].append(rel)
            elif have["mode"] != want["mode"]:
                plan["chmod"].append(rel)
        else:
            if have is None or have["type"] != "file" or have["sha256"] != want["sha256"]:
                plan["write"].append(rel)
                if have is not None and have["type"] == "dir":
                    plan["rmdir"].append(rel)
            elif have["mode"] != want["mode"]:
                plan["chmod"].append(rel)
    for rel, have in current.items():
        if rel not in snap_manifest:
            plan["rmdir" if have["type"] == "dir" else "remove"].append(rel)
    plan["rmdir"] = sorted(set(plan["rmdir"]), key=lambda r: (-r.count("/"), r))
    plan["remove"] = sorted(set(plan["remove"]))
    return plan


def plan_empty(plan):
    return not any(plan.values())


def apply_snapshot_restore(state_dir, snapshot_path, snap_manifest, plan):
    """Carry out plan_snapshot_restore's plan, reading file contents from the (already verified) snapshot."""
    if not os.path.isdir(state_dir):
        os.makedirs(state_dir, mode=0o700)
    root_owner = os.geteuid() == 0
    for rel in plan["remove"]:
        full = os.path.join(state_dir, *rel.split("/"))
        if os.path.islink(full) or (os.path.lexists(full) and not os.path.isdir(full)):
            os.unlink(full)
    for rel in plan["rmdir"]:
        full = os.path.join(state_dir, *rel.split("/"))
        if os.path.isdir(full) and not os.path.islink(full):
            try:
                os.rmdir(full)
            except OSError as exc:
                if exc.errno in (errno.ENOTEMPTY, errno.EEXIST) and rel in plan["write"]:
                    raise BackupError("restore_incomplete", "cannot replace directory %s with the snapshot's file: "
                                      "it holds files the snapshot does not cover (excluded paths or symlinks). "
                                      "Move them away, then run the restore again." % full)
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
    for rel in sorted(plan["mkdir"], key=lambda r: r.count("/")):
        full = os.path.join(state_dir, *rel.split("/"))
        if not os.path.isdir(full):
            os.mkdir(full, 0o700)
        _set_meta(full, snap_manifest[rel], root_owner, directory=True)
    wanted = set(plan["write"])
    if wanted:
        with tarfile.open(snapshot_path, "r:gz") as tar:
            for member in tar:
                rel = normalize_member(member.name)
                if rel not in wanted or not member.isfile():
                    continue
                full = os.path.join(state_dir, *rel.split("/"))
                parent = os.path.dirname(full)
                if not os.path.isdir(parent):
                    os.makedirs(parent, mode=0o700)
                _write_member(tar, member, full, snap_manifest[rel], root_owner)
                wanted.discard(rel)
    if wanted:
        raise BackupError("restore_incomplete", "the snapshot %s lacks %s although its listing had them; it changed "
                          "while restoring. Run the restore again." % (snapshot_path, ", ".join(sorted(wanted))))
    for rel in plan["chmod"]:
        full = os.path.join(state_dir, *rel.split("/"))
        _set_meta(full, snap_manifest[rel], root_owner, directory=snap_manifest[rel]["type"] == "dir")


def _write_member(tar, member, full, entry, root_owner):
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(full), prefix=".%s." % os.path.basename(full), suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            source = tar.extractfile(member)
            digest = hashlib.sha256()
            for chunk in iter(lambda: source.read(_CHUNK), b""):
                digest.update(chunk)
                handle.write(chunk)
            if digest.hexdigest() != entry["sha256"]:
                raise BackupError("tampered", "member %s of the snapshot changed while restoring it. Nothing more was "
                                  "written; run the restore again." % member.name)
            os.fchmod(handle.fileno(), entry["mode"])
            if root_owner:
                os.fchown(handle.fileno(), entry["uid"], entry["gid"])
            handle.flush()
            os.fsync(handle.fileno())
        os.utime(tmp, (entry["mtime"], entry["mtime"]))
        os.replace(tmp, full)  # replaces a symlink at `full` itself, never its target
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _set_meta(full, entry, root_owner, directory=False):
    flags = os.O_RDONLY | os.O_NOFOLLOW | (getattr(os, "O_DIRECTORY", 0) if directory else getattr(os, "O_NONBLOCK", 0))
    fd = os.open(full, flags)
    try:
        os.fchmod(fd, entry["mode"])
        if root_owner:
            os.fchown(fd, entry["uid"], entry["gid"])
    finally:
        os.close(fd)


def snapshot_manifest_from_archive(validated):
    """The snapshot manifest (files and directories with modes, owners and mtimes) from validate_archive."""
    return {name: e for name, e in validated["manifest"].items() if e["type"] in ("file", "dir")}


def snapshot_patterns(excludes, state_dir, backup_dir):
    """The full exclusion list: ALWAYS_EXCLUDED, the caller's patterns, and backup_dir when it is inside state_dir."""
    patterns = list(ALWAYS_EXCLUDED) + [p.strip("/") for p in excludes if p and p.strip("/")]
    inside = os.path.relpath(os.path.abspath(backup_dir), os.path.abspath(state_dir))
    if inside != "." and not inside.startswith(".."):
        patterns.append(inside.replace(os.sep, "/"))
    elif inside == ".":
        raise BackupError("bad_argument", "backup_dir %s is the state_dir itself; choose a directory outside it "
                          "(default /var/backups/carapace)." % backup_dir)
    seen = []
    for pattern in patterns:
        if pattern not in seen:
            seen.append(pattern)
    return seen


def verify_recorded(entry, what="path"):
    """Re-hash an indexed file against its recorded sha256; returns (sha256, size). Raises missing_archive/tampered."""
    record = entry if what == "path" else entry.get("snapshot") or {}
    path = record.get("path")
    try:
        st = os.lstat(path)
    except (OSError, TypeError):
        raise BackupError("missing_archive", "backup %s recorded in the index is missing. Pick another backup "
                          "(`backup: latest` takes the newest one) or take a new one with cara_backup." % path)
    if not stat.S_ISREG(st.st_mode):
        raise BackupError("tampered", "backup %s is not a regular file (a symlink or something else now sits "
                          "there); refusing it. Remove it and pick another backup." % path)
    digest, size = sha256_file(path)
    if digest != record.get("sha256"):
        raise BackupError("tampered", "backup %s does not match its index entry: sha256 %s, recorded %s. It was "
                          "modified or replaced after cara_backup wrote it; nothing was restored. Do not use it: pick "
                          "another backup, or investigate who changed it." % (path, digest, record.get("sha256")),
                          path=path, sha256=digest, recorded_sha256=record.get("sha256"))
    return digest, size


# -- the backup -------------------------------------------------------------------------------------------------------

class HostBackup:
    """One run of cara_backup on one host."""

    def __init__(self, cli, state_dir, backup_dir, tag=None, retention=5, include_state_snapshot=False,
                 snapshot_exclude=DEFAULT_SNAPSHOT_EXCLUDE, reuse_within=0, home=None, now=None):
        self.cli = cli
        self.state_dir = os.path.abspath(state_dir)
        self.backup_dir = os.path.abspath(backup_dir)
        self.tag = tag
        self.retention = retention
        self.snapshot = include_state_snapshot
        self.excludes = list(snapshot_exclude)
        self.reuse_within = reuse_within
        self.home = home
        self.now = now or utc_now
        self.actions = []
        self.warnings = []
        self.dir_changed = False

    def run(self, check_mode=False):
        if self.retention < 1:
            raise BackupError("bad_argument", "retention must be at least 1 (the backup just taken is always kept).")
        if self.reuse_within < 0:
            raise BackupError("bad_argument", "reuse_within must be 0 (always a new backup) or a number of seconds.")
        patterns = snapshot_patterns(self.excludes, self.state_dir, self.backup_dir) if self.snapshot else None
        version = None
        if not (os.path.isfile(self.cli.binary) and os.access(self.cli.binary, os.X_OK)):
            raise BackupError("not_installed", "cara is not installed at %s (no executable file there). Install it "
                              "(cara_switch) or pass bin_path, then run the backup again." % self.cli.binary)
        version = self.cli.version()
        if self.tag:
            tag = self.tag
        elif version:
            tag = tag_for_version(version)
        else:
            raise BackupError("cara_failed", "`%s --version` did not answer `cara <version>`, so the backup cannot be "
                              "named after the installed version. Check the binary, or pass tag." % self.cli.binary)
        running, detail = self.cli.daemon_running()
        if running:
            if not check_mode:
                raise BackupError("daemon_running", "refusing to back up %s while the cara daemon is running (%s): "
                                  "the state could change under the archive. Stop the service first, then run the "
                                  "backup again." % (self.state_dir, detail), daemon_detail=detail)
            self.warnings.append("the cara daemon is running (%s); a real run refuses to back up until it is "
                                 "stopped" % detail)
        dir_actions = check_private_dir(self.backup_dir, check_mode)
        self.actions.extend(dir_actions)
        self.dir_changed = bool(dir_actions)
        if check_mode:
            empty = {"format": INDEX_FORMAT, "backups": []}
            index = read_index(self.backup_dir) if os.path.isdir(self.backup_dir) else empty
            return self._plan(index, tag, version, patterns, running)
        with index_lock(self.backup_dir):
            return self._take(read_index(self.backup_dir), tag, version, patterns)

    # reuse: the newest entry of the same tag within the window whose archive is intact and whose content equals
    # what cara backup (and the snapshot) would archive now.
    def _reusable(self, index, tag, patterns):
        if not self.reuse_within:
            return None
        horizon = int(time.time()) - self.reuse_within
        current = None
        for entry in reversed(index["backups"]):
            if entry["tag"] != tag or entry["created_epoch"] < horizon or entry.get("state_dir") != self.state_dir:
                continue
            if self.snapshot and not entry.get("snapshot"):
                continue
            try:
                verify_recorded(entry)
                if entry.get("snapshot"):
                    verify_recorded(entry, "snapshot")
            except BackupError as exc:
                self.warnings.append("not reusing %s: %s" % (entry["path"], exc.message))
                continue
            if current is None:
                current = content_digest({n: {"type": "file", "sha256": s} for n, s in disk_file_manifest(
                    cara_sources(self.state_dir, self.cli.config_path, self.home)).items()})
            if current != entry.get("content_digest"):
                continue
            snap = entry.get("snapshot")
            if self.snapshot and snap.get("excluded") != patterns:
                continue
            if snap:  # even when not asked for: a restore of this entry would put its snapshot back
                state, _skipped = walk_state(self.state_dir, snap.get("excluded") or list(ALWAYS_EXCLUDED))
                if content_digest(state, True) != snap.get("content_digest"):
                    continue
            return entry
        return None

    def _names(self, stamp, tag):
        for n in range(0, 1000):
            archive, snapshot = archive_names(tag, stamp, n)
            if not os.path.lexists(os.path.join(self.backup_dir, archive)) and \
                    not os.path.lexists(os.path.join(self.backup_dir, snapshot)):
                return os.path.join(self.backup_dir, archive), os.path.join(self.backup_dir, snapshot)
        raise BackupError("io_error", "no free archive name in %s for %s; clean up the directory."
                          % (self.backup_dir, stamp))

    def _result(self, changed, entry, before, after, removed):
        return {"changed": changed, "backup": entry, "actions": self.actions, "removed": removed,
                "diff": {"before": {"backups": before}, "after": {"backups": after}}, "warnings": self.warnings}

    def _plan(self, index, tag, version, patterns, running):
        before = [e["path"] for e in index["backups"]]
        reuse = self._reusable(index, tag, patterns) if not running else None
        if reuse:
            kept, dropped = retention_split(index["backups"], self.retention)
            removed = [p for e in dropped for p in (e["path"], (e.get("snapshot") or {}).get("path")) if p]
            self.actions.append("would reuse %s (same tag and content, taken within reuse_within)" % reuse["path"])
            self.actions.extend("would remove %s (retention %d)" % (p, self.retention) for p in removed)
            return self._result(bool(removed) or self.dir_changed, reuse, before, [e["path"] for e in kept], removed)
        moment = self.now()
        archive, snapshot = self._names(utc_stamp(moment), tag)
        entry = self._entry(archive, tag, version, moment)
        self.actions.append("would run `%s backup -o %s`" % (self.cli.binary, archive))
        if self.snapshot:
            entry["snapshot"] = {"path": snapshot, "file": os.path.basename(snapshot), "sha256": None, "size": None,
                                 "excluded": patterns}
            self.actions.append("would write state snapshot %s of %s" % (snapshot, self.state_dir))
        self.actions.append("would record the backup in %s" % os.path.join(self.backup_dir, INDEX_NAME))
        kept, dropped = retention_split(index["backups"] + [entry], self.retention)
        removed = [p for e in dropped for p in (e["path"], (e.get("snapshot") or {}).get("path")) if p]
        self.actions.extend("would remove %s (retention %d)" % (p, self.retention) for p in removed)
        return self._result(True, entry, before, [e["path"] for e in kept], removed)

    def _entry(self, archive, tag, version, moment):
        return {"path": archive, "file": os.path.basename(archive), "tag": tag, "cara_version": version,
                "sha256": None, "size": None, "created": iso(moment), "created_epoch": int(moment.timestamp()),
                "state_dir": self.state_dir, "config_path": self.cli.config_path, "sections": None,
                "files": None, "content_digest": None, "snapshot": None, "created_by": "carapace.fleet.cara_backup"}

    def _take(self, index, tag, version, patterns):
        before = [e["path"] for e in index["backups"]]
        entry = self._reusable(index, tag, patterns)
        new = entry is None
        if new:
            entry = self._new_backup(tag, version, patterns)
            index["backups"].append(entry)
        else:
            self.actions.append("reused %s (same tag and content, taken within reuse_within)" % entry["path"])
        kept, dropped = retention_split(index["backups"], self.retention)
        removed = []
        for old in dropped:
            removed.extend(remove_entry_files(self.backup_dir, old))
            self.actions.append("removed backup %s (retention %d)" % (old["path"], self.retention))
        if new or dropped:
            index["backups"] = kept
            index["format"] = INDEX_FORMAT
            write_index(self.backup_dir, index)
            self.actions.append("wrote %s" % os.path.join(self.backup_dir, INDEX_NAME))
        return self._result(new or bool(dropped) or self.dir_changed, entry, before, [e["path"] for e in kept],
                            removed)

    def _new_backup(self, tag, version, patterns):
        moment = self.now()
        archive, snapshot = self._names(utc_stamp(moment), tag)
        res = self.cli.run("backup", "-o", archive)
        if res["rc"] != 0:
            if _own_file(self.backup_dir, archive):
                os.unlink(archive)
            raise BackupError("cara_failed", "`cara backup -o %s` failed (rc %s): %s. Nothing was recorded. Fix the "
                              "cause cara names, then run the backup again."
                              % (archive, res["rc"], (res["stderr"] or res["stdout"]).strip()[-2000:]))
        if not _own_file(self.backup_dir, archive):
            raise BackupError("cara_failed", "`cara backup -o %s` reported success but left no regular file there. "
                              "Check the cara release on this host." % archive)
        os.chmod(archive, 0o600)
        self.actions.append("ran `%s backup -o %s`" % (self.cli.binary, archive))
        try:
            checked = validate_archive(archive)
        except BackupError as exc:
            os.unlink(archive)
            raise BackupError(exc.cause, "the archive `cara backup` just wrote failed validation and was removed: %s"
                              % exc.message)
        digest, size = sha256_file(archive)
        files = file_manifest(checked["manifest"])
        entry = self._entry(archive, tag, version, moment)
        entry.update(sha256=digest, size=size, sections=checked["sections"], files=len(files),
                     content_digest=content_digest(checked["manifest"]),
                     cara_output=_cara.parse_backup_output(res["stdout"]))
        self.actions.append("validated %s (marker, %d safe members)" % (archive, checked["members"]))
        if self.snapshot:
            try:
                self._snapshot(entry, snapshot, tag, patterns)
            except BaseException:
                for path in (archive, snapshot):
                    if _own_file(self.backup_dir, path):
                        os.unlink(path)
                raise
        return entry

    def _snapshot(self, entry, snapshot, tag, patterns):
        meta = {"format": 1, "state_dir": self.state_dir, "created": entry["created"], "tag": tag,
                "excluded": patterns, "created_by": "carapace.fleet.cara_backup"}
        manifest, skipped = create_snapshot(self.state_dir, snapshot, patterns, meta)
        check = validate_archive(snapshot, SNAPSHOT_MARKER, allow_links=False)
        if content_digest(snapshot_manifest_from_archive(check), True) != content_digest(manifest, True):
            raise BackupError("io_error", "the state snapshot %s did not read back as written; nothing was recorded. "
                              "Check the disk under %s." % (snapshot, self.backup_dir))
        snap_digest, snap_size = sha256_file(snapshot)
        entry["snapshot"] = {"path": snapshot, "file": os.path.basename(snapshot), "sha256": snap_digest,
                             "size": snap_size, "files": sum(1 for e in manifest.values() if e["type"] == "file"),
                             "content_digest": content_digest(manifest, True), "excluded": patterns,
                             "skipped": skipped}
        if skipped:
            self.warnings.append("the state snapshot leaves out what is not a directory or regular file: %s"
                                 % ", ".join(skipped))
        self.actions.append("wrote state snapshot %s (%d files)" % (snapshot, entry["snapshot"]["files"]))


# -- the restore ------------------------------------------------------------------------------------------------------

def _owner_name(uid):
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _ancestors(path):
    """path and every directory above it, nearest first."""
    out = [path]
    while os.path.dirname(out[-1]) != out[-1]:
        out.append(os.path.dirname(out[-1]))
    return out


def root_restore_problem(dirs):
    """Running as root: why restoring into `dirs` (and what lies below them) is unsafe, or None.

    A restore as root writes and chowns files under directories that their owner can change at any moment: the
    service account can swap a file or a whole directory for a symlink to a root-owned file between any check and
    the write (cara restore follows paths, lchown would hand the file over). So as root every directory on the way,
    the literal path and the resolved one, must be root's and not writable by others (a sticky one such as /tmp
    aside); otherwise the restore must run as that directory's owner, which is what cara itself requires of its
    state dir.
    """
    if os.geteuid() != 0:
        return None
    for directory in dirs:
        if not directory:
            continue
        seen = set()
        for chain in (_ancestors(os.path.abspath(directory)), _ancestors(os.path.realpath(directory))):
            for path in chain:
                if path in seen:
                    continue
                seen.add(path)
                try:
                    st = os.lstat(path)
                except FileNotFoundError:
                    continue
                if st.st_uid != 0:
                    user = _owner_name(st.st_uid)
                    return ("%s belongs to %s, and this restore runs as root: %s could replace what lies under it "
                            "with symlinks to root's files while the restore writes there. Run cara_restore as %s "
                            "instead (become: true, become_user: %s; the roles' cara_state_user)."
                            % (path, user, user, user, user))
                others_write = st.st_mode & 0o002 or (st.st_mode & 0o020 and st.st_gid != 0)
                if others_write and not st.st_mode & stat.S_ISVTX:
                    return ("%s (mode %04o) can be written by users other than root, and this restore runs as root: "
                            "they could plant symlinks on its way. Remove the group/other write bit, or run "
                            "cara_restore as the state dir's owner." % (path, stat.S_IMODE(st.st_mode)))
    return None


class HostRestore:
    """One run of cara_restore on one host."""

    def __init__(self, cli, state_dir, backup_dir, backup="latest", tag=None, allow_unindexed=False,
                 restore_snapshot=True, home=None):
        self.cli = cli
        self.state_dir = os.path.abspath(state_dir)
        self.backup_dir = os.path.abspath(backup_dir)
        self.backup = backup
        self.tag = tag
        self.allow_unindexed = allow_unindexed
        self.restore_snapshot = restore_snapshot
        self.home = home
        self.actions = []
        self.warnings = []

    def select(self):
        """(entry, indexed): the index entry to restore, or a bare one for an allowed unindexed archive."""
        check_trusted_dir(self.backup_dir)
        index = read_index(self.backup_dir) if os.path.isdir(self.backup_dir) else {"backups": []}
        if self.backup == "latest":
            entry = latest_entry(index, self.tag)
            if entry is None:
                tagged = " tagged %s" % self.tag if self.tag else ""
                raise BackupError("no_backup", "the index %s has no backup%s. Take one with cara_backup, or name an "
                                  "archive with backup: <path>." % (os.path.join(self.backup_dir, INDEX_NAME), tagged))
            return entry, True
        path = self.backup if os.path.isabs(self.backup) else os.path.join(self.backup_dir, self.backup)
        entry = find_entry(index, path)
        if entry is not None:
            if self.tag and entry["tag"] != self.tag:
                raise BackupError("bad_argument", "backup %s is tagged %s, not %s. Drop tag or pick a backup of %s."
                                  % (path, entry["tag"], self.tag, self.tag))
            return entry, True
        if not self.allow_unindexed:
            raise BackupError("unknown_backup", "%s is not in the backup index %s, so its integrity cannot be checked; "
                              "nothing was restored. Restore an indexed backup (backup: latest), or, for an archive "
                              "you made and trust, pass allow_unindexed: true (its member paths are still checked)."
                              % (path, os.path.join(self.backup_dir, INDEX_NAME)))
        if not os.path.isfile(path) or os.path.islink(path):
            raise BackupError("missing_archive", "%s is not a regular file. Check the path." % path)
        digest, size = sha256_file(path)
        self.warnings.append("%s is not in the backup index; restoring it because allow_unindexed is true" % path)
        return {"path": path, "file": os.path.basename(path), "tag": None, "sha256": digest, "size": size,
                "snapshot": None, "indexed": False}, False

    def run(self, check_mode=False):
        problem = root_restore_problem([self.state_dir, os.path.dirname(self.cli.config_path), memory_dir(self.home)])
        if problem:
            raise BackupError("wrong_user", problem + " Nothing was restored.")
        entry, indexed = self.select()
        if indexed:
            verify_recorded(entry)
            self.actions.append("verified sha256 of %s against the index" % entry["path"])
        # cara backups hold directories and regular files: a link member could make cara restore write elsewhere
        checked = validate_archive(entry["path"], allow_links=False)
        self.actions.append("validated %s (marker, %d safe members)" % (entry["path"], checked["members"]))
        snap = entry.get("snapshot") if self.restore_snapshot else None
        snap_manifest = patterns = None
        if snap:
            verify_recorded(entry, "snapshot")
            snap_check = validate_archive(snap["path"], SNAPSHOT_MARKER, allow_links=False)
            snap_manifest = snapshot_manifest_from_archive(snap_check)
            patterns = snap.get("excluded") or list(ALWAYS_EXCLUDED)
            self.actions.append("verified and validated state snapshot %s" % snap["path"])
        if entry.get("state_dir") and entry["state_dir"] != self.state_dir:
            self.warnings.append("backup %s was taken from state_dir %s; restoring into %s"
                                 % (entry["path"], entry["state_dir"], self.state_dir))
        running, detail = self.cli.daemon_running()
        if running:
            if not check_mode:
                raise BackupError("daemon_running", "refusing to restore into %s while the cara daemon is running "
                                  "(%s). Stop the service first, then run the restore again; the backup was verified "
                                  "and is unchanged." % (self.state_dir, detail), daemon_detail=detail)
            self.warnings.append("the cara daemon is running (%s); a real run refuses to restore until it is "
                                 "stopped" % detail)
        files = file_manifest(checked["manifest"])
        differences = cara_differences(files, self.state_dir, self.cli.config_path, self.home)
        plan = plan_snapshot_restore(self.state_dir, snap_manifest, patterns) if snap else None
        result = {"backup": entry, "sections": checked["sections"], "restored": [], "sessions": 0,
                  "snapshot": None, "actions": self.actions, "warnings": self.warnings,
                  "differences": [d["target"] for d in differences]}
        result["diff"] = _restore_diff(differences, plan, self.state_dir, snap_manifest)
        changed = bool(differences) or (plan is not None and not plan_empty(plan))
        result["changed"] = changed
        if plan is not None:
            result["snapshot"] = dict(plan, path=snap["path"])
        if not changed:
            self.actions.append("nothing to restore: the state already holds the backup's content")
            return result
        if differences and not (os.path.isfile(self.cli.binary) and os.access(self.cli.binary, os.X_OK)):
            message = ("cara is not installed at %s, and `cara restore` is needed for %d files that differ. Install "
                       "the release the backup belongs to (%s), or pass bin_path." % (self.cli.binary, len(differences),
                                                                                      entry.get("tag") or "unknown"))
            if not check_mode:
                raise BackupError("not_installed", message + " Nothing was restored.")
            self.warnings.append(message)
        if check_mode:
            if differences:
                self.actions.append("would run `%s restore %s --force` (%d files differ)"
                                    % (self.cli.binary, entry["path"], len(differences)))
            if plan is not None and not plan_empty(plan):
                self.actions.append("would restore the state snapshot: %s" % _plan_summary(plan))
            return result
        if differences:
            res = self.cli.run("restore", entry["path"], "--force")
            if res["rc"] != 0:
                raise BackupError("cara_failed", "`cara restore %s --force` failed (rc %s): %s. The state may be "
                                  "partly restored; fix the cause cara names, then run the restore again."
                                  % (entry["path"], res["rc"], (res["stderr"] or res["stdout"]).strip()[-2000:]))
            parsed = _cara.parse_restore_output(res["stdout"])
            result["restored"] = parsed["restored"] or []
            result["sessions"] = parsed["sessions"]
            self.actions.append("ran `%s restore %s --force`: restored %s"
                                % (self.cli.binary, entry["path"], ", ".join(result["restored"]) or "(nothing)"))
            self._fix_owner(differences)
        if snap:
            plan = plan_snapshot_restore(self.state_dir, snap_manifest, patterns)
            if not plan_empty(plan):
                apply_snapshot_restore(self.state_dir, snap["path"], snap_manifest, plan)
                self.actions.append("restored the state snapshot %s: %s" % (snap["path"], _plan_summary(plan)))
            result["snapshot"] = dict(plan, path=snap["path"])
        left = cara_differences(files, self.state_dir, self.cli.config_path, self.home)
        if snap and not left:
            left = [{"target": os.path.join(self.state_dir, r)}
                    for r in _flatten(plan_snapshot_restore(self.state_dir, snap_manifest, patterns))]
        if left:
            raise BackupError("restore_incomplete", "after the restore these files still differ from the backup: %s. "
                              "Check their permissions and any symlinks on the way, then run the restore again."
                              % ", ".join(d["target"] for d in left[:20]), restored=result["restored"])
        return result

    def _fix_owner(self, differences):
        """Running as root: files cara restore created in the state dir get the state dir's owner back."""
        if os.geteuid() != 0:
            return
        st = os.stat(self.state_dir)
        if st.st_uid == 0:
            return
        for diff in differences:
            target = diff["target"]
            if os.path.commonpath([target, self.state_dir]) == self.state_dir and os.path.lexists(target):
                os.lchown(target, st.st_uid, st.st_gid)


def _flatten(plan):
    return sorted({rel for values in plan.values() for rel in values})


def _plan_summary(plan):
    return ", ".join("%s %d" % (key, len(plan[key])) for key in ("write", "chmod", "mkdir", "remove", "rmdir")
                     if plan[key]) or "nothing"


def _restore_diff(differences, plan, state_dir, snap_manifest):
    before, after = {}, {}
    for diff in differences:
        before[diff["target"]] = diff["before"] or "(absent)"
        after[diff["target"]] = diff["after"]
    if plan:
        for rel in plan["write"] + plan["chmod"] + plan["mkdir"]:
            path = os.path.join(state_dir, rel)
            want = snap_manifest[rel]
            before.setdefault(path, "(differs)")
            after[path] = want["sha256"] if want["type"] == "file" else "directory %04o" % want["mode"]
        for rel in plan["remove"] + plan["rmdir"]:
            path = os.path.join(state_dir, rel)
            before.setdefault(path, "(present)")
            after[path] = "(absent)"
    if len(before) > DIFF_LIMIT:
        keep = sorted(before)[:DIFF_LIMIT]
        more = "(%d more paths not shown)" % (len(before) - DIFF_LIMIT)
        before = dict([(k, before[k]) for k in keep], **{"...": more})
        after = dict([(k, after[k]) for k in keep if k in after], **{"...": more})
    return {"before": before, "after": after}
