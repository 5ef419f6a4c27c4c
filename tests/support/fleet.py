"""A local fleet for role and playbook tests: signed releases served on 127.0.0.1, N hosts, ansible-playbook runs.

    fleet = LocalFleet(tmp_path, lab, hosts=3, install="v0.8.0")   # builds, serves, lays out, starts the daemons
    rc, out = fleet.playbook("upgrade", cara_upgrade_version="v0.9.0")
    fleet.report()                                                  # report.json of the last run
    fleet.stop()
"""

import fcntl
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time

import fleetctl
from fake_llm import FakeLLM
from release_factory import DEFAULT_FAULTS, build_releases, release_dir
from release_server import ReleaseServer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COLLECTIONS = os.path.join(ROOT, ".collections")
BIN = os.path.dirname(sys.executable)
_RELEASES = {}
# The release whose gate fails: it never gets ready (release_factory's faults).
FAULTY = next(tag for tag, faults in DEFAULT_FAULTS.items() if faults.get("ready_never"))


def releases_for(lab, cache_dir):
    """The default releases, built once per lab per test session (they are read-only for tests)."""
    key = id(lab)
    if key not in _RELEASES:
        root = os.path.join(cache_dir, "releases")
        build_releases(lab, root)
        _RELEASES[key] = root
    return _RELEASES[key]


def state_files(hv):
    """{relative path: bytes} of a host's state dir, minus what the daemon rewrites by merely running."""
    out = {}
    root = hv["cara_state_dir"]
    for top, _dirs, files in os.walk(root):
        for name in files:
            rel = os.path.relpath(os.path.join(top, name), root)
            # the daemon's own files, our update bookkeeping, and cara's append-only audit log (never rolled back)
            if rel in ("daemon.pid", "audit.jsonl") or rel.endswith(".lock") or rel.startswith("updates" + os.sep):
                continue
            with open(os.path.join(top, name), "rb") as f:
                out[rel] = f.read()
    return out


def task_ids(files):
    """The ids of the tasks in tasks/queue.json (a bare JSON array, as cara persists it) of a state_files() map."""
    data = files.get(os.path.join("tasks", "queue.json"))
    return {task["id"] for task in json.loads(data)} if data else set()


def _sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


