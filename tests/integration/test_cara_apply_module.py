"""cara_apply and cara_info's window, run for real by ansible-playbook on a fleet host (the double running): the
window's lock refuses a second window before anything is touched, check mode touches nothing, cara_info waits for a
running window, and a finished window is acknowledged once. The window itself, end to end, is in the fleet tests
(test_fleet_kill_points, test_fleet_operator, test_fleet_roles)."""

import fcntl
import json
import os
import threading
import time

from fleet import state_files
from playbook import run_module

HOST = "cara-01"


def layout(hv):
    return {"bin_path": hv["cara_bin_path"], "state_dir": hv["cara_state_dir"], "config_path": hv["cara_config_path"],
            "install_root": hv["cara_install_root"], "backup_dir": hv["cara_backup_dir"]}


def module_running(name):
    """Whether a module process `name` (AnsiballZ_<module>.py, without pipelining) runs on this machine."""
    for pid in os.listdir("/proc"):
        try:
            with open("/proc/%s/cmdline" % pid, "rb") as f:
                if name.encode() in f.read():
                    return True
        except OSError:
            continue
    return False


def upgrade_args(fleet, hv):
    staged = os.path.join(hv["cara_state_dir"], "updates", "cara-0.9.0")
    return dict(layout(hv), action="upgrade", tag="v0.9.0", src=staged, sha256="0" * 64, from_tag="v0.8.0",
                from_sha256="1" * 64, service_manager="process",
                service_script=os.path.join(hv["cara_run_dir"], "cara-service"), run_id="test-run")


def test_a_second_window_is_refused_and_check_mode_touches_nothing(make_fleet, tmp_path):
    fleet = make_fleet(hosts=1)
    hv = fleet.hostvars()[HOST]
    before = state_files(hv)
    starts = len(fleet.starts(HOST))
    lock = os.path.join(hv["cara_install_root"], "window.lock")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another window holds the host
    try:
        rc, res, out = run_module(tmp_path, "carapace.fleet.cara_apply", upgrade_args(fleet, hv))
        assert res["failed"] and res["cause"] == "window_running", out[-3000:]
        assert "another window is running on this host" in res["msg"] and "nothing was touched" in res["msg"]
    finally:
        os.close(fd)
    rc, res, out = run_module(tmp_path, "carapace.fleet.cara_apply", upgrade_args(fleet, hv), check=True)
    assert rc == 0 and res["changed"] and res["phases"] == [] and "would run the upgrade window" in res["msg"], out
    assert fleet.health(HOST)["version"] == "0.8.0" and len(fleet.starts(HOST)) == starts  # never stopped
    assert state_files(hv) == before
    assert not os.path.exists(os.path.join(hv["cara_install_root"], "window.json"))


def test_cara_info_waits_for_a_running_window_and_a_finished_one_is_acknowledged_once(make_fleet, tmp_path):
    fleet = make_fleet(hosts=1)
    hv = fleet.hostvars()[HOST]
    root = hv["cara_install_root"]
    record = {"schema": 1, "action": "upgrade", "tag": "v0.9.0", "from": "v0.8.0", "run_id": "lost-run", "pid": 1,
              "state": "running", "phase": "gate", "outcome": None, "phases": []}
    with open(os.path.join(root, "window.json"), "w", encoding="utf-8") as f:
        json.dump(record, f)
    fd = os.open(os.path.join(root, "window.lock"), os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)

    def finish():  # the window ends by itself, 1.5 s after cara_info has started (by then it reads, or waits)
        deadline = time.monotonic() + 300
        while not module_running("AnsiballZ_cara_info") and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.5)
        with open(os.path.join(root, "window.json"), "w", encoding="utf-8") as f:
            json.dump(dict(record, state="done", phase=None, outcome="upgraded"), f)
        os.close(fd)
    ender = threading.Thread(target=finish)
    ender.start()
    try:
        rc, res, out = run_module(tmp_path, "carapace.fleet.cara_info", dict(layout(hv), wait_window=120))
    finally:
        ender.join()
    assert rc == 0, out[-3000:]
    window = res["window"]
    # it started while the window ran and returns the record as the window left it: it waited for the end
    assert window["running"] is False and window["record"]["outcome"] == "upgraded", window

    rc, res, out = run_module(tmp_path, "carapace.fleet.cara_info", dict(layout(hv)))
    assert rc == 0 and res["window"]["waited_s"] == 0 and res["window"]["running"] is False

    args = dict(layout(hv), action="acknowledge", run_id="next-run")
    rc, res, out = run_module(tmp_path, "carapace.fleet.cara_apply", args, check=True)
    assert rc == 0 and res["changed"] and not res["record"].get("acknowledged_by"), out[-3000:]  # would, did not
    rc, res, out = run_module(tmp_path, "carapace.fleet.cara_apply", args)
    assert rc == 0 and res["changed"] and res["record"]["acknowledged_by"] == "next-run", out[-3000:]
    rc, res, out = run_module(tmp_path, "carapace.fleet.cara_apply", dict(args, run_id="third-run"))
    assert rc == 0 and not res["changed"] and res["record"]["acknowledged_by"] == "next-run", out[-3000:]
