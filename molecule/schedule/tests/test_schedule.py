"""schedule: the scheduled upgrade the timer fired on schedule-1 (its own controller), and the role itself there.

The run is waited for (bounded), never started by the test: the timer must have triggered it.
"""

import json
import os
import re
import time

import pytest

from conftest import active_release, health

UNIT = "carapace-fleet-upgrade"
JOB_DIR = "/etc/carapace-fleet/schedules/upgrade"
REPORTS = "/var/lib/carapace-fleet/reports"
LOCK = "/run/lock/carapace-fleet-upgrade.lock"
RUNNER = "/usr/local/libexec/carapace-fleet/cara-schedule-run.py"
SECRET = "s3cr3t-e1c9a7f0"
RUN_ID = re.compile(r"^upgrade-[0-9]{8}T[0-9]{6}Z$")


def show(host, unit, *props):
    out = host.check_output("systemctl show %s -p %s", unit, ",".join(props))
    return dict(line.split("=", 1) for line in out.splitlines())


@pytest.fixture(scope="module")
def finished(host):
    """The service's properties once the run the timer started has ended (up to 300 s)."""
    deadline = time.monotonic() + 300
    while True:
        timer = show(host, UNIT + ".timer", "LastTriggerUSec")
        svc = show(host, UNIT + ".service", "ActiveState", "Result", "ExecMainStatus", "ExecMainStartTimestamp",
                   "ExecMainExitTimestamp")
        if timer["LastTriggerUSec"] not in ("", "n/a", "0") and svc["ExecMainExitTimestamp"] not in ("", "n/a") \
                and svc["ActiveState"] in ("inactive", "failed"):
            return dict(svc, LastTriggerUSec=timer["LastTriggerUSec"])
        assert time.monotonic() < deadline, "the timer did not fire, or the run did not end, in 300 s: %s %s" % (
            timer, svc)
        time.sleep(2)


# The role run on the host itself (Ansible is mounted there): a job that only check mode sees, then installed,
# then removed. Runs first, while the scheduled upgrade may still be running (it touches none of its files).
PROBE = """
- name: cara_schedule on this host
  hosts: localhost
  connection: local
  gather_facts: false
  roles:
    - role: carapace.fleet.cara_schedule
      vars:
        cara_schedule_jobs:
          - name: probe
            state: %s
            playbook: carapace.fleet.rollback_drill
            on_calendar: "2099-01-01 00:00:00"
            inventory: /etc/carapace-fleet/inventory.yml
            extra_vars: {cara_drill_version: v0.9.1}
"""


def apply_role(host, state, *args):
    project = os.environ["MOLECULE_PROJECT_DIRECTORY"]
    host.check_output("cat > /tmp/probe.yml <<'EOF'\n%s\nEOF" % (PROBE % state))
    out = host.run("cd /tmp && ANSIBLE_COLLECTIONS_PATH=%s/.collections %s/.venv/bin/ansible-playbook -i localhost, "
                   "/tmp/probe.yml" + "".join(" " + a for a in args), project, project)
    assert out.rc == 0, out.stdout + out.stderr
    return out.stdout


def test_the_role_in_check_mode_then_present_then_absent(host):
    files = ["/etc/systemd/system/carapace-fleet-probe.timer", "/etc/systemd/system/carapace-fleet-probe.service",
             "/etc/carapace-fleet/schedules/probe"]
    apply_role(host, "present", "--check")
    assert not any(host.file(f).exists for f in files), "check mode changed the host"
    apply_role(host, "present")
    assert all(host.file(f).exists for f in files)
    timer = show(host, "carapace-fleet-probe.timer", "ActiveState", "UnitFileState")
    assert timer == {"ActiveState": "active", "UnitFileState": "enabled"}
    job = json.loads(host.file("/etc/carapace-fleet/schedules/probe/job.json").content_string)
    assert job["kind"] == "drill" and job["lock"] == "/run/lock/carapace-fleet-probe.lock"
    apply_role(host, "absent")
    assert not any(host.file(f).exists for f in files)
    assert show(host, "carapace-fleet-probe.timer", "LoadState") == {"LoadState": "not-found"}


