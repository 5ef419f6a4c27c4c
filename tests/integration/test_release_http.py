"""cara_release's fetch-and-verify path against a real HTTP server on 127.0.0.1 (GitHub's release layout).

Runs ReleaseCache with ansible-core's open_url, exactly as the module wires it, so every byte crosses a real
socket. Each failure must stop the run with its cause and leave nothing unverified in the cache.
"""

import os

import pytest
from ansible.module_utils.urls import open_url

from ansible_collections.carapace.fleet.plugins.module_utils._http import DEFAULT_RETRIES
from ansible_collections.carapace.fleet.plugins.module_utils._release import ReleaseCache, ReleaseError
from ansible_collections.carapace.fleet.plugins.module_utils._verify import GITHUB_ISSUER, TrustRoot, release_identity
from release_factory import publish, release_dir, sha256sums_text

REPO = "puremachinery/carapace"
TAG = "v0.9.0"
ASSETS = {"cara-x86_64-linux": b"\x7fELF x86_64 cara 0.9.0\n" * 4096, "cara-aarch64-linux": b"\x7fELF aarch64 cara 0.9.0\n" * 4096}


def opener(url, timeout):
    return open_url(url, timeout=timeout, validate_certs=True, follow_redirects="safe")


@pytest.fixture
def release(lab, release_server):
    publish(lab, release_server.root, REPO, TAG, ASSETS)
    return release_server


def make_cache(tmp_path, lab_root, base, assets=tuple(ASSETS), checksums="if_present", timeout=10, max_bytes=1 << 24,
               tag=TAG, retries=DEFAULT_RETRIES):
    return ReleaseCache(tag=tag, repo=REPO, assets=list(assets), dest=str(tmp_path / "cache"), source=base,
                        trust=TrustRoot(lab_root), identity=release_identity(REPO, tag), issuer=GITHUB_ISSUER,
                        checksums=checksums, opener=opener, move=os.rename, timeout=timeout, max_bytes=max_bytes,
                        retries=retries)


def cache_files(tmp_path):
    """Everything in the cache dir, hidden entries included (temp dirs must be gone)."""
    found = []
    for top, dirs, files in os.walk(tmp_path / "cache"):
        found += [os.path.relpath(os.path.join(top, d), tmp_path / "cache") + "/" for d in dirs]
        found += [os.path.relpath(os.path.join(top, f), tmp_path / "cache") for f in files]
    return sorted(found)


def fail(cache):
    with pytest.raises(ReleaseError) as err:
        cache.sync()
    return err.value


def test_happy_path_then_cached(tmp_path, lab_root, release):
    base = release.release_url(REPO, TAG)
    result = make_cache(tmp_path, lab_root, base).sync()
    assert result["changed"] is True
    assert result["checksums"]["present"] is True
    for name, data in ASSETS.items():
        got = result["assets"][name]
        assert got["cached"] is False and got["checksum_verified"] is True
        assert open(got["path"], "rb").read() == data
        assert got["size"] == len(data)
        assert got["url"] == "%s/%s" % (base, name)
        assert oct(os.stat(got["path"]).st_mode & 0o777) == "0o644"
    assert cache_files(tmp_path) == sorted(["v0.9.0/"] + ["v0.9.0/" + f for f in (
        "SHA256SUMS.txt", "SHA256SUMS.txt.bundle", "cara-aarch64-linux", "cara-aarch64-linux.bundle",
        "cara-x86_64-linux", "cara-x86_64-linux.bundle")])
    assert release.downloads("cara-x86_64-linux") == 1

    again = make_cache(tmp_path, lab_root, base).sync()
    assert again["changed"] is False
    assert all(a["cached"] and a["checksum_verified"] for a in again["assets"].values())
    assert {n: a["sha256"] for n, a in again["assets"].items()} == {n: a["sha256"] for n, a in result["assets"].items()}
    assert release.downloads("cara-x86_64-linux") == 1  # re-verified from the cache, not fetched again
    assert again["diff"]["before"] == again["diff"]["after"]


def test_check_mode_downloads_nothing(tmp_path, lab_root, release):
    plan = make_cache(tmp_path, lab_root, release.release_url(REPO, TAG)).plan()
    assert plan["changed"] is True
    assert release.requests == []
    assert any(a.startswith("would fetch cara-x86_64-linux") for a in plan["actions"])
    assert "cara-x86_64-linux" in plan["diff"]["after"]["files"] and plan["diff"]["before"]["files"] == []
    assert not (tmp_path / "cache").exists()


