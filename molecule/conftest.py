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

import pytest

from testinfra.utils.ansible_runner import AnsibleRunner


@pytest.fixture(scope="session")
def fleet_hosts(pytestconfig):
    """Names of all hosts of the scenario, sorted."""
    inventory = pytestconfig.getoption("ansible_inventory", default=None)
    if not inventory:
        pytest.fail("no Molecule inventory: run these tests through `molecule verify`")
    return sorted(AnsibleRunner(inventory).get_hosts("all"))
