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
"""

import http.server
import os
import re
import socket
import struct
import threading
import time

_TAG_RE = re.compile(r"^v(\d+)\.(\d+)\.(\d+)$")


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
        path = self.path.split("?", 1)[0]
        file_path = owner.resolve(path)
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
        if status is None and (file_path is None or not os.path.isfile(file_path)):
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
        with open(file_path, "rb") as f:
            data = f.read()
        if fault.get("tamper") and data:
            mid = len(data) // 2
            data = data[:mid] + bytes([data[mid] ^ 0x01]) + data[mid + 1:]
        if fault.get("pad"):
            data += b"\0" * fault["pad"]
        owner.record(path, 200)
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
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