def report_dir(host):
    runs = host.check_output("ls %s/upgrade", REPORTS).split()
    ids = [r for r in runs if RUN_ID.match(r)]
    assert len(ids) == 1, runs
    return "%s/upgrade/%s" % (REPORTS, ids[0])


def test_the_timer_fired_the_run_and_it_passed(finished):
    assert finished["Result"] == "success" and finished["ExecMainStatus"] == "0", finished
    assert finished["ActiveState"] == "inactive"


def test_the_report_of_the_run_says_ok(host, finished):
    path = report_dir(host)
    report = json.loads(host.file(path + "/report.json").content_string)
    assert report["run"]["id"] == path.rsplit("/", 1)[1] and report["run"]["kind"] == "upgrade"
    summary = report["summary"]
    # summary.outcome is what the runner maps to its exit code
    assert summary["outcome"] == "ok" and summary["ok"] is True, summary
    assert host.file(path + "/report.html").exists
    rows = {row["host"]: row for row in report["hosts"]}
    assert rows["schedule-1"]["result"] == "upgraded" and rows["schedule-1"]["to"] == "v0.9.0", rows
    # <report_dir>/report.json points at the newest run
    assert json.loads(host.file(REPORTS + "/report.json").content_string)["run"]["id"] == report["run"]["id"]


def test_the_host_runs_v090(host, finished):
    assert active_release(host)[0] == "v0.9.0"
    assert health(host)["version"] == "0.9.0"


def test_the_journal_keeps_the_run(host, finished):
    log = host.check_output("journalctl -o cat -t %s --no-pager", UNIT)
    assert "PLAY RECAP" in log
    assert "carapace-fleet schedule upgrade: run upgrade-" in log and ", exit 0" in log
    assert SECRET not in log
    assert SECRET not in host.check_output("journalctl -o cat --no-pager")


def test_job_files(host, finished):
    vars_file = host.file(JOB_DIR + "/vars.yml")
    assert (vars_file.mode, vars_file.user) == (0o600, "root")
    assert SECRET in vars_file.content_string
    for unit in (UNIT + ".service", UNIT + ".timer"):
        assert SECRET not in host.file("/etc/systemd/system/" + unit).content_string
    assert host.file(JOB_DIR + "/job.json").mode == 0o600
    assert host.file(LOCK).exists


def test_units(host):
    svc = show(host, UNIT + ".service", "Type", "SuccessExitStatus", "TimeoutStartUSec", "Restart", "User",
               "SyslogIdentifier", "StandardOutput")
    assert svc["Type"] == "oneshot" and svc["Restart"] == "no" and svc["User"] == "root"
    assert "75" in svc["SuccessExitStatus"].split() and svc["TimeoutStartUSec"] == "4h"
    assert (svc["SyslogIdentifier"], svc["StandardOutput"]) == (UNIT, "journal")
    timer = show(host, UNIT + ".timer", "Persistent", "RandomizedDelayUSec", "AccuracyUSec", "UnitFileState")
    assert timer == {"Persistent": "yes", "RandomizedDelayUSec": "0", "AccuracyUSec": "1s",
                     "UnitFileState": "enabled"}
    assert not host.file("/etc/systemd/system/carapace-fleet-drill.timer").exists


def test_a_start_while_a_run_holds_the_lock_exits_at_once(host, finished):
    # flock(1) holds the job's lock as a running run would; the runner must give up at once, not wait.
    t = time.monotonic()
    out = host.run("timeout 30 flock -n %s /usr/bin/python3 %s %s/job.json", LOCK, RUNNER, JOB_DIR)
    assert out.rc == 75, out
    assert "another run holds the lock %s: this start does nothing" % LOCK in out.stdout
    assert time.monotonic() - t < 10
