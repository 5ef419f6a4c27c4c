# -*- coding: utf-8 -*-
# Copyright: carapace.fleet maintainers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The checked `state_dir` and `updates/` of one host, opened by file descriptor, with cara's update lock held:
where transaction.json is read and written.

Domain logic only (no Ansible imports). Every write satisfies cara's load-time validation and goes through
tmp + fsync + rename + fsync of `updates/` (0600, O_NOFOLLOW, relative to the directory's descriptor) while the
flock `updates/update.lock.lock` that `cara update` takes is held.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import pwd
import stat

from ansible_collections.carapace.fleet.plugins.module_utils import _atomic, _safejson
from ansible_collections.carapace.fleet.plugins.module_utils._transaction_model import (
    LOCK_NAME, MAX_FILE_BYTES, TX_NAME, UPDATES_DIR, TransactionError, dumps, problems)

_NOFOLLOW_ERRNOS = (errno.ELOOP, errno.EMLINK)


def _user(uid):
    try:
        return "%s (uid %d)" % (pwd.getpwuid(uid).pw_name, uid)
    except KeyError:
        return "uid %d" % uid


class Host:
    """The checked `state_dir` and `updates/` of one host, opened by file descriptor, with cara's update lock held.

    Use as a context manager. In check mode nothing is created, chmod-ed or written; the lock is taken (non-
    blocking) only when its file already exists, so a running update is reported as a real run would see it.
    """

    def __init__(self, state_dir, check_mode=False, create=False):
        self.state_dir = os.path.normpath(os.path.abspath(state_dir))
        self.updates_dir = os.path.join(self.state_dir, UPDATES_DIR)
        self.path = os.path.join(self.updates_dir, TX_NAME)
        self.lock_path = os.path.join(self.updates_dir, LOCK_NAME)
        self.check_mode = check_mode
        self.create = create
        self.actions = []
        self.changed = False
        self.state_fd = None
        self.updates_fd = None
        self.lock_fd = None
        self.euid = os.geteuid()

    def __enter__(self):
        try:
            self._open()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        for name in ("lock_fd", "updates_fd", "state_fd"):
            fd = getattr(self, name)
            if fd is not None:
                os.close(fd)
                setattr(self, name, None)

    def _insecure(self, path, what):
        return TransactionError("insecure_dir", "%s %s. cara refuses it too (non-retryable): every `cara update` on this "
                                "host fails until it is fixed. Make it a real directory owned by the user cara runs as, "
                                "mode 0700, and run this task as that user (become_user)." % (path, what))

    def _checked_dir(self, path, name, parent_fd):
        try:
            st = os.lstat(name, dir_fd=parent_fd) if parent_fd is not None else os.lstat(path)
        except FileNotFoundError:
            return None
        if stat.S_ISLNK(st.st_mode):
            raise self._insecure(path, "is a symlink")
        if not stat.S_ISDIR(st.st_mode):
            raise self._insecure(path, "is not a directory")
        if st.st_uid != self.euid:
            raise self._insecure(path, "is owned by %s, not by %s that runs this task" % (_user(st.st_uid), _user(self.euid)))
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
        fd = os.open(name if parent_fd is not None else path, flags, dir_fd=parent_fd)
        fst = os.fstat(fd)
        if (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino) or fst.st_uid != self.euid:
            os.close(fd)
            raise self._insecure(path, "changed while it was checked")
        mode = stat.S_IMODE(fst.st_mode)
        if mode & 0o077:
            if self.check_mode:
                self.actions.append("would remove group/other permissions from %s (%04o -> %04o)" % (path, mode, mode & 0o700))
            else:
                os.fchmod(fd, mode & 0o700)
                self.actions.append("removed group/other permissions from %s (%04o -> %04o)" % (path, mode, mode & 0o700))
            self.changed = True
        return fd

    def _open(self):
        self.state_fd = self._checked_dir(self.state_dir, None, None)
        if self.state_fd is None:
            return
        self.updates_fd = self._checked_dir(self.updates_dir, UPDATES_DIR, self.state_fd)
        if self.updates_fd is None:
            if not self.create:
                return
            if self.check_mode:
                self.actions.append("would create %s (0700)" % self.updates_dir)
                self.changed = True
                return
            os.mkdir(UPDATES_DIR, 0o700, dir_fd=self.state_fd)
            self.updates_fd = self._checked_dir(self.updates_dir, UPDATES_DIR, self.state_fd)
            os.fchmod(self.updates_fd, 0o700)
            self.actions.append("created %s (0700)" % self.updates_dir)
            self.changed = True
        self._lock()

    def _lock(self):
        cloexec = getattr(os, "O_CLOEXEC", 0)
        try:
            if self.check_mode:
                self.lock_fd = os.open(LOCK_NAME, os.O_RDONLY | os.O_NOFOLLOW | cloexec, dir_fd=self.updates_fd)
            else:
                self.lock_fd = os.open(LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | cloexec, 0o600,
                                       dir_fd=self.updates_fd)
        except FileNotFoundError:
            return  # check mode only: nobody created the lock file, so nobody holds it
        except OSError as exc:
            if exc.errno in _NOFOLLOW_ERRNOS:
                raise self._insecure(self.lock_path, "is a symlink") from exc
            raise
        try:
            fcntl.flock(self.lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise TransactionError("lock_held", "another update is running on this host (lock %s held). Wait until it "
                                   "ends (a `cara update`, or another carapace.fleet run on this host), then run this "
                                   "again." % self.lock_path, retryable=True) from exc

    def corrupt(self, what):
        return TransactionError("corrupt", "update transaction %s is invalid: %s. cara refuses such a file too: every "
                                "`cara update` on this host fails until it is removed. Inspect it (it is evidence of an "
                                "interrupted or tampered update), then remove it, or run carapace.fleet.cara_transaction "
                                "with action=clear and force=true, and start the update again." % (self.path, what))

    def read(self):
        """The transaction on disk (validated as cara validates it), or None. Raises TransactionError."""
        if self.updates_fd is None:
            return None
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(TX_NAME, flags, dir_fd=self.updates_fd)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno in _NOFOLLOW_ERRNOS:
                raise TransactionError("corrupt", "update transaction %s is a symlink; it is never followed (cara refuses it "
                                       "too). Inspect where it points, then remove the link (or run this module with "
                                       "action=clear and force=true) and start the update again." % self.path) from exc
            raise
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise self.corrupt("it is not a regular file")
            chunks, size = [], 0
            while size <= MAX_FILE_BYTES:
                chunk = os.read(fd, MAX_FILE_BYTES + 1 - size)
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
        finally:
            os.close(fd)
        if size > MAX_FILE_BYTES:
            raise self.corrupt("it is larger than 64 KiB, the most cara reads")
        try:
            tx = _safejson.loads(b"".join(chunks).decode("utf-8"), parse_constant=_reject_constant)
        except UnicodeDecodeError as exc:
            raise self.corrupt("it is not UTF-8 (%s)" % exc) from exc
        except ValueError as exc:
            raise self.corrupt("it is not valid JSON (%s)" % exc) from exc
        found = problems(tx, self.state_dir)
        if found:
            raise self.corrupt("; ".join(found))
        return tx

    def write(self, tx):
        """Atomically replace transaction.json: tmp in updates/ (0600, O_EXCL|O_NOFOLLOW) + fsync + rename + fsync dir.

        A symlink at transaction.json is replaced, never followed (read() refuses it; a forced create replaces it)."""
        found = problems(tx, self.state_dir, strict=True)
        if found:
            raise TransactionError("bad_argument", "refusing to write a transaction cara would reject: %s" % "; ".join(found))
        data = dumps(tx)
        if len(data) > MAX_FILE_BYTES:
            raise TransactionError("bad_argument", "the transaction would be %d bytes, more than the 64 KiB cara reads; "
                                   "pass smaller facts" % len(data))
        if self.check_mode:
            return
        _atomic.write_file(TX_NAME, data, mode=0o600, dir_fd=self.updates_fd, replace_symlink=True,
                           prefix=".%s.%d." % (TX_NAME, os.getpid()))

    def remove(self):
        """Delete transaction.json (the link itself when it is one). Returns whether something was removed."""
        if self.updates_fd is None:
            return False
        try:
            st = os.lstat(TX_NAME, dir_fd=self.updates_fd)
        except FileNotFoundError:
            return False
        if stat.S_ISDIR(st.st_mode):
            raise TransactionError("io_error", "%s is a directory; remove it by hand" % self.path)
        if not self.check_mode:
            os.unlink(TX_NAME, dir_fd=self.updates_fd)
            _atomic.fsync_dir(self.updates_fd)
        return True

    def hash_staged(self, name):
        """(status, sha256 hex) of `updates/<name>`, never following a symlink (see resume_point)."""
        if self.updates_fd is None:
            return "missing", None
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(name, flags, dir_fd=self.updates_fd)
        except FileNotFoundError:
            return "missing", None
        except OSError as exc:
            if exc.errno in _NOFOLLOW_ERRNOS:
                return "not_regular", None
            raise
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return "not_regular", None
            if st.st_size == 0:
                return "empty", None
            digest = hashlib.sha256()
            while True:
                chunk = os.read(fd, 1024 * 1024)
                if not chunk:
                    break
                digest.update(chunk)
            return "ok", digest.hexdigest()
        finally:
            os.close(fd)


def _reject_constant(name):
    raise ValueError("%s is not JSON" % name)
