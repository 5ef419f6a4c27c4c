"""Regression tests of issue 12 (hardening) that need real ansible-playbook runs on localhost.

Each test names the item of the issue it covers. Several tasks share one run (tests/support/playbook.py run_tasks).
"""

import os

from playbook import run_tasks

INFO = "carapace.fleet.cara_info"
HEALTH = "carapace.fleet.cara_health"
BACKUP = "carapace.fleet.cara_backup"
RESTORE = "carapace.fleet.cara_restore"
SWITCH = "carapace.fleet.cara_switch"
TRANSACTION = "carapace.fleet.cara_transaction"


def test_item7_empty_or_relative_paths_are_refused(tmp_path):
    """state_dir: "" used to mean the working directory (a restore there deleted files)."""
    work = tmp_path / "cwd"
    work.mkdir()
    (work / "keep.txt").write_text("precious\n")
    absolute = str(tmp_path / "abs")
    cases = [
        ("info empty state_dir", INFO, {"state_dir": ""}, "state_dir"),
        ("info relative install_root", INFO, {"state_dir": absolute, "install_root": "opt/carapace"}, "install_root"),
        ("health relative state_dir", HEALTH, {"state_dir": "state", "checks": ["health"], "timeout": 1}, "state_dir"),
        ("backup empty backup_dir", BACKUP, {"state_dir": absolute, "backup_dir": "", "tag": "v0.9.0"}, "backup_dir"),
        ("restore empty state_dir", RESTORE, {"state_dir": "", "backup_dir": absolute}, "state_dir"),
        ("restore relative bin_path", RESTORE, {"state_dir": absolute, "backup_dir": absolute, "bin_path": "cara"},
         "bin_path"),
        ("switch empty install_root", SWITCH, {"install_root": "", "bin_path": absolute, "state": "previous"},
         "install_root"),
        ("switch relative bin_path", SWITCH, {"install_root": absolute, "bin_path": "bin/cara", "state": "previous"},
         "bin_path"),
        ("transaction empty state_dir", TRANSACTION, {"state_dir": "", "action": "clear"}, "state_dir"),
    ]
    tasks = [{"name": name, "module": module, "args": args} for name, module, args, _key in cases]
    old = os.getcwd()
    os.chdir(work)
    try:
        _rc, results, out = run_tasks(tmp_path, tasks)
    finally:
        os.chdir(old)
    assert results is not None, out
    for name, _module, _args, key in cases:
        res = results[name]
        assert res.get("failed") is True, (name, res)
        assert key in res["msg"] and "absolute" in res["msg"], (name, res["msg"])
        assert res.get("cause") == "bad_argument", (name, res)
    assert (work / "keep.txt").read_text() == "precious\n"
