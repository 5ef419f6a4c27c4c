"""cara_upgrade_version=latest end to end on a local fleet of 2 hosts: the newest stable tag of the release source (a
newer pre-release is there too, and is not picked), recorded in the report as target with requested: latest; and a
source whose listing cannot be read refuses the run before anything on a host changes."""

import os

import pytest

from fleet import LocalFleet
from release_factory import release_dir

REPO = "puremachinery/carapace"
PREVIEW = "v1.0.0-preview1"


@pytest.fixture
def fleet(tmp_path, releases):
    """A release source with v0.8.0, v0.9.0 (the session's signed releases, linked) and a newer pre-release."""
    root = tmp_path / "releases"
    root.mkdir()
    os.symlink(os.path.join(releases, "trusted_root.json"), root / "trusted_root.json")
    for tag in ("v0.8.0", "v0.9.0"):
        os.makedirs(os.path.dirname(release_dir(str(root), REPO, tag)), exist_ok=True)
        os.symlink(release_dir(releases, REPO, tag), release_dir(str(root), REPO, tag))
    preview = release_dir(str(root), REPO, PREVIEW)
    os.makedirs(preview)
    with open(os.path.join(preview, "cara-x86_64-linux"), "wb") as f:
        f.write(b"a preview that must never be fetched\n")
    local = LocalFleet(tmp_path / "f", str(root), hosts=2, install="v0.8.0")
    yield local
    local.stop()


def test_latest_upgrades_to_the_newest_stable_tag_and_an_unreadable_source_refuses(fleet):
    fleet.server.faults["releases.json"] = {"status": 500}
    rc, out = fleet.playbook("upgrade", cara_upgrade_version="latest", cara_release_retries=0,
                             cara_release_api_url=fleet.server.url)
    assert rc != 0, out[-3000:]
    assert "cara_upgrade_version=latest: the newest release cannot be read" in out
    assert "releases/download/releases.json" in out and "(cause: http_error)" in out
    assert "Set cara_upgrade_version to a release tag" in out and "(base_url)" not in out
    assert [fleet.active(h) for h in ("cara-01", "cara-02")] == ["v0.8.0", "v0.8.0"]
    assert fleet.server.attempts("cara-x86_64-linux") == 0  # nothing fetched, nothing touched
    report = fleet.report()
    assert {row["result"] for row in report["hosts"]} == {"refused"}

    fleet.server.faults.clear()
    rc, out = fleet.playbook("upgrade", cara_upgrade_version="latest", cara_release_api_url=fleet.server.url)
    assert rc == 0, out[-3000:]
    assert "cara_upgrade_version=latest resolved to v0.9.0" in out
    assert [fleet.active(h) for h in ("cara-01", "cara-02")] == ["v0.9.0", "v0.9.0"]
    assert not any(PREVIEW in path for path, _status in fleet.server.requests)
    report = fleet.report()
    assert report["run"]["target"] == "v0.9.0" and report["run"]["requested"] == "latest"
    assert [(row["to"], row["result"]) for row in report["hosts"]] == [("v0.9.0", "upgraded")] * 2
