"""report.html: the run as a picture (module_utils/_report_html.py, written by _report.Report)."""

import json
import os
import re

from html_tree import parse

from ansible_collections.carapace.fleet.plugins.module_utils._report import Report, link_latest, run_directory

RUN = {"id": "run-1", "kind": "upgrade", "target": "v0.9.0", "started": "2026-11-24T06:00:00Z"}
T0 = 1795500000.0
WINDOW = ("stop", "backup", "applying", "switch", "applied", "start", "gate", "clear")
HOSTILE = '<script>alert("x")</script>&\'"'


def phases(names, start, seconds=2.0, failed=None):
    out = []
    for name in names:
        entry = {"phase": name, "start": start, "end": start + seconds, "ok": True}
        if name == failed:
            entry.update(ok=False, error="gate: ready 503 <b>")
        out.append(entry)
        start += seconds
    return out


def row(host, result, batch=None, window=None, **extra):
    base = {"host": host, "from": "v0.8.0", "to": "v0.9.0", "result": result, "phase": "applied"}
    if batch is not None:
        base["batch"] = batch
    if window is not None:
        base["phases"] = window
    base.update(extra)
    return base


def fleet_rows():
    rollback = phases(WINDOW[:7], T0 + 40, failed="gate") + phases(("rollback_stop", "rollback_switch",
                                                                    "rollback_start", "rollback_verify"), T0 + 60)
    running = phases(("stop", "backup"), T0 + 90)
    running[-1].update(end=None, ok=None)  # the controller was killed during the backup
    return [row("cara-01", "upgraded", 1, phases(WINDOW, T0)),
            row("cara-02", "upgraded", 2, phases(WINDOW, T0 + 30)),
            row("cara-03", "rolled_back", 2, rollback),
            row(HOSTILE, "in_progress", 3, running),
            row("cara-05", "pending", 3),
            row("cara-06", "refused", error="downgrade")]


def write(tmp_path, run=RUN, rows=None):
    report, _changed = Report(str(tmp_path)).write(run, rows=fleet_rows() if rows is None else rows)
    text = (tmp_path / "report.html").read_text(encoding="utf-8")
    return report, text, parse(text)


def host_rows(doc):
    return {g.attrs["data-host"]: g for g in doc.find_all("g", "host")}


def test_one_svg_row_per_host_of_the_report(tmp_path):
    report, _text, doc = write(tmp_path)
    (svg,) = doc.find_all("svg")
    rows = svg.find_all("g", "host")
    assert sorted(g.attrs["data-host"] for g in rows) == sorted(h["host"] for h in report["hosts"])
    assert {g.attrs["data-host"]: g.attrs["data-result"] for g in rows}["cara-03"] == "rolled_back"


def test_one_bar_per_phase_with_its_outcome_and_a_tooltip(tmp_path):
    _report, _text, doc = write(tmp_path)
    rows = host_rows(doc)
    bars = rows["cara-01"].find_all("rect", "phase")
    assert [b.attrs["data-phase"] for b in bars] == list(WINDOW)
    assert all("ok" in b.classes() for b in bars)
    assert bars[0].title().startswith("cara-01: stop 06:00:00.0-06:00:02.0, 2.0 s")
    rolled = rows["cara-03"].find_all("rect", "phase")
    assert len(rolled) == 11 and [b.attrs["data-phase"] for b in rolled if "failed" in b.classes()] == ["gate"]
    gate = next(b for b in rolled if b.attrs["data-phase"] == "gate")
    assert "failed: gate: ready 503 <b>" in gate.title()  # the error, as text
    # later phases lie to the right: x is wall-clock time across the whole run
    xs = [float(b.attrs["x"]) for b in bars] + [float(rows["cara-02"].find_all("rect", "phase")[0].attrs["x"])]
    assert xs == sorted(xs) and len(set(xs)) == len(xs)


def test_hosts_are_grouped_by_batch_with_labels(tmp_path):
    _report, _text, doc = write(tmp_path)
    batches = doc.find_all("g", "batch")
    assert [b.find_all("text", "batch-label")[0].text() for b in batches] == [
        "batch 1", "batch 2", "batch 3", "not batched"]
    assert [[g.attrs["data-host"] for g in b.find_all("g", "host")] for b in batches] == [
        ["cara-01"], ["cara-02", "cara-03"], [HOSTILE, "cara-05"], ["cara-06"]]  # by name in a batch


def test_rows_without_phases_are_labelled_rows_without_bars(tmp_path):
    _report, _text, doc = write(tmp_path)
    rows = host_rows(doc)
    for host, result in (("cara-05", "pending"), ("cara-06", "refused")):
        assert rows[host].find_all("rect", "phase") == []
        assert rows[host].find_all("text", "no-phases")[0].text() == "no phases (%s)" % result
        assert rows[host].find_all("rect", "result")  # the result's colour all the same


