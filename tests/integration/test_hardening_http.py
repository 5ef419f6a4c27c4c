"""Regression tests of issue 12 (hardening), items 3 and 4: redirects and whole-request deadlines, over real sockets
on 127.0.0.1, with ansible-core's open_url wired exactly as the modules wire it (_http.ansible_opener).
"""

import http.server
import os
import socket
import threading
import time
import urllib.error

import pytest
import yaml
from ansible.module_utils.urls import open_url

from ansible_collections.carapace.fleet.plugins.module_utils import _download, _http, _notes
from ansible_collections.carapace.fleet.plugins.module_utils._download import FetchError, Source
from ansible_collections.carapace.fleet.plugins.module_utils._release import ReleaseCache
from ansible_collections.carapace.fleet.plugins.module_utils._verify import GITHUB_ISSUER, TrustRoot, release_identity
from release_factory import publish

SECRET = "Bearer s3cret-token"


class _Recorder(http.server.BaseHTTPRequestHandler):
    """Serves /file (200) or redirects (the server's `redirect` map); records the headers of every request."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.server.seen.append((self.path, dict(self.headers)))
        target = self.server.redirect.get(self.path)
        if target:
            self.send_response(302)
            self.send_header("Location", target)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = b"release bytes\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def servers():
    started = []

    def start(redirect=None):
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
        server.daemon_threads = True
        server.seen, server.redirect = [], dict(redirect or {})
        threading.Thread(target=server.serve_forever, daemon=True).start()
        started.append(server)
        return server, "http://127.0.0.1:%d" % server.server_address[1]

    yield start
    for server in started:
        server.shutdown()
        server.server_close()


def module_opener(headers):
    """What cara_release builds: open_url without its own redirect following, our policy on top."""
    return _http.ansible_opener(open_url, headers=headers, validate_certs=True, http_agent="test")


# -- item 3 ---------------------------------------------------------------------------------------------------------

def test_item3_custom_headers_do_not_follow_a_redirect_to_another_origin(tmp_path, servers):
    other, other_url = servers()
    origin, origin_url = servers({"/rel/v0.9.0/cara": other_url + "/file", "/rel/v0.9.0/same": "/file"})
    source = Source(origin_url + "/rel/{tag}", "o/r", "v0.9.0")
    opener = module_opener({"Authorization": SECRET, "X-Mirror-Key": "k"})
    digest, size = _download.fetch(source, "cara", str(tmp_path / "a"), opener, 10, 1 << 20)
    assert size == len(b"release bytes\n") and digest
    assert origin.seen[0][1].get("Authorization") == SECRET
    assert [path for path, _h in other.seen] == ["/file"]
    assert "Authorization" not in other.seen[0][1] and "X-Mirror-Key" not in other.seen[0][1]
    # a redirect on the same origin keeps them
    _download.fetch(source, "same", str(tmp_path / "b"), opener, 10, 1 << 20)
    assert origin.seen[-1][0] == "/file" and origin.seen[-1][1].get("Authorization") == SECRET


def test_item3_https_to_http_redirect_is_refused():
    calls = []

    def raw_open(url, headers, timeout):
        calls.append((url, dict(headers)))
        raise urllib.error.HTTPError("http://mirror.example/cara", 302, "Found",
                                     {"Location": "http://mirror.example/cara"}, None)

    opener = _http.redirect_opener(raw_open, {"Authorization": SECRET})
    with pytest.raises(_http.RedirectRefused, match="https.*http"):
        opener("https://mirror.example/cara", 5)
    assert calls == [("https://mirror.example/cara", {"Authorization": SECRET})]
    # in _download it is a failure of the transfer, with the cause and no secret in it
    source = Source("https://mirror.example/{tag}", "o/r", "v0.9.0")
    with pytest.raises(FetchError) as info:
        _download.fetch(source, "cara", "/nonexistent/never-written", opener, 5, 1 << 20)
    assert "https" in info.value.message and SECRET not in info.value.message


def test_item3_notes_fetch_refuses_https_to_http(tmp_path):
    def raw_open(url, headers, timeout):
        raise urllib.error.HTTPError("http://x.example/n.md", 301, "Moved", {"Location": "http://x.example/n.md"}, None)

    with pytest.raises(_notes.NotesError) as info:
        _notes.read_notes("https://x.example/n.md", _http.redirect_opener(raw_open, {}), 5)
    assert "refus" in info.value.message


# -- item 4 ---------------------------------------------------------------------------------------------------------

@pytest.fixture
def dripper():
    """A raw TCP server: `mode` "headers" drips a header line one byte at a time, "body" sends the headers then drips
    the body; 0.1 s between bytes, 200 bytes (20 s), then it completes the response properly. It counts the
    connections it completed and those the client hung up on before the drip was over (`aborted`)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    state = {"mode": "headers", "stop": False, "completed": 0, "aborted": 0, "threads": []}

    def serve():
        while not state["stop"]:
            try:
                conn, _addr = listener.accept()
            except OSError:
                return
            worker = threading.Thread(target=drip, args=(conn,), daemon=True)
            state["threads"].append(worker)
            worker.start()

    def drip(conn):
        body = b"## Summary\n" + b"x" * 189
        try:
            conn.recv(65536)
            if state["mode"] == "headers":
                conn.sendall(b"HTTP/1.1 200 OK\r\n")
                slow, rest = b"X-Slow: " + b"a" * 190 + b"\r\n", b"Content-Length: %d\r\n\r\n" % len(body) + body
            else:
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body))
                slow, rest = body, b""
            for byte in slow:
                if state["stop"]:
                    return
                conn.sendall(bytes([byte]))
                time.sleep(0.1)
            conn.sendall(rest)
            state["completed"] += 1
        except OSError:
            state["aborted"] += 1
        finally:
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    yield state, "http://127.0.0.1:%d" % listener.getsockname()[1]
    state["stop"] = True
    listener.close()


