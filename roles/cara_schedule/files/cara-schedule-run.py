"""Runner of one carapace.fleet scheduled job (roles/cara_schedule): the job's systemd service runs

    <python> cara-schedule-run.py <job dir>/job.json

It takes the job's lock (flock, non-blocking, as `flock -n` does), runs ansible-playbook with the job's inventory,
its extra vars file (-e @vars.yml) and the run's own vars (a run id, the report dir), and maps the exit code:

    0    the playbook succeeded: its report.json says summary.outcome "ok"
    75   EX_TEMPFAIL: the run is incomplete but safe (summary.outcome "incomplete", hosts left pending, e.g. the
         maintenance window closed), or another run holds the job's lock; the next start carries on. The unit
         lists 75 in SuccessExitStatus=, so neither is a unit failure.
    *    otherwise ansible-playbook's own exit code (a playbook that failed is never called ok).

Output goes to the journal (the unit's StandardOutput=journal). The job file names no secrets; the extra vars file
(which may) is only ever passed by path. Standard library only.
"""

import datetime
import fcntl
import json
import os
import subprocess
import sys

EX_TEMPFAIL = 75
# ansible-playbook's "one or more hosts failed": how a playbook fails at its own end, as an incomplete run does.
# Other codes (1 error, 4 unreachable, 99/250 interrupted or crashed) are never mapped to a temporary failure.
HOSTS_FAILED = 2
# The variables that put a playbook's report in the job's report dir. The drill's own default comes from
# cara_drill_report_dir; an extra var cara_report_dir would win over it, so the drill gets both.
REPORT_VARS = {"upgrade": ("cara_report_dir",), "drill": ("cara_drill_report_dir", "cara_report_dir")}


def say(job, text):
    print("carapace-fleet schedule %s: %s" % (job["name"], text), flush=True)


def take_lock(path):
    """The lock's descriptor, or None when another run holds it."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def read_outcome(path):
    """summary.outcome of a report.json; None when there is none to read (the run stopped before its report)."""
    try:
        with open(path, encoding="utf-8") as f:
            summary = json.load(f).get("summary")
    except (OSError, ValueError, AttributeError):
        return None
    return summary.get("outcome") if isinstance(summary, dict) else None


def exit_code(rc, outcome):
    """75 for an incomplete but safe run; else the playbook's own code (0 with an "ok" report: a passed run)."""
    if outcome == "incomplete" and rc in (0, HOSTS_FAILED):
        return EX_TEMPFAIL
    return rc


def main(argv):
    if len(argv) != 2:
        print("usage: cara-schedule-run.py JOB_JSON", file=sys.stderr)
        return 64
    with open(argv[1], encoding="utf-8") as f:
        job = json.load(f)
    lock = take_lock(job["lock"])
    if lock is None:
        say(job, "another run holds the lock %s: this start does nothing (exit %d)" % (job["lock"], EX_TEMPFAIL))
        return EX_TEMPFAIL
    run_id = "%s-%s" % (job["name"], datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ"))
    own_vars = dict({var: job["report_dir"] for var in REPORT_VARS[job["kind"]]}, cara_fleet_run_id=run_id)
    # The run's own vars come last: they win over the same names in the extra vars file.
    cmd = ([job["ansible_playbook"], "-i", job["inventory"]] + list(job["ansible_args"])
           + [job["playbook"], "-e", "@" + job["vars_file"], "-e", json.dumps(own_vars, sort_keys=True)])
    # Unbuffered: the journal follows the run as it goes, not in blocks.
    env = dict(os.environ, PYTHONUNBUFFERED="1", ANSIBLE_NOCOLOR="1")
    env.update({str(k): str(v) for k, v in job["environment"].items()})
    say(job, "run %s starts: %s" % (run_id, " ".join(cmd)))
    try:
        rc = subprocess.call(cmd, env=env)
    except OSError as e:
        say(job, "run %s: cannot start %s: %s" % (run_id, job["ansible_playbook"], e))
        return 127
    report = os.path.join(job["report_dir"], job["kind"], run_id, "report.json")
    outcome = read_outcome(report)
    code = exit_code(rc, outcome)
    say(job, "run %s ended: ansible-playbook exit %d, %s, exit %d%s" % (
        run_id, rc, "report %s outcome %s" % (report, outcome) if outcome else "no outcome in %s" % report, code,
        " (incomplete but safe: the next run carries on)" if code == EX_TEMPFAIL else ""))
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv))
