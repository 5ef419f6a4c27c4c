"""B4 rollback RTO per host in the drill vs the bare runbook commands on the same host.

Goals: <= 30 s and <= 1.5x the bare commands (the policy's target is 15 minutes). One local host on v0.8.0,
repeated: `carapace.fleet.rollback_drill` to v0.9.0 (its gate passes, the rollback is forced: stop, switch back,
`cara restore --force` + the state snapshot, start, gate - one window on the host, carapace.fleet.cara_apply),
then bare_runbook.sh upgrade (not timed) and rollback (timed). The figure is the drill's own RTO (fleet report,
rto_s: from just before the stop to the verify passed, on the host); the window task's wall time is shown too.
Then, once, the drill with the faulty v0.9.1 (it never gets ready): its gate fails at its deadline and the window
rolls the host back by itself; that RTO counts from the upgrade's stop, so it holds the whole gate deadline.

    BENCH_B4_REPEAT (2)  BENCH_B4_FAULTY (1: run the faulty-release drill)  BENCH_B4_GATE_TIMEOUT (20 s, as make demo)
"""

import os

import benchlib
import hostrun
from fleetrun import RECOMMENDED, BenchFleet, Settings

GOAL_S = 30.0
GOAL_RATIO = 1.5
HOST = "cara-01"
ROLLBACK_WINDOW = "Stop, reinstall, restore, start and verify on the host, in one window"


def drill_row(run):
    return next(r for r in run.report()["hosts"] if r["host"] == HOST)


def main():
    benchlib.ensure_reaped()
    settings = Settings.from_env(**RECOMMENDED)
    repeat = benchlib.env_int("BENCH_B4_REPEAT", 2)
    gate_timeout = benchlib.env_int("BENCH_B4_GATE_TIMEOUT", 20)
    results = benchlib.Results("B4", "rollback RTO per host in the drill")
    rtos, windows, details, bare_totals, bare_steps = [], [], [], [], []
    faulty = None
    with BenchFleet("b4", 1, settings=settings) as fleet:
        for _round in range(repeat):
            run = fleet.playbook("rollback_drill", cara_drill_version="v0.9.0").check("B4 drill")
            rtos.append(float(drill_row(run)["rto_s"]))
            seconds, _tasks = hostrun.window(run, HOST, ROLLBACK_WINDOW, ROLLBACK_WINDOW)
            windows.append(seconds)
            details.append(hostrun.phases(fleet.window_record(HOST)["phases"]))
            hostrun.bare(fleet, HOST, "upgrade")
            total, steps = hostrun.bare(fleet, HOST, "rollback")
            bare_totals.append(total)
            bare_steps.append(steps)
        if os.environ.get("BENCH_B4_FAULTY", "1") == "1":
            run = fleet.playbook("rollback_drill", cara_drill_version="v0.9.1",
                                 cara_upgrade_health_timeout=gate_timeout).check("B4 faulty drill")
            gate = next(p for p in fleet.window_record(HOST)["phases"] if p["phase"] == "gate")
            faulty = {"rto": float(drill_row(run)["rto_s"]), "gate": gate["end"] - gate["start"],
                      "gate_status": "failed" if not gate["ok"] else "passed"}
    base = benchlib.median(bare_totals)
    value = benchlib.median(rtos)
    r = benchlib.ratio(value, base)
    results.figure("RTO, drill with forced rollback (fleet report rto_s)", value, "s", baseline=base,
                   goal="<= %g s and <= %gx" % (GOAL_S, GOAL_RATIO),
                   met=value <= GOAL_S and r is not None and r <= GOAL_RATIO,
                   detail="runs %s; bare rollback runs %s; bare steps: %s" % (rtos, bare_totals, bare_steps[-1]))
    results.figure("the rollback window task on the controller (async launch -> last poll)", benchlib.median(windows),
                   "s", baseline=base, detail="runs %s; last window's phases: %s" % (windows, details[-1]))
    if faulty:
        results.figure("RTO, drill with the faulty v0.9.1 (automatic rollback after the failed gate)", faulty["rto"],
                       "s", baseline=base, goal="<= %g s; policy 15 min" % GOAL_S, met=faulty["rto"] <= GOAL_S,
                       detail="of which %.1f s in the failed gate (%s; cara_upgrade_health_timeout=%d s: a release "
                              "that never gets ready is only known bad at the deadline); without it %.1f s"
                              % (faulty["gate"], faulty["gate_status"], gate_timeout, faulty["rto"] - faulty["gate"]))
    results.note("settings: " + settings.label())
    results.save()


if __name__ == "__main__":
    main()
