"""A real HTTP server on 127.0.0.1 that serves release trees laid out as GitHub serves them.

`ReleaseServer(root)` serves `root/<owner>/<repo>/releases/download/<tag>/<file>` at the same URL path,
and `/<owner>/<repo>/releases/latest/download/<file>` from the newest stable tag present; any other file under
the root is served at its relative path (release notes, trusted_root.json). Faults are set
per file name (any tag) or per full URL path, and can be changed while the server runs:

    server.faults["cara-x86_64-linux.bundle"] = {"status": 404}
    server.faults["SHA256SUMS.txt"] = {"status": 500}
    server.faults["cara-x86_64-linux"] = {"delay": 3.0}          # seconds before the response starts
    server.faults["cara-x86_64-linux"] = {"drip": 0.2}           # seconds between 1 KiB chunks
    server.faults["cara-x86_64-linux"] = {"truncate": 1000}      # send 1000 bytes, then close
    server.faults["cara-x86_64-linux"] = {"tamper": True}        # flip one byte in the middle
    server.faults["cara-x86_64-linux"] = {"pad": 10}             # append 10 bytes, Content-Length too
    server.faults["cara-x86_64-linux"] = {"reset": True}         # close the connection without an answer (RST)
    server.faults["cara-x86_64-linux"] = {"status": 503, "times": 2}   # the first 2 requests only, then it clears

Every request is recorded in `server.requests` (path, status; 0 for a reset) so tests can count downloads
(`downloads(name)`) and attempts (`attempts(name)`).

It also lists the releases, built from the tag directories present (a tag directory counts when it holds a file):
- `/repos/<owner>/<repo>/releases`: the stand-in for GitHub's REST API ("list releases"), a JSON list of objects with
  tag_name, name, draft and prerelease (true for a tag with a pre-release part), newest first. It honours `per_page`
  (default 30, at most `server.api_page_max`, 100 as on GitHub) and `page` (from 1), and links the next page in a
  `Link: <...>; rel="next"` header as GitHub does. Tests point cara_release_tags' api_url at `server.url`.
  `server.drafts` is a set of tags listed as drafts (whether or not their directory exists).
- `<...>/releases/download/releases.json` (any `<dir>/releases.json` that is not a file on disk): the mirror layout of
  cara_release_tags, the same objects for the tag directories of `<dir>`, in one list. A real file is served as it is.
Faults apply to these paths as to any other, by full path or by last segment:

    server.faults["releases"] = {"status": 500}                  # the API listing
    server.faults["releases.json"] = {"status": 500}             # every mirror index
"""

import http.server
import json
import os
import re
import socket
import struct
import threading
import time
from urllib.parse import parse_qs, urlencode

_TAG_RE = re.compile(r"^v(\d+)\.(\d+)\.(\d+)$")
_ANY_TAG_RE = re.compile(r"^v(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)(-[0-9A-Za-z][0-9A-Za-z.-]*)?$")


