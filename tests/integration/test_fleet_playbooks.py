"""The other fleet playbooks for real on a local fleet: rollback.yml, rollback_drill.yml and verify_release.yml."""

import json
import os
import subprocess

import pytest

from fleet import BIN, LocalFleet


@pytest.fixture
def fleet(tmp_path, releases):
    local = LocalFleet(tmp_path / "f", releases, hosts=1, install="v0.8.0")
    yield local
    local.stop()


def test_upgrade_then_rollback_playbook_then_a_passing_drill(fleet):
    rc, out = fleet.playbook("upgrade", cara_upgrade_version="v0.9.0")
    assert rc == 0, out[-3000:]
    assert fleet.active("cara-01") == "v0.9.0"

    rc, out = fleet.playbook("rollback", cara_report_dir=os.path.join(fleet.base, "rollback"))
    assert rc == 0, out[-3000:]
    assert fleet.active("cara-01") == "v0.8.0"
    assert fleet.health("cara-01")["version"] == "0.8.0"
    row = fleet.report(os.path.join(fleet.base, "rollback"))["hosts"][0]
    assert row["result"] == "rolled_back" and row["to"] == "v0.8.0" and row["from"] == "v0.9.0"
    assert row["rto_s"] > 0 and row["backup"].endswith(".tar.gz")

    # a drill with a good release: it passes its gate, the drill forces the rollback and proves it
    drill_dir = os.path.join(fleet.base, "drill")
    rc, out = fleet.playbook("rollback_drill", cara_drill_version="v0.9.0", cara_report_dir=drill_dir)
    assert rc == 0, out[-3000:]
    assert "Rollback drill passed on cara-01" in out
    assert "[ERROR]" not in out, out[-3000:]
    report = fleet.report(drill_dir)
    drill = report["hosts"][0]["details"]["drill"]
    assert drill["version_restored"] and drill["state_identical"] and drill["rto_within_budget"]
    assert report["summary"]["ok"] is True
    assert fleet.active("cara-01") == "v0.8.0"


def test_a_run_without_a_target_release_is_refused_before_anything(fleet):
    """cara_upgrade_version is required and has no default: the playbook refuses before it takes the lock, and the
    role on its own refuses through its argument spec."""
    rc, out = fleet.playbook("upgrade")
    assert rc == 2, out[-3000:]
    assert "Set cara_upgrade_version to the release tag" in out
    assert not os.path.exists(os.path.join(fleet.base, "run.lock"))

    play = os.path.join(fleet.base, "role_only.yml")
    with open(play, "w", encoding="utf-8") as f:
        f.write("- hosts: cara_fleet\n  gather_facts: false\n  roles: [carapace.fleet.cara_upgrade]\n")
    proc = subprocess.run([os.path.join(BIN, "ansible-playbook"), "-i", fleet.inventory, play], cwd=fleet.base,
                          env=fleet._env(), capture_output=True, text=True, timeout=300,  # pylint: disable=protected-access
                          check=False)
    assert proc.returncode == 2, (proc.stdout + proc.stderr)[-3000:]
    assert "missing required arguments: cara_upgrade_version" in proc.stdout + proc.stderr
    assert fleet.active("cara-01") == "v0.8.0"


def test_a_role_argument_of_the_wrong_type_fails_the_run_and_leaves_no_lock(fleet):
    """A failure no rescue sees (the role's argument spec) still releases the fleet lock."""
    rc, out = fleet.playbook("upgrade", cara_upgrade_version="v0.9.0", cara_release_timeout="soon")
    assert rc == 2, out[-3000:]
    assert "cara_release_timeout" in out
    assert not os.path.exists(os.path.join(fleet.base, "run.lock"))
    assert fleet.active("cara-01") == "v0.8.0"


def test_drill_verdict_fails_the_run_when_the_rto_budget_is_missed(fleet):
    rc, out = fleet.playbook("rollback_drill", cara_drill_version="v0.9.0", cara_drill_rto_budget_s=0,
                             cara_report_dir=os.path.join(fleet.base, "drill"))
    assert rc != 0
    assert "Rollback drill FAILED on cara-01" in out
    assert fleet.active("cara-01") == "v0.8.0"  # the rollback itself still happened


def test_verify_release_reports_pass_and_fail(fleet):
    report_dir = os.path.join(fleet.base, "verify")
    rc, out = fleet.playbook("verify_release", cara_verify_tag="v0.9.0", cara_verify_report_dir=report_dir)
    assert rc == 0, out[-3000:]
    report = json.load(open(os.path.join(report_dir, "verify", "latest", "release-verify-v0.9.0.json"), encoding="utf-8"))
    assert report["status"] == "pass" and report["checksumsPresent"] is True
    assert sorted(report["assets"]) == ["cara-aarch64-darwin", "cara-aarch64-linux", "cara-x86_64-darwin",
                                        "cara-x86_64-linux", "cara-x86_64-windows.exe"]
    assert all(a["checksum_verified"] for a in report["assets"].values())

    fleet.server.faults["cara-aarch64-darwin"] = {"tamper": True}
    rc, out = fleet.playbook("verify_release", cara_verify_tag="v0.9.1", cara_verify_report_dir=report_dir)
    assert rc != 0
    report = json.load(open(os.path.join(report_dir, "verify", "latest", "release-verify-v0.9.1.json"), encoding="utf-8"))
    assert len(os.listdir(os.path.join(report_dir, "verify"))) == 3  # two runs, each in its own directory, and latest
    assert report["status"] == "fail" and report["cause"] == "digest_mismatch"
    assert "cara-aarch64-darwin" in report["error"]


def test_cara_release_retries_reaches_the_download(fleet):
    """A release file that answers 503 once: with cara_release_retries 0 the run is refused before the stop, naming
    the cause; with the default it is tried again and the upgrade goes through."""
    asset = "cara-x86_64-linux"
    fleet.server.faults[asset] = {"status": 503, "times": 1}
    rc, out = fleet.playbook("upgrade", cara_upgrade_version="v0.9.0", cara_release_retries=0)
    assert rc == 2, out[-3000:]
    assert "(cause: http_error)" in out, out[-3000:]
    assert fleet.active("cara-01") == "v0.8.0"

    fleet.server.faults[asset] = {"status": 503, "times": 1}
    rc, out = fleet.playbook("upgrade", cara_upgrade_version="v0.9.0")
    assert rc == 0, out[-3000:]
    assert fleet.active("cara-01") == "v0.9.0"
    answers = [status for path, status in fleet.server.requests if path.endswith("/" + asset)]
    assert answers == [503, 503, 200], answers
