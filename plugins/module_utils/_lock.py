# -*- coding: utf-8 -*-
# Copyright: carapace.fleet maintainers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""A controller-side run lock, so two scheduled runs on one inventory never overlap.

Domain logic only (no Ansible imports). The lock is a small JSON file naming the run and the
ansible-playbook process that holds it. It outlives the module process (a run spans many tasks), so
it is not an flock; a lock whose process is gone is stale and is taken over, with a warning.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import stat
import tempfile
import time

from ansible_collections.carapace.fleet.plugins.module_utils import _safejson
from ansible_collections.carapace.fleet.plugins.module_utils._cara import pid_alive


class LockHeld(Exception):
    """Another live run holds the lock."""


def _cmdline(pid):
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            return f.read().replace(b"\0", b" ").decode("utf-8", "replace")
    except OSError:
        return ""


def _ppid(pid):
    try:
        with open("/proc/%d/stat" % pid, "r", encoding="utf-8") as f:
            # the command name may hold spaces and parentheses: the fields after the last ')' are fixed
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def playbook_pid(start=None):
    """The ansible-playbook (or ansible) process this module runs under, by walking /proc; None if not found."""
    pid = start or os.getppid()
    for _unused in range(64):
        if not pid or pid <= 1:
            return None
        line = _cmdline(pid)
        if "ansible-playbook" in line or "/ansible " in line or line.startswith("ansible "):
            return pid
        pid = _ppid(pid)
    return None


def alive(pid):
    """Whether the process holding a lock still runs (a reused pid that is not ansible does not count)."""
    if not pid:
        return False
    line = _cmdline(pid)
    if os.path.isdir("/proc/self") and line and "ansible" not in line:
        return False
    return pid_alive(pid)


def read(path):
    try:
        with open(path, "r", encoding="utf-8") as f:
            return _safejson.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {"run_id": None, "pid": None, "corrupt": True}


def _open_guard(path):
    """The guard file next to the lock, for flock: never through a symlink (O_NOFOLLOW), and a regular file."""
    fd = os.open(path + ".guard", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o600)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file", path + ".guard")
    return os.fdopen(fd, "r+", encoding="utf-8")


def _write_new(path, data):
    """Write data to path atomically: a fresh temp file (O_EXCL|O_NOFOLLOW, random name) renamed over it."""
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=os.path.dirname(path) or ".")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def acquire(path, run_id, pid):
    """Take the lock for run_id (held by process pid). Returns (changed, previous holder or None, stale?)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with _open_guard(path) as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        holder = read(path)
        if holder and holder.get("run_id") == run_id:
            return False, holder, False
        stale = bool(holder) and not alive(holder.get("pid"))
        if holder and not stale:
            raise LockHeld("another carapace.fleet run holds %s: run %s, pid %s on %s, since %s. Wait for it to end; "
                           "if that process is gone, remove the file."
                           % (path, holder.get("run_id"), holder.get("pid"), holder.get("host"), holder.get("started")))
        _write_new(path, json.dumps({"run_id": run_id, "pid": pid, "host": socket.gethostname(),
                                     "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}))
        return True, holder, stale


def release(path, run_id):
    """Drop the lock if run_id holds it. Returns changed."""
    if not os.path.lexists(path + ".guard") and not os.path.lexists(path):
        return False
    with _open_guard(path) as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        holder = read(path)
        if not holder or holder.get("run_id") != run_id:
            return False
        os.unlink(path)
        return True
