"""rollback_drill-3: neither the drill nor the rollback touched the host beside them.

Run by `molecule verify` (testinfra); helpers and fixtures in ../../conftest.py; the scenario in ../molecule.yml.
"""

from __future__ import annotations

from conftest import BACKUP_DIR, STATE_DIR, prepared_service, service_props

# testinfra runs this module on this host only.
testinfra_hosts = ["ansible://rollback_drill-3"]


def test_bystander_was_never_touched(host):
    before = prepared_service(host)
    now = service_props(host, "MainPID", "ExecMainStartTimestampMonotonic", "NRestarts")
    assert now == before
    assert not host.file(BACKUP_DIR + "/index.json").exists
    assert not host.file(STATE_DIR + "/updates/transaction.json").exists
    assert host.check_output("ls -A %s/updates", STATE_DIR) == ""
