"""B6 controller lost inside the downtime window: the host ends healthy without it, and the next run says so.

For every phase of the window (carapace.fleet.cara_apply, launched async: stop, backup, applying, switch, applied,
start, gate) an upgrade run to v0.9.0 loses its controller the moment the host's window record shows that phase
(polled every millisecond; a loss that lands a phase later, in the phases that last milliseconds, is tried again, up
to 3 times), in two ways:
  - kill: `kill -9` of the ansible-playbook process (its workers are orphaned and die on their own);
  - cut:  `kill -9` of the worker process that runs the window task (the controller lives, its connection to the
          host is gone).
Then, with no controller, the host must end healthy on v0.9.0 within the gate's deadline plus 30 s, counted from
the kill. The next ordinary run must report the host as upgraded by that window. The host is rolled back to v0.8.0
(rollback playbook) for the next phase. Then the same for the window's own rollback (the faulty v0.9.1 fails its
gate): killed in each rollback phase, the host must end on v0.8.0, healthy, within the rollback's verify deadline
plus 30 s, and the next run must report it rolled back.

    BENCH_B6_MODES (kill,cut)  BENCH_B6_FAULTY (1)  BENCH_B6_GATE_TIMEOUT (10 s, the faulty gate's deadline)
"""

import json
import os
import signal
import time
import urllib.request

import benchlib
from fleetrun import RECOMMENDED, BenchFleet, Settings, timing_env

HOST = "cara-01"
UPGRADE = ("stop", "backup", "applying", "switch", "applied", "start", "gate")
ROLLBACK = ("rollback_stop", "rollback_switch", "rollback_restore", "rollback_close", "rollback_start",
            "rollback_verify")
ROLLBACK_ORDER = ROLLBACK
HEALTH_TIMEOUT = 60  # the gate's deadline of the runs to v0.9.0 (LocalFleet's)
ROLLBACK_TIMEOUT = 120  # cara_upgrade_rollback_timeout's default
MARGIN = 30


def children(pid):
    try:
        with open("/proc/%d/task/%d/children" % (pid, pid), encoding="utf-8") as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []


def health_version(hv):
    try:
        with urllib.request.urlopen("http://127.0.0.1:%d/health" % hv["cara_port"], timeout=2) as resp:
            return json.loads(resp.read()).get("version")
    except (OSError, ValueError):
        return None


def lose_controller(fleet, mode, phase, order, extra):
    """Run the upgrade, lose the controller as soon as the window is in `phase` or past it (the transaction writes
    and the switch last milliseconds); returns (seconds from the loss to the window ended, the phase it landed in),
    or (None, None) when the run ended first."""
    config = fleet.settings.write_config(os.path.join(fleet.dir, "ansible.cfg"))
    with timing_env(os.path.join(fleet.dir, "timings-lost.jsonl"), config):  # the settings' ansible.cfg
        proc = fleet.fleet.spawn_playbook("upgrade", **extra)
    killed_at = landed = None
    path = os.path.join(fleet.hostvars()[HOST]["cara_install_root"], "window.json")
    while proc.poll() is None:
        try:
            with open(path, encoding="utf-8") as f:
                record = json.load(f)
        except (OSError, ValueError):
            record = {}
        if record.get("state") == "running" and record.get("phase") in order and \
                order.index(record["phase"]) >= order.index(phase):
            if mode == "kill":
                os.kill(proc.pid, signal.SIGKILL)
            else:  # the worker running the window task: a child of ansible-playbook that is ansible-playbook too
                for child in children(proc.pid):
                    os.kill(child, signal.SIGKILL)
            killed_at, landed = time.monotonic(), record["phase"]
            break
        time.sleep(0.001)
    if killed_at is None:
        proc.wait()
        return None, None
    while fleet.fleet.window_running(HOST):
        time.sleep(0.05)
    ended = time.monotonic() - killed_at
    proc.wait(timeout=600)  # a cut run goes on without the host, and ends
    return round(ended, 2), landed


def case(fleet, mode, phase, target, settings, extra, tries=3):
    """One target phase: up to `tries` losses until one lands in that phase exactly. Returns (met, detail)."""
    order = UPGRADE if phase in UPGRADE else ROLLBACK_ORDER
    want, version, budget = (("upgraded", "0.9.0", HEALTH_TIMEOUT + MARGIN) if phase in UPGRADE
                             else ("rolled_back", "0.8.0", ROLLBACK_TIMEOUT + MARGIN))
    hv = fleet.hostvars()[HOST]
    notes = []
    for attempt in range(1, tries + 1):
        ended, landed = lose_controller(fleet, mode, phase, order,
                                        dict(settings.extra_vars(), cara_upgrade_version=target, **extra))
        record = fleet.window_record(HOST) or {}
        seen = health_version(hv)
        ok = ended is not None and record.get("outcome") == want and seen == version and ended <= budget
        run = fleet.playbook("upgrade", cara_upgrade_version=target, **extra)
        row = next(r for r in run.report()["hosts"] if r["host"] == HOST)
        reported = ended is None or (
            row["result"] == want and "controller was lost: %s" % want in (row["details"].get("error") or ""))
        if seen == "0.9.0" or health_version(hv) == "0.9.0":  # back to v0.8.0 for the next case
            fleet.playbook("rollback").check("B6 rollback to v0.8.0")
        notes.append("try %d: %s" % (attempt, "the run ended before the window reached %s" % phase if ended is None
                                     else "landed in %s, ended %s s after the loss (budget %s s), %s, /health %s, "
                                          "next run %s (rc %s)" % (landed, ended, budget, record.get("outcome"), seen,
                                                                   row["result"], run.rc)))
        if ended is not None and landed == phase:
            return ok and reported, "%s %s: %s" % (mode, phase, "; ".join(notes))
        if ended is not None and not (ok and reported):
            break
    return False, "%s %s: %s" % (mode, phase, "; ".join(notes))


def main():
    benchlib.ensure_reaped()
    settings = Settings.from_env(**RECOMMENDED)
    modes = [m for m in (os.environ.get("BENCH_B6_MODES") or "kill,cut").split(",") if m]
    gate_timeout = benchlib.env_int("BENCH_B6_GATE_TIMEOUT", 10)
    results = benchlib.Results("B6", "controller lost inside the window")
    with BenchFleet("b6", 1, settings=settings) as fleet:
        for mode in modes:
            rows = [case(fleet, mode, phase, "v0.9.0", settings, {}) for phase in UPGRADE]
            met = sum(1 for ok, _ in rows if ok)
            results.figure("%s: upgrade window phases that end healthy on v0.9.0 without the controller, and are "
                           "reported by the next run" % mode, "%d/%d" % (met, len(rows)), "phases",
                           goal="N/N within the gate deadline + %d s" % MARGIN, met=met == len(rows),
                           detail="; ".join(d for _, d in rows))
        if os.environ.get("BENCH_B6_FAULTY", "1") == "1":
            extra = {"cara_upgrade_health_timeout": gate_timeout}
            rows = [case(fleet, "kill", phase, "v0.9.1", settings, extra) for phase in ROLLBACK]
            met = sum(1 for ok, _ in rows if ok)
            results.figure("kill: phases of the window's own rollback (v0.9.1 fails its gate) that end on v0.8.0, "
                           "healthy, without the controller, and are reported", "%d/%d" % (met, len(rows)), "phases",
                           goal="N/N within the verify deadline + %d s" % MARGIN, met=met == len(rows),
                           detail="; ".join(d for _, d in rows))
    results.note("settings: " + settings.label())
    results.save()


if __name__ == "__main__":
    main()
