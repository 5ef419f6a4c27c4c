# -*- coding: utf-8 -*-
# Copyright: carapace.fleet maintainers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Installing verified `cara` binaries side by side and switching the active one atomically.

Domain logic only (no Ansible imports). Layout on a host:

    <install_root>/releases/<tag>/cara   every installed release, 0755, kept `keep` deep
    <install_root>/state.json            {"schemaVersion": 1, "active": REC, "previous": REC|null,
                                          "rolledBackFrom": REC|null, "history": [REC, ...],
                                          "updatedAt": "<UTC>"}, REC = {tag, sha256, path}
                                         history: the releases that were active before, newest first (never the
                                         active one), kept after a switch back so the next rollback knows where to go
    <bin_path>                           symlink to the active release, replaced by symlink(temp name) + rename

Nothing is ever kept beside the active path as `cara.bak`/`cara.old`: HEAD `cara` deletes such files at every start
and v0.8.0 deletes every `*.bak`/`*.old` in the binary's directory (Carapace's contract). Temporary
names are `.<name>.switch-<random>` and exist only for the instant between symlink() and rename().
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import time

from ansible_collections.carapace.fleet.plugins.module_utils import _atomic, _safejson
from ansible_collections.carapace.fleet.plugins.module_utils._errors import FleetError
from ansible_collections.carapace.fleet.plugins.module_utils._version import version_from_output

STATE_FILE = "state.json"
LOCK_FILE = ".switch.lock"
SCHEMA_VERSION = 1
HISTORY_DEPTH = 10
BINARY_NAME = "cara"
_TAG_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")
_HEX64_RE = re.compile(r"[0-9a-fA-F]{64}")
_CHUNK = 1 << 20


class SwitchError(FleetError):
    """A refusal, with a machine-readable cause and a message that names the next step."""


def check_tag(tag):
    """A release directory name: letters, digits, `._+-`, not starting with a dot (no paths, no `..`)."""
    if not isinstance(tag, str) or not _TAG_RE.fullmatch(tag):
        raise SwitchError("bad_argument", "tag %r is not usable as a release directory name: expected something like "
                                          "v0.9.0 (letters, digits and ._+- only, not starting with a dot)" % (tag,))
    return tag


def check_sha256(digest):
    if not isinstance(digest, str) or not _HEX64_RE.fullmatch(digest.strip()):
        raise SwitchError("bad_argument", "sha256 %r is not 64 hex digits: pass the digest cara_release verified" % (digest,))
    return digest.strip().lower()


def _open_regular(path, follow=True):
    """A read fd on the regular file at path. O_NONBLOCK: opening a FIFO (or a device) must not wait for a writer;
    the type is checked on the open fd before any byte is read. Without follow, a symlink is refused (ELOOP)."""
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | (0 if follow else getattr(os, "O_NOFOLLOW", 0))
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
        raise SwitchError("not_a_file", "%s is a symlink, not a regular file: point it at the verified file itself"
                          % path) from exc
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise SwitchError("not_a_file", "%s is not a regular file" % path)
    os.set_blocking(fd, True)
    return fd


