"""The tags of a release source (module_utils/_release_tags.py): which listing a base_url means, parsing the GitHub
releases API's shape, pagination, drafts, previews, SemVer order, and every refusal. HTTP goes through a real server
on 127.0.0.1 (tests/support/release_server.py) and ansible-core's open_url, as the module wires it."""

import json
import os

import pytest
from ansible.module_utils.urls import open_url

from ansible_collections.carapace.fleet.plugins.module_utils import _release_tags
from ansible_collections.carapace.fleet.plugins.module_utils._http import ansible_opener
from ansible_collections.carapace.fleet.plugins.module_utils._release_tags import ReleaseTagsError, listing_for

REPO = "puremachinery/carapace"
OPENER = ansible_opener(open_url)


def no_sleep(_seconds):
    pass


def tags_of(server, tags):
    """Tag directories (each holding one file) under the server's GitHub layout."""
    for tag in tags:
        d = os.path.join(server.root, *REPO.split("/"), "releases", "download", tag)
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "cara-x86_64-linux"), "wb") as f:
            f.write(b"cara " + tag.encode())


def listed(base_url=None, api_url=None, allow_preview=False, retries=0, **kw):
    return _release_tags.release_tags(base_url, REPO, api_url or _release_tags.DEFAULT_API_URL, opener=OPENER,
                                      timeout=5, retries=retries, allow_preview=allow_preview, sleep=no_sleep, **kw)


def refused(**kw):
    with pytest.raises(ReleaseTagsError) as err:
        listed(**kw)
    assert _release_tags.NEXT_STEP in err.value.message  # every refusal names the next step
    return err.value


# -- which listing a base_url means --------------------------------------------------------------------------------
@pytest.mark.parametrize("base,kind,location", [
    (None, "api", "https://api.github.com/repos/puremachinery/carapace/releases?per_page=100"),
    ("", "api", "https://api.github.com/repos/puremachinery/carapace/releases?per_page=100"),
    ("https://github.com/{repo}/releases/download/{tag}", "api",
     "https://api.github.com/repos/puremachinery/carapace/releases?per_page=100"),
    ("https://m.example/{repo}/releases/download/{tag}", "mirror",
     "https://m.example/puremachinery/carapace/releases/download/releases.json"),
    ("https://m.example/carapace/{tag}/", "mirror", "https://m.example/carapace/releases.json"),
    ("file:///srv/mirror/{tag}", "directory", "/srv/mirror"),
    ("/srv/mirror/{repo}/{tag}/bin", "directory", "/srv/mirror/puremachinery/carapace"),
])
def test_listing_of_each_source(base, kind, location):
    listing = listing_for(base, REPO)
    assert (listing.kind, listing.location) == (kind, location)


def test_listing_redacts_credentials():
    listing = listing_for("https://user:s3cret@m.example/{tag}", REPO)
    assert "s3cret" not in listing.display and listing.display == "https://********@m.example/releases.json"


@pytest.mark.parametrize("base", ["/srv/mirror/carapace", "https://m.example/carapace/v0.9.0", "/srv/cara-{tag}",
                                  "/srv/{tag}.d/files"])
def test_a_base_without_a_tag_directory_cannot_be_listed(base):
    with pytest.raises(ReleaseTagsError) as err:
        listing_for(base, REPO)
    assert err.value.cause == "no_listing" and "cara_known_tags" in err.value.message


def test_unsupported_scheme_and_api_url_are_refused():
    with pytest.raises(ReleaseTagsError) as err:
        listing_for("ftp://m.example/{tag}", REPO)
    assert err.value.cause == "bad_source"
    with pytest.raises(ReleaseTagsError) as err:
        listing_for(None, REPO, "file:///api")
    assert err.value.cause == "bad_source"


