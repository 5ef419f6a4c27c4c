# -*- coding: utf-8 -*-
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Benchmark-only callback: one JSON line per (task, host) with its start, end and status, written to the file
named by $BENCH_TIMING_FILE. For cara_release a small extract of its result is kept too (what it verified, from
the cache or not), which B1 counts.

Enabled by benchmarks/benchlib.py only (ANSIBLE_CALLBACK_PLUGINS + ANSIBLE_CALLBACKS_ENABLED); not shipped.
"""

from __future__ import annotations

DOCUMENTATION = """
    name: bench_timing
    type: aggregate
    short_description: per-task, per-host timings as JSON lines (carapace.fleet benchmarks)
    description: Writes one JSON line per finished task and host to the file named by BENCH_TIMING_FILE.
    requirements: [enabled through ANSIBLE_CALLBACKS_ENABLED]
"""

import json
import os
import time

from ansible.plugins.callback import CallbackBase


def _release_extract(res):
    """What one cara_release run verified: per asset whether it came from the cache, its digest and log index."""
    return {"tag": res.get("tag"), "actions": res.get("actions", []),
            "checksums_present": (res.get("checksums") or {}).get("present"),
            "assets": {name: {"cached": a.get("cached"), "sha256": a.get("sha256"), "log_index": a.get("log_index")}
                       for name, a in (res.get("assets") or {}).items()}}


def _extract(action, res):
    if (action or "").rsplit(".", 1)[-1] != "cara_release":
        return None
    items = res.get("results") if isinstance(res.get("results"), list) else [res]  # a loop's results, or one
    return {"release_runs": [_release_extract(r) for r in items if isinstance(r, dict) and "assets" in r]}


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "aggregate"
    CALLBACK_NAME = "bench_timing"
    CALLBACK_NEEDS_ENABLED = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._started = {}
        path = os.environ.get("BENCH_TIMING_FILE")
        self._out = open(path, "a", encoding="utf-8") if path else None  # pylint: disable=consider-using-with

    def _write(self, record):
        if self._out:
            self._out.write(json.dumps(record, sort_keys=True, default=str) + "\n")
            self._out.flush()

    def v2_playbook_on_play_start(self, play):
        self._write({"event": "play", "name": play.get_name(), "at": time.time()})

    def v2_runner_on_start(self, host, task):
        self._started[(host.get_name(), task._uuid)] = time.time()

    def _finish(self, result, status):
        host, task = result._host.get_name(), result._task
        end = time.time()
        start = self._started.pop((host, task._uuid), end)
        action = task.action
        record = {"event": "task", "host": host, "task": task.get_name(), "action": action, "status": status,
                  "start": start, "end": end, "duration": round(end - start, 4)}
        extract = _extract(action, result._result)
        if extract is not None:
            record["result"] = extract
        self._write(record)

    def v2_runner_on_ok(self, result):
        self._finish(result, "ok")

    def v2_runner_on_failed(self, result, ignore_errors=False):
        self._finish(result, "ignored" if ignore_errors else "failed")

    def v2_runner_on_skipped(self, result):
        self._finish(result, "skipped")

    def v2_runner_on_unreachable(self, result):
        self._finish(result, "unreachable")

    def v2_playbook_on_stats(self, stats):
        self._write({"event": "stats", "at": time.time()})
        if self._out:
            self._out.close()
            self._out = None
