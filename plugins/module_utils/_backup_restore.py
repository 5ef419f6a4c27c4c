# -*- coding: utf-8 -*-
# Copyright: carapace.fleet maintainers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The restore of a Carapace host from a backup made by cara_backup (the cara_restore module).

Domain logic only (no Ansible imports); `cara` runs through a `_cara.CaraCLI` whose runner the caller passes.
Nothing in an archive is trusted before its recorded sha256 and every member path are checked: `cara restore`
reads the cara archive, _backup_snapshot writes snapshot members one by one. Running as root, the restore refuses
directories that another user could change under it (root_restore_problem).
"""

from __future__ import annotations

import os
import pwd
import stat

from ansible_collections.carapace.fleet.plugins.module_utils import _cara
from ansible_collections.carapace.fleet.plugins.module_utils._backup_archive import (
    SNAPSHOT_MARKER, BackupError, cara_differences, file_manifest, memory_dir, validate_archive)
from ansible_collections.carapace.fleet.plugins.module_utils._backup_index import (
    INDEX_NAME, check_trusted_dir, find_entry, latest_entry, read_index, verify_recorded)
from ansible_collections.carapace.fleet.plugins.module_utils._backup_snapshot import (
    ALWAYS_EXCLUDED, apply_snapshot_restore, plan_empty, plan_snapshot_restore, snapshot_manifest_from_archive)
from ansible_collections.carapace.fleet.plugins.module_utils._digest import sha256_file

DIFF_LIMIT = 200  # paths shown in a restore's diff


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
