"""Shared pieces of the benchmarks: paths, knobs from the environment, the releases, figures and their record.

Every figure is printed as `B<n> <name>: <value> <unit> (baseline <b>, ratio <r>) goal <g>: met|MISSED` and
saved to build/bench/results/<bench>.json; benchmarks/report.py turns those into the summary table.
"""

import json
import os
import platform
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUPPORT = os.path.join(ROOT, "tests", "support")
if SUPPORT not in sys.path:
    sys.path.insert(0, SUPPORT)
BENCH_DIR = os.path.join(ROOT, "build", "bench")
RESULTS_DIR = os.path.join(BENCH_DIR, "results")
REAPER = os.path.join(ROOT, "benchmarks", "reaper.py")
VENV_BIN = os.path.dirname(sys.executable)


def ensure_reaped():
    """Re-run this script under benchmarks/reaper.py unless it already is (see reaper.py for why)."""
    if os.environ.get("BENCH_UNDER_REAPER") != "1":
        os.environ["BENCH_UNDER_REAPER"] = "1"
        os.execv(sys.executable, [sys.executable, REAPER, sys.executable] + sys.argv)


def env_int(name, default):
    return int(os.environ.get(name) or default)


def env_float(name, default):
    return float(os.environ.get(name) or default)


def env_ints(name, default):
    """A comma-separated list of ints, e.g. BENCH_B1_SIZES=1,5,20."""
    text = os.environ.get(name) or default
    return [int(x) for x in text.split(",") if x.strip()]


def workdir(name):
    """A fresh directory build/bench/<name> (the previous run's is removed first)."""
    path = os.path.join(BENCH_DIR, name)
    subprocess.run(["rm", "-rf", path], check=True)
    os.makedirs(path)
    return path


def releases():
    """The signed releases of the cara double (v0.7.0 .. v0.9.1), built once into build/bench/releases."""
    from release_factory import build_releases  # pylint: disable=import-outside-toplevel
    from sigstore_lab import PrivateSigstore  # pylint: disable=import-outside-toplevel
    root = os.path.join(BENCH_DIR, "releases")
    if not os.path.isfile(os.path.join(root, "releases.json")):
        build_releases(PrivateSigstore(), root)
    return root


def median(values):
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 3) if values else None


def ratio(value, baseline):
    return round(value / baseline, 2) if value is not None and baseline else None


def machine():
    """Where and when the figures were taken (RESULTS.md records this)."""
    with open("/proc/meminfo", encoding="utf-8") as f:
        mem_kb = int(next(line for line in f if line.startswith("MemTotal")).split()[1])
    from ansible.release import __version__ as ansible_version  # pylint: disable=import-outside-toplevel
    with open("/proc/loadavg", encoding="utf-8") as f:
        loadavg = f.read().split()[:3]
    return {
        "date": subprocess.run(["date"], capture_output=True, text=True, check=False).stdout.strip(),
        "nproc": os.cpu_count(),
        "mem_gib": round(mem_kb / 1024 / 1024, 1),
        "python": platform.python_version(),
        "ansible_core": ansible_version,
        "kernel": platform.release(),
        "loadavg": loadavg,
        "nice": os.nice(0),
    }


class Results:
    """The figures of one benchmark script, printed as they come and saved as JSON at the end."""

    def __init__(self, bench, title):
        # BENCH_SUFFIX names a variant run of the same script (e.g. "-mitogen" with BENCH_STRATEGY=mitogen_linear)
        self.bench = bench + os.environ.get("BENCH_SUFFIX", "")
        self.data = {"bench": bench, "title": title, "machine": machine(), "figures": [], "notes": [],
                     "started": time.time()}

    def figure(self, name, value, unit, *, baseline=None, goal=None, met=None, detail=None):
        """One measured figure; `ratio` is value/baseline when a baseline was measured in the same run."""
        entry = {"name": name, "value": value, "unit": unit, "baseline": baseline, "ratio": ratio(value, baseline),
                 "goal": goal, "met": met, "detail": detail}
        self.data["figures"].append(entry)
        parts = ["%s %s: %s %s" % (self.bench, name, value, unit)]
        if baseline is not None:
            parts.append("(baseline %s %s, ratio %s)" % (baseline, unit, entry["ratio"]))
        if goal:
            parts.append("goal %s: %s" % (goal, "met" if met else "MISSED" if met is not None else "n/a"))
        print(" ".join(parts), flush=True)
        if detail:
            print("    " + detail, flush=True)
        return entry

    def note(self, text):
        self.data["notes"].append(text)
        print("    note: " + text, flush=True)

    def save(self):
        self.data["wall_s"] = round(time.time() - self.data.pop("started"), 1)
        os.makedirs(RESULTS_DIR, exist_ok=True)
        path = os.path.join(RESULTS_DIR, self.bench + ".json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.data, f, indent=2, sort_keys=True)
            f.write("\n")
        print("%s: results in %s (%.0f s)" % (self.bench, os.path.relpath(path, ROOT), self.data["wall_s"]), flush=True)
