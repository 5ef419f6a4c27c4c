"""rollback_drill-2: after a good upgrade to v0.9.0, playbooks/rollback.yml took it back to v0.8.0.

Run by `molecule verify` (testinfra); helpers and fixtures in ../../conftest.py; the scenario in ../molecule.yml.
"""

from __future__ import annotations

import os

from conftest import STATE_DIR, asset_sha256, backup_index, read_report

# testinfra runs this module on this host only.
testinfra_hosts = ["ansible://rollback_drill-2"]


def test_standalone_rollback_restored_the_pre_upgrade_backup(host, me, run_dir, manifest):
    upgraded = read_report(os.path.join(run_dir, "upgrade"))[1]
    assert (upgraded[me]["result"], upgraded[me]["to"]) == ("upgraded", "v0.9.0")
    assert upgraded[me]["sha256"] == asset_sha256(manifest, "v0.9.0")
    report, rolled = read_report(os.path.join(run_dir, "rollback"))
    row = rolled[me]
    assert report["run"]["kind"] == "rollback" and set(rolled) == {me}
    assert (row["result"], row["from"], row["to"], row["phase"]) == ("rolled_back", "v0.9.0", "v0.8.0", "restored")
    assert float(row["rto_s"]) > 0
    # The backup it restored is the one the upgrade took, verified against the index.
    assert row["backup"] == upgraded[me]["backup"]
    entry = [b for b in backup_index(host)["backups"] if b["path"] == row["backup"]][0]
    assert entry["tag"] == "v0.8.0" and host.file(entry["path"]).sha256sum == entry["sha256"]
    assert not host.file(STATE_DIR + "/updates/transaction.json").exists
