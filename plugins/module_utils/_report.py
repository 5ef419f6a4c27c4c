# -*- coding: utf-8 -*-
# Copyright: carapace.fleet maintainers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The fleet report: one row per host, written as each host finishes, summarised as report.json and report.md.

Domain logic only (no Ansible imports). Rows are kept as rows/<host>.json so that a run that stops half way
(max_fail_percentage, a killed controller) still leaves a report of every host it reached; report.json and
report.md are regenerated from the rows after every write, under a lock, atomically.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import tempfile
import unicodedata

from ansible_collections.carapace.fleet.plugins.module_utils import _safejson

RESULTS = ("upgraded", "unchanged", "rolled_back", "failed", "pending")
ROW_KEYS = ("host", "from", "to", "result", "phase", "downtime_s", "rto_s", "sha256", "log_index", "backup")
_SAFE = re.compile(r"[^A-Za-z0-9._-]")


def _atomic_write(path, text, mode=0o644):
    directory = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(prefix=".%s." % os.path.basename(path), dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def normalise_row(row):
    """A host row with exactly the report's keys (missing ones None); rejects an unknown result."""
    out = {key: row.get(key) for key in ROW_KEYS}
    if not out["host"]:
        raise ValueError("a report row needs a host")
    if out["result"] not in RESULTS:
        raise ValueError("result must be one of %s, got %r" % (", ".join(RESULTS), out["result"]))
    extra = {k: v for k, v in row.items() if k not in ROW_KEYS}
    if extra:
        out["details"] = extra
    return out


def row_file_name(host):
    """rows/<name>: the host name made file-safe, plus a short hash of the real name, so two hosts whose names
    sanitise alike (web/1, web_1) never share, and overwrite, one row file."""
    digest = hashlib.sha256(str(host).encode("utf-8", "surrogatepass")).hexdigest()[:12]
    return "%s-%s.json" % (_SAFE.sub("_", str(host))[:80], digest)


def md_text(value):
    """Text safe inside one line of report.md: control characters (newline, carriage return, escape, ...) and
    Unicode line separators are shown escaped (\\n, \\x1b, \\u2028), so a host name or an error message cannot
    start a line of its own."""
    out = []
    for char in str(value):
        if char == "\\":
            out.append("\\\\")
        elif unicodedata.category(char) in ("Cc", "Zl", "Zp"):
            out.append({"\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(char) or (
                "\\x%02x" % ord(char) if ord(char) < 0x100 else "\\u%04x" % ord(char)))
        else:
            out.append(char)
    return "".join(out)


class Report:
    """A report directory: rows/<host>.json + report.json + report.md."""

    def __init__(self, directory):
        self.dir = directory
        self.rows_dir = os.path.join(directory, "rows")

    def write(self, run, row=None, rows=None):
        """Record rows (one or many) for `run` and regenerate the summary. Returns (report, changed)."""
        os.makedirs(self.rows_dir, mode=0o755, exist_ok=True)
        lock_fd = os.open(os.path.join(self.dir, ".report.lock"),
                          os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
        with os.fdopen(lock_fd, "r+", encoding="utf-8") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            changed = self._reset_if_new_run(run)
            for item in ([row] if row else []) + list(rows or []):
                clean = normalise_row(item)
                path = os.path.join(self.rows_dir, row_file_name(clean["host"]))
                text = json.dumps(clean, indent=2, sort_keys=True) + "\n"
                if not os.path.exists(path) or open(path, encoding="utf-8").read() != text:
                    _atomic_write(path, text)
                    changed = True
            report = self.build(run)
            _atomic_write(os.path.join(self.dir, "report.json"), json.dumps(report, indent=2, sort_keys=True) + "\n")
            _atomic_write(os.path.join(self.dir, "report.md"), render_markdown(report))
        return report, changed

    def _reset_if_new_run(self, run):
        # Rows of an earlier run would mix two runs in one report: a new run id starts from empty.
        marker = os.path.join(self.dir, ".run_id")
        current = open(marker, encoding="utf-8").read().strip() if os.path.exists(marker) else None
        if current == str(run.get("id")):
            return False
        for name in os.listdir(self.rows_dir):
            if name.endswith(".json"):
                os.unlink(os.path.join(self.rows_dir, name))
        _atomic_write(marker, "%s\n" % run.get("id"))
        return True

    def rows(self):
        out = []
        for name in sorted(os.listdir(self.rows_dir)):
            if name.endswith(".json"):
                with open(os.path.join(self.rows_dir, name), encoding="utf-8") as f:
                    out.append(_safejson.load(f))
        return sorted(out, key=lambda r: r["host"])

    def build(self, run):
        hosts = self.rows()
        counts = {result: sum(1 for h in hosts if h["result"] == result) for result in RESULTS}
        rtos = [h["rto_s"] for h in hosts if isinstance(h.get("rto_s"), (int, float))]
        downs = [h["downtime_s"] for h in hosts if isinstance(h.get("downtime_s"), (int, float))]
        # A rollback (or a drill's forced one) is the expected outcome of a rollback run, not a problem.
        expected_rollback = run.get("kind") in ("rollback", "drill")
        ok = counts["failed"] == 0 and counts["pending"] == 0 and (expected_rollback or counts["rolled_back"] == 0)
        summary = dict(counts, hosts=len(hosts), max_downtime_s=max(downs) if downs else None,
                       max_rto_s=max(rtos) if rtos else None, ok=ok)
        return {"run": dict(run), "summary": summary, "hosts": hosts}


def _cell(value):
    if value is None:
        return "-"
    if isinstance(value, float):
        return "%.1f" % value
    return md_text(value).replace("|", "\\|")


def render_markdown(report):
    run = report["run"]
    summary = report["summary"]
    lines = [
        "# carapace.fleet report: %s" % md_text(run.get("kind") or "run"),
        "",
        "- run: `%s`" % md_text(run.get("id")),
        "- target: %s" % md_text(run.get("target") or "-"),
        "- started: %s" % md_text(run.get("started") or "-"),
        "- hosts: %d (upgraded %d, unchanged %d, rolled back %d, failed %d, pending %d)" % (
            summary["hosts"], summary["upgraded"], summary["unchanged"], summary["rolled_back"], summary["failed"],
            summary["pending"]),
        "- max downtime: %s s, max RTO: %s s" % (_cell(summary["max_downtime_s"]), _cell(summary["max_rto_s"])),
        "- outcome: %s" % ("OK" if summary["ok"] else "NEEDS ATTENTION"),
        "",
        "| host | from | to | result | phase | downtime s | RTO s | sha256 | Rekor log index | backup |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for h in report["hosts"]:
        sha = (h.get("sha256") or "")[:12] or None
        lines.append("| %s |" % " | ".join(_cell(v) for v in (
            h["host"], h.get("from"), h.get("to"), h["result"], h.get("phase"), h.get("downtime_s"), h.get("rto_s"),
            sha, h.get("log_index"), os.path.basename(h["backup"]) if h.get("backup") else None)))
    failures = [h for h in report["hosts"] if (h.get("details") or {}).get("error")]
    if failures:
        lines += ["", "## Errors", ""]
        lines += ["- **%s**: %s" % (md_text(h["host"]), md_text(h["details"]["error"])) for h in failures]
    return "\n".join(lines) + "\n"
