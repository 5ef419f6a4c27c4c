"""roles/cara_schedule/files/cara-schedule-run.py: what a scheduled job's service runs (`<python> runner job.json`).

A stand-in ansible-playbook records its arguments and writes the run's report.json with the outcome the case asks
for, then exits with the case's code: the runner's exit code is the contract (0 ok, 75 incomplete but safe or the
lock held, else the playbook's own).
"""
import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

RUNNER = Path(__file__).resolve().parents[2] / "roles" / "cara_schedule" / "files" / "cara-schedule-run.py"

FAKE = """#!%s
import json, os, sys
args = sys.argv[1:]
own = json.loads(args[args.index("-e", args.index("-e") + 1) + 1])
with open(os.environ["FAKE_ARGS"], "w") as f:
    json.dump({"args": args, "env": os.environ.get("MY_ENV")}, f)
outcome = os.environ["FAKE_OUTCOME"]
if outcome != "none":
    d = os.path.join(own["cara_report_dir"], os.environ["FAKE_KIND"], own["cara_fleet_run_id"])
    os.makedirs(d)
    with open(os.path.join(d, "report.json"), "w") as f:
        json.dump({"summary": {"outcome": outcome}}, f)
print("PLAY RECAP")
sys.exit(int(os.environ["FAKE_RC"]))
"""


@pytest.fixture(name="job")
def job_fixture(tmp_path):
    fake = tmp_path / "ansible-playbook"
    fake.write_text(FAKE % sys.executable)
    fake.chmod(0o755)
    (tmp_path / "vars.yml").write_text("cara_upgrade_version: v0.9.0\n")
    job = {"name": "nightly", "kind": "upgrade", "playbook": "carapace.fleet.upgrade",
           "inventory": str(tmp_path / "inventory.yml"), "vars_file": str(tmp_path / "vars.yml"),
           "report_dir": str(tmp_path / "reports"), "lock": str(tmp_path / "locks" / "nightly.lock"),
           "ansible_playbook": str(fake), "ansible_args": ["-b"], "environment": {"MY_ENV": "from-job"}}
    return tmp_path, job


def run(tmp_path, job, outcome, rc):
    path = tmp_path / "job.json"
    path.write_text(json.dumps(job))
    env = dict(os.environ, FAKE_ARGS=str(tmp_path / "args.json"), FAKE_OUTCOME=outcome, FAKE_RC=str(rc),
               FAKE_KIND=job["kind"])
    proc = subprocess.run([sys.executable, str(RUNNER), str(path)], capture_output=True, text=True, env=env,
                          check=False, timeout=30)
    return proc.returncode, proc.stdout


@pytest.mark.parametrize("outcome, rc, expected", [
    ("ok", 0, 0),
    ("incomplete", 2, 75),       # hosts left pending: safe, the next run carries on
    ("incomplete", 0, 75),
    ("incomplete", 4, 4),        # unreachable hosts are not "only incomplete"
    ("incomplete", 1, 1),
    ("needs_attention", 2, 2),
    ("ok", 2, 2),                # a failed playbook is never called ok
    ("none", 2, 2),              # no report: the playbook's own code
    ("none", 0, 0),
])
def test_exit_code(job, outcome, rc, expected):
    tmp_path, settings = job
    code, out = run(tmp_path, settings, outcome, rc)
    assert code == expected, out
    assert "PLAY RECAP" in out and ("exit %d" % expected) in out


def test_the_playbook_gets_inventory_vars_file_run_id_and_report_dir(job):
    tmp_path, settings = job
    assert run(tmp_path, settings, "ok", 0)[0] == 0
    seen = json.loads((tmp_path / "args.json").read_text())
    args = seen["args"]
    assert args[:4] == ["-i", settings["inventory"], "-b", "carapace.fleet.upgrade"]
    assert args[4:6] == ["-e", "@" + settings["vars_file"]]
    own = json.loads(args[7])
    assert own["cara_report_dir"] == settings["report_dir"]
    assert own["cara_fleet_run_id"].startswith("nightly-") and len(own["cara_fleet_run_id"]) == len("nightly-") + 16
    assert seen["env"] == "from-job"
    assert (tmp_path / "locks" / "nightly.lock").exists()


def test_a_drill_gets_both_report_dir_variables(job):
    tmp_path, settings = job
    settings.update(kind="drill", playbook="carapace.fleet.rollback_drill")
    assert run(tmp_path, settings, "ok", 0)[0] == 0
    own = json.loads(json.loads((tmp_path / "args.json").read_text())["args"][7])
    assert own["cara_drill_report_dir"] == own["cara_report_dir"] == settings["report_dir"]


def test_a_start_while_the_lock_is_held_does_nothing(job):
    tmp_path, settings = job
    os.makedirs(tmp_path / "locks")
    with open(settings["lock"], "w", encoding="utf-8") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        code, out = run(tmp_path, settings, "ok", 0)
    assert code == 75
    assert "another run holds the lock %s: this start does nothing" % settings["lock"] in out
    assert not (tmp_path / "args.json").exists()


def test_a_missing_ansible_playbook_is_said(job):
    tmp_path, settings = job
    settings["ansible_playbook"] = str(tmp_path / "nowhere" / "ansible-playbook")
    code, out = run(tmp_path, settings, "ok", 0)
    assert code == 127 and "cannot start" in out
