"""The fake LLM provider (tests/support/fake_llm.py): Ollama's API as cara uses it, faults, stats, CLI."""
import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from fake_llm import FakeLLM, reply_for

FAKE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "support", "fake_llm.py")


def call(url, body=None, method=None, timeout=10):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method or ("POST" if data else "GET"),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return resp.status, resp.headers.get("Content-Type"), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type"), exc.read()


def chat(base, text, stream):
    return call(base + "/v1/chat/completions", {"model": "m", "stream": stream, "stream_options": {"include_usage": True},
                                                "messages": [{"role": "system", "content": "be brief"},
                                                             {"role": "user", "content": text}]})


@pytest.mark.parametrize("text, reply", [("Reply with exactly: verification-ok", "verification-ok"),
                                         ("Please. Reply with exactly: two words", "two words"),
                                         ("hello", "Hello from the fake LLM.")])
def test_reply_rule(text, reply):
    assert reply_for([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"},
                      {"role": "user", "content": text}]) == reply


def test_tags_and_streamed_chat():
    with FakeLLM() as llm:
        status, ctype, body = call(llm.base_url + "/api/tags")
        assert status == 200 and json.loads(body)["models"][0]["name"] == "fake-llm"
        status, ctype, body = chat(llm.base_url, "Reply with exactly: verification-ok", stream=True)
        assert status == 200 and ctype == "text/event-stream"
        lines = [line for line in body.decode().splitlines() if line]
        assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
        chunks = [json.loads(line[6:]) for line in lines[:-1]]
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
        assert text == "verification-ok" and chunks[-1]["usage"]["completion_tokens"] == 1
        status, ctype, body = chat(llm.base_url, "hi", stream=False)
        assert status == 200 and json.loads(body)["choices"][0]["message"]["content"] == "Hello from the fake LLM."
        assert (llm.chat_requests, llm.tags_requests) == (2, 1)


def test_faults_from_this_process_and_over_http():
    with FakeLLM() as llm:
        llm.set_faults(fail=True)
        assert chat(llm.base_url, "hi", stream=True)[0] == 500
        status, _ctype, body = call(llm.base_url + "/__faults", {"delay_s": 0.5, "fail": False})
        assert status == 200 and json.loads(body)["faults"] == {"delay_s": 0.5, "fail": False}
        assert llm.faults() == {"delay_s": 0.5, "fail": False}
        assert chat(llm.base_url, "hi", stream=True)[0] == 200
        assert call(llm.base_url + "/__faults", {"delay_s": -1})[0] == 400
        assert call(llm.base_url + "/__faults", {"nope": 1})[0] == 400
        stats = json.loads(call(llm.base_url + "/__stats")[2])
        assert stats["chat_requests"] == 2 and stats["faults"]["delay_s"] == 0.5


def test_a_delayed_reply_times_out_a_short_client():
    with FakeLLM() as llm:
        llm.set_faults(delay_s=2.0)
        with pytest.raises(OSError):  # socket.timeout / urllib's URLError are OSErrors
            call(llm.base_url + "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}, timeout=0.5)
        assert llm.chat_requests == 1


def test_cli_serves_until_sigterm():
    with FakeLLM() as probe:
        port = probe.port  # a port that is free once the probe stops
    proc = subprocess.Popen([sys.executable, FAKE, "--port", str(port)], stdout=subprocess.PIPE, text=True)  # pylint: disable=consider-using-with
    try:
        assert proc.stdout.readline().strip() == "fake LLM (Ollama API) at http://127.0.0.1:%d" % port
        assert json.loads(call("http://127.0.0.1:%d/api/tags" % port)[2])["models"]
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        proc.stdout.close()
