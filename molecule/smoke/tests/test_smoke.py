"""smoke: every host is its own systemd machine running a hardened unit, and the hosts reach each other.

Run by `molecule verify` (testinfra, one module-scoped run per host); ../../conftest.py provides the
native container backend and the `fleet_hosts` fixture.
"""

from __future__ import annotations

import json

UNIT = "smoke-http.service"
USER = "smokehttp"
PORT = 8080
ROOT = "/var/lib/smoke-http"

FETCH = "python3 -c 'import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode().strip())' %s"


def _show(host, *props):
    """systemctl show PROP=VALUE lines as a dict."""
    out = host.check_output("systemctl show %s -p %s", UNIT, ",".join(props))
    return dict(line.split("=", 1) for line in out.splitlines())


def _main_pid(host):
    pid = int(_show(host, "MainPID")["MainPID"])
    assert pid > 1
    return pid


def _mounts(host, pid):
    """{mount point: (root of the mount, options)} of a process's mount namespace, as the kernel reports it.

    (Readable without CAP_SYS_PTRACE, unlike /proc/PID/ns/* for another user's process.)
    """
    mounts = {}
    for line in host.file("/proc/%s/mountinfo" % pid).content_string.splitlines():
        fields = line.split()
        mounts[fields[4]] = (fields[3], fields[5].split(","))
    return mounts


def test_host_boots_systemd_as_pid1(host, fleet_hosts):
    assert host.file("/proc/1/comm").content_string.strip() == "systemd"
    assert host.run("systemctl is-system-running").stdout.strip() == "running"
    assert host.check_output("hostname") in fleet_hosts


def test_service_runs_under_systemd_as_its_user(host):
    service = host.service("smoke-http")
    assert service.is_running
    assert service.is_enabled
    props = _show(host, "ActiveState", "SubState", "User", "NRestarts", "ControlGroup", "Result")
    assert props["ActiveState"] == "active"
    assert props["SubState"] == "running"
    assert props["Result"] == "success"
    assert props["User"] == USER
    assert props["NRestarts"] == "0"
    assert props["ControlGroup"].endswith("/system.slice/" + UNIT)
    pid = _main_pid(host)
    assert host.check_output("ps -o user= -p %s", str(pid)) == USER
    assert host.check_output("ps -o ppid= -p %s", str(pid)).strip() == "1"


def test_port_listens_and_serves_the_host_name(host):
    assert host.socket("tcp://0.0.0.0:%d" % PORT).is_listening
    me = host.check_output("hostname")
    assert host.check_output(FETCH, "http://127.0.0.1:%d/" % PORT) == me


def test_files_have_the_converged_modes(host):
    unit = host.file("/etc/systemd/system/" + UNIT)
    assert unit.is_file and unit.mode == 0o644 and unit.user == "root" and unit.group == "root"
    assert "ProtectSystem=strict" in unit.content_string
    www = host.file(ROOT + "/www")
    assert www.is_directory and www.mode == 0o755 and www.user == "root"
    data = host.file(ROOT + "/data")
    assert data.is_directory and data.mode == 0o750 and data.user == USER and data.group == USER
    page = host.file(ROOT + "/www/index.html")
    assert page.mode == 0o644 and page.content_string.strip() == host.check_output("hostname")
    # Written by ExecStartPre inside the sandbox: ReadWritePaths= is writable to the service.
    started = host.file(ROOT + "/data/started")
    assert started.is_file and started.user == USER and started.content_string.strip().endswith("Z")


def test_hardening_is_enforced_not_just_configured(host):
    pid = _main_pid(host)
    props = _show(host, "NoNewPrivileges", "ProtectSystem", "ProtectHome", "PrivateTmp", "ReadWritePaths")
    assert props == {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "ReadWritePaths": ROOT + "/data",
    }
    assert "NoNewPrivs:\t1" in host.file("/proc/%d/status" % pid).content_string
    mounts = _mounts(host, pid)
    # systemd skips the sandbox silently when it cannot build a mount namespace (no CAP_SYS_ADMIN):
    # the host's own view must differ from the service's.
    assert "rw" in _mounts(host, 1)["/"][1]
    # ProtectSystem=strict: the whole tree read-only, except ReadWritePaths= (where ExecStartPre wrote).
    assert "ro" in mounts["/"][1]
    assert mounts[ROOT + "/data"][0] == ROOT + "/data"
    assert "rw" in mounts[ROOT + "/data"][1]
    # PrivateTmp=yes: /tmp and /var/tmp are the unit's own directories.
    for tmp in ("/tmp", "/var/tmp"):
        source, options = mounts[tmp]
        assert "/systemd-private-" in source and "-%s-" % UNIT in source, (tmp, source)
        assert "rw" in options
    # ProtectHome=yes: /root and /home are systemd's inaccessible, read-only, empty directory.
    for home in ("/root", "/home"):
        assert mounts[home][0] == "/systemd/inaccessible/dir", home
        assert "ro" in mounts[home][1]


def test_hosts_have_own_addresses_and_reach_each_other_by_name(host, fleet_hosts):
    me = host.check_output("hostname")
    own = json.loads(host.check_output("ip -j -4 addr show scope global"))
    own_addresses = {a["local"] for iface in own for a in iface.get("addr_info", [])}
    assert len(own_addresses) == 1
    resolved = {}
    for name in fleet_hosts:
        addr = host.addr(name)
        assert addr.is_resolvable, name
        resolved[name] = addr.ipv4_addresses[0]
    # One distinct address per host, ours among them.
    assert len(set(resolved.values())) == len(fleet_hosts)
    assert resolved[me] in own_addresses
    for name in fleet_hosts:
        if name != me:
            assert host.check_output(FETCH, "http://%s:%d/" % (name, PORT)) == name
