"""The release factory, the loopback release server and fleetctl: what later tests and the demo stand on."""

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import urllib.request

import pytest
from ansible.module_utils.urls import open_url

from ansible_collections.carapace.fleet.plugins.module_utils._release import ReleaseCache, ReleaseError
from ansible_collections.carapace.fleet.plugins.module_utils._verify import GITHUB_ISSUER, TrustRoot, release_identity
from release_factory import ASSET_NAMES, DEFAULT_TAGS, NOTES_SECTIONS, build_releases, release_dir
from fleetctl import free_port
from release_server import ReleaseServer

REPO = "puremachinery/carapace"
FLEETCTL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "support", "fleetctl.py")


@pytest.fixture(scope="module")
def built(lab, tmp_path_factory):
    root = tmp_path_factory.mktemp("releases")
    manifest = build_releases(lab, str(root))
    with ReleaseServer(root) as server:
        yield root, manifest, server


def fetch_all(tmp_path, root, server, tag, assets=ASSET_NAMES):
    cache = ReleaseCache(tag=tag, repo=REPO, assets=list(assets), dest=str(tmp_path / tag), source=server.release_url(REPO, tag),
                         trust=TrustRoot(str(root / "trusted_root.json")), identity=release_identity(REPO, tag),
                         issuer=GITHUB_ISSUER, checksums="required",
                         opener=lambda url, timeout: open_url(url, timeout=timeout), move=os.rename, timeout=30,
                         max_bytes=1 << 24)
    return cache.sync()


@pytest.mark.parametrize("tag", DEFAULT_TAGS)
def test_every_served_file_verifies_with_cara_release(tmp_path, built, tag):
    root, manifest, server = built
    result = fetch_all(tmp_path, root, server, tag)
    assert result["checksums"]["present"] is True
    for name in ASSET_NAMES:
        got = result["assets"][name]
        assert got["checksum_verified"] is True
        assert got["sha256"] == manifest["releases"][tag]["assets"][name]


def test_a_tampered_file_does_not_verify(tmp_path, built):
    root, _manifest, server = built
    server.faults["/%s/releases/download/v0.9.0/cara-x86_64-linux" % REPO] = {"tamper": True}
    try:
        with pytest.raises(ReleaseError) as err:
            fetch_all(tmp_path, root, server, "v0.9.0", ["cara-x86_64-linux"])
    finally:
        server.faults.clear()
    assert err.value.cause == "digest_mismatch"


def test_sha256sums_is_sha256sum_text_output_of_the_assets(built):
    root, _manifest, _server = built
    out = release_dir(str(root), REPO, "v0.9.0")
    lines = open(os.path.join(out, "SHA256SUMS.txt"), encoding="utf-8").read().splitlines()
    assert [line.split("  ")[1] for line in lines] == sorted(ASSET_NAMES)
    for line in lines:
        digest, name = line.split("  ")
        assert re.fullmatch(r"[0-9a-f]{64}", digest)
        assert digest == hashlib.sha256(open(os.path.join(out, name), "rb").read()).hexdigest()


def test_assets_are_distinct_and_the_linux_ones_run(built, tmp_path):
    root, manifest, _server = built
    digests = [d for r in manifest["releases"].values() for d in r["assets"].values()]
    assert len(set(digests)) == len(digests)
    for tag in DEFAULT_TAGS:
        for asset in ("cara-x86_64-linux", "cara-aarch64-linux"):
            exe = tmp_path / ("%s-%s" % (tag, asset))
            exe.write_bytes(open(os.path.join(release_dir(str(root), REPO, tag), asset), "rb").read())
            exe.chmod(0o755)
            out = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=30, check=True,
                                 env=dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]))
            assert out.stdout.strip() == "cara %s" % tag[1:]


def test_flavors_and_the_faulty_release(built):
    _root, manifest, _server = built
    assert {t: r["flavor"] for t, r in manifest["releases"].items()} == {
        "v0.7.0": "v0.8.0", "v0.8.0": "v0.8.0", "v0.9.0": "head", "v0.9.1": "head"}
    assert manifest["releases"]["v0.9.1"]["faults"] == {"migrate_state": True, "ready_never": True}
    assert all(not manifest["releases"][t]["faults"] for t in ("v0.7.0", "v0.8.0", "v0.9.0"))


def test_latest_download_serves_the_newest_stable_tag(built):
    root, _manifest, server = built
    url = "%s/%s/releases/latest/download/cara-x86_64-linux" % (server.url, REPO)
    with urllib.request.urlopen(url, timeout=10) as resp:
        body = resp.read()
    assert body == open(os.path.join(release_dir(str(root), REPO, "v0.9.1"), "cara-x86_64-linux"), "rb").read()


def test_release_notes_complete_and_incomplete(built):
    root, _manifest, server = built
    with urllib.request.urlopen("%s/%s/docs/releases/v0.9.0.md" % (server.url, REPO), timeout=10) as resp:
        notes = resp.read().decode()
    assert re.findall(r"^## (.+)$", notes, re.M) == list(NOTES_SECTIONS)
    assert "503" in notes.split("## Breaking Changes", 1)[1].split("##", 1)[0]
    incomplete = open(os.path.join(root, *REPO.split("/"), "docs", "releases-incomplete", "v0.9.0.md"), encoding="utf-8").read()
    headings = re.findall(r"^## (.+)$", incomplete, re.M)
    assert set(NOTES_SECTIONS) - set(headings) == {"Rollback Steps", "Verification"}


