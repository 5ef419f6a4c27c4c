# -*- coding: utf-8 -*-
# Copyright: carapace.fleet maintainers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""A controller-side run lock, so two scheduled runs on one inventory never overlap.

Domain logic only (no Ansible imports). The lock is a small JSON file naming the run and the top-level
ansible-playbook process that holds it: its pid and its start time (field 22 of /proc/<pid>/stat, clock ticks since
boot) plus the boot id, found by walking up the parents of the module's process. The per-task worker fork that runs a
module ends with the task; the top-level process lives as long as the run. It outlives the module process, so it is
not an flock. Only the lock of a dead run is stale: a lock is taken over (with a warning) once its process is gone,
or its pid now belongs to another process (another start time or another boot).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import stat
import time

from ansible_collections.carapace.fleet.plugins.module_utils import _atomic, _safejson
from ansible_collections.carapace.fleet.plugins.module_utils._cara import pid_alive
from ansible_collections.carapace.fleet.plugins.module_utils._errors import FleetError


class LockHeld(FleetError):
    """Another live run holds the lock (cause `lock_held`)."""

    def __init__(self, message):
        super().__init__("lock_held", message)


def _cmdline(pid):
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            return f.read().replace(b"\0", b" ").decode("utf-8", "replace")
    except OSError:
        return ""


def _stat_fields(pid):
    """Fields 3 and later of /proc/<pid>/stat (index 0 is field 3, the state), or None."""
    try:
        with open("/proc/%d/stat" % pid, "r", encoding="utf-8", errors="replace") as f:
            # the command name may hold spaces and parentheses: the fields after the last ')' are fixed
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _ppid(pid):
    fields = _stat_fields(pid)
    try:
        return int(fields[1])
    except (TypeError, ValueError, IndexError):
        return None


def start_time(pid):
    """The start time of process pid (field 22 of /proc/<pid>/stat, clock ticks after boot), or None."""
    fields = _stat_fields(pid) if pid else None
    try:
        return int(fields[19])
    except (TypeError, ValueError, IndexError):
        return None


def boot_id():
    try:
        with open("/proc/sys/kernel/random/boot_id", "r", encoding="utf-8") as f:
            return f.read().strip() or None
    except OSError:
        return None


def _is_ansible(line):
    return "ansible-playbook" in line or "/ansible " in line or line.startswith("ansible ")


def playbook_pid(start=None):
    """The top-level ansible-playbook (or ansible) process this module runs under, or None if there is none.

    Walks up from the module's parent: past the shell (and sudo) that started the module, to the first ansible
    process, which is the per-task worker fork, then on through the ansible processes above it (forks carry the
    command line of the process they were forked from) to the topmost one: the run itself.
    """
    pid = start or os.getppid()
    found = None
    for _unused in range(64):
        if not pid or pid <= 1:
            break
        if _is_ansible(_cmdline(pid)):
            found = pid
        elif found is not None:
            break
        pid = _ppid(pid)
    return found


def identity(pid):
    """What a lock records about the process holding it: pid, start time and boot id."""
    return {"pid": pid, "start_time": start_time(pid), "boot_id": boot_id()}


def holder_alive(holder):
    """Whether the run that holds a lock (its content) still runs.

    With a recorded start time the process must exist with that very start time, in the same boot: a pid reused by
    any other process does not count. A lock written on another controller cannot be checked and counts as alive.
    Locks of older versions (no start time) fall back to: the pid runs and is an ansible process.
    """
    if not holder or holder.get("corrupt"):
        return False
    pid = holder.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 1:
        return False
    if holder.get("host") and holder["host"] != socket.gethostname():
        return True
    if holder.get("start_time") is not None:
        if holder.get("boot_id") and boot_id() and holder["boot_id"] != boot_id():
            return False
        return start_time(pid) == holder["start_time"]
    return alive(pid)


def alive(pid):
    """Whether pid runs and is an ansible process (the check for locks that record no start time)."""
    if not pid:
        return False
    line = _cmdline(pid)
    if not line or "ansible" not in line:
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


def held_message(path, holder):
    return ("another carapace.fleet run holds %s: run %s (ansible-playbook pid %s on %s, since %s) is still running. "
            "Wait for it to end or stop it; its lock is taken over only once that process is gone."
            % (path, holder.get("run_id"), holder.get("pid"), holder.get("host"), holder.get("started")))


def _open_guard(path):
    """The guard file next to the lock, for flock: never through a symlink (O_NOFOLLOW), and a regular file."""
    fd = os.open(path + ".guard", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o600)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file", path + ".guard")
    return os.fdopen(fd, "r+", encoding="utf-8")


def _write_new(path, data):
    """Write data to path atomically (a fresh temp file, O_EXCL|O_NOFOLLOW, random name, renamed over it; 0600)."""
    _atomic.write_file(path, data, mode=0o600, prefix=os.path.basename(path) + ".", replace_symlink=True)


def acquire(path, run_id, pid):
    """Take the lock for run_id, held by process pid (recorded with its start time, see identity()).

    Returns (changed, previous holder or None, stale?). Raises LockHeld while another run's process lives."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with _open_guard(path) as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        holder = read(path)
        if holder and holder.get("run_id") == run_id:
            return False, holder, False
        stale = bool(holder) and not holder_alive(holder)
        if holder and not stale:
            raise LockHeld(held_message(path, holder))
        record = {"run_id": run_id, "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        record.update(identity(pid))
        _write_new(path, json.dumps(record))
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
