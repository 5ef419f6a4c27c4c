"""B5 fleet scaling: the rolling upgrade on 50 local hosts in batches of 25 % vs the same upgrade on one host.

Goals: total wall time <= 6x one host's; controller peak memory < 1 GiB. The ansible settings come from
BENCH_FORKS / BENCH_PIPELINING / BENCH_POLL_INTERVAL / BENCH_STRATEGY (defaults: the ones RESULTS.md recommends);
BENCH_B5_SWEEP=1 instead compares the settings that matter, each against its own one-host run.

    BENCH_B5_HOSTS (50)  BENCH_B5_SERIAL ("25%")  BENCH_B5_SWEEP_HOSTS (= BENCH_B5_HOSTS)
"""

import os
import resource

import benchlib
from fleetrun import RECOMMENDED, BenchFleet, Settings

GOAL_RATIO = 6.0
GOAL_MEMORY_MIB = 1024
SWEEP = (
    ("ansible defaults + pipelining", dict(pipelining=True)),
    ("pipelining off", dict(pipelining=False)),
    ("forks 25", dict(forks=25, pipelining=True)),
    ("forks 25 + poll 0.01 s", dict(forks=25, pipelining=True, poll_interval=0.01)),
)


def children_cpu():
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed_upgrade(name, hosts, settings, serial):
    """One rolling upgrade v0.8.0 -> v0.9.0 on a fresh fleet; wall, CPU (every process it ran), memory, result."""
    with BenchFleet(name, hosts, settings=settings) as fleet:
        cpu0 = children_cpu()
        run = fleet.upgrade(sample=True, cara_upgrade_serial=serial).check(name)
        cpu = children_cpu() - cpu0
        summary = run.report()["summary"]
        downloads = sum(1 for _p, status in fleet.server.requests if status == 200)
    if summary.get("upgraded") != hosts:
        raise SystemExit("%s: not every host was upgraded: %s" % (name, summary))
    c = run.controller
    return {"wall": run.wall, "cpu": round(cpu, 1), "main_cpu": round(c.main_cpu_s, 1),
            "pss_mib": round(c.peak_pss_kb / 1024, 1), "main_rss_mib": round(c.peak_rss_main_kb / 1024, 1),
            "processes": c.peak_processes, "downloads": downloads}


def compare(results, label, settings, hosts, serial):
    one = timed_upgrade("b5-one", 1, settings, serial)
    many = timed_upgrade("b5-many", hosts, settings, serial)
    nproc = os.cpu_count() or 1
    detail = ("%s; one host %.1f s; %d hosts %.1f s, %.0f CPU-s in all (%.1f CPU-s per host; on %d CPUs no run can "
              "be shorter than %.0f s), of which the ansible-playbook main process %.0f CPU-s; %d HTTP downloads"
              % (label, one["wall"], hosts, many["wall"], many["cpu"], many["cpu"] / hosts, nproc,
                 many["cpu"] / nproc, many["main_cpu"], many["downloads"]))
    r = benchlib.ratio(many["wall"], one["wall"])
    results.figure("wall time, %d hosts, serial %s [%s]" % (hosts, serial, label), many["wall"], "s",
                   baseline=one["wall"], goal="<= %gx one host" % GOAL_RATIO, met=r is not None and r <= GOAL_RATIO,
                   detail=detail)
    results.figure("controller peak memory, %d hosts [%s]" % (hosts, label), many["pss_mib"], "MiB",
                   goal="< %d MiB" % GOAL_MEMORY_MIB, met=many["pss_mib"] < GOAL_MEMORY_MIB,
                   detail="PSS summed over ansible-playbook and its %d forked workers at the peak; main process RSS "
                          "%.1f MiB" % (many["processes"] - 1, many["main_rss_mib"]))
    return one, many


def main():
    benchlib.ensure_reaped()
    serial = os.environ.get("BENCH_B5_SERIAL") or "25%"
    results = benchlib.Results("B5", "fleet scaling")
    sweep = os.environ.get("BENCH_B5_SWEEP", "")
    if sweep:
        # "1": every variant of SWEEP; "3,4": only those (1-based), e.g. to finish an interrupted sweep
        picked = range(1, len(SWEEP) + 1) if sweep == "1" else [int(i) for i in sweep.split(",")]
        hosts = benchlib.env_int("BENCH_B5_SWEEP_HOSTS", benchlib.env_int("BENCH_B5_HOSTS", 50))
        for i in picked:
            label, knobs = SWEEP[i - 1]
            compare(results, label, Settings(**knobs), hosts, serial)
    else:
        hosts = benchlib.env_int("BENCH_B5_HOSTS", 50)
        settings = Settings.from_env(**RECOMMENDED)
        compare(results, settings.label(), settings, hosts, serial)
    results.save()


if __name__ == "__main__":
    main()
