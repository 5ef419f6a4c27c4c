# carapace.fleet's start guard: run before every start of cara, by the unit (ExecStartPre) and the service script.
#
# cara resumes an interrupted update transaction by itself at every start: released v0.8.0
# downloads the target from GitHub and copies it over its own running binary. A transaction of carapace.fleet
# (one with the `fleet` key) that cara would resume is therefore made terminal here first: failed, not retryable,
# saying what happened. cara's own transactions (no `fleet` key) are cara's business and left alone. Exit 1 (so
# cara is not started) only when such a transaction cannot be made terminal, or cannot be read safely.
# Installed by roles/cara_service and run as `<python> cara-start-guard.py <state dir>` (standard library only).
import json
import os
import stat
import sys
import time

MAX_BYTES = 64 * 1024


def read(path):
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError("not a regular file")
        data = os.read(fd, MAX_BYTES + 1)
    finally:
        os.close(fd)
    try:
        tx = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError):
        return None  # cara cannot parse it either, so it resumes nothing
    return tx if isinstance(tx, dict) else None


def resumable(tx):
    """cara's transaction_resume_pending (3.3): in progress, or a retryable failure with attempts left."""
    if tx.get("state") == "in_progress":
        return True
    attempt, most = tx.get("attempt"), tx.get("maxAttempts")
    return (tx.get("state") == "failed" and tx.get("retryable") is True and isinstance(attempt, int)
            and isinstance(most, int) and attempt < most)


def write(path, tx):
    directory = os.path.dirname(path)
    tmp = os.path.join(directory, ".transaction.json.guard.%d.tmp" % os.getpid())
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, (json.dumps(tx, indent=2) + "\n").encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def main(state_dir):
    path = os.path.join(state_dir, "updates", "transaction.json")
    try:
        tx = read(path)
    except OSError as exc:  # a symlink (ELOOP), a FIFO, unreadable: cara may still follow it, so do not start it
        sys.stderr.write("cara-start-guard: cannot read %s safely (%s); not starting cara, which could resume an update "
                         "from it. Inspect and remove it, then start again.\n" % (path, exc))
        return 1
    if tx is None or not isinstance(tx.get("fleet"), dict) or not resumable(tx):
        return 0
    now = int(time.time() * 1000)
    was = "%s at phase %s (attempt %s)" % (tx.get("state"), tx.get("phase"), tx.get("attempt"))
    error = ("carapace.fleet start guard: cara was started while this host's fleet transaction to %s was %s, outside "
             "a carapace.fleet run (a reboot or a manual start); it was made terminal so that cara does not resume it "
             "by itself. Re-run the upgrade playbook: it finishes or rolls back what the interrupted run left."
             % (tx.get("version"), was))
    fleet = tx["fleet"]
    if tx.get("phase") != "failed":
        fleet["failed_phase"] = tx.get("phase")
    fleet["start_guard"] = {"at_ms": now, "was": {"state": tx.get("state"), "phase": tx.get("phase")}}
    history = fleet.get("history") if isinstance(fleet.get("history"), list) else []
    fleet["history"] = history + [{"event": "failed", "by": "start_guard", "attempt": tx.get("attempt"),
                                   "phase": tx.get("phase"), "error": error, "retryable": False, "at_ms": now}]
    tx.update(state="failed", phase="failed", retryable=False, lastError=error, updatedAtMs=max(now, tx.get("updatedAtMs") or 0))
    try:
        write(path, tx)
    except OSError as exc:
        sys.stderr.write("cara-start-guard: %s is %s and cannot be made terminal (%s); not starting cara, which would "
                         "resume it by itself. Fix the state dir, then start again.\n" % (path, was, exc))
        return 1
    sys.stderr.write("cara-start-guard: %s was %s; marked failed, not retryable, before cara starts\n" % (path, was))
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.stderr.write("usage: cara-start-guard STATE_DIR\n")
        sys.exit(2)
    sys.exit(main(sys.argv[1]))
