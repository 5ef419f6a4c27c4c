"""Testinfra plumbing shared by every Molecule scenario under molecule/.

Molecule runs testinfra with ``--connection=ansible --ansible-inventory=<its inventory>``. Our hosts have
``ansible_connection: ssh`` (molecule/base.yml), so testinfra maps each of them to its native ssh backend and
runs every command over the same multiplexed SSH connection Ansible uses (ProxyCommand ``podman exec -i
<host> sshd -i``): about 20 ms a command. Keep it that way: with a connection testinfra cannot map (for
example ``ansible.builtin.ssh`` spelled in full, or ``podman``), it starts one ``ansible`` process per
command and the same 18 tests take 220 s instead of 5 s.

Fixtures:
  fleet_hosts  sorted inventory names of all hosts of the scenario (the containers' names and hostnames).
"""

from __future__ import annotations

import json
import os

import pytest

from testinfra.utils.ansible_runner import AnsibleRunner


@pytest.fixture(scope="session")
def fleet_hosts(pytestconfig):
    """Names of all hosts of the scenario, sorted."""
    inventory = pytestconfig.getoption("ansible_inventory", default=None)
    if not inventory:
        pytest.fail("no Molecule inventory: run these tests through `molecule verify`")
    return sorted(AnsibleRunner(inventory).get_hosts("all"))


# ------------------------------------------------------------------------------------------------------------------
# What the drill scenarios' tests read: the release manifest and the reports on the controller (testinfra runs
# there), and on each host the record molecule/playbooks/prepare-fleet.yml left outside everything the roles touch.


ASSET = "cara-x86_64-linux"
BIN = "/usr/local/bin/cara"
INSTALL_ROOT = "/opt/carapace"
STATE_DIR = "/var/lib/carapace"
BACKUP_DIR = "/var/backups/carapace"
PREPARE_DIR = "/var/lib/molecule-prepare"
PORT = 18789
UNIT = "cara.service"
# Written by every gate's `cara verify --outcome auto|autonomy` (a chat roundtrip, a control task), so they
# grow after prepare; every other state file must keep its bytes.
GROWS = ("./tasks/queue.json", "./usage.json")
FETCH = ("python3 -c 'import sys, urllib.request; "
         "print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())' %s")


@pytest.fixture(scope="session")
def manifest():
    """releases.json of the release tree the scenario ran against (molecule/release_lab.py)."""
    releases = os.environ.get("MOLECULE_RELEASES")
    if not releases:
        pytest.fail("MOLECULE_RELEASES is not set: run the scenario through scripts/molecule_run.sh (make molecule)")
    with open(os.path.join(releases, "releases.json"), encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="session")
def run_dir():
    """The scenario's controller-side dir: cache/, report/, drill/, run.lock (molecule/base.yml)."""
    return os.path.join(os.environ["MOLECULE_PROJECT_DIRECTORY"], "build", "molecule", "run",
                        os.environ["MOLECULE_SCENARIO_NAME"])


def asset_sha256(manifest_, tag):
    return manifest_["releases"][tag]["assets"][ASSET]


def read_report(path):
    """{host: row} of a report.json the collection wrote."""
    with open(os.path.join(path, "report.json"), encoding="utf-8") as f:
        report = json.load(f)
    return report, {row["host"]: row for row in report["hosts"]}


def health(host, name="127.0.0.1"):
    """GET /health of the gateway on `name`, asked from `host`."""
    return json.loads(host.check_output(FETCH, "http://%s:%d/health" % (name, PORT)))


def process_manager(me):
    """Hosts that run cara under the `process` service script instead of systemd (their scenario's molecule.yml)."""
    return me == "rollback_drill-2"


def assert_service_runs(host, me):
    """cara runs as its service: the hardened unit as the cara account, or the service script's own process."""
    if process_manager(me):
        assert host.run("/run/carapace/cara-service status").rc == 0
        pid = int(host.file("/run/carapace/cara.pid").content_string)
        assert host.check_output("ps -o user= -p %s", str(pid)).strip() == "root"
        return
    props = service_props(host, "ActiveState", "SubState", "User")
    assert (props["ActiveState"], props["SubState"], props["User"]) == ("active", "running", "cara")


def service_props(host, *props):
    out = host.check_output("systemctl show %s -p %s", UNIT, ",".join(props))
    return dict(line.split("=", 1) for line in out.splitlines())


def prepared_service(host):
    """MainPID, ExecMainStartTimestampMonotonic, NRestarts of cara as prepare left it."""
    text = host.file(PREPARE_DIR + "/service.env").content_string
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def prepared_digests(host):
    """{./relative/path: sha256} of the state files at prepare."""
    out = {}
    for line in host.file(PREPARE_DIR + "/state.sha256").content_string.splitlines():
        digest, path = line.split(None, 1)
        out[path] = digest
    assert out, "prepare recorded no state files"
    return out


def current_digest(host, relpath):
    f = host.file(os.path.normpath(os.path.join(STATE_DIR, relpath)))
    return f.sha256sum if f.exists else None


def assert_state_kept(host):
    """Every state file of prepare is byte-identical now; the two the gates' verify writes only grew."""
    before = prepared_digests(host)
    changed = {p for p, d in before.items() if p not in GROWS and current_digest(host, p) != d}
    assert not changed, "state files changed since prepare: %s" % sorted(changed)
    # tasks/queue.json is a bare JSON array of tasks, as cara persists it (cara-contract 10); in the shape every
    # release reads (`attempts` a number: the faulty v0.9.1's migration makes it an object, which older releases
    # cannot parse)
    old = json.loads(host.file(PREPARE_DIR + "/queue.json").content_string)
    new = json.loads(host.file(STATE_DIR + "/tasks/queue.json").content_string)
    assert isinstance(old, list) and isinstance(new, list)
    assert all(isinstance(t["attempts"], int) for t in new), "the queue is still in the faulty release's shape"
    tasks = {t["id"]: t for t in new}
    assert old and all(tasks.get(t["id"]) == t for t in old), "a task of prepare was lost or altered"


def active_release(host):
    """(tag, sha256 of the binary it runs) of the active symlink, which must point into the install root."""
    link = host.file(BIN)
    assert link.is_symlink
    target = link.linked_to
    assert target.startswith(INSTALL_ROOT + "/releases/") and target.endswith("/cara"), target
    return target.split("/")[-2], host.file(target).sha256sum


def backup_index(host):
    return json.loads(host.file(BACKUP_DIR + "/index.json").content_string)


@pytest.fixture()
def me(host):
    """The host's inventory name (its container name; the kernel hostname drops the `_` of a scenario name)."""
    return host.backend.get_hostname()
