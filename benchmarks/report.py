"""Summarise build/bench/results/*.json as one Markdown table (printed, and written to build/bench/summary.md).

With BENCH_RECORD=1 the table also replaces the block between the bench markers in benchmarks/RESULTS.md, so the
analysis written around it stays as it is.
"""

import glob
import json
import os
import re
import sys

import benchlib

BEGIN = "<!-- bench:begin -->"
END = "<!-- bench:end -->"
RESULTS_MD = os.path.join(benchlib.ROOT, "benchmarks", "RESULTS.md")


def load():
    out = []
    for path in sorted(glob.glob(os.path.join(benchlib.RESULTS_DIR, "B*.json"))):
        with open(path, encoding="utf-8") as f:
            out.append(json.load(f))
    return out


def cell(value, unit=""):
    if value is None:
        return "-"
    return ("%s %s" % (value, unit)).strip()


def render(benches):
    m = benches[0]["machine"]
    lines = [
        "Run of %s: %s CPUs, %s GiB, Python %s, ansible-core %s, kernel %s, nice %s, load average at the start %s."
        % (m["date"], m["nproc"], m["mem_gib"], m["python"], m["ansible_core"], m["kernel"], m["nice"],
           " ".join(m["loadavg"])),
        "",
        "| | figure | value | baseline (same run) | ratio | goal | |",
        "|---|---|---|---|---|---|---|",
    ]
    for bench in benches:
        for f in bench["figures"]:
            verdict = {True: "met", False: "**missed**", None: ""}[f["met"]]
            lines.append("| %s | %s | %s | %s | %s | %s | %s |" % (
                bench["bench"], f["name"], cell(f["value"], f["unit"]), cell(f["baseline"], f["unit"]),
                cell(f["ratio"], "x" if f["ratio"] is not None else ""), f["goal"] or "", verdict))
    lines.append("")
    lines.append("Wall time per script: %s." % ", ".join("%s %.0f s" % (b["bench"], b["wall_s"]) for b in benches))
    return "\n".join(lines) + "\n"


def record(table):
    with open(RESULTS_MD, encoding="utf-8") as f:
        text = f.read()
    block = "%s\n%s%s" % (BEGIN, table, END)
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        raise SystemExit("report: %s has no %s ... %s block" % (RESULTS_MD, BEGIN, END))
    with open(RESULTS_MD, "w", encoding="utf-8") as f:
        f.write(pattern.sub(lambda _m: block, text))
    print("report: recorded in %s" % os.path.relpath(RESULTS_MD, benchlib.ROOT))


def main():
    benches = load()
    if not benches:
        print("report: no results in %s" % benchlib.RESULTS_DIR, file=sys.stderr)
        return 1
    table = render(benches)
    print(table)
    with open(os.path.join(benchlib.BENCH_DIR, "summary.md"), "w", encoding="utf-8") as f:
        f.write(table)
    if os.environ.get("BENCH_RECORD") == "1":
        record(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