def test_missing_asset_bundle_404(tmp_path, lab_root, release):
    release.faults["cara-aarch64-linux.bundle"] = {"status": 404}
    err = fail(make_cache(tmp_path, lab_root, release.release_url(REPO, TAG)))
    assert err.cause == "missing_bundle" and err.asset == "cara-aarch64-linux"
    assert "HTTP 404" in err.message
    # the other asset verified, but nothing of a failed run is installed
    assert cache_files(tmp_path) == []


def test_missing_asset_404(tmp_path, lab_root, release):
    err = fail(make_cache(tmp_path, lab_root, release.release_url(REPO, TAG), assets=["cara-x86_64-darwin"]))
    assert err.cause == "not_found" and "cara-x86_64-darwin" in err.message


def test_server_error_500(tmp_path, lab_root, release):
    # a server error that does not clear: tried 1 + retries times, then the run fails with its cause
    release.faults["cara-x86_64-linux"] = {"status": 500}
    err = fail(make_cache(tmp_path, lab_root, release.release_url(REPO, TAG)))
    assert err.cause == "http_error" and "HTTP 500" in err.message
    assert "(after %d attempts)" % (DEFAULT_RETRIES + 1) in err.message
    assert release.attempts("cara-x86_64-linux") == DEFAULT_RETRIES + 1
    assert cache_files(tmp_path) == []


@pytest.mark.parametrize("fault", [{"status": 503, "times": 2}, {"status": 502, "times": 3}, {"reset": True, "times": 2},
                                   {"truncate": 1000, "times": 1}],
                         ids=["503-twice", "502-three-times", "reset-twice", "truncated-once"])
def test_a_transient_failure_that_clears_is_retried(tmp_path, lab_root, release, fault):
    release.faults["cara-x86_64-linux"] = fault
    result = make_cache(tmp_path, lab_root, release.release_url(REPO, TAG)).sync()
    got = result["assets"]["cara-x86_64-linux"]
    assert got["checksum_verified"] is True
    assert open(got["path"], "rb").read() == ASSETS["cara-x86_64-linux"]
    assert release.attempts("cara-x86_64-linux") == fault["times"] + 1
    assert release.downloads("cara-x86_64-linux") == 1 + (1 if "truncate" in fault else 0)


def test_a_connection_reset_that_persists_fails_after_the_bound(tmp_path, lab_root, release):
    release.faults["cara-x86_64-linux"] = {"reset": True}
    err = fail(make_cache(tmp_path, lab_root, release.release_url(REPO, TAG), retries=1))
    assert err.cause == "connection_error" and "(after 2 attempts)" in err.message
    assert release.attempts("cara-x86_64-linux") == 2
    assert cache_files(tmp_path) == []


@pytest.mark.parametrize("status", [403, 404, 429])
def test_a_4xx_is_never_retried(tmp_path, lab_root, release, status):
    release.faults["cara-x86_64-linux"] = {"status": status}
    err = fail(make_cache(tmp_path, lab_root, release.release_url(REPO, TAG)))
    assert err.cause == ("not_found" if status == 404 else "http_error")
    assert "attempts" not in err.message
    assert release.attempts("cara-x86_64-linux") == 1


def test_server_slower_than_timeout(tmp_path, lab_root, release):
    release.faults["cara-x86_64-linux"] = {"delay": 3}
    err = fail(make_cache(tmp_path, lab_root, release.release_url(REPO, TAG), timeout=1, retries=0))
    assert err.cause == "timeout" and "timeout=1s" in err.message
    assert cache_files(tmp_path) == []


def test_dripping_body_is_bounded_by_the_whole_transfer_timeout(tmp_path, lab_root, release):
    # each 1 KiB chunk comes well within the socket timeout, the whole body does not
    release.faults["cara-x86_64-linux"] = {"drip": 0.05}
    err = fail(make_cache(tmp_path, lab_root, release.release_url(REPO, TAG), timeout=1, retries=0))
    assert err.cause == "timeout"
    assert cache_files(tmp_path) == []


