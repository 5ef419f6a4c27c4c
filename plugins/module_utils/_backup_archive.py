# -*- coding: utf-8 -*-
# Copyright: carapace.fleet maintainers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The archives of a Carapace backup: the refusal type, names, digests, validation without extraction, and the
files on a host that `cara backup` archives and `cara restore` writes (Carapace's backup and restore contract).

Domain logic only (no Ansible imports). Nothing in an archive is trusted before every member path is checked, and
archives are never unpacked with tarfile's extract.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import posixpath
import re
import stat
import tarfile

from ansible_collections.carapace.fleet.plugins.module_utils import _version
from ansible_collections.carapace.fleet.plugins.module_utils._digest import sha256_file
from ansible_collections.carapace.fleet.plugins.module_utils._errors import FleetError

CARA_MARKER = ".carapace-backup"
SNAPSHOT_MARKER = ".carapace-fleet-state-snapshot"
CARA_SECTIONS = ("sessions", "config", "memory", "cron", "tasks", "usage")
CHUNK = 1 << 20


class BackupError(FleetError):
    """A refusal or failure with a machine-readable cause and a message naming the cause and the next step; `extra`
    holds facts the module returns with it."""

    def __init__(self, cause, message, **extra):
        super().__init__(cause, message)
        self.extra = extra


# -- time, names, digests ------------------------------------------------------------------------------------------

def utc_now():
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)


def utc_stamp(moment):
    return moment.strftime("%Y%m%dT%H%M%SZ")


def iso(moment):
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def check_tag(tag):
    """Raise BackupError(bad_argument) unless tag is a release tag, vMAJOR.MINOR.PATCH[-pre] (_version.check_tag)."""
    try:
        return _version.check_tag(tag)
    except ValueError:
        raise BackupError("bad_argument", "tag %r is not a Carapace release tag: expected vMAJOR.MINOR.PATCH, e.g. "
                          "v0.9.0 (previews: v0.9.0-preview1)." % (tag,)) from None


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
                    for chunk in iter(lambda: handle.read(CHUNK), b""):
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


# -- what `cara backup` covers, on disk --------------------------------------------------------------------------

def memory_dir(home=None):
    """Agent memory: always $HOME/.config/carapace/memory, whatever the state dir (Carapace's contract)."""
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
    """{archive name: path} of every file `cara backup` puts in its archive (Carapace's backup contract)."""
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
    """Where `cara restore` writes an archive member (Carapace's restore contract); None for entries it ignores."""
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