def hung_up_early(state):
    """Wait for the server's connections to end; True when the client gave up on every one mid-drip."""
    for worker in list(state["threads"]):
        worker.join()
    return state["aborted"] >= 1 and state["completed"] == 0


def test_item4_headers_dripped_slowly_are_bounded_by_timeout(tmp_path, dripper):
    state, url = dripper
    state["mode"] = "headers"
    source = Source(url + "/{tag}", "o/r", "v0.9.0")
    with pytest.raises(FetchError) as info:
        _download.fetch(source, "cara", str(tmp_path / "a"), module_opener({}), 1, 1 << 20)
    assert info.value.cause == "timeout", info.value.message
    assert hung_up_early(state), state


def test_item4_release_notes_body_dripped_slowly_is_bounded_by_timeout(dripper):
    state, url = dripper
    state["mode"] = "body"
    with pytest.raises(_notes.NotesError) as info:
        _notes.read_notes(url + "/notes.md", module_opener({}), 1)
    assert info.value.cause == "timeout", info.value.message
    assert hung_up_early(state), state


def test_item4_notes_headers_dripped_slowly_are_bounded_by_timeout(dripper):
    state, url = dripper
    state["mode"] = "headers"
    with pytest.raises(_notes.NotesError) as info:
        _notes.read_notes(url + "/notes.md", module_opener({}), 1)
    assert info.value.cause == "timeout", info.value.message
    assert hung_up_early(state), state


# -- item 5 ---------------------------------------------------------------------------------------------------------

ASSETS = {"cara-x86_64-linux": b"\x7fELF x86_64 cara 0.9.0\n" * 64}


def _cache(tmp_path, lab_root, base, checksums):
    return ReleaseCache(tag="v0.9.0", repo="puremachinery/carapace", assets=list(ASSETS), dest=str(tmp_path / "cache"),
                        source=Source(base, "puremachinery/carapace", "v0.9.0"), trust=TrustRoot(lab_root),
                        identity=release_identity("puremachinery/carapace", "v0.9.0"), issuer=GITHUB_ISSUER,
                        checksums=checksums, opener=module_opener({}), move=os.rename, timeout=10, max_bytes=1 << 24)


@pytest.mark.parametrize("checksums", ["if_present", "ignore"])
def test_item5_cara_release_warns_when_it_runs_without_sha256sums(tmp_path, lab, lab_root, release_server, checksums):
    publish(lab, release_server.root, "puremachinery/carapace", "v0.9.0", ASSETS, sums=False)
    result = _cache(tmp_path, lab_root, release_server.release_url("puremachinery/carapace", "v0.9.0"), checksums).sync()
    assert result["checksums"]["present"] is False
    assert any("SHA256SUMS.txt" in w and "checksums: required" in w for w in result["warnings"]), result["warnings"]


def test_item5_no_warning_when_the_sums_are_checked(tmp_path, lab, lab_root, release_server):
    publish(lab, release_server.root, "puremachinery/carapace", "v0.9.0", ASSETS)
    result = _cache(tmp_path, lab_root, release_server.release_url("puremachinery/carapace", "v0.9.0"), "required").sync()
    assert result["checksums"]["present"] is True and result["warnings"] == []


def test_item5_the_roles_require_the_checksums_by_default():
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for role in ("cara_upgrade", "cara_rollback"):
        with open(os.path.join(root, "roles", role, "defaults", "main.yml"), encoding="utf-8") as f:
            assert yaml.safe_load(f)["cara_release_checksums"] == "required", role
        with open(os.path.join(root, "roles", role, "meta", "argument_specs.yml"), encoding="utf-8") as f:
            specs = yaml.safe_load(f)["argument_specs"]
        documented = [entry["options"]["cara_release_checksums"] for entry in specs.values()
                      if "cara_release_checksums" in entry.get("options", {})]
        assert documented and all(o["default"] == "required" for o in documented), (role, documented)