def test_body_larger_than_max_bytes(tmp_path, lab_root, release):
    err = fail(make_cache(tmp_path, lab_root, release.release_url(REPO, TAG), max_bytes=50000))
    assert err.cause == "too_large" and "max_bytes=50000" in err.message
    assert cache_files(tmp_path) == []


def test_local_file_larger_than_max_bytes(tmp_path, lab_root, release):
    err = fail(make_cache(tmp_path, lab_root, release_dir(release.root, REPO, TAG), max_bytes=50000))
    assert err.cause == "too_large"


def test_truncated_transfer(tmp_path, lab_root, release):
    release.faults["cara-x86_64-linux"] = {"truncate": 1000}
    err = fail(make_cache(tmp_path, lab_root, release.release_url(REPO, TAG)))
    assert err.cause == "truncated" and err.asset == "cara-x86_64-linux"
    assert release.attempts("cara-x86_64-linux") == DEFAULT_RETRIES + 1
    assert cache_files(tmp_path) == []


def test_tampered_byte_in_transit(tmp_path, lab_root, release):
    release.faults["cara-x86_64-linux"] = {"tamper": True}
    err = fail(make_cache(tmp_path, lab_root, release.release_url(REPO, TAG)))
    assert err.cause == "digest_mismatch" and err.asset == "cara-x86_64-linux"
    # an integrity failure is never retried: one request, one download
    assert release.attempts("cara-x86_64-linux") == 1
    assert cache_files(tmp_path) == []


def _republish_sums(lab, release, text, tag=TAG, identity=None):
    out = release_dir(release.root, REPO, TAG)
    with open(os.path.join(out, "SHA256SUMS.txt"), "w", encoding="utf-8") as f:
        f.write(text)
    with open(os.path.join(out, "SHA256SUMS.txt.bundle"), "wb") as f:
        f.write(lab.sign(text.encode(), identity or release_identity(REPO, tag)))


def test_sha256sums_with_a_wrong_line(tmp_path, lab_root, lab, release):
    text = sha256sums_text(ASSETS).replace(sha256sums_text({"cara-x86_64-linux": ASSETS["cara-x86_64-linux"]})[:64], "0" * 64)
    _republish_sums(lab, release, text)
    err = fail(make_cache(tmp_path, lab_root, release.release_url(REPO, TAG)))
    assert err.cause == "checksum_mismatch" and err.asset == "cara-x86_64-linux"
    assert cache_files(tmp_path) == []


def test_sha256sums_with_a_missing_line(tmp_path, lab_root, lab, release):
    _republish_sums(lab, release, sha256sums_text({"cara-aarch64-linux": ASSETS["cara-aarch64-linux"]}))
    err = fail(make_cache(tmp_path, lab_root, release.release_url(REPO, TAG)))
    assert err.cause == "checksum_missing" and err.asset == "cara-x86_64-linux"
    assert cache_files(tmp_path) == []


def test_no_sha256sums_if_present_passes_on_the_bundle(tmp_path, lab_root, lab, release_server):
    publish(lab, release_server.root, REPO, TAG, ASSETS, sums=False)
    result = make_cache(tmp_path, lab_root, release_server.release_url(REPO, TAG)).sync()
    assert result["checksums"]["present"] is False
    assert [a["checksum_verified"] for a in result["assets"].values()] == [False, False]
    assert "SHA256SUMS.txt" not in os.listdir(tmp_path / "cache" / TAG)


def test_no_sha256sums_when_required_fails(tmp_path, lab_root, lab, release_server):
    publish(lab, release_server.root, REPO, TAG, ASSETS, sums=False)
    err = fail(make_cache(tmp_path, lab_root, release_server.release_url(REPO, TAG), checksums="required"))
    assert err.cause == "checksums_absent"
    assert cache_files(tmp_path) == []


def test_sha256sums_without_its_bundle_fails(tmp_path, lab_root, release):
    release.faults["SHA256SUMS.txt.bundle"] = {"status": 404}
    err = fail(make_cache(tmp_path, lab_root, release.release_url(REPO, TAG)))
    assert err.cause == "missing_bundle" and err.asset == "SHA256SUMS.txt"


