"""report.html in a real browser: the cara_report module writes a fleet's report, headless Chromium renders it, and the
DOM Chromium built (not the file as written) has the timeline, one row per host. `make integration` installs Chromium
(`make browser`)."""

import os
import shutil
import subprocess

from html_tree import parse
from playbook import run_module

T0 = 1795500000.0
WINDOW = ("stop", "backup", "applying", "switch", "applied", "start", "gate", "clear")


def phases(names, start, seconds=1.5, failed=None):
    out = []
    for name in names:
        out.append({"phase": name, "start": start, "end": start + seconds, "ok": name != failed})
        start += seconds
    return out


def fleet_rows():
    """Five hosts in batches 1 (the canary), 2 and 3: one rolled back after its gate failed, one never reached."""
    rolled = phases(WINDOW[:7], T0 + 20, failed="gate") + phases(("rollback_stop", "rollback_switch",
                                                                 "rollback_start", "rollback_verify"), T0 + 31)
    return [
        {"host": "cara-01", "result": "upgraded", "batch": 1, "phases": phases(WINDOW, T0)},
        {"host": "cara-02", "result": "upgraded", "batch": 2, "phases": phases(WINDOW, T0 + 20)},
        {"host": "cara-03", "result": "rolled_back", "batch": 2, "phases": rolled, "error": "gate: ready 503"},
        {"host": "cara-04 <b>&", "result": "upgraded", "batch": 3, "phases": phases(WINDOW, T0 + 45)},
        {"host": "cara-05", "result": "pending", "batch": 3},
    ]


def chromium(tmp_path, *args):
    exe = shutil.which("chromium")
    assert exe, "chromium is not installed: `make browser` (a dependency of `make integration`) installs it from apt"
    # As root Chromium needs --no-sandbox; a container's /dev/shm is small; a throwaway profile leaves nothing behind.
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
           "--user-data-dir=%s" % (tmp_path / "profile"), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_chromium_renders_one_row_per_host(tmp_path):
    base = tmp_path / "reports"
    run = {"id": "run-html", "kind": "upgrade", "target": "v0.9.0", "requested": "latest", "stopped": "line_stopped"}
    rc, result, out = run_module(tmp_path, "carapace.fleet.cara_report",
                                 {"dir": str(base), "run": run, "rows": fleet_rows()}, keep_going=False)
    assert rc == 0 and result and not result.get("failed"), out[-3000:]
    page = result["report_html"]
    assert page == os.path.join(str(base), "upgrade", "run-html", "report.html") and os.path.isfile(page)
    assert os.path.realpath(base / "report.html") == os.path.realpath(page)  # the top link of the newest run
    assert result["report"]["summary"]["outcome"] == "needs_attention"

    url = "file://" + str(base / "report.html")
    doc = parse(chromium(tmp_path, "--dump-dom", url))
    assert doc.find_all("title")[0].text() == "carapace.fleet report: upgrade"
    (svg,) = doc.find_all("svg")
    rows = svg.find_all("g", "host")
    assert [g.attrs["data-host"] for g in rows] == ["cara-01", "cara-02", "cara-03", "cara-04 <b>&", "cara-05"]
    assert [len(g.find_all("rect", "phase")) for g in rows] == [8, 8, 11, 8, 0]
    assert [t.text() for t in svg.find_all("text", "batch-label")] == ["batch 1", "batch 2", "batch 3"]
    assert svg.find_all("b") == []  # the host name stayed text
    assert "stopped: line_stopped" in [li.text() for li in doc.find_all("li")]

    shot = tmp_path / "report.png"
    chromium(tmp_path, "--screenshot=%s" % shot, "--window-size=1100,700", url)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10000
