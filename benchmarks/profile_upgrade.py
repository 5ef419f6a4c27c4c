"""Where an upgrade run's CPU goes: py-spy samples the rolling upgrade on a few local hosts, every process included,
and the samples are attributed to the controller (ansible-playbook and its forked workers), the module processes
(AnsiballZ start-up, the module's imports, its main()), the cara double and the rest.

    BENCH_PROFILE_HOSTS (5)  BENCH_PROFILE_RATE (40 samples/s)    raw samples: build/bench/profile/upgrade.txt
"""

import collections
import os
import re
import shutil
import signal
import subprocess
import time

import benchlib
from fleetrun import RECOMMENDED, BenchFleet, Settings

PROCESS_RE = re.compile(r'^process \d+:"(.*)"$')


def classify(frames):
    """(class, detail) of one sampled stack: py-spy puts one `process PID:"cmdline"` frame per process level."""
    procs = [PROCESS_RE.match(f).group(1) for f in frames if PROCESS_RE.match(f)]
    code = [f for f in frames if not PROCESS_RE.match(f)]
    cmd = procs[-1] if procs else ""
    if "ansible-playbook" in cmd:
        kind = "controller: main process" if sum("ansible-playbook" in p for p in procs) == 1 else "controller: workers"
        return kind, ";".join(re.sub(r" \(.*", "", f) for f in code[-3:])
    if "/bin/cara" in cmd:
        return ("cara double: daemon" if cmd.endswith(" start") else "cara double: CLI"), ""
    if cmd.endswith("/python") or "python && sleep" in cmd:
        names = [re.sub(r" \(.*", "", f) for f in code]
        if "run_module" not in names:
            return "module process: AnsiballZ start-up (unzip, import ansible's loader from the zip)", ""
        if any(n.startswith("_find_and_load") or n.startswith("zipimporter") for n in names):
            return "module process: imports while the module runs (compiled from the zip)", ""
        return "module process: the module's own work", ""
    return "other", cmd[:60]


def attribute(raw_path):
    classes, controller = collections.Counter(), collections.Counter()
    total = 0
    with open(raw_path, encoding="utf-8") as f:
        for line in f:
            stack, _sep, count = line.rstrip("\n").rpartition(" ")
            if not count.isdigit():
                continue
            n = int(count)
            total += n
            kind, detail = classify(stack.split(";"))
            classes[kind] += n
            if kind.startswith("controller"):
                controller[detail] += n
    return total, classes, controller


def main():
    benchlib.ensure_reaped()
    py_spy = os.path.join(benchlib.VENV_BIN, "py-spy")
    if not os.path.exists(py_spy):
        raise SystemExit("py-spy is not installed: make bench-deps (benchmarks/requirements.txt)")
    hosts = benchlib.env_int("BENCH_PROFILE_HOSTS", 5)
    rate = benchlib.env_int("BENCH_PROFILE_RATE", 40)
    out_dir = os.path.join(benchlib.BENCH_DIR, "profile")
    shutil.rmtree(out_dir, ignore_errors=True)
    os.makedirs(out_dir)
    raw = os.path.join(out_dir, "upgrade.txt")
    settings = Settings.from_env(**RECOMMENDED)
    with BenchFleet("profile", hosts, settings=settings) as fleet:
        spy = subprocess.Popen([py_spy, "record", "--pid", str(os.getpid()), "--subprocesses", "--rate", str(rate),  # pylint: disable=consider-using-with
                                "--format", "raw", "--output", raw], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            time.sleep(1)  # let py-spy attach before the run starts
            run = fleet.upgrade().check("profiled upgrade")
        finally:
            spy.send_signal(signal.SIGINT)
            try:
                spy.wait(timeout=60)
            except subprocess.TimeoutExpired:
                spy.kill()
                spy.wait()
    total, classes, controller = attribute(raw)
    print("profile: %d-host upgrade, %.1f s, %d samples at %d/s (%s)" % (hosts, run.wall, total, rate, settings.label()))
    for kind, n in classes.most_common():
        print("  %5.1f %%  %s" % (100.0 * n / total, kind))
    print("  controller, top stacks (last three frames):")
    for detail, n in controller.most_common(8):
        print("  %5.1f %%  %s" % (100.0 * n / total, detail))
    print("profile: raw samples in %s (flamegraph.pl or speedscope read them)" % os.path.relpath(raw, benchlib.ROOT))


if __name__ == "__main__":
    main()
