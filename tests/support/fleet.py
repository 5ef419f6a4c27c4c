"""A local fleet for role and playbook tests: signed releases served on 127.0.0.1, N hosts, ansible-playbook runs.

    fleet = LocalFleet(tmp_path, lab, hosts=3, install="v0.8.0")   # builds, serves, lays out, starts the daemons
    rc, out = fleet.playbook("upgrade", cara_upgrade_version="v0.9.0")
    fleet.report()                                                  # report.json of the last run
    fleet.stop()
"""

import json
import os
import subprocess
import sys

import fleetctl
from release_factory import build_releases
from release_server import ReleaseServer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COLLECTIONS = os.path.join(ROOT, ".collections")
BIN = os.path.dirname(sys.executable)
_RELEASES = {}


def releases_for(lab, cache_dir):
    """The default releases, built once per lab per test session (they are read-only for tests)."""
    key = id(lab)
    if key not in _RELEASES:
        root = os.path.join(cache_dir, "releases")
        build_releases(lab, root)
        _RELEASES[key] = root
    return _RELEASES[key]


class LocalFleet:
    """Releases + a loopback release server + N local hosts with their daemons running."""

    def __init__(self, base, releases, hosts=3, install="v0.8.0", start=True):
        self.base = str(base)
        self.releases = releases
        self.server = ReleaseServer(releases).start()
        self.hosts = fleetctl.make_fleet(os.path.join(self.base, "fleet"), hosts, install=install, releases=releases)
        self.inventory = os.path.join(self.base, "fleet", "inventory.yml")
        self.report_dir = os.path.join(self.base, "report")
        self.runs = 0
        if start:
            self.start()

    def hostvars(self):
        return fleetctl.load_hosts(os.path.join(self.base, "fleet"))

    def start(self, names=None):
        for name, hv in self.hostvars().items():
            if not names or name in names:
                fleetctl.start_host(hv)

    def stop(self):
        for hv in self.hostvars().values():
            fleetctl.stop_host(hv)
        self.server.stop()

    def extra_vars(self, **overrides):
        values = {
            "cara_release_base_url": self.server.url + "/{repo}/releases/download/{tag}",
            "cara_trusted_root": os.path.join(self.releases, "trusted_root.json"),
            "cara_release_cache_dir": os.path.join(self.base, "cache"),
            "cara_report_dir": self.report_dir,
            "cara_fleet_lock_path": os.path.join(self.base, "run.lock"),
            "cara_upgrade_health_timeout": 60,
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
        env = dict(os.environ, ANSIBLE_COLLECTIONS_PATH=COLLECTIONS, ANSIBLE_NOCOLOR="1", ANSIBLE_FORCE_COLOR="0",
                   ANSIBLE_RETRY_FILES_ENABLED="0", ANSIBLE_HOME=os.path.join(self.base, ".ansible"), ANSIBLE_PIPELINING="1",
                   ANSIBLE_LOCAL_TEMP=os.path.join(self.base, ".ansible", "tmp"), ANSIBLE_DEPRECATION_WARNINGS="0",
                   PATH=BIN + os.pathsep + os.environ.get("PATH", ""))
        proc = subprocess.run(cmd, cwd=self.base, env=env, capture_output=True, text=True, timeout=timeout, check=False)
        with open(os.path.join(self.base, "run-%d.log" % self.runs), "w", encoding="utf-8") as f:
            f.write(proc.stdout + proc.stderr)
        return proc.returncode, proc.stdout + proc.stderr

    def report(self, report_dir=None):
        with open(os.path.join(report_dir or self.report_dir, "report.json"), encoding="utf-8") as f:
            return json.load(f)

    def active(self, name):
        """The tag the host's active binary points at."""
        target = os.readlink(self.hostvars()[name]["cara_bin_path"])
        return os.path.basename(os.path.dirname(target))

    def health(self, name):
        import urllib.request  # pylint: disable=import-outside-toplevel
        with urllib.request.urlopen("http://127.0.0.1:%d/health" % self.hostvars()[name]["cara_port"], timeout=5) as resp:
            return json.loads(resp.read())
