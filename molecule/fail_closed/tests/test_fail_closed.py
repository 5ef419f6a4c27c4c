"""fail_closed: five runs against broken releases changed nothing on any host and left nothing unverified.

Run by `molecule verify` (testinfra, once per host); helpers and fixtures in ../../conftest.py; the converge
(../converge.yml) already failed unless each run failed with its own cause at the controller's verified fetch.
"""

from __future__ import annotations

import json
import os

import pytest

from conftest import (BACKUP_DIR, STATE_DIR, active_release, asset_sha256, assert_state_kept, health,
                      prepared_service, service_props)

CASES = ("tampered", "other_tag", "wrong_issuer", "missing_bundle", "sums_mismatch")


def _cases():
    with open(os.path.join(os.environ["MOLECULE_RELEASES"], "cases.json"), encoding="utf-8") as f:
        return json.load(f)


def test_the_five_cases_were_built():
    assert sorted(_cases()) == sorted(CASES)


@pytest.mark.parametrize("case", CASES)
def test_run_failed_at_verification_with_its_cause(run_dir, case):
    with open(os.path.join(run_dir, "runs", case + ".log"), encoding="utf-8") as f:
        log = f.read()
    assert log.startswith("rc=2\n")
    assert "(cause: %s)" % _cases()[case] in log
    # That no host was staged, stopped or changed is asserted on the hosts below (outcomes, not task names).


def test_host_still_runs_v0_8_0_untouched(host, manifest):
    tag, digest = active_release(host)
    assert (tag, digest) == ("v0.8.0", asset_sha256(manifest, "v0.8.0"))
    assert health(host)["version"] == "0.8.0"
    # The same process since prepare: never stopped, never restarted.
    assert service_props(host, "MainPID", "ExecMainStartTimestampMonotonic", "NRestarts") == prepared_service(host)
    assert_state_kept(host)


def test_no_unverified_file_on_the_host(host):
    # Nothing staged, no transaction, no release installed beside v0.8.0, no backup taken.
    assert host.check_output("ls -A %s/updates", STATE_DIR) == ""
    assert host.check_output("ls -A /opt/carapace/releases") == "v0.8.0"
    assert not host.file(BACKUP_DIR + "/index.json").exists
    assert host.check_output("find / -xdev -name 'cara-x86_64-linux*' -newer %s/state.sha256",
                             "/var/lib/molecule-prepare") == ""


def test_no_unverified_file_in_the_controller_cache(run_dir):
    cache = os.path.join(run_dir, "cache")
    leftovers = [os.path.join(root, name) for root, dirs, files in os.walk(cache) for name in files + dirs]
    assert leftovers == [], leftovers
