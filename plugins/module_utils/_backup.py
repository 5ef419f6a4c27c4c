# -*- coding: utf-8 -*-
# Copyright: carapace.fleet maintainers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Backups of a Carapace host (the cara_backup module).

Domain logic only (no Ansible imports); `cara` runs through a `_cara.CaraCLI` whose runner the caller passes.

On disk, in a private backup directory (0700, owned by the euid, never a symlink; see _backup_index):
- `carapace-backup-<tag>-<UTC YYYYMMDDTHHMMSSZ>.tar.gz`: written by `cara backup -o`, then validated (marker,
  safe member paths; _backup_archive) and made 0600;
- optionally `carapace-state-<tag>-<UTC>.tar.gz`: a full snapshot of the state dir (_backup_snapshot);
- `index.json`: one entry per backup, written atomically under a flock.
The restore is in _backup_restore.
"""

from __future__ import annotations

import os
import time

from ansible_collections.carapace.fleet.plugins.module_utils import _cara
from ansible_collections.carapace.fleet.plugins.module_utils._backup_archive import (
    SNAPSHOT_MARKER, BackupError, archive_names, cara_sources, check_tag, content_digest, disk_file_manifest,
    file_manifest, iso, utc_now, utc_stamp, validate_archive)
from ansible_collections.carapace.fleet.plugins.module_utils._backup_index import (
    INDEX_FORMAT, INDEX_NAME, check_private_dir, index_lock, own_file, read_index, remove_entry_files,
    retention_split, verify_recorded, write_index)
from ansible_collections.carapace.fleet.plugins.module_utils._backup_snapshot import (
    ALWAYS_EXCLUDED, DEFAULT_SNAPSHOT_EXCLUDE, create_snapshot, snapshot_manifest_from_archive, snapshot_patterns,
    walk_state)
from ansible_collections.carapace.fleet.plugins.module_utils._digest import sha256_file
from ansible_collections.carapace.fleet.plugins.module_utils._version import tag_for_version

# What cara_backup and other callers use from here (some of it defined in the _backup_* files).
__all__ = ["BackupError", "DEFAULT_SNAPSHOT_EXCLUDE", "HostBackup", "SNAPSHOT_MARKER", "check_private_dir", "check_tag",
           "file_manifest", "read_index", "retention_split", "sha256_file", "snapshot_patterns", "tag_for_version",
           "validate_archive", "walk_state", "write_index"]


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
            if own_file(self.backup_dir, archive):
                os.unlink(archive)
            raise BackupError("cara_failed", "`cara backup -o %s` failed (rc %s): %s. Nothing was recorded. Fix the "
                              "cause cara names, then run the backup again."
                              % (archive, res["rc"], (res["stderr"] or res["stdout"]).strip()[-2000:]))
        if not own_file(self.backup_dir, archive):
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
                    if own_file(self.backup_dir, path):
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
