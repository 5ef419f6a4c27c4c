# -*- coding: utf-8 -*-
# Copyright: carapace.fleet maintainers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Atomic replacement of a file or a symlink: the one way every module writes a file that someone reads.

Domain logic only (no Ansible imports). A write goes to a fresh temporary file in the target's directory, created
relative to a descriptor of that directory (O_CREAT|O_EXCL|O_NOFOLLOW, so no planted name or symlink is ever
written through), gets its mode (and owner) on the descriptor, is fsync-ed, renamed over the target relative to the
same directory descriptor, and then the directory is fsync-ed so that the rename survives a crash. Until the rename
the target is untouched; when anything fails the temporary file is removed.

A symlink at the target is refused (OSError ELOOP) unless the caller says that replacing the link itself is what it
wants (`replace_symlink=True`); rename never writes through a link either way.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat

_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def open_dir(path):
    """A read-only descriptor of the directory `path` (symlinks on the way are followed, as the path says)."""
    return os.open(path or ".", os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | _CLOEXEC)


def fsync_dir(path_or_fd):
    """fsync a directory (a path or an open descriptor) so that renames in it are durable.

    A filesystem that cannot fsync directories (EINVAL) is not an error; any other failure is.
    """
    if isinstance(path_or_fd, int):
        fd, own = path_or_fd, False
    else:
        fd, own = open_dir(path_or_fd), True
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        if own:
            os.close(fd)


def _temp_name(prefix, suffix):
    return "%s%s%s" % (prefix, secrets.token_hex(8), suffix)


def _refuse_symlink(name, dir_fd, shown):
    try:
        st = os.lstat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise OSError(errno.ELOOP, "refusing to replace a symlink (%s)" % os.strerror(errno.ELOOP), shown)


@contextlib.contextmanager
def atomic_file(path, mode=0o600, dir_fd=None, owner=None, mtime=None, prefix=None, suffix=".tmp",
                replace_symlink=False, sync_dir=True):
    """Replace `path` atomically with what the `with` block writes to the yielded binary file object.

    `path` is a path, or with `dir_fd` a name inside that open directory. The file gets `mode` (not reduced by the
    umask), with `owner` (uid, gid) its owner, with `mtime` its access and modification times, all set on the
    descriptor before the rename. The file object is opened for reading too (seek(0) to read back what was
    written). An exception in the block, or in the commit, removes the temporary file and leaves `path` as it was.
    """
    if dir_fd is None:
        directory, name = os.path.split(path)
        dfd, own_dir = open_dir(directory), True
    else:
        name, dfd, own_dir = path, dir_fd, False
    if not name or "/" in name:
        raise ValueError("%r does not name a file" % (path,))
    prefix = ".%s." % name if prefix is None else prefix
    tmp = None
    try:
        for _attempt in range(10):
            candidate = _temp_name(prefix, suffix)
            try:
                fd = os.open(candidate, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | _CLOEXEC, 0o600,
                             dir_fd=dfd)
            except FileExistsError:
                continue
            tmp = candidate
            break
        else:
            raise OSError(errno.EEXIST, "no free temporary name next to it", path)
        try:
            with os.fdopen(fd, "w+b") as handle:
                yield handle
                handle.flush()
                os.fchmod(handle.fileno(), mode)
                if owner is not None:
                    os.fchown(handle.fileno(), owner[0], owner[1])
                if mtime is not None:
                    os.utime(handle.fileno(), (mtime, mtime))
                os.fsync(handle.fileno())
            if not replace_symlink:
                _refuse_symlink(name, dfd, path)
            os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
            tmp = None
        finally:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=dfd)
        if sync_dir:
            fsync_dir(dfd)
    finally:
        if own_dir:
            os.close(dfd)


def write_file(path, data, mode=0o600, **kwargs):
    """Replace `path` atomically with `data` (bytes, or text written as UTF-8); see atomic_file for the keywords."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    with atomic_file(path, mode=mode, **kwargs) as handle:
        handle.write(data)


def replace_with_symlink(target, path, prefix=None):
    """Make `path` a symlink to `target`: a symlink under a fresh temporary name in the same directory, renamed over
    `path` (whatever it is), then the directory fsync-ed. `path` exists, old or new, at every moment."""
    directory, name = os.path.split(path)
    prefix = ".%s." % name if prefix is None else prefix
    dfd = open_dir(directory)
    try:
        for _attempt in range(10):
            tmp = _temp_name(prefix, "")
            try:
                os.symlink(target, tmp, dir_fd=dfd)
                break
            except FileExistsError:
                continue
        else:
            raise OSError(errno.EEXIST, "no free temporary name next to it", path)
        try:
            os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dfd)
            raise
        fsync_dir(dfd)
    finally:
        os.close(dfd)
