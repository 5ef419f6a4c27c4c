"""Shared fixtures for the integration tests: builds releases of the `cara` double and runs them as real processes."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

SUPPORT = Path(__file__).resolve().parents[1] / "support"
if str(SUPPORT) not in sys.path:
    sys.path.insert(0, str(SUPPORT))

from cara_double import build_release, default_flavor  # noqa: E402
from fleet import LocalFleet, releases_for  # noqa: E402
from fixtures import fake_llm, llm  # noqa: E402,F401  pylint: disable=unused-import

# Variables a host's environment never inherits from the test runner: cara's own, the provider keys (spec 10), and
# the double's test-only switches.
PROVIDER_ENV = ("ANTHROPIC_API_KEY", "OPENAI_API_KEY", "GOOGLE_API_KEY", "VENICE_API_KEY", "NEARAI_API_KEY",
                "OLLAMA_BASE_URL", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                "VERTEX_PROJECT_ID", "CLAUDE_CLI_ENABLED")

# One release per flavor, named like the tags that behave that way (spec section 10).
FLAVOR_VERSIONS = {"head": "0.9.0", "v0.8.0": "0.8.0"}


def free_port():
    """A loopback port that was free a moment ago (bound, then closed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(predicate, timeout=15.0, interval=0.02, what="condition"):
    """Poll until predicate() is truthy; return its value or fail after the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for %s" % what)
        time.sleep(interval)


def http_get(port, path, headers=None, method="GET", body=None):
    """(status, headers, body bytes) of one request to 127.0.0.1:port; None when nothing answers."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request("http://127.0.0.1:%d%s" % (port, path), data=data, method=method,
                                     headers=dict(headers or {}, **({"Content-Type": "application/json"} if data else {})))
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read()
    except (urllib.error.URLError, ConnectionError, socket.timeout):
        return None


class CaraHost:
    """A state dir, a config and a release of the double, driven as subprocesses."""

    free_port = staticmethod(free_port)
    wait_for = staticmethod(wait_for)
    http_get = staticmethod(http_get)

    def __init__(self, root, binary, port, config, llm_url=None):
        self.root = Path(root)
        self.binary = Path(binary)
        self.port = port
        self.llm_url = llm_url
        self.state = self.root / "state"
        self.home = self.root / "home"
        self.home.mkdir(parents=True, exist_ok=True)
        self.procs = []
        self.config_file = self.state / "carapace.json5"
        if config is not None:
            self.write_config(config)

    def write_config(self, config):
        """Write carapace.json5; the host's LLM provider (llm_url) is added unless the config names providers."""
        self.state.mkdir(parents=True, exist_ok=True)
        if self.llm_url and isinstance(config, dict) and "providers" not in config:
            config = dict(config, providers={"ollama": {"baseUrl": self.llm_url}})
        self.config_file.write_text("// test config\n" + json.dumps(config, indent=2) + "\n")

    def env(self, **extra):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CARAPACE_", "CARA_DOUBLE_"))
               and k != "XDG_CONFIG_HOME" and k not in PROVIDER_ENV}
        # The release's `#!/usr/bin/env python3` must find the interpreter that has json5.
        env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
        env.update(HOME=str(self.home), CARAPACE_STATE_DIR=str(self.state))
        for key, value in extra.items():  # a None value removes the variable
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
        return env

    def run(self, *args, env=None, cwd=None, timeout=60):
        return subprocess.run([str(self.binary), *args], capture_output=True, text=True, timeout=timeout,
                              env=env or self.env(), cwd=str(cwd or self.root), check=False)

    def spawn(self, *args, env=None):
        """Start `cara <args>` in the background; its output goes to files under root."""
        index = len(self.procs)
        stdout = open(self.root / ("daemon-%d.out" % index), "w")
        stderr = open(self.root / ("daemon-%d.err" % index), "w")
        proc = subprocess.Popen([str(self.binary), *args], stdout=stdout, stderr=stderr, env=env or self.env(),
                                cwd=str(self.root))
        stdout.close()
        stderr.close()
        proc.index = index
        self.procs.append(proc)
        return proc

    def start(self, *args, env=None, port=None):
        """Start the daemon and wait until /health answers; fails if the process exits first."""
        proc = self.spawn(*args, env=env)
        port = port or self.port

        def up():
            if proc.poll() is not None:
                raise AssertionError("daemon exited %s: %s" % (proc.returncode, self.stderr(proc)))
            return http_get(port, "/health") is not None
        wait_for(up, what="the daemon to answer /health")
        return proc

    def stop(self, proc, sig=signal.SIGTERM):
        proc.send_signal(sig)
        return proc.wait(timeout=20)

    def stdout(self, proc):
        return (self.root / ("daemon-%d.out" % proc.index)).read_text()

    def stderr(self, proc):
        return (self.root / ("daemon-%d.err" % proc.index)).read_text()

    def get(self, path, **kwargs):
        return http_get(self.port, path, **kwargs)

    def kill_all(self):
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)


