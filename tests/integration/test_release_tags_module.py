"""carapace.fleet.cara_release_tags run for real by ansible-playbook on localhost, against the loopback release server
(the stand-in for GitHub's API and for a mirror) and a local directory. One ansible-playbook run for every case."""

import os

from playbook import run_tasks

REPO = "puremachinery/carapace"
TAGS = ["v0.7.0", "v0.8.0", "v0.9.0", "v0.9.1", "v1.0.0-preview1"]
SECRET = "ghp_SECRET-TOKEN-never-logged-42"


def lay_out(root, tags):
    for tag in tags:
        d = os.path.join(root, *REPO.split("/"), "releases", "download", tag)
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "cara-x86_64-linux"), "wb") as f:
            f.write(b"cara " + tag.encode())


def test_api_mirror_directory_and_refusals(tmp_path, release_server):
    lay_out(release_server.root, TAGS)
    release_server.api_page_max = 3  # 5 releases and a draft: 2 pages
    release_server.drafts = {"v1.1.0"}
    release_server.faults["/broken/releases.json"] = {"status": 500}
    mirror = release_server.url + "/{repo}/releases/download/{tag}"
    directory = os.path.join(release_server.root, REPO, "releases", "download", "{tag}")
    tasks = [
        {"name": "api", "module": "carapace.fleet.cara_release_tags",
         "args": {"api_url": release_server.url, "headers": {"Authorization": "Bearer " + SECRET}}},
        {"name": "api_preview", "module": "carapace.fleet.cara_release_tags", "check_mode": True,
         "args": {"api_url": release_server.url, "allow_preview": True}},
        {"name": "mirror", "module": "carapace.fleet.cara_release_tags", "args": {"base_url": mirror}},
        {"name": "directory", "module": "carapace.fleet.cara_release_tags", "args": {"base_url": "file://" + directory}},
        {"name": "broken", "module": "carapace.fleet.cara_release_tags",
         "args": {"base_url": release_server.url + "/broken/{tag}", "retries": 1}},
        {"name": "one_release", "module": "carapace.fleet.cara_release_tags",
         "args": {"base_url": "/srv/carapace/v0.9.0"}},
    ]
    rc, res, out = run_tasks(tmp_path, tasks)
    assert rc == 0 and res, out

    api = res["api"]
    assert not api.get("failed") and api["changed"] is False and api["kind"] == "api"
    assert api["tags"] == TAGS and api["stable"] == TAGS[:4] and api["latest"] == "v0.9.1"
    assert api["source"] == release_server.url + "/repos/puremachinery/carapace/releases?per_page=100"
    assert sum(1 for p, s in release_server.requests if p.endswith("/releases") and s == 200) == 2 * 2  # 2 runs of 2 pages
    assert SECRET not in out

    assert res["api_preview"]["latest"] == "v1.0.0-preview1" and res["api_preview"]["changed"] is False

    assert res["mirror"]["kind"] == "mirror" and res["mirror"]["latest"] == "v0.9.1"
    assert res["mirror"]["source"].endswith("/puremachinery/carapace/releases/download/releases.json")

    d = res["directory"]
    assert d["kind"] == "directory" and d["tags"] == TAGS and d["latest"] == "v0.9.1"
    assert d["source"] == os.path.dirname(directory)

    broken = res["broken"]
    assert broken["failed"] and broken["cause"] == "http_error" and broken["status"] == 500
    assert "/broken/releases.json" in broken["msg"] and "(after 2 attempts)" in broken["msg"]
    assert "cara_known_tags" in broken["msg"] and "tags" not in broken

    one = res["one_release"]
    assert one["failed"] and one["cause"] == "no_listing" and "has no {tag}" in one["msg"]