# -- the API's shape: drafts, previews, order ----------------------------------------------------------------------
def test_summarize_orders_by_semver_and_keeps_previews_out_of_stable():
    entries = [("v0.9.0", False), ("v0.10.0-preview1", False), ("v0.10.0-preview12", False), ("v0.10.0-preview2", False),
               ("v0.8.0", False), ("v0.9.1", True), ("v0.9.0", False)]  # v0.9.1 flagged prerelease, v0.9.0 twice
    got = _release_tags.summarize(entries, "src")
    assert got["tags"] == ["v0.8.0", "v0.9.0", "v0.9.1", "v0.10.0-preview1", "v0.10.0-preview2", "v0.10.0-preview12"]
    assert got["stable"] == ["v0.8.0", "v0.9.0"] and got["latest"] == "v0.9.0"
    assert _release_tags.summarize(entries, "src", allow_preview=True)["latest"] == "v0.10.0-preview12"


def test_parse_drops_drafts_and_names_that_are_not_tags():
    data = [{"tag_name": "v1.0.0", "draft": True, "prerelease": False}, {"tag_name": "nightly", "prerelease": True},
            {"tag_name": "v0.9.0"}, {"tag_name": "v0.9.1-rc.1", "prerelease": True, "draft": False}]
    assert _release_tags._parse_releases(data, "src") == [("v0.9.0", False), ("v0.9.1-rc.1", True)]


@pytest.mark.parametrize("data", [{"tag_name": "v0.9.0"}, ["v0.9.0"], [{"name": "v0.9.0"}],
                                  [{"tag_name": "v0.9.0", "draft": "no"}]])
def test_parse_refuses_what_is_not_the_api_shape(data):
    with pytest.raises(ReleaseTagsError) as err:
        _release_tags._parse_releases(data, "src")
    assert err.value.cause == "bad_listing"


def test_empty_and_preview_only_listings_are_refused():
    with pytest.raises(ReleaseTagsError) as err:
        _release_tags.summarize([], "src")
    assert err.value.cause == "empty"
    with pytest.raises(ReleaseTagsError) as err:
        _release_tags.summarize([("v1.0.0-preview1", False), ("v1.0.0", True)], "src")
    assert err.value.cause == "no_stable" and "v1.0.0-preview1, v1.0.0" in err.value.message
    got = _release_tags.summarize([("v1.0.0-preview1", False)], "src", allow_preview=True)
    assert got["stable"] == [] and got["latest"] == "v1.0.0-preview1"


# -- over HTTP -------------------------------------------------------------------------------------------------------
def test_api_pages_are_all_read(release_server):
    tags_of(release_server, ["v0.7.0", "v0.8.0", "v0.9.0", "v0.9.1", "v0.10.0-preview1"])
    release_server.api_page_max = 2  # 3 pages
    release_server.drafts = {"v0.11.0"}
    got = listed(api_url=release_server.url)
    assert got["kind"] == "api" and got["latest"] == "v0.9.1"
    assert got["tags"] == ["v0.7.0", "v0.8.0", "v0.9.0", "v0.9.1", "v0.10.0-preview1"]
    pages = [p for p, s in release_server.requests if p.endswith("/releases")]
    assert len(pages) == 3


def test_a_next_page_on_another_server_is_not_followed(release_server, tmp_path):
    release_server.api_page_max = 1
    tags_of(release_server, ["v0.8.0", "v0.9.0"])
    listing = _release_tags.Listing("api", release_server.url.replace("127.0.0.1", "localhost")
                                    + "/repos/%s/releases" % REPO)
    with pytest.raises(ReleaseTagsError) as err:
        _release_tags.read_tags(listing, OPENER, 5, 0)
    assert err.value.cause == "bad_listing" and "another server" in err.value.message


def test_mirror_index(release_server):
    tags_of(release_server, ["v0.8.0", "v0.9.0", "v1.0.0-preview1"])
    got = listed(base_url=release_server.url + "/{repo}/releases/download/{tag}")
    assert got["kind"] == "mirror" and got["latest"] == "v0.9.0"
    assert got["source"] == release_server.url + "/puremachinery/carapace/releases/download/releases.json"