@pytest.mark.parametrize("fault,cause_status", [({"status": 404}, 404), ({"status": 500}, 500)])
def test_server_status_faults(built, fault, cause_status):
    _root, _manifest, server = built
    server.faults["cara-x86_64-darwin"] = fault
    try:
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(server.release_url(REPO, "v0.9.0") + "/cara-x86_64-darwin", timeout=10)
    finally:
        server.faults.clear()
    assert err.value.code == cause_status


def run_fleetctl(*args, timeout=120):
    return subprocess.run([sys.executable, FLEETCTL] + list(args), capture_output=True, text=True, timeout=timeout,
                          check=False, env=dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]))


def test_fleetctl_releases_fleet_start_stop(tmp_path, llm):
    rel, fleet = tmp_path / "rel", tmp_path / "fleet"
    out = run_fleetctl("releases", "--out", str(rel), "--tags", "v0.8.0,v0.9.0")
    assert out.returncode == 0, out.stderr
    assert json.loads((rel / "releases.json").read_text())["releases"].keys() == {"v0.8.0", "v0.9.0"}
    assert (rel / "trusted_root.json").is_file()
    out = run_fleetctl("fleet", "--hosts", "2", "--dir", str(fleet), "--install", "v0.8.0", "--releases", str(rel),
                       "--llm-url", llm.base_url, "--github-url", "http://127.0.0.1:9")
    assert out.returncode == 0, out.stderr
    text = "".join(line for line in (fleet / "inventory.yml").read_text().splitlines(True) if not line.startswith("#"))
    inv = json.loads(text)
    hosts = inv["all"]["children"]["cara_fleet"]["hosts"]
    assert sorted(hosts) == ["cara-01", "cara-02"]
    assert hosts["cara-01"]["cara_port"] != hosts["cara-02"]["cara_port"]
    for hv in hosts.values():
        assert os.readlink(hv["cara_bin_path"]).endswith("/releases/v0.8.0/cara")
        assert oct(os.stat(hv["cara_state_dir"]).st_mode & 0o777) == "0o700"
        assert hv["cara_service_environment"] == {"CARA_DOUBLE_GITHUB_URL": "http://127.0.0.1:9"}
        assert 'ollama: { baseUrl: "%s" }' % llm.base_url in open(hv["cara_config_path"], encoding="utf-8").read()
    out = run_fleetctl("start", "--dir", str(fleet))
    try:
        assert out.returncode == 0, out.stdout + out.stderr
        for hv in hosts.values():
            with urllib.request.urlopen("http://127.0.0.1:%d/health" % hv["cara_port"], timeout=10) as resp:
                assert json.loads(resp.read())["version"] == "0.8.0"
            # v0.8.0 writes no daemon.pid: fleetctl keeps the pid in <run dir>/cara.pid
            assert not os.path.exists(os.path.join(hv["cara_state_dir"], "daemon.pid"))
            pid = int(open(os.path.join(hv["cara_run_dir"], "cara.pid"), encoding="utf-8").read())
            assert open("/proc/%d/cmdline" % pid, "rb").read().split(b"\0")[1] == hv["cara_bin_path"].encode()
    finally:
        stop = run_fleetctl("stop", "--dir", str(fleet))
    assert stop.returncode == 0 and stop.stdout.count("stopped") == 2
    for hv in hosts.values():
        assert not os.path.exists(os.path.join(hv["cara_run_dir"], "cara.pid"))
    assert run_fleetctl("stop", "--dir", str(fleet)).stdout.count("not running") == 2


def test_fleetctl_llm():
    port = free_port()
    proc = subprocess.Popen([sys.executable, FLEETCTL, "llm", "--port", str(port)],  # pylint: disable=consider-using-with
                            stdout=subprocess.PIPE, text=True)
    try:
        assert "fake LLM (Ollama API) at http://127.0.0.1:%d" % port in proc.stdout.readline()
        with urllib.request.urlopen("http://127.0.0.1:%d/api/tags" % port, timeout=10) as resp:
            assert json.loads(resp.read())["models"]
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        proc.stdout.close()


def test_fleetctl_serve(tmp_path, lab):
    build_releases(lab, str(tmp_path), tags=("v0.9.0",))
    port = free_port()
    proc = subprocess.Popen([sys.executable, FLEETCTL, "serve", "--root", str(tmp_path), "--port", str(port)],  # pylint: disable=consider-using-with
                            stdout=subprocess.PIPE, text=True)
    try:
        assert "serving" in proc.stdout.readline()
        with urllib.request.urlopen("http://127.0.0.1:%d/%s/releases/download/v0.9.0/SHA256SUMS.txt" % (port, REPO),
                                    timeout=10) as resp:
            assert b"cara-x86_64-linux" in resp.read()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        proc.stdout.close()
