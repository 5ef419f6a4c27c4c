"""B3 per-host downtime of an upgrade (service stop -> gate passed) vs the bare runbook commands on the same host.

Goal: <= 1.3x the bare commands. One local host, v0.8.0 -> v0.9.0, repeated: each round runs the upgrade playbook,
the rollback playbook (back to v0.8.0, state restored), then bare_runbook.sh upgrade and rollback. The figure is
the window from the start of the stop task to the end of the health gate (timing callback); the fleet report's
own downtime_s (measured by the role from the transaction's down_at) is shown beside it.

    BENCH_B3_REPEAT (2)
"""

import os

import benchlib
import hostrun
from fleetrun import RECOMMENDED, BenchFleet, Settings

GOAL = 1.3
HOST = "cara-01"
STOP = "Stop cara (service script)"
GATE = "Gate on health, readiness, status and verify (auto, autonomy) under one deadline"


def main():
    benchlib.ensure_reaped()
    settings = Settings.from_env(**RECOMMENDED)
    repeat = benchlib.env_int("BENCH_B3_REPEAT", 2)
    results = benchlib.Results("B3", "per-host downtime during an upgrade")
    windows, reported, bare_totals, bare_steps, rtos, details = [], [], [], [], [], []
    with BenchFleet("b3", 1, settings=settings) as fleet:
        for _round in range(repeat):
            run = fleet.upgrade().check("B3 upgrade")
            seconds, tasks = hostrun.window(run, HOST, STOP, GATE)
            windows.append(seconds)
            reported.append(run.report()["hosts"][0]["downtime_s"])
            details.append(hostrun.breakdown(tasks))
            back = fleet.playbook("rollback").check("B3 rollback playbook")
            rtos.append(back.report()["hosts"][0]["rto_s"])
            total, steps = hostrun.bare(fleet, HOST, "upgrade")
            bare_totals.append(total)
            bare_steps.append(steps)
            hostrun.bare(fleet, HOST, "rollback")
        floor = hostrun.task_floor(os.path.join(fleet.dir, "floor"), settings)
    base = benchlib.median(bare_totals)
    value = benchlib.median(windows)
    r = benchlib.ratio(value, base)
    results.figure("downtime, upgrade playbook (stop task start -> gate end)", value, "s", baseline=base,
                   goal="<= %gx" % GOAL, met=r is not None and r <= GOAL,
                   detail="runs %s; bare runs %s; last run: %s; bare steps: %s"
                          % (windows, bare_totals, details[-1], bare_steps[-1]))
    results.figure("downtime_s in the fleet report (from the transaction's down_at)", benchlib.median(reported), "s",
                   baseline=base, detail="runs %s; down_at is taken after the stop task returns, so the stop "
                                         "itself is not in it" % reported)
    results.figure("one module task that does nothing (command: true), same host", floor, "s",
                   detail="the fixed price of every module task in the window")
    results.figure("RTO of the rollback playbook (back to v0.8.0 with the backup restored)", benchlib.median(rtos), "s",
                   detail="runs %s (B4 measures the drill)" % rtos)
    results.note("settings: " + settings.label())
    results.save()


if __name__ == "__main__":
    main()
