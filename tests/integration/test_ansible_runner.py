"""The upgrade run the way AWX/AAP run a job: through ansible-runner's interface (a private data dir with project/,
env/extravars and env/envvars, an inventory, an ident). The run's set_stats summary and its report must land in
the runner's artifacts. ansible-runner is real (PyPI); the fleet is the usual one of the cara double."""
import glob
import json
import os

import ansible_runner

from fleet import BIN, COLLECTIONS


def test_the_upgrade_through_ansible_runner_leaves_stats_and_report_in_the_artifacts(make_fleet, tmp_path):
    fleet = make_fleet(hosts=2)
    data = tmp_path / "job"
    (data / "project").mkdir(parents=True)
    (data / "env").mkdir()
    # A job template's playbook: the collection's, from the project (AWX installs the collection from requirements).
    (data / "project" / "upgrade.yml").write_text("---\n- name: Upgrade the fleet\n"
                                                 "  ansible.builtin.import_playbook: carapace.fleet.upgrade\n")
    # The job's extra vars; the report goes to the job's artifact dir, which ansible-runner names in the environment.
    extra = fleet.extra_vars(cara_upgrade_version="v0.9.0", cara_upgrade_serial=[1, "100%"],
                             cara_report_dir="{{ lookup('ansible.builtin.env', 'AWX_ISOLATED_DATA_DIR') }}/carapace-fleet-report")
    (data / "env" / "extravars").write_text(json.dumps(extra))
    (data / "env" / "envvars").write_text(json.dumps({
        "ANSIBLE_COLLECTIONS_PATH": COLLECTIONS, "PATH": BIN + os.pathsep + os.environ.get("PATH", ""),
        "ANSIBLE_HOME": str(tmp_path / ".ansible"), "ANSIBLE_RETRY_FILES_ENABLED": "0", "ANSIBLE_PIPELINING": "1"}))

    run = ansible_runner.run(private_data_dir=str(data), playbook="upgrade.yml", inventory=fleet.inventory,
                             ident="job-17", quiet=True, timeout=900)
    artifacts = data / "artifacts" / "job-17"
    stdout = (artifacts / "stdout").read_text(errors="replace") if (artifacts / "stdout").exists() else ""
    assert (run.status, run.rc) == ("successful", 0), stdout[-3000:]
    assert run.stats["failures"] == {} and sorted(run.stats["ok"]) == ["cara-01", "cara-02"]

    # set_stats: what AWX shows as the job's artifacts and passes to the next node of a workflow
    stats = [json.loads(open(p, encoding="utf-8").read()) for p in glob.glob(str(artifacts / "job_events" / "*.json"))]
    stats = [e for e in stats if e.get("event") == "playbook_on_stats"]
    assert len(stats) == 1
    summary = stats[0]["event_data"]["artifact_data"]["cara_fleet"]
    assert summary["outcome"] == "ok" and summary["kind"] == "upgrade" and summary["target"] == "v0.9.0"
    assert summary["summary"]["upgraded"] == 2

    # the report, in the artifact dir
    report_json = artifacts / "carapace-fleet-report" / "report.json"
    report = json.loads(report_json.read_text())
    assert {h["host"]: h["result"] for h in report["hosts"]} == {"cara-01": "upgraded", "cara-02": "upgraded"}
    assert os.path.realpath(summary["report"]) == os.path.realpath(
        artifacts / "carapace-fleet-report" / "upgrade" / report["run"]["id"] / "report.json")
    assert (artifacts / "carapace-fleet-report" / "report.md").exists()
    for name in ("cara-01", "cara-02"):
        assert fleet.health(name)["version"] == "0.9.0"