class CaraHosts:
    """Factory of CaraHost objects, plus the small helpers the double's tests share."""

    flavor_versions = FLAVOR_VERSIONS
    free_port = staticmethod(free_port)
    wait_for = staticmethod(wait_for)
    http_get = staticmethod(http_get)

    def __init__(self, tmp_path, llm_url=None):
        self.tmp_path = tmp_path
        self.llm_url = llm_url
        self.hosts = []

    def __call__(self, version="0.9.0", *, flavor=None, faults=None, config="default", name=None, binary=None,
                 llm=None):
        """A host with a fresh release (or `binary`); the default config sets gateway.port to a free port.
        llm: None = the session's fake LLM as its provider, a URL = that Ollama base URL, False = no provider
        (cara then refuses to start, spec 10)."""
        name = name or "host%d" % len(self.hosts)
        port = free_port()
        if config == "default":
            config = {"gateway": {"port": port}}
        binary = binary or self.release(version, name, flavor=flavor, faults=faults)
        llm_url = self.llm_url if llm is None else (llm or None)
        host = CaraHost(self.tmp_path / name, binary, port, None, llm_url=llm_url)
        if config is not None:
            host.write_config(config)
        host.version = version.lstrip("v")
        host.flavor = flavor or default_flavor(version)
        self.hosts.append(host)
        return host

    def release(self, version, name, **kwargs):
        return build_release(version, self.tmp_path / "releases" / name / "cara", **kwargs)

    def kill_all(self):
        for host in self.hosts:
            host.kill_all()


@pytest.fixture
def cara_hosts(tmp_path, llm):
    """Factory of hosts running releases of the `cara` double; every daemon is killed at teardown. Every host's
    config names the session's fake LLM (fixture `llm`) as its Ollama provider unless built with llm=False."""
    hosts = CaraHosts(tmp_path, llm_url=llm.base_url)
    yield hosts
    hosts.kill_all()


@pytest.fixture(params=sorted(FLAVOR_VERSIONS))
def cara_flavor(request):
    """Each flavor of the double (spec section 10): "head" and "v0.8.0"."""
    return request.param


@pytest.fixture
def cara_host(cara_hosts, cara_flavor):
    """A host running the release that stands for cara_flavor."""
    return cara_hosts(FLAVOR_VERSIONS[cara_flavor], flavor=cara_flavor)


@pytest.fixture(scope="session")
def releases(lab, tmp_path_factory):
    """Signed releases of the double for every tag local fleets serve (built once per test process)."""
    return releases_for(lab, str(tmp_path_factory.mktemp("built")))


@pytest.fixture
def make_fleet(tmp_path, releases):  # pylint: disable=redefined-outer-name
    """make(hosts, install): a LocalFleet under tmp_path; every fleet is stopped (and its start log checked) after."""
    fleets = []

    def make(hosts=1, install="v0.8.0"):
        fleet = LocalFleet(tmp_path / ("f%d" % len(fleets)), releases, hosts=hosts, install=install)
        fleets.append(fleet)
        return fleet
    yield make
    for fleet in fleets:
        fleet.stop()


# The long runbook tests first, longest first, so that under pytest-xdist the short tests fill the workers at the end
# instead of one worker running a long test alone.
SLOW_FIRST = ("test_fleet_kill_points.py", "test_readme.py", "test_fleet_unattended.py", "test_fleet_latest.py",
              "test_fleet_operator.py", "test_fleet_roles.py", "test_fleet_refusals_and_chains.py",
              "test_fleet_playbooks.py", "test_fleet_never_resumed.py", "test_fleet_tags.py", "test_ansible_runner.py",
              "test_release_tags_module.py")


def pytest_collection_modifyitems(items):
    def rank(item):
        name = item.path.name
        return SLOW_FIRST.index(name) if name in SLOW_FIRST else len(SLOW_FIRST)
    items.sort(key=rank)