def hash_file(path, follow=True):
    """sha256 hex digest of a regular file (opened once, checked with fstat)."""
    fd = _open_regular(path, follow)
    h = hashlib.sha256()
    with os.fdopen(fd, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def makedirs(path, mode=0o755):
    """Create missing directories with `mode` (not reduced by the umask)."""
    if os.path.isdir(path):
        return
    parent = os.path.dirname(path)
    if parent and parent != path:
        makedirs(parent, mode)
    try:
        os.mkdir(path, mode)
    except FileExistsError:
        return
    os.chmod(path, mode)


def install_file(src, dest, expected):
    """Copy src to dest as a verified 0755 binary: hash the bytes while copying them into a temp file in dest's
    directory, re-hash the temp file as written, then rename it over dest. Any mismatch removes the temp file and
    raises; dest is untouched until both digests equal `expected`."""
    directory = os.path.dirname(dest)
    makedirs(directory)
    try:
        src_fd = _open_regular(src, follow=False)
    except FileNotFoundError as exc:
        raise SwitchError("missing_src", "src %s does not exist: copy the verified file there first" % src) from exc
    # replace_symlink: a link planted at releases/<tag>/cara is replaced by the verified file, never written through
    prefix = ".%s.switch-" % os.path.basename(dest)
    with os.fdopen(src_fd, "rb") as fin, \
            _atomic.atomic_file(dest, mode=0o755, prefix=prefix, suffix="", replace_symlink=True) as fout:
        h = hashlib.sha256()
        for chunk in iter(lambda: fin.read(_CHUNK), b""):
            h.update(chunk)
            fout.write(chunk)
        if h.hexdigest() != expected:
            raise SwitchError("digest_mismatch", "%s has sha256 %s, expected %s: refusing to install it, nothing was "
                                                 "switched. Fetch and verify the release again (cara_release)."
                              % (src, h.hexdigest(), expected))
        fout.flush()
        fout.seek(0)
        again = hashlib.sha256()
        for chunk in iter(lambda: fout.read(_CHUNK), b""):
            again.update(chunk)
        written = again.hexdigest()
        if written != expected:
            raise SwitchError("digest_mismatch", "the copy of %s written to %s has sha256 %s, expected %s (disk or "
                                                 "filesystem fault?): nothing was switched" % (src, directory, written, expected))
    return expected


def switch_link(bin_path, target):
    """Point bin_path at target atomically: symlink under a temp name in the same directory, then rename over bin_path.
    bin_path exists (old or new) at every moment; no other name is left behind."""
    makedirs(os.path.dirname(bin_path) or ".")
    _atomic.replace_with_symlink(target, bin_path, prefix=".%s.switch-" % os.path.basename(bin_path))


def default_version_of(path):
    """The version `<path> --version` reports (`cara 0.9.0` -> "0.9.0"), or None."""
    try:
        proc = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30, check=False,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return None
    return version_from_output(proc.stdout) if proc.returncode == 0 else None


def _utc_now():
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class Switcher:
    """One host's installed releases and active link. Methods return a result dict; refusals raise SwitchError."""

    def __init__(self, install_root, bin_path, keep=3, version_of=default_version_of, check_mode=False):
        if not isinstance(keep, int) or keep < 1:
            raise SwitchError("bad_argument", "keep must be at least 1 (the active and the previous release are always kept)")
        self.install_root = os.path.abspath(install_root)
        self.releases_dir = os.path.join(self.install_root, "releases")
        self.state_path = os.path.join(self.install_root, STATE_FILE)
        self.bin_path = os.path.abspath(bin_path)
        self.keep = keep
        self.version_of = version_of
        self.check_mode = check_mode
        self.actions = []
        self.warnings = []
        self._simulated_tags = None

    # -- reading ---------------------------------------------------------------------------------------------------
    def release_path(self, tag):
        return os.path.join(self.releases_dir, check_tag(tag), BINARY_NAME)

    def record(self, tag, digest):
        return {"tag": tag, "sha256": digest, "path": self.release_path(tag)}

    def read_state(self):
        empty = {"schemaVersion": SCHEMA_VERSION, "active": None, "previous": None, "rolledBackFrom": None}
        try:
            with open(self.state_path, "r", encoding="utf-8") as f:
                data = _safejson.load(f)
        except FileNotFoundError:
            return empty
        except (OSError, ValueError) as exc:
            raise SwitchError("corrupt_state", "%s cannot be read as JSON (%s). The active link %s was not touched; move the "
                                               "file aside and run state=present with the release to keep active."
                              % (self.state_path, exc, self.bin_path)) from exc
        if not isinstance(data, dict):
            raise SwitchError("corrupt_state", "%s is not a JSON object; move it aside and run state=present" % self.state_path)
        for key in ("active", "previous", "rolledBackFrom"):
            rec = data.get(key)
            if rec is not None and not (isinstance(rec, dict) and isinstance(rec.get("tag"), str)
                                        and isinstance(rec.get("sha256"), str)):
                raise SwitchError("corrupt_state", "%s: %r is not a {tag, sha256} record; move the file aside and run "
                                                   "state=present" % (self.state_path, key))
        history = data.get("history")
        if history is not None and not (isinstance(history, list) and all(
                isinstance(rec, dict) and isinstance(rec.get("tag"), str) and isinstance(rec.get("sha256"), str)
                for rec in history)):
            raise SwitchError("corrupt_state", "%s: 'history' is not a list of {tag, sha256} records; move the file aside "
                                               "and run state=present" % self.state_path)
        return dict(empty, **data)

    @staticmethod
    def _history(records, drop):
        """Records newest first, one per tag, none of the tags in `drop`, HISTORY_DEPTH deep."""
        out, seen = [], set(drop)
        for rec in records:
            if rec and rec["tag"] not in seen:
                seen.add(rec["tag"])
                out.append({"tag": rec["tag"], "sha256": rec["sha256"], "path": rec.get("path")})
        return out[:HISTORY_DEPTH]

    def tag_of_target(self, target):
        """The tag when target is <releases_dir>/<tag>/cara (also through a symlinked install_root), else None."""
        for root in (self.releases_dir, os.path.realpath(self.releases_dir)):
            parent, name = os.path.split(target)
            if name == BINARY_NAME and os.path.dirname(parent) == root and _TAG_RE.fullmatch(os.path.basename(parent)):
                return os.path.basename(parent)
        return None

    def current(self):
        """What bin_path is now: kind missing|symlink|file|other, its target, tag (if one of ours) and sha256."""
        cur = {"kind": "missing", "target": None, "tag": None, "sha256": None, "exists": False}
        try:
            st = os.lstat(self.bin_path)
        except FileNotFoundError:
            return cur
        if stat.S_ISLNK(st.st_mode):
            target = os.readlink(self.bin_path)
            target = os.path.normpath(os.path.join(os.path.dirname(self.bin_path), target))
            cur.update(kind="symlink", target=target, tag=self.tag_of_target(target))
            try:
                cur.update(sha256=hash_file(self.bin_path), exists=True)
            except FileNotFoundError:
                pass
            except SwitchError:  # points at a directory or device
                cur["kind"] = "other"
        elif stat.S_ISREG(st.st_mode):
            cur.update(kind="file", target=self.bin_path, sha256=hash_file(self.bin_path, follow=False), exists=True)
        else:
            cur["kind"] = "other"
        return cur

    def release_tags(self):
        """Installed release directories, oldest first (by the mtime of their binary, then name)."""
        try:
            names = os.listdir(self.releases_dir)
        except FileNotFoundError:
            return []
        found = []
        for name in names:
            path = os.path.join(self.releases_dir, name)
            if name.startswith(".") or not _TAG_RE.fullmatch(name) or os.path.islink(path) or not os.path.isdir(path):
                continue
            try:
                mtime = os.lstat(os.path.join(path, BINARY_NAME)).st_mtime_ns
            except OSError:
                mtime = os.lstat(path).st_mtime_ns
            found.append((mtime, name))
        return [name for _mtime, name in sorted(found)]

    def describe(self, cur):
        return {"bin_path": self.bin_path, "kind": cur["kind"], "target": cur["target"], "tag": cur["tag"],
                "sha256": cur["sha256"], "releases": self.release_tags()}

    def installed_digest(self, tag):
        try:
            return hash_file(self.release_path(tag), follow=False)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except (SwitchError, OSError):
            return "unreadable"

    # -- writing ---------------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self):
        """Serialise runs on one install_root (flock on <install_root>/.switch.lock); check mode takes no lock."""
        if self.check_mode:
            yield
            return
        makedirs(self.install_root)
        fd = os.open(os.path.join(self.install_root, LOCK_FILE),
                     os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._remove_stale_temps()
            yield
        finally:
            os.close(fd)

    def write_state(self, state):
        makedirs(self.install_root)
        state = dict(state, schemaVersion=SCHEMA_VERSION, updatedAt=_utc_now())
        # read_state follows a symlinked state.json; a write replaces the link itself, as it always did
        _atomic.write_file(self.state_path, json.dumps(state, indent=2, sort_keys=True) + "\n", mode=0o644,
                           prefix=".state.json.", suffix="", replace_symlink=True)

    def _remove_stale_temps(self):
        """Temp links left by a run killed between symlink() and rename() (ours only: symlinks named .<name>.switch-*)."""
        directory = os.path.dirname(self.bin_path)
        prefix = ".%s.switch-" % os.path.basename(self.bin_path)
        try:
            names = os.listdir(directory)
        except OSError:
            return
        for name in names:
            path = os.path.join(directory, name)
            if name.startswith(prefix) and os.path.islink(path):
                os.unlink(path)
                self.actions.append("removed stale temporary link %s" % path)

    def _do(self, text, *call):
        """Record an action ("would ..." in check mode) and, outside check mode, run call = (function, *args)."""
        self.actions.append(("would " + text) if self.check_mode else text)
        if not self.check_mode and call:
            call[0](*call[1:])

    @staticmethod
    def _same(a, b):
        return bool(a and b and a.get("tag") == b.get("tag") and a.get("sha256") == b.get("sha256"))

    def _state_changed(self, old, new):
        keys = ("active", "previous", "rolledBackFrom", "history")
        return any((old.get(k) or None) != (new.get(k) or None) for k in keys)

    # -- adoption of a manual install ---------------------------------------------------------------------------
    def _adoption(self, cur, new_tag=None, new_digest=None):
        """Where the binary bin_path holds (a regular file, or a symlink outside releases/) goes, or None."""
        if not cur["exists"] or cur["tag"] is not None:
            return None
        version = self.version_of(self.bin_path) if self.version_of else None
        sha8 = cur["sha256"][:8]
        base = ("v" + version) if version else ("unknown-" + sha8)
        if not _TAG_RE.fullmatch(base):
            base = "unknown-" + sha8
        for candidate in (base, "%s-%s" % (base, sha8)):
            existing = new_digest if candidate == new_tag else self.installed_digest(candidate)
            if existing is None or existing == cur["sha256"]:
                return {"tag": candidate, "sha256": cur["sha256"], "version": version, "from": cur["target"],
                        "copy": existing is None}
        raise SwitchError("adoption_conflict", "cannot keep the binary at %s: %s and %s-%s already hold other binaries. Move "
                                               "one of them aside and re-run." % (cur["target"], self.release_path(base), base, sha8))

    # -- state: present / installed ----------------------------------------------------------------------------
    def present(self, src, sha256, tag, switch=True):
        """Install release `tag` from the verified file `src`; with switch (state=present) make it the active one."""
        tag = check_tag(tag)
        sha256 = check_sha256(sha256)
        with self._locked():
            return self._present(src, sha256, tag, switch)

    def _present(self, src, sha256, tag, switch):
        target = self.release_path(tag)
        state = self.read_state()
        cur = self.current()
        if cur["kind"] == "other":
            raise SwitchError("bin_path_not_a_file", "%s is neither a file nor a symlink to one; nothing was changed. "
                                                     "Move it aside, then re-run." % self.bin_path)
        before = self.describe(cur)
        installed = self.installed_digest(tag)
        # The staged file must verify, even when the release is installed already.
        if src and os.path.lexists(src):
            src_digest = hash_file(src, follow=False)
            if src_digest != sha256:
                raise SwitchError("digest_mismatch", "src %s has sha256 %s, expected %s: refusing to install it, nothing was "
                                                     "switched (active: %s). Fetch and verify the release again (cara_release)."
                                  % (src, src_digest, sha256, cur["target"] or "none"))
        elif installed != sha256:
            if not self.check_mode:
                raise SwitchError("missing_src", "src %s does not exist and %s is not installed: copy the verified file "
                                                 "there first; nothing was switched" % (src, target))
            self.warnings.append("src %s does not exist (yet): its digest could not be checked in check mode" % src)
        need_install = installed != sha256
        adopt = self._adoption(cur, tag, sha256) if switch else None
        need_switch = switch and not (cur["kind"] == "symlink" and cur["target"] == target)

        new_state = dict(state)
        if switch:
            new_rec = self.record(tag, sha256)
            recorded = state.get("active")
            # The release being left is what bin_path runs now (kept as an adopted release when it was a manual
            # install); with no usable bin_path, the recorded active one.
            if cur["exists"] and cur["tag"] is not None:
                leaving = self.record(cur["tag"], cur["sha256"])
            elif adopt:
                leaving = self.record(adopt["tag"], adopt["sha256"])
            else:
                leaving = recorded
            if leaving and leaving["tag"] != tag:
                previous = leaving
            elif recorded and recorded["tag"] != tag:
                previous = recorded  # the link already moved but the record did not (a run killed in between)
            else:
                previous = state.get("previous")  # same release again: what to roll back to stays what it was
            if previous and previous["tag"] == tag:
                previous = None
            new_state.update(active=new_rec, previous=previous,
                             history=self._history([leaving, recorded] + list(state.get("history") or []), {tag}))
            if not self._same(recorded, new_rec) or need_switch or need_install:
                new_state["rolledBackFrom"] = None
        state_changed = self._state_changed(state, new_state)

        if need_install:
            why = "" if installed is None else " (replacing a copy with sha256 %s)" % installed
            self._do("install %s as %s (sha256 %s)%s" % (src, target, sha256, why), install_file, src, target, sha256)
        if adopt:
            if adopt["copy"]:
                self._do("keep the manually installed %s (version %s) as release %s"
                         % (adopt["from"], adopt["version"] or "unknown", adopt["tag"]),
                         install_file, adopt["from"], self.release_path(adopt["tag"]), adopt["sha256"])
            else:
                self._do("keep the manually installed %s: release %s already holds the same binary"
                         % (adopt["from"], adopt["tag"]))
        if need_switch:
            self._do("switch %s from %s to %s" % (self.bin_path, cur["target"] or "nothing", target),
                     switch_link, self.bin_path, target)
        if state_changed:
            self._do("record active %s (previous %s) in %s" % (
                (new_state.get("active") or {}).get("tag"), (new_state.get("previous") or {}).get("tag"), self.state_path),
                self.write_state, new_state)
        protect = {tag} | {r["tag"] for r in (new_state.get("active"), new_state.get("previous")) if r}
        if adopt:
            protect.add(adopt["tag"])
        new_tags = ([tag] if need_install else []) + ([adopt["tag"]] if adopt and adopt["copy"] else [])
        removed = self._prune(protect, new_tags)
        return self._result(before, new_state if self.check_mode else self.read_state(), target, removed,
                            adopted=adopt, predicted=self._predict(cur, target, sha256, need_switch))

    # -- state: previous ---------------------------------------------------------------------------------------
    def previous(self):
        """Switch back to the release recorded as previous; a second run changes nothing."""
        with self._locked():
            return self._previous()

    def _previous(self):
        state = self.read_state()
        cur = self.current()
        before = self.describe(cur)
        prev = state.get("previous")
        active = state.get("active")
        if prev is None:
            back_from = state.get("rolledBackFrom")
            if back_from and active and cur["kind"] == "symlink" and cur["target"] == self.release_path(active["tag"]):
                self.actions.append("already switched back from %s to %s" % (back_from["tag"], active["tag"]))
                return self._result(before, state, cur["target"], [])
            raise SwitchError("no_previous", "no previous release is recorded in %s, so there is nothing to switch back to "
                                             "(active: %s). Switch to a named release with state=present and its tag."
                              % (self.state_path, cur["target"] or "none"))
        target = self.release_path(prev["tag"])
        digest = self.installed_digest(prev["tag"])
        if digest is None:
            raise SwitchError("missing_release", "the previous release %s is no longer installed at %s; nothing was switched. "
                                                 "Reinstall it with state=present (src, sha256, tag=%s)."
                              % (prev["tag"], target, prev["tag"]))
        if digest != prev["sha256"]:
            raise SwitchError("digest_mismatch", "%s has sha256 %s but %s recorded %s for release %s: refusing to switch to "
                                                 "it, nothing was switched. Reinstall it with state=present from a verified copy."
                              % (target, digest, self.state_path, prev["sha256"], prev["tag"]))
        if cur["kind"] == "other":
            raise SwitchError("bin_path_not_a_file", "%s is neither a file nor a symlink to one; nothing was changed" % self.bin_path)
        adopt = self._adoption(cur)
        if cur["exists"] and cur["tag"] is not None and cur["tag"] != prev["tag"]:
            left = self.record(cur["tag"], cur["sha256"])
        elif adopt:
            left = self.record(adopt["tag"], adopt["sha256"])
        else:
            left = active  # bin_path missing, or already on the previous release (a run killed before recording)
        new_state = dict(state, active=self.record(prev["tag"], prev["sha256"]), previous=None,
                         rolledBackFrom=left if left and left["tag"] != prev["tag"] else None,
                         # the release rolled back from leaves the history; what came before stays for the next rollback
                         history=self._history(state.get("history") or [], {prev["tag"]} | ({left["tag"]} if left else set())))
        need_switch = not (cur["kind"] == "symlink" and cur["target"] == target)
        if self.check_mode:
            self._simulated_tags = self.release_tags() + ([adopt["tag"]] if adopt and adopt["copy"] else [])
        if adopt and adopt["copy"]:
            self._do("keep the manually installed %s as release %s" % (adopt["from"], adopt["tag"]),
                     install_file, adopt["from"], self.release_path(adopt["tag"]), adopt["sha256"])
        if need_switch:
            self._do("switch %s back from %s to the previous release %s" % (self.bin_path, cur["target"] or "nothing", target),
                     switch_link, self.bin_path, target)
        if self._state_changed(state, new_state):
            self._do("record active %s (switched back from %s) in %s"
                     % (prev["tag"], (left or {}).get("tag"), self.state_path), self.write_state, new_state)
        return self._result(before, new_state if self.check_mode else self.read_state(), target, [], adopted=adopt,
                            predicted=self._predict(cur, target, prev["sha256"], need_switch))

    # -- retention ---------------------------------------------------------------------------------------------
    def _prune(self, protect, new_tags=()):
        """Remove the oldest releases beyond `keep`, never one in `protect` (active, previous, this run's)."""
        tags = self.release_tags()
        if self.check_mode:  # what this run would have installed counts as newest
            tags = [t for t in tags if t not in new_tags] + list(dict.fromkeys(new_tags))
        kept_protected = [t for t in tags if t in protect]
        others = [t for t in tags if t not in protect]
        room = max(0, self.keep - len(kept_protected))
        doomed = others[:max(0, len(others) - room)]
        for tag in doomed:
            path = os.path.join(self.releases_dir, tag)
            self._do("remove old release %s (keep=%d)" % (path, self.keep), shutil.rmtree, path)
        self._simulated_tags = [t for t in tags if t not in doomed]
        return doomed

    # -- result ------------------------------------------------------------------------------------------------
    def _predict(self, cur, target, digest, need_switch):
        """Check mode: the bin_path and releases a real run would leave."""
        if not self.check_mode:
            return None
        after = self.describe(cur)
        if need_switch or cur["target"] == target:
            after.update(kind="symlink", target=target, tag=self.tag_of_target(target), sha256=digest)
        if self._simulated_tags is not None:
            after["releases"] = self._simulated_tags
        return after

    def _result(self, before, state, target, removed, adopted=None, predicted=None):
        after = predicted if predicted is not None else self.describe(self.current())
        changed = bool([a for a in self.actions if not a.startswith("already")])
        return {
            "changed": changed,
            "actions": self.actions,
            "warnings": self.warnings,
            "bin_path": self.bin_path,
            "target": target,
            "tag": (state.get("active") or {}).get("tag"),
            "sha256": (state.get("active") or {}).get("sha256"),
            "active": state.get("active"),
            "previous": state.get("previous"),
            "rolled_back_from": state.get("rolledBackFrom"),
            "history": state.get("history") or [],
            "adopted": {"tag": adopted["tag"], "sha256": adopted["sha256"], "version": adopted["version"],
                        "from": adopted["from"]} if adopted else None,
            "removed": removed,
            "releases": after["releases"],
            "state_file": self.state_path,
            "diff": {"before": before, "after": after},
        }
