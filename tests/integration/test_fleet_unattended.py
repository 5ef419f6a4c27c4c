"""Unattended rolling upgrades (issue 17): the maintenance window, the canary soak, the progress lines, the run-end
webhook. Real fleets of the cara double, a real release server, a real webhook receiver on 127.0.0.1."""
import datetime
import http.server
import json
import os
import re
import threading

import pytest

from conftest import wait_for
from fleet import state_files

SECRET = "hook-secret-7f3a9c"  # in the webhook's path: it must never show in the output


class Webhook:
    """A real HTTP receiver on 127.0.0.1 that records every POST (path, JSON body)."""

    def __init__(self, status=204):
        received = self.received = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):  # pylint: disable=invalid-name
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                received.append({"path": self.path, "body": json.loads(body),
                                 "content_type": self.headers.get("Content-Type")})
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = "http://127.0.0.1:%d/hooks/%s" % (self.server.server_address[1], SECRET)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def webhook():
    hook = Webhook()
    yield hook
    hook.close()


def clock(seconds=0):
    """HH:MM:SS (UTC) `seconds` from now."""
    return (datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=seconds)).strftime("%H:%M:%S")


def rows(fleet):
    return {h["host"]: h for h in fleet.report()["hosts"]}


def test_no_batch_starts_outside_the_window(make_fleet, webhook):
    fleet = make_fleet(hosts=3)
    before = {name: state_files(hv) for name, hv in fleet.hostvars().items()}
    # opened two hours ago, closed an hour ago (every day, so it also tells when the next one opens)
    window = "daily %s-%s" % (clock(-7200)[:5], clock(-3600)[:5])
    rc, out = fleet.playbook("upgrade", cara_upgrade_version="v0.9.0", cara_upgrade_window=window,
                             cara_notify_webhook_url=webhook.url)
    assert rc == 2, out[-3000:]
    assert "INCOMPLETE (safe)" in out and "is closed" in out and "the next one opens" in out, out[-3000:]
    report = fleet.report()
    assert report["summary"]["outcome"] == "incomplete" and report["summary"]["pending"] == 3
    assert report["run"]["stopped"] == "window_closed" and window in report["run"]["window"]
    for name, row in rows(fleet).items():
        assert (row["result"], row["phase"]) == ("pending", "not_started"), row
        assert "maintenance window" in row["details"]["error"]
        assert fleet.active(name) == "v0.8.0" and fleet.health(name)["version"] == "0.8.0"
        assert state_files(fleet.hostvars()[name]) == before[name]
        assert not os.listdir(fleet.hostvars()[name]["cara_backup_dir"])
    assert not os.path.exists(os.path.join(fleet.base, "run.lock")), "the fleet lock was not released"
    # the webhook had the summary, once; its URL (a secret) is nowhere in the output
    assert len(webhook.received) == 1, webhook.received
    hook = webhook.received[0]
    assert hook["path"] == "/hooks/" + SECRET and hook["content_type"].startswith("application/json")
    assert hook["body"]["event"] == "carapace.fleet.run_end" and hook["body"]["summary"]["outcome"] == "incomplete"
    assert {h["host"]: h["result"] for h in hook["body"]["hosts"]} == dict.fromkeys(before, "pending")
    assert SECRET not in out


def test_the_window_is_judged_before_every_batch(make_fleet, webhook):
    fleet = make_fleet(hosts=2)
    # The window comes from a file (a site may keep it there), read again before each batch: open for the canary,
    # closed by the time its soak has ended.
    window_file = os.path.join(fleet.base, "window.txt")
    with open(window_file, "w", encoding="utf-8") as f:
        f.write("daily 00:00-24:00")
    proc = fleet.spawn_playbook("upgrade", cara_upgrade_version="v0.9.0",
                                cara_upgrade_window="{{ lookup('ansible.builtin.file', '%s') }}" % window_file,
                                cara_upgrade_serial=[1, "100%"], cara_upgrade_soak=6, cara_upgrade_soak_interval=1,
                                cara_notify_webhook_url=webhook.url)
    try:
        wait_for(lambda: canary_upgraded(fleet), timeout=300, interval=0.2, what="the canary upgraded (report row)")
        with open(window_file, "w", encoding="utf-8") as f:  # the canary soaks now: the window closes
            f.write("daily %s-%s" % (clock(-7200)[:5], clock(-3600)[:5]))
        rc = proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = open(proc.log, encoding="utf-8").read()
    assert rc == 2, out[-3000:]
    got = rows(fleet)
    assert got["cara-01"]["result"] == "upgraded" and got["cara-01"]["details"]["batch"] == 1, got["cara-01"]
    assert fleet.health("cara-01")["version"] == "0.9.0"
    assert (got["cara-02"]["result"], got["cara-02"]["phase"]) == ("pending", "not_started")
    assert fleet.active("cara-02") == "v0.8.0"
    # the soak held (its rounds are in the output), and one progress line per batch that ran
    held = re.search(r"held for (\d+)s \((\d+) rounds of health, ready\)", out)
    assert held and int(held.group(1)) >= 6 and int(held.group(2)) >= 4, out[-4000:]
    assert re.search(r"batch 1 \(canary\): cara-01 \| so far: pending 2", out), out[-4000:]
    assert re.search(r"batch 1 done: 1 ok \| so far: upgraded 1, pending 1", out), out[-4000:]
    assert not re.search(r"batch 2\b", out), out[-4000:]  # never started
    assert webhook.received[-1]["body"]["summary"]["outcome"] == "incomplete"


def canary_upgraded(fleet):
    """The canary's row says upgraded once its window passed the gate: its soak starts right after."""
    try:
        return rows(fleet)["cara-01"]["result"] == "upgraded"
    except (OSError, KeyError, ValueError):
        return False


def test_a_canary_that_degrades_in_its_soak_is_rolled_back_and_stops_the_line(make_fleet, webhook):
    fleet = make_fleet(hosts=2)
    proc = fleet.spawn_playbook("upgrade", cara_upgrade_version="v0.9.0", cara_upgrade_serial=[1, "100%"],
                                cara_upgrade_soak=60, cara_upgrade_soak_interval=1, cara_notify_webhook_url=webhook.url)
    try:
        wait_for(lambda: canary_upgraded(fleet), timeout=300, interval=0.2, what="the canary upgraded (report row)")
        fleet.stop_daemons(["cara-01"])  # the canary degrades: it stops answering
        rc = proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = open(proc.log, encoding="utf-8").read()
    assert rc == 2, out[-4000:]
    got = rows(fleet)
    assert (got["cara-01"]["result"], got["cara-01"]["phase"]) == ("rolled_back", "soak"), got["cara-01"]
    # found within a round's deadline (5 s here), not after the gate's whole health timeout
    assert re.search(r"degraded during the soak: health check '(health|ready)' failed after [0-5][.]\d+s",
                     got["cara-01"]["details"]["error"]), got["cara-01"]["details"]["error"]
    assert fleet.active("cara-01") == "v0.8.0" and fleet.health("cara-01")["version"] == "0.8.0"
    assert (got["cara-02"]["result"], got["cara-02"]["phase"]) == ("pending", "not_started")
    assert fleet.active("cara-02") == "v0.8.0"
    assert "The line stops: cara-01 failed in batch 1" in out, out[-4000:]
    assert fleet.report()["run"]["stopped"] == "line_stopped"
    body = webhook.received[-1]["body"]
    assert body["summary"]["outcome"] == "needs_attention" and body["summary"]["rolled_back"] == 1
    assert SECRET not in out
    assert not os.path.exists(os.path.join(fleet.base, "run.lock")), "the fleet lock was not released"
