# -*- coding: utf-8 -*-
# Copyright: carapace.fleet maintainers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Run one function as another user (the account that owns cara's state), from a process running as root.

Domain logic only (no Ansible imports). cara refuses a state dir owned by anyone else, and a restore as root could
follow what that user planted; so a host-side task that stops and starts the service as root still runs every cara
command and every state write as that user. The function runs in a forked child that dropped to the user (groups,
gid, uid, HOME); its return value (plain JSON data) or its error comes back through a pipe.
"""

from __future__ import annotations

import json
import os
import pwd
import traceback

from ansible_collections.carapace.fleet.plugins.module_utils._errors import FleetError


class AsUserError(FleetError):
    """The function failed in the child: its cause and message as it raised them, plus `extra` facts."""

    def __init__(self, cause, message, extra=None):
        super().__init__(cause, message)
        self.extra = extra or {}


def needs_switch(user):
    """Whether running as `user` means a switch: a user is named and it is not the one this process runs as."""
    return bool(user) and user != pwd.getpwuid(os.geteuid()).pw_name


def _drop(entry):
    os.setgroups(os.getgrouplist(entry.pw_name, entry.pw_gid))
    os.setgid(entry.pw_gid)
    os.setuid(entry.pw_uid)
    os.environ.update(HOME=entry.pw_dir or "/", USER=entry.pw_name, LOGNAME=entry.pw_name)
    os.chdir("/")


def _encode_error(exc):
    if isinstance(exc, FleetError):
        extra = getattr(exc, "extra", None)
        extra = extra if isinstance(extra, dict) else {}
        for name in ("retryable", "changed", "transaction"):
            if hasattr(exc, name):
                extra.setdefault(name, getattr(exc, name))
        return {"cause": exc.cause, "message": exc.message, "extra": extra}
    cause = "io_error" if isinstance(exc, OSError) else "internal"
    return {"cause": cause, "message": "%s: %s" % (type(exc).__name__, exc), "extra": {"trace": traceback.format_exc()}}


def _max_fd():
    try:
        return os.sysconf("SC_OPEN_MAX")
    except (ValueError, OSError):
        return 1024


def call_as(user, func, *args, **kwargs):
    """func(*args, **kwargs), as `user` when that is another user than this process's (root only); raises AsUserError
    with the child's cause and message when it fails. Without a switch it is called here and raises as it does."""
    if not needs_switch(user):
        return func(*args, **kwargs)
    if os.geteuid() != 0:
        raise AsUserError("wrong_user", "this task runs as %s and cannot act as %s: run it as root (become), or as %s"
                          % (pwd.getpwuid(os.geteuid()).pw_name, user, user))
    try:
        entry = pwd.getpwnam(user)
    except KeyError as exc:
        raise AsUserError("bad_argument", "there is no user %s on this host (state_user)" % user) from exc
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        status = 0
        try:
            os.close(read_fd)
            # Only the result pipe: inherited descriptors (the window's flock above all) must not outlive the
            # caller in a child it can no longer wait for.
            os.closerange(3, write_fd)
            os.closerange(write_fd + 1, _max_fd())
            try:
                _drop(entry)
                out = {"value": func(*args, **kwargs)}
            except Exception as exc:  # pylint: disable=broad-exception-caught
                out = {"error": _encode_error(exc)}
            data = json.dumps(out, default=str).encode("utf-8")
            view = memoryview(data)
            while view:
                view = view[os.write(write_fd, view):]
        except BaseException:  # pylint: disable=broad-exception-caught
            status = 1
        finally:
            os._exit(status)  # pylint: disable=protected-access
    os.close(write_fd)
    chunks = []
    with os.fdopen(read_fd, "rb") as pipe:
        while True:
            chunk = pipe.read(1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
    _pid, status = os.waitpid(pid, 0)
    try:
        out = json.loads(b"".join(chunks).decode("utf-8"))
    except ValueError as exc:
        raise AsUserError("internal", "the step run as %s ended without a result (wait status %s)" % (user, status)) from exc
    if "error" in out:
        err = out["error"]
        raise AsUserError(err["cause"], err["message"], err.get("extra"))
    return out["value"]
