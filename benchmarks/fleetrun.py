"""A local fleet for the benchmarks: tests/support's LocalFleet (signed releases, a release server on 127.0.0.1,
N hosts with the `process` service manager) plus what a benchmark needs around each `ansible-playbook` run:
the ansible settings under test, per-task timings (callback_plugins/bench_timing.py) and a sample of the
controller (memory, the main process's CPU).
"""

import contextlib
import json
import os
import subprocess
import sys
import threading
import time

import benchlib
from fleet import LocalFleet  # tests/support, on sys.path through benchlib

CALLBACKS = os.path.join(benchlib.ROOT, "benchmarks", "callback_plugins")
FLEETCTL = os.path.join(benchlib.SUPPORT, "fleetctl.py")


# The settings RESULTS.md recommends (B5): forks for a whole batch of 50 hosts at 25 % (and the plan play), and
# pipelining. Every benchmark runs with them unless BENCH_* says otherwise.
RECOMMENDED = dict(forks=25, pipelining=True)


class Settings:
    """The ansible settings a run is made with (B5 compares them). None leaves ansible's own default."""

    def __init__(self, forks=None, pipelining=True, poll_interval=None, strategy=None):
        self.forks = forks
        self.pipelining = pipelining
        self.poll_interval = poll_interval
        self.strategy = strategy

    @classmethod
    def from_env(cls, **defaults):
        """BENCH_FORKS, BENCH_PIPELINING (0/1), BENCH_POLL_INTERVAL, BENCH_STRATEGY override `defaults`."""
        knobs = dict(defaults)
        if os.environ.get("BENCH_FORKS"):
            knobs["forks"] = int(os.environ["BENCH_FORKS"])
        if os.environ.get("BENCH_PIPELINING"):
            knobs["pipelining"] = os.environ["BENCH_PIPELINING"] == "1"
        if os.environ.get("BENCH_POLL_INTERVAL"):
            knobs["poll_interval"] = float(os.environ["BENCH_POLL_INTERVAL"])
        if os.environ.get("BENCH_STRATEGY"):
            knobs["strategy"] = os.environ["BENCH_STRATEGY"]
        return cls(**knobs)

    def label(self):
        return "forks=%s pipelining=%s internal_poll_interval=%s strategy=%s" % (
            self.forks or "5 (default)", "on" if self.pipelining else "off",
            self.poll_interval if self.poll_interval is not None else "0.001 (default)", self.strategy or "linear")

    def cli_args(self):
        return ["--forks", str(self.forks)] if self.forks else []

    def extra_vars(self):
        # LocalFleet exports ANSIBLE_PIPELINING=1; a variable outranks the environment for a connection option.
        return {"ansible_pipelining": self.pipelining}

    def write_config(self, path):
        """internal_poll_interval and strategy have no environment variable: an ansible.cfg carries them."""
        lines = ["[defaults]"]
        if self.poll_interval is not None:
            lines.append("internal_poll_interval = %s" % self.poll_interval)
        if self.strategy:
            lines.append("strategy = %s" % self.strategy)
        if (self.strategy or "").startswith("mitogen_"):  # mitogen (benchmarks/requirements.txt) ships its strategies
            import ansible_mitogen  # pylint: disable=import-outside-toplevel
            lines.append("strategy_plugins = %s" % os.path.join(os.path.dirname(ansible_mitogen.__file__), "plugins",
                                                                "strategy"))
        with open(path, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        return path


class ControllerSampler(threading.Thread):
    """The controller of one ansible-playbook run, sampled from /proc: peak memory of the main process and its
    forked workers, and the main process's own CPU time (the strategy loop; workers and modules excluded).

    The processes are told apart from any other ansible by the run's inventory path on their command line.
    PSS counts a page shared by the forked workers once, so their sum is the controller's real footprint.
    """

    def __init__(self, marker, interval=0.25):
        super().__init__(daemon=True)
        self.marker = marker.encode()
        self.interval = interval
        self.peak_pss_kb = 0
        self.peak_rss_main_kb = 0
        self.peak_processes = 0
        self.main_cpu_s = 0.0
        self._stop_event = threading.Event()

    def run(self):
        while not self._stop_event.wait(self.interval):
            self.sample()

    def stop(self):
        self._stop_event.set()
        self.join(timeout=5)

    def sample(self):
        pss, main_rss, count = 0, 0, 0
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                with open("/proc/%s/cmdline" % pid, "rb") as f:
                    cmdline = f.read()
                if b"ansible-playbook" not in cmdline or self.marker not in cmdline:
                    continue
                pss += _field_kb("/proc/%s/smaps_rollup" % pid, "Pss:")
                stat = _stat(pid)
                if int(stat[1]) == os.getpid():  # the main process is our child; its workers are its children
                    main_rss = _field_kb("/proc/%s/status" % pid, "VmRSS:")
                    self.main_cpu_s = max(self.main_cpu_s, (int(stat[11]) + int(stat[12])) / _TICKS)
                count += 1
            except (OSError, ValueError):
                continue  # the process ended while being read
        self.peak_pss_kb = max(self.peak_pss_kb, pss)
        self.peak_rss_main_kb = max(self.peak_rss_main_kb, main_rss)
        self.peak_processes = max(self.peak_processes, count)


def _field_kb(path, key):
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1])
    return 0


_TICKS = os.sysconf("SC_CLK_TCK")


def _stat(pid):
    """Fields of /proc/<pid>/stat after the command name: [state, ppid, ...]; utime and stime are [11], [12]."""
    with open("/proc/%s/stat" % pid, encoding="utf-8") as f:
        return f.read().rsplit(")", 1)[1].split()


