"""resume: after a run killed at `verified`, and controllers killed inside the window (which ended on the hosts by
itself), the next run finished resume-1 and reported how the windows of resume-2 and resume-3 ended.

Run by `molecule verify` (testinfra, once per host); helpers and fixtures in ../../conftest.py; the kills and the
checks of what they left are in ../converge.yml.
"""

from __future__ import annotations

import json
import os

from conftest import (STATE_DIR, active_release, asset_sha256, assert_state_kept, backup_index, health,
                      read_report, service_props)

# host -> (release it must run now, result of the resumed run, version the transaction was for, the attempt that
# ended it: resume-1's second (the next run), the windows' first (they ended without their controller))
EXPECTED = {
    "resume-1": ("v0.9.0", "upgraded", "0.9.0", 2),
    "resume-2": ("v0.9.0", "upgraded", "0.9.0", 1),
    "resume-3": ("v0.8.0", "rolled_back", "0.9.1", 1),
}


def test_host_runs_the_release_it_must(host, me, manifest):
    want = EXPECTED[me][0]
    assert active_release(host) == (want, asset_sha256(manifest, want))
    assert health(host)["version"] == want.lstrip("v")
    props = service_props(host, "ActiveState", "SubState", "User")
    assert (props["ActiveState"], props["SubState"], props["User"]) == ("active", "running", "cara")


def test_resumed_run_counted_a_second_attempt(host, me, run_dir):
    report, rows = read_report(os.path.join(run_dir, "reports", "resumed"))
    assert report["run"]["kind"] == "upgrade"
    row = rows[me]
    assert row["result"] == EXPECTED[me][1]
    if me == "resume-1":  # the killed run was attempt 1; the run that finished it is attempt 2
        assert row["details"]["attempt"] == 2
    else:  # the window ended on the host; the next run only reports it
        assert "after its controller was lost: " + EXPECTED[me][1] in row["details"]["error"]
        assert [p["phase"] for p in row["details"]["phases"]][:2] == ["stop", "backup"]


def test_transaction_is_cleared_or_failed_for_good(host, me):
    path = STATE_DIR + "/updates/transaction.json"
    if EXPECTED[me][1] == "upgraded":
        assert not host.file(path).exists
        return
    tx = json.loads(host.file(path).content_string)
    assert (tx["version"], tx["state"], tx["retryable"], tx["attempt"]) == (EXPECTED[me][2], "failed", False,
                                                                             EXPECTED[me][3])
    assert "rolled back to v0.8.0" in tx["lastError"] and tx["fleet"]["rollback"]["state"] == "done"
    events = [e["event"] for e in tx["fleet"]["history"]]
    assert events[0] == "created" and events[-1] == "failed"


def test_one_backup_taken_before_the_stop_and_the_state_kept(host):
    backups = backup_index(host)["backups"]
    assert len(backups) == 1 and backups[0]["tag"] == "v0.8.0"
    assert host.file(backups[0]["path"]).sha256sum == backups[0]["sha256"]
    assert_state_kept(host)
