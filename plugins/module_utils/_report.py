# -*- coding: utf-8 -*-
# Copyright: carapace.fleet maintainers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The fleet report: one row per host, written as each host finishes, summarised as report.json, report.md and
report.html (the run as a picture: a timeline of every host's phases, by batch; see _report_html).

Layout under the report directory (cara_report_dir): <kind>/<run id>/ per run (kind: upgrade, rollback, drill),
<kind>/latest -> the newest real run of that kind, and report.json, report.md, report.html -> the newest real run of
any kind.
A dry run (check mode) is written to its own <kind>/<run id>/, marked dry_run, and moves no link.

Domain logic only (no Ansible imports). Rows are kept as rows/<host>.json so that a run that stops half way
(max_fail_percentage, a killed controller) still leaves a report of every host it reached; report.json, report.md
and report.html are regenerated from the rows after every write, under a lock, atomically.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import unicodedata

from ansible_collections.carapace.fleet.plugins.module_utils import _atomic, _safejson
from ansible_collections.carapace.fleet.plugins.module_utils._report_html import RUN_EXTRAS, render_html

RESULTS = ("upgraded", "unchanged", "rolled_back", "failed", "refused", "in_progress", "pending")
ROW_KEYS = ("host", "from", "to", "result", "phase", "downtime_s", "rto_s", "sha256", "log_index", "backup")
_SAFE = re.compile(r"[^A-Za-z0-9._-]")


def _atomic_write(path, text, mode=0o644):
    # A symlink planted at a row or summary is replaced, never written through (as before the shared helper).
    _atomic.write_file(path, text, mode=mode, replace_symlink=True)


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
    """A report directory: rows/<host>.json + report.json + report.md + report.html."""

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
            _atomic_write(os.path.join(self.dir, "report.html"), render_html(report, _outcome(report["summary"])))
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
        dry_run = bool(run.get("dry_run"))
        # In a dry run nothing happened: `pending` is what would be done, not a host left behind.
        ok = (counts["failed"] == 0 and counts["refused"] == 0 and counts["in_progress"] == 0
              and (dry_run or counts["pending"] == 0) and (expected_rollback or counts["rolled_back"] == 0))
        # Only hosts not reached yet (a stopped line, a closed window): nothing to repair, the next run continues.
        incomplete = (not dry_run and counts["pending"] > 0 and counts["failed"] == 0 and counts["refused"] == 0
                      and counts["in_progress"] == 0 and (expected_rollback or counts["rolled_back"] == 0))
        outcome = "dry_run" if dry_run else "ok" if ok else "incomplete" if incomplete else "needs_attention"
        summary = dict(counts, hosts=len(hosts), max_downtime_s=max(downs) if downs else None,
                       max_rto_s=max(rtos) if rtos else None, ok=ok, dry_run=dry_run, incomplete=incomplete,
                       outcome=outcome)
        return {"run": dict(run), "summary": summary, "hosts": hosts}


def run_directory(base, run):
    """<base>/<kind>/<run id> of a run (the id made file-safe)."""
    kind = _SAFE.sub("_", str(run.get("kind") or "run"))[:40] or "run"
    run_id = _SAFE.sub("_", str(run.get("id")))[:120]
    if run_id in ("", ".", "..", "latest"):
        raise ValueError("run.id %r cannot name a report directory" % run.get("id"))
    return os.path.join(base, kind, run_id)


def _link(target, path):
    """Make `path` a symlink to `target` (relative), replacing it atomically; refuses to replace a real file."""
    if os.path.lexists(path) and not os.path.islink(path):
        raise ValueError("%s exists and is not a link; move it aside" % path)
    _atomic.replace_with_symlink(target, path)


def link_latest(base, run_dir):
    """<kind>/latest -> this run; report.json, report.md, report.html and latest at the top -> this run (the newest
    of any kind)."""
    kind_dir = os.path.dirname(run_dir)
    _link(os.path.basename(run_dir), os.path.join(kind_dir, "latest"))
    rel = os.path.relpath(run_dir, base)
    _link(rel, os.path.join(base, "latest"))
    for name in ("report.json", "report.md", "report.html"):
        _link(os.path.join(rel, name), os.path.join(base, name))


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
        "# carapace.fleet report: %s%s" % (md_text(run.get("kind") or "run"), " (DRY RUN)" if run.get("dry_run") else ""),
        "",
        "- run: `%s`" % md_text(run.get("id")),
        "- target: %s" % md_text(run.get("target") or "-"),
        "- started: %s" % md_text(run.get("started") or "-"),
    ] + ["- %s: %s" % (key, md_text(run[key])) for key in RUN_EXTRAS if run.get(key) not in (None, "")] + [
        "- hosts: %d (upgraded %d, unchanged %d, rolled back %d, failed %d, refused %d, in progress %d, pending %d)" % (
            summary["hosts"], summary["upgraded"], summary["unchanged"], summary["rolled_back"], summary["failed"],
            summary.get("refused", 0), summary.get("in_progress", 0), summary["pending"]),
        "- max downtime: %s s, max RTO: %s s" % (_cell(summary["max_downtime_s"]), _cell(summary["max_rto_s"])),
        "- outcome: %s" % _outcome(summary),
        "",
        "| host | from | to | result | phase | downtime s | RTO s | sha256 | Rekor log index | backup |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for h in report["hosts"]:
        sha = (h.get("sha256") or "")[:12] or None
        lines.append("| %s |" % " | ".join(_cell(v) for v in (
            h["host"], h.get("from"), h.get("to"), h["result"], h.get("phase"), h.get("downtime_s"), h.get("rto_s"),
            sha, h.get("log_index"), os.path.basename(h["backup"]) if h.get("backup") else None)))
    down = [h for h in report["hosts"] if h["result"] == "in_progress"]
    if down:
        lines += ["", "## Interrupted", ""]
        lines += ["- **%s**: the run ended at %s, after the service was stopped: it may be down. Run the same playbook "
                  "again: it finishes or rolls back this host." % (md_text(h["host"]), md_text(h.get("phase") or "?"))
                  for h in down]
    failures = [h for h in report["hosts"] if (h.get("details") or {}).get("error")]
    if failures:
        lines += ["", "## Errors", ""]
        lines += ["- **%s**: %s" % (md_text(h["host"]), md_text(h["details"]["error"])) for h in failures]
    return "\n".join(lines) + "\n"


def _outcome(summary):
    if summary.get("dry_run"):
        return "DRY RUN (check mode): nothing was changed; %s" % (
            "the run would proceed" if summary["ok"] else "the run would NOT proceed for every host")
    if summary.get("incomplete"):
        pending = summary["pending"]
        return "INCOMPLETE: %d host%s not reached (pending), untouched; run again to continue" % (
            pending, "" if pending == 1 else "s")
    return "OK" if summary["ok"] else "NEEDS ATTENTION"