@contextlib.contextmanager
def timing_env(timing_file, config=None):
    """The environment under which ansible-playbook (a child of this process) writes per-task timings."""
    saved = dict(os.environ)
    os.environ.update(ANSIBLE_CALLBACK_PLUGINS=CALLBACKS, ANSIBLE_CALLBACKS_ENABLED="bench_timing",
                      BENCH_TIMING_FILE=timing_file)
    if config:
        os.environ["ANSIBLE_CONFIG"] = config
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def read_timings(timing_file):
    if not os.path.exists(timing_file):
        return []
    with open(timing_file, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


class PlaybookRun:
    """What one ansible-playbook run left: exit code, wall time, per-task timings, its report, the controller sample."""

    def __init__(self, rc, wall, output, timings, report_dir, controller=None):
        self.rc = rc
        self.wall = wall
        self.output = output
        self.timings = timings
        self.report_dir = report_dir
        self.controller = controller

    def report(self):
        with open(os.path.join(self.report_dir, "report.json"), encoding="utf-8") as f:
            return json.load(f)

    def tasks(self, host=None, suffix=None, action=None):
        """Task records, optionally of one host, whose name ends with `suffix`, of one module (short name)."""
        out = []
        for r in self.timings:
            if r.get("event") != "task":
                continue
            if host and r["host"] != host or suffix and not r["task"].endswith(suffix):
                continue
            if action and r["action"].rsplit(".", 1)[-1] != action:
                continue
            out.append(r)
        return out

    def check(self, what):
        if self.rc != 0:
            tail = "\n".join(self.output.splitlines()[-40:])
            raise SystemExit("%s: ansible-playbook exited %s\n%s" % (what, self.rc, tail))
        return self


class BenchFleet:
    """N local hosts with `install` running, served releases, and ansible-playbook runs with timings."""

    def __init__(self, name, hosts, *, settings=None, install="v0.8.0"):
        self.name = name
        self.settings = settings or Settings()
        self.releases = benchlib.releases()
        self.runs = 0
        for _attempt in range(5):
            self.dir = benchlib.workdir(name)
            self.fleet = LocalFleet(self.dir, self.releases, hosts=hosts, install=install, start=False)
            ports = [hv["cara_port"] for hv in self.hostvars().values()]
            if len(set(ports)) == len(ports):
                break
            # fleetctl's free_port() reserves nothing: two hosts of a large fleet can be given one port (the
            # second daemon cannot bind and the first one answers for both). Lay the fleet out again.
            self.fleet.stop()
        else:
            raise SystemExit("%s: could not lay out %d hosts on distinct ports" % (name, hosts))
        try:
            self.start()
            self.check_daemons()
        except BaseException:
            self.stop()
            raise

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    @property
    def server(self):
        return self.fleet.server

    def hostvars(self):
        return self.fleet.hostvars()

    def start(self, names=()):
        # Through the fleetctl CLI, not in-process: a daemon must not be our own child, or it stays a zombie
        # after its first stop and the service script waits for it to go (reaper.py reaps it instead).
        cmd = [sys.executable, FLEETCTL, "start", "--dir", os.path.join(self.dir, "fleet")]
        for n in names:
            cmd += ["--host", n]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, timeout=600,
                       env=dict(os.environ, PATH=benchlib.VENV_BIN + os.pathsep + os.environ.get("PATH", "")))

    def check_daemons(self):
        """Every host's own daemon runs (a port another process holds would pass fleetctl's connect check)."""
        for name, hv in self.hostvars().items():
            # fleetctl records the daemon it started in <run dir>/cara.pid: v0.8.0 writes no daemon.pid
            pid_file = os.path.join(hv["cara_run_dir"], "cara.pid")
            if not os.path.exists(pid_file):
                pid_file = os.path.join(hv["cara_state_dir"], "daemon.pid")
            try:
                with open(pid_file, encoding="utf-8") as f:
                    os.kill(int(f.read().strip()), 0)
            except (OSError, ValueError) as exc:
                raise SystemExit("%s: the daemon of %s is not running (%s); see %s/cara.log"
                                 % (self.name, name, exc, hv["cara_run_dir"])) from exc

    def stop(self):
        self.fleet.stop()

    def window_record(self, name):
        """The host's window record (install_root/window.json) of carapace.fleet.cara_apply, or None."""
        return self.fleet.window(name)

    def playbook(self, name, *, sample=False, timeout=3600, **extra):
        """Run carapace.fleet.<name> with the settings and a fresh report dir; returns a PlaybookRun."""
        self.runs += 1
        tag = "%02d-%s" % (self.runs, name)
        timing_file = os.path.join(self.dir, "timings-%s.jsonl" % tag)
        report_dir = os.path.join(self.dir, "report-%s" % tag)
        config = self.settings.write_config(os.path.join(self.dir, "ansible.cfg"))
        extra = dict(self.settings.extra_vars(), cara_report_dir=report_dir, **extra)
        sampler = ControllerSampler(self.fleet.inventory) if sample else None
        if sampler:
            sampler.start()
        t0 = time.monotonic()
        try:
            with timing_env(timing_file, config):
                rc, output = self.fleet.playbook(name, *self.settings.cli_args(), timeout=timeout, **extra)
        finally:
            wall = time.monotonic() - t0
            if sampler:
                sampler.stop()
        timings = read_timings(timing_file)
        return PlaybookRun(rc, round(wall, 2), output, timings, report_dir, sampler)

    def upgrade(self, version="v0.9.0", timeout=3600, **extra):
        notes = "%s/puremachinery/carapace/docs/releases/%s.md" % (self.server.url, version)
        return self.playbook("upgrade", timeout=timeout, cara_upgrade_version=version,
                             cara_upgrade_release_notes=notes, cara_upgrade_ack_breaking=version, **extra)