def test_sha256sums_bundle_for_another_tag(tmp_path, lab_root, lab, release):
    _republish_sums(lab, release, sha256sums_text(ASSETS), identity=release_identity(REPO, "v0.8.0"))
    err = fail(make_cache(tmp_path, lab_root, release.release_url(REPO, TAG)))
    assert err.cause == "identity_mismatch" and err.asset == "SHA256SUMS.txt"
    assert "refs/tags/v0.8.0" in err.message
    assert cache_files(tmp_path) == []


def test_checksums_ignore_does_not_fetch_them(tmp_path, lab_root, release):
    result = make_cache(tmp_path, lab_root, release.release_url(REPO, TAG), checksums="ignore").sync()
    assert result["checksums"]["present"] is False
    assert release.downloads("SHA256SUMS.txt") == 0


def test_mirror_file_url_and_local_dir_give_identical_results(tmp_path, lab_root, release):
    local = release_dir(release.root, REPO, TAG)
    bases = {
        "mirror": release.url + "/{repo}/releases/download/{tag}",
        "file": "file://" + local,
        "dir": local,
    }
    results = {}
    for kind, base in bases.items():
        out = tmp_path / kind
        out.mkdir()
        res = make_cache(out, lab_root, base).sync()
        results[kind] = {n: {k: v for k, v in a.items() if k not in ("path", "bundle_path", "url")}
                         for n, a in res["assets"].items()}
        results[kind]["_checksums_present"] = res["checksums"]["present"]
        assert cache_files(out) == cache_files(tmp_path / "mirror")
    assert results["mirror"] == results["file"] == results["dir"]
    assert all(a["checksum_verified"] for n, a in results["dir"].items() if not n.startswith("_"))


def test_cached_file_that_no_longer_verifies_is_replaced(tmp_path, lab_root, release):
    base = release.release_url(REPO, TAG)
    first = make_cache(tmp_path, lab_root, base).sync()
    path = first["assets"]["cara-x86_64-linux"]["path"]
    with open(path, "r+b") as f:
        f.write(b"X")
    plan = make_cache(tmp_path, lab_root, base).plan()
    assert plan["changed"] is True and any("would replace cached" in a for a in plan["actions"])
    cache = make_cache(tmp_path, lab_root, base)
    again = cache.sync()
    assert again["changed"] is True
    assert again["assets"]["cara-x86_64-linux"]["cached"] is False
    assert open(path, "rb").read() == ASSETS["cara-x86_64-linux"]
    assert cache.warnings and "failed re-verification" in cache.warnings[0]


def test_stale_incoming_dirs_of_dead_runs_are_swept(tmp_path, lab_root, release):
    stale = tmp_path / "cache" / ".incoming-999999999-abc"
    stale.mkdir(parents=True)
    (stale / "cara-x86_64-linux").write_bytes(b"half a download")
    make_cache(tmp_path, lab_root, release.release_url(REPO, TAG)).sync()
    assert not stale.exists()


def test_unsupported_scheme_is_refused(tmp_path, lab_root):
    from ansible_collections.carapace.fleet.plugins.module_utils._download import FetchError
    with pytest.raises(FetchError) as err:
        make_cache(tmp_path, lab_root, "ftp://mirror.example/x")
    assert err.value.cause == "bad_source"


def test_release_notes_retry_a_transient_failure_and_not_a_4xx(release):
    from ansible_collections.carapace.fleet.plugins.module_utils import _notes  # pylint: disable=import-outside-toplevel
    notes_dir = os.path.join(release.root, "notes")
    os.makedirs(notes_dir, exist_ok=True)
    with open(os.path.join(notes_dir, "v0.9.0.md"), "w", encoding="utf-8") as f:
        f.write("# v0.9.0\n\n## Summary\n\nretried\n")
    url = release.url + "/notes/v0.9.0.md"
    release.faults["v0.9.0.md"] = {"status": 503, "times": 1}
    assert "retried" in _notes.read_notes(url, opener, 5, sleep=lambda _s: None)
    assert release.attempts("v0.9.0.md") == 2
    release.faults["v0.9.0.md"] = {"status": 403}
    with pytest.raises(_notes.NotesError) as err:
        _notes.read_notes(url, opener, 5, sleep=lambda _s: None)
    assert err.value.cause == "http_error" and "attempts" not in err.value.message
    assert release.attempts("v0.9.0.md") == 3