class _Handler(http.server.BaseHTTPRequestHandler):
    server_version = "release-server/1"
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # keep test output clean
        pass

    def do_HEAD(self):
        self._serve(head=True)

    def do_GET(self):
        self._serve(head=False)

    def _serve(self, head):
        owner = self.server.owner
        path, _sep, query = self.path.partition("?")
        file_path = owner.resolve(path)
        listed = owner.listing(path, query) if file_path is None or not os.path.isfile(file_path) else None
        fault = owner.take_fault(path)
        if fault.get("reset"):
            owner.record(path, 0)
            # SO_LINGER 0: close() sends a TCP RST, as a reset connection looks to the client
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
            self.close_connection = True
            return
        if "delay" in fault:
            time.sleep(fault["delay"])
        status = fault.get("status")
        if status is None and listed is None and (file_path is None or not os.path.isfile(file_path)):
            status = 404
        if status is not None:
            owner.record(path, status)
            body = b"error %d\n" % status
            self.send_response(status)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)
            return
        extra_headers = {}
        if listed is not None:
            data, extra_headers = listed
        else:
            with open(file_path, "rb") as f:
                data = f.read()
        if fault.get("tamper") and data:
            mid = len(data) // 2
            data = data[:mid] + bytes([data[mid] ^ 0x01]) + data[mid + 1:]
        if fault.get("pad"):
            data += b"\0" * fault["pad"]
        owner.record(path, 200)
        self.send_response(200)
        self.send_header("Content-Type", "application/json" if listed is not None else "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        for name, value in extra_headers.items():
            self.send_header(name, value)
        if "truncate" in fault:
            self.send_header("Connection", "close")
        self.end_headers()
        if head:
            return
        if "truncate" in fault:
            self.wfile.write(data[:fault["truncate"]])
            self.wfile.flush()
            self.close_connection = True
            return
        if "drip" in fault:
            for i in range(0, len(data), 1024):
                self.wfile.write(data[i:i + 1024])
                self.wfile.flush()
                time.sleep(fault["drip"])
            return
        self.wfile.write(data)


class ReleaseServer:
    """Serve a release tree on 127.0.0.1 (an OS-chosen free port unless `port` is given)."""

    def __init__(self, root, port=0, host="127.0.0.1"):
        self.root = os.path.abspath(root)
        self.faults = {}
        self.drafts = set()
        self.api_page_max = 100
        self.requests = []
        self._lock = threading.Lock()
        self._httpd = http.server.ThreadingHTTPServer((host, port), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.owner = self
        self._thread = None

    @property
    def url(self):
        host, port = self._httpd.server_address[:2]
        return "http://%s:%d" % (host, port)

    def release_url(self, repo, tag):
        """The base URL of one release, as cara_release's base_url expects it."""
        return "%s/%s/releases/download/%s" % (self.url, repo, tag)

    def start(self):
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="release-server", daemon=True)
        self._thread.start()
        return self

    def stop(self):
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread:
            self._thread.join(timeout=10)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def serve_forever(self):
        self._httpd.serve_forever()

    # -- used by the handler ------------------------------------------------------------------------
    def record(self, path, status):
        with self._lock:
            self.requests.append((path, status))

    def downloads(self, name):
        """How many successful GETs/HEADs of a file name (any tag) this server answered."""
        with self._lock:
            return sum(1 for p, s in self.requests if s == 200 and p.rsplit("/", 1)[-1] == name)

    def attempts(self, name):
        """How many requests for a file name (any tag) this server got, whatever it answered."""
        with self._lock:
            return sum(1 for p, _s in self.requests if p.rsplit("/", 1)[-1] == name)

    def fault_for(self, path):
        return self.faults.get(path) or self.faults.get(path.rsplit("/", 1)[-1]) or {}

    def take_fault(self, path):
        """The fault for this request; a fault with `times` counts down and clears after that many requests."""
        with self._lock:
            key = path if path in self.faults else path.rsplit("/", 1)[-1]
            fault = self.faults.get(key) or {}
            if "times" in fault:
                left = fault["times"] - 1
                if left <= 0:
                    del self.faults[key]
                else:
                    self.faults[key] = dict(fault, times=left)
            return fault

    def resolve(self, path):
        parts = [p for p in path.split("/") if p]
        if not parts or any(p in (".", "..") for p in parts):
            return None
        if len(parts) != 6 or parts[2] != "releases":
            # anything else under the root is served as it lies (release notes, trusted_root.json)
            return os.path.join(self.root, *parts)
        owner, repo, _releases, kind, tag, name = parts
        if kind == "latest" and tag == "download":
            tag = self.resolve_latest(owner, repo)
            if tag is None:
                return None
        elif kind != "download":
            return None
        return os.path.join(self.root, owner, repo, "releases", "download", tag, name)

    def resolve_latest(self, owner, repo):
        base = os.path.join(self.root, owner, repo, "releases", "download")
        tags = [t for t in os.listdir(base) if _TAG_RE.match(t)] if os.path.isdir(base) else []
        if not tags:
            return None
        return max(tags, key=lambda t: tuple(int(x) for x in _TAG_RE.match(t).groups()))

    def release_tags(self, directory):
        """The tags of the tag directories in `directory` that hold at least one file, newest first."""
        try:
            names = os.listdir(directory)
        except OSError:
            return []
        tags = []
        for name in names:
            sub = os.path.join(directory, name)
            if _ANY_TAG_RE.match(name) and os.path.isdir(sub) and any(e.is_file() for e in os.scandir(sub)):
                tags.append(name)
        return sorted(tags, key=_semver_key, reverse=True)

    def _release_objects(self, tags):
        return [{"tag_name": t, "name": t, "draft": t in self.drafts, "prerelease": "-" in t} for t in tags]

    def listing(self, path, query):
        """(JSON body, extra headers) for the API's release list or a mirror's releases.json, else None."""
        parts = [p for p in path.split("/") if p]
        if any(p in (".", "..") for p in parts):
            return None
        if len(parts) == 4 and parts[0] == "repos" and parts[3] == "releases":
            directory = os.path.join(self.root, parts[1], parts[2], "releases", "download")
            tags = sorted(set(self.release_tags(directory)) | set(self.drafts), key=_semver_key, reverse=True)
            params = parse_qs(query)
            try:
                per_page = max(1, min(int(params.get("per_page", ["30"])[0]), self.api_page_max))
                page = max(1, int(params.get("page", ["1"])[0]))
            except ValueError:
                return None
            chunk = tags[(page - 1) * per_page:page * per_page]
            headers = {}
            if page * per_page < len(tags):
                headers["Link"] = '<%s%s?%s>; rel="next"' % (self.url, path, urlencode({"per_page": per_page,
                                                                                        "page": page + 1}))
            return json.dumps(self._release_objects(chunk)).encode(), headers
        if parts and parts[-1] == "releases.json":
            directory = os.path.join(self.root, *parts[:-1])
            if not os.path.isdir(directory):
                return None
            return json.dumps(self._release_objects(self.release_tags(directory))).encode(), {}
        return None


def _semver_key(tag):
    match = _ANY_TAG_RE.match(tag)
    if not match:
        return ((), ())
    pre = match.group(4)
    pre_key = (1,) if not pre else (0,) + tuple((0, int(p), "") if p.isdigit() else (1, 0, p)
                                                for p in re.findall(r"[0-9]+|[^0-9]+", pre[1:]))
    return (tuple(int(x) for x in match.groups()[:3]), pre_key)
