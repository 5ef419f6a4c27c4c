"""One-host pieces shared by B3 and B4: the bare runbook (bare_runbook.sh) on a fleet host, and windows of time
(first task start -> last task end) read from a run's per-task timings."""

import json
import os
import shutil
import subprocess

import benchlib
from release_factory import DEFAULT_REPO, release_dir

BARE = os.path.join(benchlib.ROOT, "benchmarks", "bare_runbook.sh")


def bare(fleet, host, action, new_tag="v0.9.0"):
    """Run bare_runbook.sh `action` on `host`; returns {step: seconds} and the total (first mark -> gated)."""
    hv = fleet.hostvars()[host]
    bare_dir = os.path.join(os.path.dirname(hv["cara_state_dir"]), "bare")
    new_binary = os.path.join(bare_dir, "cara-" + new_tag)
    if not os.path.exists(new_binary):  # staged before the clock starts, as the roles stage before the stop
        os.makedirs(bare_dir, exist_ok=True)
        shutil.copyfile(os.path.join(release_dir(fleet.releases, DEFAULT_REPO, new_tag), hv["cara_asset"]), new_binary)
        os.chmod(new_binary, 0o755)
    env = dict(os.environ, CARA_BIN=hv["cara_bin_path"], CARA_STATE_DIR=hv["cara_state_dir"],
               CARA_CONFIG=hv["cara_config_path"], CARA_PORT=str(hv["cara_port"]),
               CARA_SERVICE=os.path.join(hv["cara_run_dir"], "cara-service"), BARE_DIR=bare_dir,
               NEW_BINARY=new_binary, NEW_VERSION=new_tag.lstrip("v"),
               PATH=benchlib.VENV_BIN + os.pathsep + os.environ.get("PATH", ""))
    proc = subprocess.run(["bash", BARE, action], env=env, capture_output=True, text=True, timeout=300, check=False)
    if proc.returncode != 0:
        raise SystemExit("bare_runbook.sh %s on %s failed (%s): %s" % (action, host, proc.returncode, proc.stderr))
    marks = json.loads(proc.stdout.strip().splitlines()[-1])
    names = list(marks)
    steps = {b: round(marks[b] - marks[a], 3) for a, b in zip(names, names[1:])}
    return round(marks["gated"] - marks["start"], 3), steps


def window(run, host, first, last, after=None):
    """Seconds from the start of task `first` to the end of the next task `last` (names matched by suffix);
    `after`: only look past the first task named so. Returns (seconds, the tasks in the window)."""
    tasks = run.tasks(host=host)
    if after:
        tasks = tasks[next(i for i, t in enumerate(tasks) if t["task"].endswith(after)) + 1:]
    start = next(i for i, t in enumerate(tasks) if t["task"].endswith(first))
    end = next(i for i, t in enumerate(tasks) if i >= start and t["task"].endswith(last))
    inside = tasks[start:end + 1]
    return round(inside[-1]["end"] - inside[0]["start"], 3), inside


def breakdown(tasks, threshold=0.1):
    """`name 0.61 s, ...` of the tasks that cost something (modules; set_fact and includes are ~0.02 s)."""
    costly = [t for t in tasks if t["duration"] >= threshold]
    return "%d tasks, %d of them >= %.1f s: %s" % (
        len(tasks), len(costly), threshold,
        ", ".join("%s %.2f" % (t["task"].split(" : ")[-1][:40], t["duration"]) for t in costly))


def phases(records):
    """`stop 0.21, backup 0.35, ...` of a window's phases (the host's own timings)."""
    return ", ".join("%s %.2f" % (p["phase"], (p["end"] or p["start"]) - p["start"]) for p in records)


def task_floor(work, settings, count=10):
    """Median seconds of a task that does nothing (`command: true`) on a local host: the price of one module task."""
    import pathlib  # pylint: disable=import-outside-toplevel
    from fleetrun import read_timings, timing_env  # pylint: disable=import-outside-toplevel
    from playbook import run_tasks  # tests/support  pylint: disable=import-outside-toplevel
    os.makedirs(work, exist_ok=True)
    timing_file = os.path.join(work, "floor.jsonl")
    tasks = [{"name": "noop %d" % i, "module": "ansible.builtin.command", "args": {"cmd": "true"}} for i in range(count)]
    saved = os.environ.get("ANSIBLE_PIPELINING")
    os.environ["ANSIBLE_PIPELINING"] = "1" if settings.pipelining else "0"
    try:
        with timing_env(timing_file, settings.write_config(os.path.join(work, "ansible.cfg"))):
            rc, _results, output = run_tasks(pathlib.Path(work), tasks)
    finally:
        if saved is None:
            os.environ.pop("ANSIBLE_PIPELINING", None)
        else:
            os.environ["ANSIBLE_PIPELINING"] = saved
    if rc != 0:
        raise SystemExit("task floor run failed:\n%s" % output[-2000:])
    return benchlib.median([r["duration"] for r in read_timings(timing_file)
                            if r.get("event") == "task" and r["task"].startswith("noop")])
