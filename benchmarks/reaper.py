"""Run one command as a child subreaper, so that orphaned descendants are reaped while it runs.

    python benchmarks/reaper.py COMMAND [ARG...]      exit status: the command's

Why: the `process` service script starts cara with `setsid cara start &` and exits, so the daemon is re-parented
to the nearest subreaper, normally PID 1. On this machine PID 1 (a VM agent) never reaps, a stopped daemon stays
a zombie, `kill -0` keeps succeeding, and every `cara-service stop` waits its whole stop timeout (20 s) before
it gives up. A real host's init reaps at once; this wrapper plays that part for the benchmarks (and only that:
it starts nothing else and changes nothing in what is measured).
"""

import ctypes
import os
import signal
import subprocess
import sys

PR_SET_CHILD_SUBREAPER = 36


def become_subreaper():
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed")


def main(argv):
    if not argv:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    become_subreaper()
    child = subprocess.Popen(argv)  # pylint: disable=consider-using-with
    # Forward the usual stop signals to the command, so its own cleanup (finally/trap) runs.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda signum, _frame: child.send_signal(signum))
    status = None
    while status is None:
        try:
            pid, raw = os.wait()  # reaps the command and any orphan re-parented to us
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        if pid == child.pid:
            status = os.waitstatus_to_exitcode(raw)
    # Orphans still running after the command ended are left to whoever adopts them next; reap the dead ones.
    while True:
        try:
            pid, _raw = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            break
    if status is None:
        status = 1
    return 128 - status if status < 0 else status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
