"""rollback_drill, every host: each runs the release it ran before, with its state as it was.

Run by `molecule verify` (testinfra); helpers and fixtures in ../../conftest.py; the scenario in ../molecule.yml.
"""

from __future__ import annotations

import glob
import json
import os

from conftest import STATE_DIR, active_release, assert_service_runs, asset_sha256, assert_state_kept, health

EXPECTED = {"rollback_drill-1": "v0.9.0", "rollback_drill-2": "v0.8.0", "rollback_drill-3": "v0.8.0"}


def test_each_host_runs_its_previous_release_again(host, me, manifest, fleet_hosts):
    tag, digest = active_release(host)
    assert tag == EXPECTED[me]
    assert digest == asset_sha256(manifest, tag)
    assert health(host)["version"] == tag.lstrip("v")
    # ...and that is what the other hosts see on the scenario network.
    for name in fleet_hosts:
        assert health(host, name)["version"] == EXPECTED[name].lstrip("v"), name
    assert_service_runs(host, me)
    if tag == "v0.8.0":  # released v0.8.0 writes no daemon.pid: the service manager found and stopped it without one
        assert not host.file(STATE_DIR + "/daemon.pid").exists


def test_state_is_as_it_was_before_the_upgrade(host):
    # On -1 the faulty release had migrated tasks/queue.json to a shape v0.9.0 cannot parse: the restore brought the
    # old queue back byte for byte (v0.9.0 refuses to start on the migrated one, so it would not be running otherwise).
    assert_state_kept(host)


def test_no_drill_report_mentions_another_host(run_dir):
    found = glob.glob(os.path.join(run_dir, "**", "report.json"), recursive=True)
    reports = sorted(set(os.path.realpath(p) for p in found))
    kinds = set()
    for path in reports:
        with open(path, encoding="utf-8") as f:
            kinds.add(json.load(f)["run"]["kind"])
    # the drill, the upgrade and the rollback of converge.yml each wrote one: this checks every report there is
    assert {"drill", "upgrade", "rollback"} <= kinds, reports
    for path in reports:
        with open(path, encoding="utf-8") as f:
            hosts = {row["host"] for row in json.load(f)["hosts"]}
        assert "rollback_drill-3" not in hosts, path
