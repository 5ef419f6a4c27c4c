# -*- coding: utf-8 -*-
# Copyright: carapace.fleet maintainers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The private backup directory and its index, `index.json`.

Domain logic only (no Ansible imports). The directory is 0700, owned by the euid, never a symlink; `index.json`
(0600, written atomically under the flock `.index.lock`) holds one entry per backup with sha256, size, tag,
creation time, path, the content digest of the archive, and the snapshot's own facts. An index is trusted only in a
directory nobody else can write, and an archive only once it matches its entry.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import stat

from ansible_collections.carapace.fleet.plugins.module_utils import _atomic, _safejson
from ansible_collections.carapace.fleet.plugins.module_utils._backup_archive import BackupError
from ansible_collections.carapace.fleet.plugins.module_utils._digest import sha256_file

INDEX_NAME = "index.json"
INDEX_LOCK = ".index.lock"
INDEX_FORMAT = 1
MAX_INDEX_BYTES = 16 * 1024 * 1024
_HEX64 = re.compile(r"[0-9a-f]{64}")


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
    """Atomically replace backup_dir/index.json (tmp + fsync + rename + fsync of the directory, 0600). A symlink at
    index.json is refused, as read_index refuses to read one."""
    _atomic.write_file(os.path.join(backup_dir, INDEX_NAME), json.dumps(index, indent=2, sort_keys=True) + "\n",
                       mode=0o600, prefix=".%s." % INDEX_NAME)


@contextlib.contextmanager
def index_lock(backup_dir):
    """Hold the flock backup_dir/.index.lock (serialises runs that write the same index)."""
    fd = os.open(os.path.join(backup_dir, INDEX_LOCK), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def own_file(backup_dir, path):
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
        if own_file(backup_dir, path):
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
