# -*- coding: utf-8 -*-
# Copyright: carapace.fleet maintainers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""A verified local cache of one Carapace release: fetch, verify, then (and only then) install into dest/<tag>/.

Domain logic only (no Ansible imports): the caller passes an HTTP opener and an atomic `move(src, dst)`.
Order, for every file: download to a private temp dir (hashing as it streams) -> Sigstore-verify its
bundle under the exact identity/issuer policy -> SHA256SUMS.txt check (secondary) -> re-hash right before
the move (the temp copy must still be the verified bytes) -> atomic move. Nothing unverified reaches
dest/<tag>/: all files of the run are verified before the first is moved, and the temp dir is removed
whatever happens.
"""

from __future__ import annotations

import os
import shutil
import tempfile

from ansible_collections.carapace.fleet.plugins.module_utils._cara import pid_alive
from ansible_collections.carapace.fleet.plugins.module_utils._digest import sha256_file
from ansible_collections.carapace.fleet.plugins.module_utils._download import FetchError, Source, fetch
from ansible_collections.carapace.fleet.plugins.module_utils._errors import FleetError
from ansible_collections.carapace.fleet.plugins.module_utils._http import DEFAULT_RETRIES
from ansible_collections.carapace.fleet.plugins.module_utils._verify import (
    VerifyError, check_sha256sums, parse_sha256sums, verify_bundle)

SUMS = "SHA256SUMS.txt"
CHECKSUM_MODES = ("if_present", "required", "ignore")
INCOMING_PREFIX = ".incoming-"


class ReleaseError(FleetError):
    """Any failure of the run: `cause` is machine-readable, `message` names the file and the next step."""

    def __init__(self, cause, message, asset=None):
        super().__init__(cause, message)
        self.asset = asset


class ReleaseCache:
    """One run of cara_release: `plan()` for check mode, `sync()` to fetch and verify for real."""

    def __init__(self, *, tag, repo, assets, dest, source, trust, identity, issuer, checksums,
                 opener, move, timeout, max_bytes, retries=DEFAULT_RETRIES):
        if checksums not in CHECKSUM_MODES:
            raise ValueError("checksums must be one of %s" % ", ".join(CHECKSUM_MODES))
        self.tag = tag
        self.repo = repo
        self.assets = list(dict.fromkeys(assets))  # keep order, drop repeats
        self.dest = os.path.abspath(dest)
        self.tag_dir = os.path.join(self.dest, tag)
        self.source = source if isinstance(source, Source) else Source(source, repo, tag)
        self.trust = trust
        self.identity = identity
        self.issuer = issuer
        self.checksums = checksums
        self.opener = opener
        self.move = move
        self.timeout = timeout
        self.max_bytes = max_bytes
        self.retries = retries
        self.actions = []
        self.warnings = []

    # -- public --------------------------------------------------------------------------------------
    def plan(self):
        """Check mode: re-verify what is cached (read-only), list what would be fetched; download nothing."""
        before = self._listing()
        sums = None
        if self.checksums != "ignore":
            sums = self._cached_sums(remove_bad=False)
            if sums is None:
                self.actions.append("would fetch %s and %s.bundle from %s" % (SUMS, SUMS, self.source.display_base))
        assets = {}
        for name in self.assets:
            cached = self._cached_asset(name, sums, remove_bad=False)
            if cached is None:
                self.actions.append("would fetch %s and %s.bundle from %s" % (name, name, self.source.display_base))
                assets[name] = self._planned(name)
            else:
                assets[name] = cached
        after = sorted(set(before) | self._planned_files(assets, sums))
        return self._result(assets, sums, before, after, changed=bool(self.actions))

    def sync(self):
        """Fetch and verify every missing file, re-verify cached ones, install verified files atomically."""
        before = self._listing()
        os.makedirs(self.dest, mode=0o755, exist_ok=True)
        self._sweep_incoming()
        work = tempfile.mkdtemp(prefix="%s%d-" % (INCOMING_PREFIX, os.getpid()), dir=self.dest)
        try:
            installs = []  # (temp path, final path, sha256 the temp file must still have)
            sums = None
            if self.checksums != "ignore":
                sums = self._cached_sums(remove_bad=True)
                if sums is None:
                    sums = self._fetch_sums(work, installs)
            assets = {}
            for name in self.assets:
                cached = self._cached_asset(name, sums, remove_bad=True)
                assets[name] = cached if cached is not None else self._fetch_asset(name, work, sums, installs)
            self._install(installs)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return self._result(assets, sums, before, self._listing(), changed=bool(installs))

    # -- checksums -------------------------------------------------------------------------------------
    def _cached_sums(self, remove_bad):
        path = os.path.join(self.tag_dir, SUMS)
        if not (os.path.isfile(path) and os.path.isfile(path + ".bundle")):
            return None
        try:
            digest, _size = sha256_file(path)
            self._verify(SUMS, digest, path + ".bundle")
            with open(path, "r", encoding="utf-8", errors="replace") as f:
                return {"digests": parse_sha256sums(f.read()), "path": path, "cached": True}
        except (ReleaseError, OSError) as exc:
            self._distrust([path, path + ".bundle"], exc, remove_bad)
            return None

    def _fetch_sums(self, work, installs):
        tmp = os.path.join(work, SUMS)
        try:
            digest, _size = fetch(self.source, SUMS, tmp, self.opener, self.timeout, self.max_bytes,
                                  retries=self.retries)
        except FetchError as exc:
            if exc.cause != "not_found":
                raise ReleaseError(exc.cause, exc.message, SUMS) from exc
            if self.checksums == "required":
                raise ReleaseError("checksums_absent", "%s: the release has no %s but checksums=required. Nothing was "
                                   "installed; use checksums=if_present for releases published without it."
                                   % (SUMS, SUMS), SUMS) from exc
            self.actions.append("%s not published at %s: secondary check skipped (checksums=if_present)"
                                % (SUMS, self.source.display_base))
            return {"digests": None, "path": None, "cached": False}
        bundle_tmp = self._fetch_bundle(SUMS, work)
        self._verify(SUMS, digest, bundle_tmp)
        final = os.path.join(self.tag_dir, SUMS)
        installs.append((bundle_tmp, final + ".bundle", sha256_file(bundle_tmp)[0]))
        installs.append((tmp, final, digest))
        self.actions.append("fetched and verified %s" % SUMS)
        with open(tmp, "r", encoding="utf-8", errors="replace") as f:
            return {"digests": parse_sha256sums(f.read()), "path": final, "cached": False}

    # -- assets --------------------------------------------------------------------------------------------
    def _cached_asset(self, name, sums, remove_bad):
        path = os.path.join(self.tag_dir, name)
        if not (os.path.isfile(path) and os.path.isfile(path + ".bundle")):
            return None
        try:
            digest, size = sha256_file(path)
            facts = self._verify(name, digest, path + ".bundle")
            checked = self._check_sums(name, digest, sums)
        except (ReleaseError, OSError) as exc:
            self._distrust([path, path + ".bundle"], exc, remove_bad)
            return None
        return self._asset(name, path, digest, size, facts, checked, cached=True)

    def _fetch_asset(self, name, work, sums, installs):
        tmp = os.path.join(work, name)
        try:
            digest, size = fetch(self.source, name, tmp, self.opener, self.timeout, self.max_bytes,
                                 retries=self.retries)
        except FetchError as exc:
            raise ReleaseError(exc.cause, exc.message, name) from exc
        bundle_tmp = self._fetch_bundle(name, work)
        facts = self._verify(name, digest, bundle_tmp)
        checked = self._check_sums(name, digest, sums)
        final = os.path.join(self.tag_dir, name)
        # The bundle goes in first: a run killed between the two moves leaves no asset without its bundle.
        installs.append((bundle_tmp, final + ".bundle", sha256_file(bundle_tmp)[0]))
        installs.append((tmp, final, digest))
        self.actions.append("fetched and verified %s (%s)" % (name, digest))
        return self._asset(name, final, digest, size, facts, checked, cached=False)

    def _fetch_bundle(self, name, work):
        tmp = os.path.join(work, name + ".bundle")
        try:
            fetch(self.source, name + ".bundle", tmp, self.opener, self.timeout, self.max_bytes,
                  retries=self.retries)
        except FetchError as exc:
            if exc.cause == "not_found":
                raise ReleaseError("missing_bundle", "%s: its Sigstore bundle %s.bundle is missing (%s). An unsigned "
                                   "file is never installed; check that the source mirrors the whole release."
                                   % (name, name, exc.message), name) from exc
            raise ReleaseError(exc.cause, exc.message, name) from exc
        return tmp

    def _verify(self, name, digest, bundle_path):
        try:
            with open(bundle_path, "rb") as f:
                bundle = f.read()
            return verify_bundle(self.trust, name, digest, bundle, self.identity, self.issuer)
        except VerifyError as exc:
            raise ReleaseError(exc.cause, exc.message, name) from exc

    def _check_sums(self, name, digest, sums):
        if not sums or sums["digests"] is None:
            return False
        try:
            return check_sha256sums(sums["digests"], name, digest)
        except VerifyError as exc:
            raise ReleaseError(exc.cause, exc.message, name) from exc

    # -- install and bookkeeping ------------------------------------------------------------------------
    def _install(self, installs):
        if not installs:
            return
        # Close the window between verification and install: the bytes moved are the bytes verified. Every file is
        # re-hashed before the first one moves, so a mismatch installs nothing at all.
        for tmp, final, digest in installs:
            if sha256_file(tmp)[0] != digest:
                raise ReleaseError("digest_mismatch", "%s changed on disk between verification and install; nothing "
                                   "was installed. Re-run; check for other processes writing to %s."
                                   % (os.path.basename(final), self.dest), os.path.basename(final))
        os.makedirs(self.tag_dir, mode=0o755, exist_ok=True)
        for tmp, final, _digest in installs:
            os.chmod(tmp, 0o644)
            self.move(tmp, final)

    def _distrust(self, paths, exc, remove_bad):
        why = exc.message if isinstance(exc, ReleaseError) else "%s: %s" % (type(exc).__name__, exc)
        if remove_bad:
            for p in paths:
                if os.path.lexists(p):
                    os.unlink(p)
            self.actions.append("removed cached %s: it no longer verifies (%s)" % (os.path.basename(paths[0]), why))
        else:
            self.actions.append("would replace cached %s: it no longer verifies (%s)" % (os.path.basename(paths[0]), why))
        self.warnings.append("cached %s failed re-verification and is not trusted: %s" % (paths[0], why))

    def _sweep_incoming(self):
        # Temp dirs of runs that were killed (-9) hold unverified bytes: remove those whose process is gone.
        for entry in os.listdir(self.dest):
            if not entry.startswith(INCOMING_PREFIX):
                continue
            pid = entry[len(INCOMING_PREFIX):].split("-", 1)[0]
            if pid.isdigit() and not pid_alive(int(pid)):
                shutil.rmtree(os.path.join(self.dest, entry), ignore_errors=True)

    def _listing(self):
        if not os.path.isdir(self.tag_dir):
            return []
        return sorted(e for e in os.listdir(self.tag_dir) if not e.startswith("."))

    def _asset(self, name, path, digest, size, facts, checked, cached):
        return {
            "path": path,
            "sha256": digest,
            "size": size,
            "bundle_path": path + ".bundle",
            "identity": self.identity,
            "issuer": self.issuer,
            "log_index": facts["log_index"],
            "integrated_time": facts["integrated_time"],
            "checksum_verified": checked,
            "cached": cached,
            "url": self.source.display(name),
        }

    def _planned(self, name):
        path = os.path.join(self.tag_dir, name)
        return {"path": path, "sha256": None, "size": None, "bundle_path": path + ".bundle",
                "identity": self.identity, "issuer": self.issuer, "log_index": None, "integrated_time": None,
                "checksum_verified": False, "cached": False, "url": self.source.display(name)}

    def _result(self, assets, sums, before, after, changed):
        # Sigstore signs digests, not names: only the signed SHA256SUMS.txt binds each file to its asset name. A
        # mirror serving another asset's file and bundle under this name passes without it.
        if self.checksums == "ignore" or (sums is not None and sums["digests"] is None):
            self.warnings.append(
                "%s ran without %s (checksums=%s): the files are verified by their Sigstore bundles, but nothing binds "
                "each file to its asset name, so a mirror could serve another signed asset under this name. Carapace "
                "publishes %s with every release: use checksums: required (the roles' default)."
                % (self.tag, SUMS, self.checksums, SUMS))
        return {
            "changed": changed,
            "tag": self.tag,
            "repo": self.repo,
            "dest": self.tag_dir,
            "identity": self.identity,
            "issuer": self.issuer,
            "trusted_root": self.trust.source,
            "trusted_root_sha256": self.trust.sha256,
            "assets": assets,
            "checksums": {
                "mode": self.checksums,
                "present": bool(sums and sums["digests"] is not None),
                "path": sums["path"] if sums else None,
            },
            "actions": self.actions,
            "warnings": self.warnings,
            "diff": {"before": {"files": before}, "after": {"files": after}},
        }

    def _planned_files(self, assets, sums):
        files = set()
        for name in assets:
            files.update((name, name + ".bundle"))
        if self.checksums != "ignore" and (sums is None or sums["digests"] is not None):
            files.update((SUMS, SUMS + ".bundle"))
        return files
