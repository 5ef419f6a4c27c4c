"""B3 per-host downtime of an upgrade (service stop -> gate passed) vs the bare runbook commands on the same host.

Goal: <= 1.5x the bare commands (issue 16). One local host, v0.8.0 -> v0.9.0, repeated: each round runs the
upgrade playbook, the rollback playbook (back to v0.8.0, state restored), then bare_runbook.sh upgrade and rollback.
The window runs on the host in one task (carapace.fleet.cara_apply): the figure is its downtime as the host saw it,
from just before the stop to the gate passed (fleet report downtime_s), the span bare_runbook.sh times. The window
task's wall time on the controller (async launch and polls included) is shown beside it.

    BENCH_B3_REPEAT (2)
"""

import os

import benchlib
import hostrun
from fleetrun import RECOMMENDED, BenchFleet, Settings

GOAL = 1.5
HOST = "cara-01"
WINDOW = "Run the downtime window on the host (rolls back by itself on a failure)"


def main():
    benchlib.ensure_reaped()
    settings = Settings.from_env(**RECOMMENDED)
    repeat = benchlib.env_int("BENCH_B3_REPEAT", 2)
    results = benchlib.Results("B3", "per-host downtime during an upgrade")
    windows, reported, bare_totals, bare_steps, rtos, details = [], [], [], [], [], []
    with BenchFleet("b3", 1, settings=settings) as fleet:
        for _round in range(repeat):
            run = fleet.upgrade().check("B3 upgrade")
            seconds, _tasks = hostrun.window(run, HOST, WINDOW, WINDOW)
            windows.append(seconds)
            row = run.report()["hosts"][0]
            reported.append(row["downtime_s"])
            details.append(hostrun.phases(row["details"]["phases"]))
            back = fleet.playbook("rollback").check("B3 rollback playbook")
            rtos.append(back.report()["hosts"][0]["rto_s"])
            total, steps = hostrun.bare(fleet, HOST, "upgrade")
            bare_totals.append(total)
            bare_steps.append(steps)
            hostrun.bare(fleet, HOST, "rollback")
        floor = hostrun.task_floor(os.path.join(fleet.dir, "floor"), settings)
    base = benchlib.median(bare_totals)
    value = benchlib.median(reported)
    r = benchlib.ratio(value, base)
    results.figure("downtime, upgrade playbook (host window: before the stop -> gate passed)", value, "s",
                   baseline=base, goal="<= %gx" % GOAL, met=r is not None and r <= GOAL,
                   detail="runs %s; bare runs %s; last run's phases: %s; bare steps: %s"
                          % (reported, bare_totals, details[-1], bare_steps[-1]))
    results.figure("the window task on the controller (async launch -> last poll)", benchlib.median(windows), "s",
                   baseline=base, detail="runs %s; the service is up again at the gate, inside this; the rest is "
                                         "the launch before the stop and the poll interval after the gate" % windows)
    results.figure("one module task that does nothing (command: true), same host", floor, "s",
                   detail="the fixed price of a module task; the window pays it once")
    results.figure("RTO of the rollback playbook (back to v0.8.0 with the backup restored)", benchlib.median(rtos), "s",
                   detail="runs %s (B4 measures the drill)" % rtos)
    results.note("settings: " + settings.label())
    results.save()


if __name__ == "__main__":
    main()
