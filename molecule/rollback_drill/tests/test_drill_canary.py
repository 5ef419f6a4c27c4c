"""rollback_drill-1: the faulty v0.9.1 failed its gate and the drill rolled it back to v0.9.0 by itself.

Run by `molecule verify` (testinfra); helpers and fixtures in ../../conftest.py; the scenario in ../molecule.yml.
"""

from __future__ import annotations

import json
import os

from conftest import BACKUP_DIR, STATE_DIR, backup_index, read_report

# testinfra runs this module on this host only.
testinfra_hosts = ["ansible://rollback_drill-1"]


def test_drill_report_kept_the_verdict_and_an_rto_under_budget(host, me, run_dir):
    report, rows = read_report(os.path.join(run_dir, "drill"))
    assert report["run"]["kind"] == "drill" and set(rows) == {me}
    row = rows[me]
    assert (row["result"], row["from"], row["to"]) == ("rolled_back", "v0.9.0", "v0.9.1")
    verdict = row["details"]["drill"]
    assert verdict["rolled_back"] and verdict["version_restored"] and verdict["state_identical"]
    # the drill's own verdict on its budget (molecule.yml); the RTO itself is measured in benchmarks/, not here
    assert verdict["rto_within_budget"] and float(verdict["rto_s"]) > 0
    assert "ready" in verdict["upgrade_error"]
    assert row["backup"] in [b["path"] for b in backup_index(host)["backups"]]


def test_drill_kept_the_evidence_of_the_failure(host, me):
    found = host.check_output("ls %s", BACKUP_DIR).split()
    evidence = [n for n in found if n.startswith("evidence-") and n.endswith("-v0.9.1.json")]
    assert len(evidence) == 1, found
    f = host.file(os.path.join(BACKUP_DIR, evidence[0]))
    assert f.mode == 0o600 and f.user == "cara"
    data = json.loads(f.content_string)
    assert data["host"] == me and data["step"] == "v0.9.1"
    assert "Gate on health" in data["error"] and "ready" in data["error"]
    # The journal of the failed start: the faulty release did start, as 0.9.1.
    assert any("0.9.1" in line for line in data["log_tail"]), data["log_tail"]
    tx = json.loads(host.file(STATE_DIR + "/updates/transaction.json").content_string)
    assert (tx["state"], tx["phase"], tx["retryable"], tx["version"]) == ("failed", "failed", False, "0.9.1")
    assert "rolled back to v0.9.0" in tx["lastError"] and evidence[0] in tx["lastError"]
    assert float(tx["fleet"]["rto_s"]) > 0