def test_a_saved_api_answer_is_a_mirror_index(release_server):
    d = os.path.join(release_server.root, "mirror")
    os.makedirs(d)
    with open(os.path.join(d, "releases.json"), "w", encoding="utf-8") as f:
        json.dump([{"tag_name": "v0.9.0", "prerelease": False, "draft": False, "body": "x" * 1000},
                   {"tag_name": "v1.0.0", "prerelease": False, "draft": True}], f)
    assert listed(base_url=release_server.url + "/mirror/{tag}")["tags"] == ["v0.9.0"]


@pytest.mark.parametrize("fault,cause,attempts", [({"status": 500}, "http_error", 3), ({"status": 404}, "not_found", 1),
                                                  ({"status": 403}, "http_error", 1),
                                                  ({"reset": True}, "connection_error", 3),
                                                  ({"truncate": 5}, "truncated", 3)])
def test_http_failures_after_retries(release_server, fault, cause, attempts):
    tags_of(release_server, ["v0.9.0"])
    release_server.faults["releases"] = fault
    err = refused(api_url=release_server.url, retries=2)
    assert err.cause == cause and release_server.attempts("releases") == attempts
    assert release_server.url + "/repos/puremachinery/carapace/releases" in err.message
    if attempts > 1:
        assert "(after 3 attempts)" in err.message


def test_a_transient_failure_then_success(release_server):
    tags_of(release_server, ["v0.9.0"])
    release_server.faults["releases"] = {"status": 503, "times": 1}
    assert listed(api_url=release_server.url, retries=1)["latest"] == "v0.9.0"


def test_bad_json_is_refused_at_once(release_server):
    d = os.path.join(release_server.root, "bad")
    os.makedirs(d)
    with open(os.path.join(d, "releases.json"), "w", encoding="utf-8") as f:
        f.write("<html>not json</html>")
    err = refused(base_url=release_server.url + "/bad/{tag}", retries=3)
    assert err.cause == "bad_listing" and release_server.attempts("releases.json") == 1


def test_an_empty_index_is_refused(release_server):
    os.makedirs(os.path.join(release_server.root, "empty"))
    err = refused(base_url=release_server.url + "/empty/{tag}")
    assert err.cause == "empty" and "/empty/releases.json" in err.source


def test_too_large_is_refused(release_server):
    tags_of(release_server, ["v0.9.0"])
    err = refused(api_url=release_server.url, max_bytes=10)
    assert err.cause == "too_large"


# -- a directory -----------------------------------------------------------------------------------------------------
def test_directory_keeps_tags_whose_directory_holds_files(tmp_path):
    for tag in ("v0.8.0", "v0.9.0", "v1.0.0-preview1"):
        (tmp_path / tag / "bin").mkdir(parents=True)
        (tmp_path / tag / "bin" / "cara-x86_64-linux").write_bytes(b"x")
    (tmp_path / "v0.9.1" / "bin").mkdir(parents=True)  # no file: not a release
    (tmp_path / "latest").mkdir()
    (tmp_path / "v0.9.2").write_text("a file, not a directory")
    got = listed(base_url=str(tmp_path) + "/{tag}/bin")
    assert got["kind"] == "directory" and got["tags"] == ["v0.8.0", "v0.9.0", "v1.0.0-preview1"]
    assert got["latest"] == "v0.9.0" and got["source"] == str(tmp_path)
    assert listed(base_url="file://" + str(tmp_path) + "/{tag}/bin", allow_preview=True)["latest"] == "v1.0.0-preview1"


def test_directory_refusals(tmp_path):
    assert refused(base_url=str(tmp_path / "missing") + "/{tag}").cause == "not_found"
    (tmp_path / "v0.9.0").mkdir()  # empty: nothing released
    assert refused(base_url=str(tmp_path) + "/{tag}").cause == "empty"