class LocalFleet:
    """Releases + a loopback release server + a fake LLM provider + N local hosts with their daemons running.

    Each host's double can apply an open update transaction by itself at start, as v0.8.0 does: its "GitHub" is
    this fleet's release server. Each start of a daemon is recorded in <host>/starts.jsonl with the transaction
    it found (`starts()`, `assert_starts_terminal()`).
    """

    def __init__(self, base, releases, hosts=3, install="v0.8.0", start=True, group_vars=None):
        self.base = str(base)
        self.releases = releases
        self.server = ReleaseServer(releases).start()
        self.llm = FakeLLM().start()
        self.hosts = fleetctl.make_fleet(os.path.join(self.base, "fleet"), hosts, install=install, releases=releases,
                                         llm_url=self.llm.base_url, github_url=self.server.url)
        self.inventory = os.path.join(self.base, "fleet", "inventory.yml")
        self._record_starts(group_vars or {})
        self.report_dir = os.path.join(self.base, "report")
        self.runs = 0
        self.guard_may_act = set()  # hosts a test restarted outside a run (reboot), where the start guard acts
        if start:
            self.start()

    def _record_starts(self, group_vars):
        """Every host's daemon (started by fleetctl or by the roles' service script) logs each start it makes; the
        inventory's cara_fleet group also gets `group_vars` (what an operator keeps in group_vars/cara_fleet.yml)."""
        with open(self.inventory, encoding="utf-8") as f:
            header = f.readline()
            inventory = json.load(f)
        inventory["all"]["children"]["cara_fleet"].setdefault("vars", {}).update(group_vars)
        for name, hv in inventory["all"]["children"]["cara_fleet"]["hosts"].items():
            env = dict(hv.get("cara_service_environment") or {})
            env["CARA_DOUBLE_START_LOG"] = os.path.join(self.base, "fleet", "hosts", name, "starts.jsonl")
            hv["cara_service_environment"] = env
        with open(self.inventory, "w", encoding="utf-8") as f:
            f.write(header)
            json.dump(inventory, f, indent=2, sort_keys=True)
            f.write("\n")

    def hostvars(self):
        return fleetctl.load_hosts(os.path.join(self.base, "fleet"))

    def start(self, names=None):
        for name, hv in self.hostvars().items():
            if not names or name in names:
                fleetctl.start_host(hv)

    def stop_daemons(self, names=None):
        """Stop the hosts' daemons, whoever started them (fleetctl or the service script share the pid file)."""
        for name, hv in self.hostvars().items():
            if not names or name in names:
                fleetctl.stop_host(hv)

    def stop(self):
        """Stop everything, then check every start of every path the test took: no daemon ever started on an
        open transaction, and the roles, not the start guard, made each one terminal. A window a killed run left
        running on a host ends first (it would start cara again after the stop)."""
        self.wait_windows()
        self.kill_orphans()
        self.stop_daemons()
        self.server.stop()
        self.llm.stop()
        self.assert_starts_terminal(self.guard_may_act)

    def reboot(self, name):
        """The host restarts cara by itself (a reboot): the daemon goes, and its service starts it again."""
        hv = self.hostvars()[name]
        self.guard_may_act.add(name)
        fleetctl.stop_host(hv)
        script = os.path.join(hv["cara_run_dir"], "cara-service")
        proc = subprocess.run([script, "start"], capture_output=True, text=True, timeout=120, check=False)
        if proc.returncode != 0:
            raise AssertionError("%s start failed: %s" % (script, proc.stdout + proc.stderr))
        return proc.stdout + proc.stderr

    def starts(self, name):
        """What each start of the host's daemon found in updates/transaction.json (the double's start log)."""
        path = os.path.join(self.base, "fleet", "hosts", name, "starts.jsonl")
        if not os.path.exists(path):
            return []
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]

    def assert_starts_terminal(self, guard_may_act=()):
        """No daemon ever started on a transaction it would resume by itself (applied, or failed for good), and the
        roles made it terminal themselves: the service's start guard (the last line of defence, for starts outside
        a run such as a reboot) never had to, but on the hosts named in guard_may_act."""
        for name, hv in self.hostvars().items():
            log = os.path.join(hv["cara_run_dir"], "cara.log")
            if name not in guard_may_act and os.path.exists(log):
                with open(log, encoding="utf-8", errors="replace") as f:
                    acted = [line for line in f if line.startswith("cara-start-guard:")]
                assert not acted, "%s: the start guard had to close a transaction the roles left open: %s" % (name, acted)
            for entry in self.starts(name):
                tx = entry.get("transaction")
                if tx is None or tx.get("state") == "applied":
                    continue
                resumable = tx.get("state") == "in_progress" or (
                    tx.get("state") == "failed" and tx.get("retryable") and tx.get("attempt", 0) < tx.get("maxAttempts", 3))
                assert not resumable, "%s: cara %s started on an open transaction: %s" % (name, entry.get("version"), tx)

    def release_intact(self, name, tag, asset="cara-x86_64-linux"):
        """The host's kept release `tag` still holds exactly the bytes published for it."""
        kept = os.path.join(self.hostvars()[name]["cara_install_root"], "releases", tag, "cara")
        return _sha256(kept) == _sha256(os.path.join(release_dir(self.releases, "puremachinery/carapace", tag), asset))

    def token(self, name):
        """The host's gateway token (from its config)."""
        import json5  # pylint: disable=import-outside-toplevel
        with open(self.hostvars()[name]["cara_config_path"], encoding="utf-8") as f:
            return json5.load(f)["gateway"]["auth"]["token"]

    def spawn_playbook(self, name, **extra):
        """Start `ansible-playbook carapace.fleet.<name>` in the background; the Popen has .log (its output file)."""
        self.runs += 1
        vars_file = os.path.join(self.base, "vars-%d.json" % self.runs)
        with open(vars_file, "w", encoding="utf-8") as f:
            json.dump(self.extra_vars(**extra), f)
        log_path = os.path.join(self.base, "run-%d.log" % self.runs)
        with open(log_path, "w", encoding="utf-8") as log:
            proc = subprocess.Popen([os.path.join(BIN, "ansible-playbook"), "-i", self.inventory,  # pylint: disable=consider-using-with
                                     "carapace.fleet.%s" % name, "-e", "@" + vars_file],
                                    cwd=self.base, env=self._env(), stdout=log, stderr=log, start_new_session=True)
        proc.log = log_path
        return proc

    def window(self, name):
        """The host's window record (install_root/window.json), or None."""
        try:
            with open(os.path.join(self.hostvars()[name]["cara_install_root"], "window.json"), encoding="utf-8") as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def window_running(self, name):
        """Whether a window holds the host's window.lock (the flock cara_apply holds for the whole window)."""
        try:
            fd = os.open(os.path.join(self.hostvars()[name]["cara_install_root"], "window.lock"), os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return False
        except OSError:
            return True
        finally:
            os.close(fd)

    def wait_windows(self, names=None, timeout=600):
        """Wait until no window runs on the hosts (a window that lost its controller ends by itself)."""
        deadline = time.monotonic() + timeout
        for name in names or self.hostvars():
            while self.window_running(name):
                if time.monotonic() > deadline:
                    raise AssertionError("%s: the window still runs after %s s: %s" % (name, timeout, self.window(name)))
                time.sleep(0.2)

    def kill_orphans(self):
        """SIGKILL what is left of this fleet's killed runs: ansible's workers detach into sessions of their own, so
        a run killed with its process group leaves its workers behind, blocked on the dead run's result pipe."""
        for pid in os.listdir("/proc"):
            if not pid.isdigit() or int(pid) == os.getpid():
                continue
            try:
                with open("/proc/%s/cmdline" % pid, "rb") as f:
                    argv = f.read().split(b"\0")
            except OSError:
                continue
            if any(a.endswith(b"ansible-playbook") for a in argv) and self.inventory.encode() in argv:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except OSError:
                    pass

    def kill_window(self, name):
        """SIGKILL the host's running window itself (the host-side process dies: OOM, a crash)."""
        record = self.window(name)
        if record and record.get("state") == "running" and self.window_running(name):
            os.kill(int(record["pid"]), signal.SIGKILL)

    def kill_run(self, playbook, host="cara-01", after_task=None, when=None, timeout=600, host_crash=False, poll=0.02,
                 **extra):
        """Run `ansible-playbook carapace.fleet.<playbook>` on `host` only and SIGKILL the whole run (its process
        group: workers and the modules they run; cara runs in its own session and survives) at one point:
        `after_task` ("<task name>" or "<task name>#<n>", the n-th time it returns ok: the kill_at callback kills
        from inside), or `when`, a predicate polled by this process (for points inside a task). The window
        (cara_apply, launched async) is in a session of its own and keeps going, as when the controller dies; with
        `host_crash` it is killed first, as when the host-side process dies too. Returns the log."""
        self.runs += 1
        vars_file = os.path.join(self.base, "vars-%d.json" % self.runs)
        with open(vars_file, "w", encoding="utf-8") as f:
            json.dump(self.extra_vars(**extra), f)
        env = self._env()
        if after_task:
            env.update(ANSIBLE_CALLBACK_PLUGINS=os.path.join(os.path.dirname(os.path.abspath(__file__)), "callback_plugins"),
                       ANSIBLE_CALLBACKS_ENABLED="kill_at", CARAPACE_KILL_AT="%s:%s" % (host, after_task))
        log_path = os.path.join(self.base, "run-%d.log" % self.runs)
        with open(log_path, "w", encoding="utf-8") as log:
            proc = subprocess.Popen([os.path.join(BIN, "ansible-playbook"), "-i", self.inventory, "--limit", host,  # pylint: disable=consider-using-with
                                     "carapace.fleet.%s" % playbook, "-e", "@" + vars_file],
                                    cwd=self.base, env=env, stdout=log, stderr=log, start_new_session=True)
        done = threading.Event()

        def watch():
            while not done.is_set():
                try:
                    if when():
                        if host_crash:
                            self.kill_window(host)
                        os.killpg(proc.pid, signal.SIGKILL)
                        return
                except (OSError, ValueError):
                    pass
                time.sleep(poll)
        watcher = threading.Thread(target=watch) if when else None
        if watcher:
            watcher.start()
        try:
            proc.wait(timeout=timeout)
        finally:
            done.set()
            if watcher:
                watcher.join()
        with open(log_path, encoding="utf-8") as f:
            out = f.read()
        if proc.returncode != -signal.SIGKILL:
            raise AssertionError("the run ended (rc %s) before the kill point %s: %s"
                                 % (proc.returncode, after_task or when, out[-3000:]))
        return out

    def kill_run_at(self, playbook, phase, host="cara-01", timeout=600, **extra):
        """kill_run when `host`'s transaction reaches `phase`, the window too (a host crash: nothing goes on by
        itself); returns the phase it was left at."""
        path = os.path.join(self.hostvars()[host]["cara_state_dir"], "updates", "transaction.json")

        def reached():
            with open(path, encoding="utf-8") as f:
                return json.load(f).get("phase") == phase
        self.kill_run(playbook, host, when=reached, timeout=timeout, host_crash=True, **extra)
        with open(path, encoding="utf-8") as f:
            return json.load(f)["phase"]

    def extra_vars(self, **overrides):
        values = {
            "cara_release_base_url": self.server.url + "/{repo}/releases/download/{tag}",
            "cara_trusted_root": os.path.join(self.releases, "trusted_root.json"),
            "cara_release_cache_dir": os.path.join(self.base, "cache"),
            "cara_report_dir": self.report_dir,
            "cara_fleet_lock_path": os.path.join(self.base, "run.lock"),
            # The faulty v0.9.1 never gets ready: a short deadline is enough to see its gate fail.
            "cara_upgrade_health_timeout": 10 if FAULTY in (overrides.get("cara_upgrade_version"),
                                                            overrides.get("cara_drill_version")) else 60,
        }
        values.update(overrides)
        return values

    def playbook(self, name, *args, timeout=900, **extra):
        """Run `ansible-playbook carapace.fleet.<name>`; returns (rc, combined output)."""
        self.runs += 1
        vars_file = os.path.join(self.base, "vars-%d.json" % self.runs)
        with open(vars_file, "w", encoding="utf-8") as f:
            json.dump(self.extra_vars(**extra), f)
        cmd = [os.path.join(BIN, "ansible-playbook"), "-i", self.inventory, "carapace.fleet.%s" % name,
               "-e", "@" + vars_file] + list(args)
        proc = subprocess.run(cmd, cwd=self.base, env=self._env(), capture_output=True, text=True, timeout=timeout,
                              check=False)
        with open(os.path.join(self.base, "run-%d.log" % self.runs), "w", encoding="utf-8") as f:
            f.write(proc.stdout + proc.stderr)
        return proc.returncode, proc.stdout + proc.stderr

    def _env(self):
        return dict(os.environ, ANSIBLE_COLLECTIONS_PATH=COLLECTIONS, ANSIBLE_NOCOLOR="1", ANSIBLE_FORCE_COLOR="0",
                    ANSIBLE_RETRY_FILES_ENABLED="0", ANSIBLE_HOME=os.path.join(self.base, ".ansible"), ANSIBLE_PIPELINING="1",
                    ANSIBLE_LOCAL_TEMP=os.path.join(self.base, ".ansible", "tmp"), ANSIBLE_DEPRECATION_WARNINGS="0",
                    PATH=BIN + os.pathsep + os.environ.get("PATH", ""))

    def report(self, report_dir=None, kind=None):
        """report.json of the newest real run (of `kind`: <dir>/<kind>/latest; of any kind: <dir>/report.json)."""
        base = report_dir or self.report_dir
        path = os.path.join(base, kind, "latest", "report.json") if kind else os.path.join(base, "report.json")
        with open(path, encoding="utf-8") as f:
            return json.load(f)

    def active(self, name):
        """The tag the host's active binary points at."""
        target = os.readlink(self.hostvars()[name]["cara_bin_path"])
        return os.path.basename(os.path.dirname(target))

    def health(self, name):
        import urllib.request  # pylint: disable=import-outside-toplevel
        with urllib.request.urlopen("http://127.0.0.1:%d/health" % self.hostvars()[name]["cara_port"], timeout=5) as resp:
            return json.loads(resp.read())