def test_an_unfinished_phase_is_drawn_to_the_latest_time_known_and_marked(tmp_path):
    _report, _text, doc = write(tmp_path)
    backup = host_rows(doc)[HOSTILE].find_all("rect", "phase")[-1]
    assert backup.attrs["data-phase"] == "backup" and "unfinished" in backup.classes()
    assert "(unfinished)" in backup.title() and backup.attrs.get("stroke-dasharray")
    # it starts at the latest time known (T0 + 92), so it ends at the right edge of the chart
    stop = host_rows(doc)[HOSTILE].find_all("rect", "phase")[0]
    assert float(backup.attrs["x"]) > float(stop.attrs["x"])
    # with an earlier start it reaches that latest time: here the other hosts' last phase ends later
    rows = fleet_rows()
    rows[3]["phases"][-1]["start"] = T0 + 50
    _report, _text, doc = write(tmp_path, run=dict(RUN, id="run-2"), rows=rows)
    bars = {g.attrs["data-host"]: g.find_all("rect", "phase") for g in doc.find_all("g", "host")}
    right = max(float(b.attrs["x"]) + float(b.attrs["width"]) for bs in bars.values() for b in bs)
    unfinished = bars[HOSTILE][-1]
    assert abs(float(unfinished.attrs["x"]) + float(unfinished.attrs["width"]) - right) < 0.2


def test_a_hostile_host_name_is_text_everywhere(tmp_path):
    _report, text, doc = write(tmp_path)
    assert "<script" not in text and doc.find_all("script") == []
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&amp;&#x27;&quot;" in text
    row_ = host_rows(doc)[HOSTILE]  # the attribute gives back the name itself
    assert HOSTILE in row_.text() and row_.title() == "%s: in_progress" % HOSTILE


def test_the_page_refers_to_nothing_outside_itself(tmp_path):
    _report, text, doc = write(tmp_path)
    assert not re.search(r"https?:|//|src\s*=|@import|url\(", text, re.I)
    for tag in ("script", "link", "img", "iframe", "object", "embed", "image", "use"):
        assert doc.find_all(tag) == [], tag
    assert not re.search(r'href\s*=\s*"(?!#)', text)


def test_the_header_shows_the_run_and_its_optional_facts(tmp_path):
    run = dict(RUN, requested="latest", window="Sat 02:00-04:00 UTC", stopped="window_closed")
    _report, _text, doc = write(tmp_path, run=run)
    items = [li.text() for li in doc.find_all("li")]
    assert "requested: latest" in items and "window: Sat 02:00-04:00 UTC" in items and "stopped: window_closed" in items
    assert doc.find_all("title")[0].text() == "carapace.fleet report: upgrade"
    assert doc.find_all("p", "outcome")[0].text() == "NEEDS ATTENTION"
    md = (tmp_path / "report.md").read_text()
    assert "- requested: latest\n- window: Sat 02:00-04:00 UTC\n- stopped: window_closed\n" in md
    _report, _text, doc = write(tmp_path, run=dict(RUN, id="run-2"))
    assert not [li for li in doc.find_all("li") if li.text().startswith(("requested", "window", "stopped"))]
    assert "requested" not in (tmp_path / "report.md").read_text()


def test_a_report_without_any_phase_still_renders(tmp_path):
    _report, _text, doc = write(tmp_path, rows=[row("a", "pending"), row("b", "refused")])
    assert len(doc.find_all("g", "host")) == 2 and doc.find_all("rect", "phase") == []
    assert doc.find_all("line", "tick") == []
    # malformed phases from an old or hand-edited row are skipped, not a failure
    bad = [{"phase": "stop"}, "x", {"phase": "gate", "start": T0, "end": "soon"},
           {"phase": "ok", "start": T0, "end": None}]
    _report, _text, doc = write(tmp_path, run=dict(RUN, id="run-2"), rows=[row("a", "in_progress", "2", bad)])
    assert [b.attrs["data-phase"] for b in doc.find_all("rect", "phase")] == ["ok"]
    assert doc.find_all("text", "batch-label")[0].text() == "batch 2"


def test_garbled_times_neither_fail_the_report_nor_flood_the_axis(tmp_path):
    window = [{"phase": "far", "start": 1e300, "end": None}, {"phase": "zero", "start": 0, "end": 1, "ok": True},
              {"phase": "stop", "start": T0, "end": T0 + 1, "ok": True}]
    _report, _text, doc = write(tmp_path, rows=[row("a", "upgraded", 1, window)])
    assert [b.attrs["data-phase"] for b in doc.find_all("rect", "phase")] == ["zero", "stop"]
    assert 1 <= len(doc.find_all("text", "tick")) <= 7  # 57 years on one axis, a few ticks all the same


def test_time_ticks_label_the_axis(tmp_path):
    _report, _text, doc = write(tmp_path)
    labels = [t.text() for t in doc.find_all("text", "tick")]
    assert 3 <= len(labels) <= 7 and labels[0] == "06:00:00" and labels == sorted(labels)


def test_latest_links_report_html_at_the_top(tmp_path):
    base = str(tmp_path)
    run_dir = run_directory(base, RUN)
    Report(run_dir).write(RUN, rows=fleet_rows())
    link_latest(base, run_dir)
    assert os.path.islink(tmp_path / "report.html")
    assert (tmp_path / "report.html").read_text() == (tmp_path / "upgrade" / "latest" / "report.html").read_text()
    assert json.loads((tmp_path / "report.json").read_text())["summary"]["outcome"] == "needs_attention"
