# -*- coding: utf-8 -*-
# Copyright: carapace.fleet maintainers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""report.html: the fleet report as one self-contained page with an SVG timeline of the run.

Domain logic only (no Ansible imports). One row per host of the report, grouped by batch (details.batch, 1-based;
rows without one under "not batched"), one bar per phase of the host's window (details.phases, as cara_apply
records them) on one wall-clock axis for the whole run. The page loads nothing (no scripts, no links, no external
assets): it is read from an evidence directory, possibly offline. Every text from a row is escaped.
"""

from __future__ import annotations

import datetime
import html
import math

# Optional facts of the run shown in the headers (report.md too) when the playbooks set them, in this order.
RUN_EXTRAS = ("requested", "window", "stopped")
RESULT_COLOURS = {
    "upgraded": "#2e7d32", "unchanged": "#78909c", "rolled_back": "#ef6c00", "failed": "#c62828",
    "refused": "#6a1b9a", "in_progress": "#f9a825", "pending": "#bdbdbd",
}
PHASE_COLOURS = {"ok": "#43a047", "failed": "#e53935", "unfinished": "#fbc02d", "unknown": "#9e9e9e"}
_STEPS = (0.1, 0.2, 0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400)

LABEL_W = 260
CHART_W = 720
ROW_H = 22
BATCH_H = 22
AXIS_H = 30
PAD = 10

_CSS = """
body { font-family: sans-serif; margin: 1.5em; color: #212121; }
h1 { font-size: 1.3em; }
ul.run { list-style: none; padding: 0; }
ul.run li { margin: 0.15em 0; }
.outcome { font-weight: bold; padding: 0.3em 0.6em; display: inline-block; border-radius: 3px; }
.outcome-ok { background: #c8e6c9; }
.outcome-dry_run { background: #e3f2fd; }
.outcome-incomplete { background: #fff9c4; }
.outcome-needs_attention { background: #ffcdd2; }
svg text { font-family: sans-serif; font-size: 12px; }
.legend span { display: inline-block; margin-right: 1em; }
.legend i { display: inline-block; width: 0.9em; height: 0.9em; margin-right: 0.3em; vertical-align: middle; }
"""


def _e(value):
    return html.escape(str(value), quote=True)


def batch_of(row):
    """The row's batch number (int >= 1) or None: a row the roles did not place in a batch."""
    value = (row.get("details") or {}).get("batch")
    if isinstance(value, bool):
        return None
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    return value if isinstance(value, int) and value >= 1 else None


def phases_of(row):
    """The row's phases that can be drawn: a name and a numeric start; end a number or None (still running)."""
    out = []
    for entry in (row.get("details") or {}).get("phases") or []:
        if not isinstance(entry, dict):
            continue
        start, end = entry.get("start"), entry.get("end")
        if not _number(start) or not (end is None or _number(end)):
            continue
        out.append(entry)
    return out


def _number(value):
    # An epoch time a clock can name (0 .. the year 5138): a garbled one is skipped, never a failed report.
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1e11


def groups(hosts):
    """[(batch or None, [rows])]: batches in order, then the rows with no batch; rows keep the report's order."""
    by_batch = {}
    for row in hosts:
        by_batch.setdefault(batch_of(row), []).append(row)
    keys = sorted(k for k in by_batch if k is not None) + ([None] if None in by_batch else [])
    return [(k, by_batch[k]) for k in keys]


def _clock(epoch, fraction=False):
    when = datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc)
    return when.strftime("%H:%M:%S") + (".%d" % (when.microsecond // 100000) if fraction else "")


def _span(hosts):
    times = []
    for row in hosts:
        for p in phases_of(row):
            times.append(p["start"])
            if p["end"] is not None:
                times.append(p["end"])
    if not times:
        return None
    # The latest time known: a phase still running is drawn up to it.
    return min(times), max(times)


def _ticks(t0, t1):
    step = next((s for s in _STEPS if (t1 - t0) / s <= 6), None) or math.ceil((t1 - t0) / 6 / 86400) * 86400
    first = math.ceil(t0 / step) * step
    count = int((t1 - first) / step + 1e-9) + 1
    return [first + i * step for i in range(max(count, 0))], step < 1


def _phase_state(p):
    if p["end"] is None:
        return "unfinished"
    return {True: "ok", False: "failed"}.get(p.get("ok"), "unknown")


def _phase_title(host, p, state, latest):
    end = p["end"] if p["end"] is not None else latest
    text = "%s: %s %s-%s, %.1f s" % (host, p.get("phase"), _clock(p["start"], True),
                                     _clock(end, True) if p["end"] is not None else "(unfinished)", end - p["start"])
    if state == "unfinished":
        text += ", unfinished (still running or killed)"
    elif state == "failed":
        text += ", failed"
    if p.get("error"):
        text += ": %s" % p["error"]
    return text


def _host_row(row, y, span):
    host = str(row["host"])
    result = row["result"]
    label = host if len(host) <= 34 else host[:33] + "\u2026"
    parts = ['<g class="host" data-host="%s" data-result="%s">' % (_e(host), _e(result)),
             '<title>%s: %s</title>' % (_e(host), _e(result)),
             '<rect class="result" x="%d" y="%d" width="10" height="10" fill="%s"/>' % (
                 PAD, y + 6, RESULT_COLOURS.get(result, "#000")),
             '<text x="%d" y="%d">%s</text>' % (PAD + 16, y + 15, _e(label))]
    phases = phases_of(row)
    if not phases or span is None:
        parts.append('<text class="no-phases" x="%d" y="%d" fill="#757575">no phases (%s)</text>' % (
            LABEL_W + 4, y + 15, _e(result)))
    else:
        t0, t1 = span
        scale = CHART_W / (t1 - t0)
        for p in phases:
            state = _phase_state(p)
            end = p["end"] if p["end"] is not None else t1
            x = LABEL_W + (p["start"] - t0) * scale
            # a millisecond phase stays visible; an unfinished one ends where the data ends, often at its own start
            width = max((end - p["start"]) * scale, 6 if state == "unfinished" else 1.5)
            outline = 'stroke="#5d4037" stroke-dasharray="3,2"' if state == "unfinished" else 'stroke="#ffffff"'
            parts.append('<rect class="phase %s" data-phase="%s" x="%.1f" y="%d" width="%.1f" height="%d" fill="%s" %s>'
                         '<title>%s</title></rect>' % (state, _e(p.get("phase")), x, y + 4, width, ROW_H - 8,
                                                       PHASE_COLOURS[state], outline,
                                                       _e(_phase_title(host, p, state, t1))))
    parts.append("</g>")
    return parts


def render_svg(hosts):
    span = _span(hosts)
    if span is not None and span[1] - span[0] < 1:
        span = (span[0], span[0] + 1)  # a run of milliseconds still gets an axis
    body, y = [], AXIS_H
    for index, (batch, rows) in enumerate(groups(hosts)):
        name = "batch %d" % batch if batch is not None else "not batched"
        height = BATCH_H + ROW_H * len(rows)
        body.append('<g class="batch" data-batch="%s">' % (batch if batch is not None else ""))
        body.append('<rect x="0" y="%d" width="%d" height="%d" fill="%s"/>' % (
            y, LABEL_W + CHART_W + PAD, height, "#f5f5f5" if index % 2 == 0 else "#ffffff"))
        body.append('<line x1="0" y1="%d" x2="%d" y2="%d" stroke="#616161"/>' % (y, LABEL_W + CHART_W + PAD, y))
        body.append('<text class="batch-label" x="%d" y="%d" font-weight="bold">%s</text>' % (PAD, y + 15, name))
        y += BATCH_H
        for row in rows:
            body.extend(_host_row(row, y, span))
            y += ROW_H
        body.append("</g>")
    axis = []
    if span is not None:
        ticks, fraction = _ticks(*span)
        scale = CHART_W / (span[1] - span[0])
        for t in ticks:
            x = LABEL_W + (t - span[0]) * scale
            axis.append('<line class="tick" x1="%.1f" y1="%d" x2="%.1f" y2="%d" stroke="#bdbdbd"/>' % (
                x, AXIS_H - 4, x, y))
            axis.append('<text class="tick" x="%.1f" y="%d" text-anchor="middle">%s</text>' % (
                x, AXIS_H - 10, _clock(t, fraction)))
    total_w, total_h = LABEL_W + CHART_W + PAD * 2, y + PAD
    return "\n".join(
        # no xmlns: inline in HTML the parser gives it, and the page names no URL at all
        ['<svg class="timeline" width="%d" height="%d" viewBox="0 0 %d %d" '
         'role="img" aria-label="timeline of the run">' % (total_w, total_h, total_w, total_h)]
        + body + axis + ["</svg>"])


def _legend():
    items = ['<i style="background:%s"></i>phase %s' % (PHASE_COLOURS[k], k) for k in ("ok", "failed", "unfinished")]
    items += ['<i style="background:%s"></i>%s' % (c, r.replace("_", " ")) for r, c in RESULT_COLOURS.items()]
    return '<p class="legend">%s</p>' % "".join("<span>%s</span>" % i for i in items)


def render_html(report, outcome_text):
    """The page for `report` (the content of report.json); `outcome_text` is report.md's outcome line."""
    run, summary, hosts = report["run"], report["summary"], report["hosts"]
    title = "carapace.fleet report: %s%s" % (run.get("kind") or "run", " (DRY RUN)" if run.get("dry_run") else "")
    facts = [("run", run.get("id")), ("target", run.get("target") or "-"), ("started", run.get("started") or "-")]
    facts += [(key, run[key]) for key in RUN_EXTRAS if run.get(key) not in (None, "")]
    facts.append(("hosts", "%d (upgraded %d, unchanged %d, rolled back %d, failed %d, refused %d, in progress %d, "
                           "pending %d)" % (summary["hosts"], summary["upgraded"], summary["unchanged"],
                                            summary["rolled_back"], summary["failed"], summary.get("refused", 0),
                                            summary.get("in_progress", 0), summary["pending"])))
    span = _span(hosts)
    axis = ("times UTC, %s to %s" % (
        datetime.datetime.fromtimestamp(span[0], datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
        _clock(span[1])) if span else "no phases recorded")
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        "<title>%s</title>" % _e(title),
        "<style>%s</style>" % _CSS,
        "</head><body>",
        "<h1>%s</h1>" % _e(title),
        '<ul class="run">%s</ul>' % "".join("<li><b>%s</b>: %s</li>" % (_e(k), _e(v)) for k, v in facts),
        '<p class="outcome outcome-%s">%s</p>' % (_e(summary.get("outcome", "")), _e(outcome_text)),
        "<h2>Timeline</h2>",
        "<p>One row per host, grouped by batch; one bar per phase of its window (%s). Hover a bar for its times.</p>"
        % _e(axis),
        _legend(),
        render_svg(hosts),
        "</body></html>",
        "",
    ])
