"""A fake LLM provider that speaks the Ollama API the way `cara`'s Ollama provider uses it (src/agent/ollama.rs).

A real HTTP server on 127.0.0.1 (stdlib only):

    GET  /api/tags                 {"models": [{"name": ...}]}            cara's connectivity check at startup
    POST /v1/chat/completions      OpenAI-compatible chat; with "stream": true the reply comes as SSE
                                   `data: {chunk}` lines and `data: [DONE]` (what cara sends), else one JSON body
    POST /__faults                 {"delay_s": float, "fail": bool}: delay every chat reply / answer chats with 500
    GET  /__stats                  {"chat_requests": n, "tags_requests": n, "faults": {...}, "last_messages": [...]}

Reply rule: when the last user message contains `Reply with exactly: X`, the reply is X; otherwise a short canned
reply. Fault switches can be changed while the server runs, from this process (`set_faults`) or from another one
(`POST /__faults`, e.g. from a playbook or a shell).

    with FakeLLM() as llm:                 # or llm = FakeLLM().start(); ...; llm.stop()
        config = {"providers": {"ollama": {"baseUrl": llm.base_url}}}
        llm.set_faults(delay_s=2.0)        # slow but answering
        llm.set_faults(fail=True)          # HTTP 500 on every chat request
        llm.chat_requests                  # how many chat requests were served

CLI (serves until SIGTERM or SIGINT): `python tests/support/fake_llm.py --port P [--host 127.0.0.1]`.
"""

import argparse
import json
import re
import signal
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MODEL = "fake-llm"
CANNED_REPLY = "Hello from the fake LLM."
_EXACT = re.compile(r"Reply with exactly:\s*(.+?)\s*$", re.S)


def reply_for(messages):
    """The reply rule: `Reply with exactly: X` in the last user message gives X, anything else a canned text."""
    users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    content = users[-1].get("content", "") if users else ""
    if isinstance(content, list):  # OpenAI content parts
        content = " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    match = _EXACT.search(str(content))
    return match.group(1) if match else CANNED_REPLY


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "fake-llm/1"

    def log_message(self, *args):  # keep test output clean
        pass

    @property
    def owner(self):
        return self.server.owner

    def _send(self, status, body, content_type="application/json"):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self):
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            return json.loads(raw or b"{}")
        except ValueError:
            return None

    def do_GET(self):
        path = self.path.split("?", 1)[0]
        if path == "/api/tags":
            self.owner._count("tags_requests")
            return self._send(200, {"models": [{"name": MODEL, "model": MODEL, "size": 1}]})
        if path == "/__stats":
            return self._send(200, self.owner.stats())
        self._send(404, {"error": "not found"})

    def do_POST(self):
        path = self.path.split("?", 1)[0]
        body = self._body()
        if path == "/__faults":
            if not isinstance(body, dict):
                return self._send(400, {"error": "body must be a JSON object"})
            try:
                self.owner.set_faults(**body)
            except (TypeError, ValueError) as exc:
                return self._send(400, {"error": str(exc)})
            return self._send(200, {"ok": True, "faults": self.owner.faults()})
        if path in ("/v1/chat/completions", "/chat/completions"):
            return self._chat(body)
        self._send(404, {"error": "not found"})

    def _chat(self, body):
        owner = self.owner
        owner._count("chat_requests")
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            return self._send(400, {"error": {"message": "messages must be a list"}})
        owner._remember(body["messages"])
        faults = owner.faults()
        if faults["delay_s"] > 0:
            time.sleep(faults["delay_s"])
        if faults["fail"]:
            return self._send(500, {"error": {"message": "fake LLM: injected failure (fault fail)"}})
        text = reply_for(body["messages"])
        model = body.get("model") or MODEL
        ident = "chatcmpl-%s" % uuid.uuid4().hex[:12]
        created = int(time.time())
        usage = {"prompt_tokens": sum(len(str(m.get("content", "")).split()) for m in body["messages"]
                                      if isinstance(m, dict)),
                 "completion_tokens": len(text.split())}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        if not body.get("stream"):
            return self._send(200, {"id": ident, "object": "chat.completion", "created": created, "model": model,
                                    "choices": [{"index": 0, "finish_reason": "stop",
                                                 "message": {"role": "assistant", "content": text}}],
                                    "usage": usage})
        chunks = [{"role": "assistant", "content": ""}, {"content": text}]
        events = [{"id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
                   "choices": [{"index": 0, "delta": delta, "finish_reason": None}]} for delta in chunks]
        events.append({"id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
                       "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        if (body.get("stream_options") or {}).get("include_usage"):
            events.append({"id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
                           "choices": [], "usage": usage})
        data = "".join("data: %s\n\n" % json.dumps(e) for e in events) + "data: [DONE]\n\n"
        self._send(200, data.encode(), "text/event-stream")


class FakeLLM:
    """The fake provider; `port=0` lets the OS pick a free loopback port."""

    def __init__(self, port=0, host="127.0.0.1"):
        self._lock = threading.Lock()
        self._faults = {"delay_s": 0.0, "fail": False}
        self._counts = {"chat_requests": 0, "tags_requests": 0}
        self._last = []
        self._httpd = ThreadingHTTPServer((host, port), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.owner = self
        self._thread = None

    @property
    def base_url(self):
        host, port = self._httpd.server_address[:2]
        return "http://%s:%d" % (host, port)

    @property
    def port(self):
        return self._httpd.server_address[1]

    def start(self):
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fake-llm", daemon=True)
        self._thread.start()
        return self

    def stop(self):
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread:
            self._thread.join(timeout=10)

    def serve_forever(self):
        self._httpd.serve_forever()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # -- faults and stats ------------------------------------------------------------------------------------
    def set_faults(self, delay_s=0.0, fail=False):
        """Replace the fault switches (both reset to normal unless given)."""
        if isinstance(delay_s, bool) or not isinstance(delay_s, (int, float)) or delay_s < 0:
            raise ValueError("delay_s must be a number >= 0")
        if not isinstance(fail, bool):
            raise ValueError("fail must be a boolean")
        with self._lock:
            self._faults = {"delay_s": float(delay_s), "fail": fail}

    def faults(self):
        with self._lock:
            return dict(self._faults)

    @property
    def chat_requests(self):
        with self._lock:
            return self._counts["chat_requests"]

    @property
    def tags_requests(self):
        with self._lock:
            return self._counts["tags_requests"]

    def stats(self):
        with self._lock:
            return dict(self._counts, faults=dict(self._faults), last_messages=list(self._last))

    def _count(self, key):
        with self._lock:
            self._counts[key] += 1

    def _remember(self, messages):
        with self._lock:
            self._last = messages[-4:]


def _interrupt(*_args):
    raise KeyboardInterrupt


def main(argv=None):
    parser = argparse.ArgumentParser(prog="fake_llm", description=__doc__.split("\n", 1)[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args(argv)
    llm = FakeLLM(port=args.port, host=args.host)
    signal.signal(signal.SIGTERM, _interrupt)
    print("fake LLM (Ollama API) at %s" % llm.base_url, flush=True)
    try:
        llm.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        llm._httpd.server_close()  # pylint: disable=protected-access
    return 0


if __name__ == "__main__":
    sys.exit(main())
