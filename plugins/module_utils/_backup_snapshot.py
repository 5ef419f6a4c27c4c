# -*- coding: utf-8 -*-
# Copyright: carapace.fleet maintainers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""State snapshots: a full tar.gz of the state dir (what `cara backup` leaves out: credentials/, auth_profiles.json,
matrix/, ...), minus the daemon's pid and lock files and the `snapshot_exclude` patterns, and their restore.

Domain logic only (no Ansible imports). A snapshot's first member is `.carapace-fleet-state-snapshot`; it holds
directories and regular files only. Its restore writes members one by one (tmp + fsync + rename, no symlink followed),
after the plan has refused any symlink on a path the snapshot needs.
"""

from __future__ import annotations

import errno
import fnmatch
import hashlib
import json
import os
import stat
import tarfile
import time

from ansible_collections.carapace.fleet.plugins.module_utils import _atomic
from ansible_collections.carapace.fleet.plugins.module_utils._backup_archive import (
    CHUNK, SNAPSHOT_MARKER, BackupError, normalize_member)
from ansible_collections.carapace.fleet.plugins.module_utils._digest import sha256_file

# Never part of a snapshot and never touched by a snapshot restore: the live daemon's pid file and every flock
# sentinel (`.matrix-rekey.lock.lock`, `updates/update.lock.lock`).
ALWAYS_EXCLUDED = ("daemon.pid", "*.lock")
# Left out by default: updates/ belongs to the update in progress (transaction.json, rollback.json, staged
# binaries); putting an older transaction.json back could make cara resume an update at its next start.
# audit.jsonl is evidence and is never rolled back.
DEFAULT_SNAPSHOT_EXCLUDE = ("updates", "audit.jsonl")


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
                             "size": st.st_size, "sha256": sha256_file(full, follow=False)[0] if with_hashes else None}
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
    """Write a tar.gz of state_dir (minus `patterns`) to dest atomically (tmp in dest's dir + fsync + rename, 0600).

    Returns (manifest, skipped) of what went in: the same shapes as walk_state.
    """
    manifest, skipped = walk_state(state_dir, patterns, with_hashes=False)
    with _atomic.atomic_file(dest, mode=0o600, prefix=".carapace-state-") as raw:
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
    # replace_symlink: a symlink at `full` (where the snapshot has a file) is replaced itself, never its target
    with _atomic.atomic_file(full, mode=entry["mode"], owner=(entry["uid"], entry["gid"]) if root_owner else None,
                             mtime=entry["mtime"], replace_symlink=True) as handle:
        source = tar.extractfile(member)
        digest = hashlib.sha256()
        for chunk in iter(lambda: source.read(CHUNK), b""):
            digest.update(chunk)
            handle.write(chunk)
        if digest.hexdigest() != entry["sha256"]:
            raise BackupError("tampered", "member %s of the snapshot changed while restoring it. Nothing more was "
                              "written; run the restore again." % member.name)


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
