"""Regression tests of issue 12 (hardening) that need real ansible-playbook runs on localhost.

Each test names the item of the issue it covers. Several tasks share one run (tests/support/playbook.py run_tasks).
"""

import json
import os
import signal
import subprocess
import sys
import time

import playbook
from playbook import run_module, run_tasks

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


def test_item10_unreadable_configs_give_a_clean_error(tmp_path):
    """A config that is not UTF-8, or a directory, ended cara_health in a traceback."""
    state = tmp_path / "state"
    state.mkdir()
    latin1 = tmp_path / "latin1.json5"
    latin1.write_bytes(b'{"gateway": {"port": 18789, "name": "caf\xe9"}}\n')
    directory = tmp_path / "config-dir.json5"
    directory.mkdir()
    tasks = []
    for label, path in (("latin1", latin1), ("directory", directory)):
        tasks.append({"name": "health " + label, "module": HEALTH,
                      "args": {"state_dir": str(state), "config_path": str(path), "checks": ["health"], "timeout": 1}})
        tasks.append({"name": "info " + label, "module": INFO,
                      "args": {"state_dir": str(state), "config_path": str(path), "bin_path": str(tmp_path / "cara"),
                               "install_root": str(tmp_path / "opt"), "backup_dir": str(tmp_path / "backups")}})
    _rc, results, out = run_tasks(tmp_path, tasks)
    assert results is not None, out
    for label, path in (("latin1", latin1), ("directory", directory)):
        health = results["health " + label]
        assert health.get("failed") is True and health.get("cause") == "config", health
        assert str(path) in health["msg"] and "Traceback" not in health["msg"], health
        assert "module_stdout" not in health and "Traceback" not in str(health.get("exception")), health
        info = results["info " + label]
        assert not info.get("failed"), info
        assert info["config"] is None and str(path) in info["config_error"], info
        assert "Traceback" not in str(info.get("exception")), info


LOCK_PLAYBOOK = """\
- name: Hold the fleet lock until the test says go
  hosts: localhost
  gather_facts: false
  tasks:
    - name: Take the lock
      carapace.fleet.cara_lock:
        path: "{{ lock_path }}"
        run_id: run-a
    - name: Tell the test the lock is taken
      ansible.builtin.copy:
        content: "locked\\n"
        dest: "{{ marker }}"
        mode: "0600"
    - name: Work for a while (until the test creates the go file)
      ansible.builtin.wait_for:
        path: "{{ go_file }}"
        timeout: 600
    - name: Drop the lock
      carapace.fleet.cara_lock:
        path: "{{ lock_path }}"
        run_id: run-a
        state: absent
"""


def test_item1_the_lock_excludes_a_concurrent_run_until_that_run_is_dead(tmp_path):
    """Two real ansible-playbook runs: the second is refused while the first lives; after kill -9 of the first,
    the next run takes the lock over (the lock used to name the per-task worker fork, stale at once)."""
    work = tmp_path / "run-a"
    work.mkdir()
    lock_path, marker, go_file = tmp_path / "run.lock", work / "locked", work / "go"
    (work / "play.yml").write_text(LOCK_PLAYBOOK)
    (work / "vars.json").write_text(json.dumps({"lock_path": str(lock_path), "marker": str(marker),
                                                "go_file": str(go_file),
                                                "ansible_python_interpreter": sys.executable}))
    env = dict(os.environ, ANSIBLE_COLLECTIONS_PATH=playbook.COLLECTIONS, ANSIBLE_HOME=str(work / ".ansible"),
               ANSIBLE_LOCAL_TEMP=str(work / "tmp"), ANSIBLE_NOCOLOR="1", ANSIBLE_RETRY_FILES_ENABLED="0")
    cmd = [os.path.join(playbook.BIN, "ansible-playbook"), "-i", "localhost,", "-c", "local",
           "-e", "@%s" % (work / "vars.json"), str(work / "play.yml")]
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,  # pylint: disable=consider-using-with
                             start_new_session=True)
    try:
        for _unused in range(1200):
            if marker.exists() or first.poll() is not None:
                break
            time.sleep(0.25)
        assert marker.exists(), "the first run never took the lock: %s" % first.communicate()[0]
        holder = json.loads(lock_path.read_text())
        assert holder["run_id"] == "run-a" and holder["pid"] == first.pid, holder

        _rc, result, out = run_module(tmp_path, "carapace.fleet.cara_lock", {"path": str(lock_path), "run_id": "run-b"})
        assert result and result.get("failed") is True, out  # run_module ignores errors: rc stays 0
        assert "another carapace.fleet run holds" in result["msg"] and "run-a" in result["msg"], result
        assert json.loads(lock_path.read_text())["run_id"] == "run-a"

        os.kill(first.pid, signal.SIGKILL)
        first.wait()
        rc, result, out = run_module(tmp_path, "carapace.fleet.cara_lock", {"path": str(lock_path), "run_id": "run-c"})
        assert rc == 0 and not result.get("failed"), out
        assert result["stale"] is True and result["holder"]["run_id"] == "run-c", result
        assert "took over a stale lock" in out and "run-a" in out
    finally:
        go_file.write_text("go\n")
        try:
            os.killpg(first.pid, signal.SIGKILL)
        except OSError:
            pass
        first.communicate()


def test_item6_url_credentials_never_come_back_from_cara_release_or_the_notes_gate(tmp_path):
    """base_url (and the notes' src) with userinfo: the credentials appear in no result, message or invocation."""
    port = 9  # discard: nothing listens, so the fetch fails with a message naming the URL
    tasks = [
        {"name": "release", "module": "carapace.fleet.cara_release",
         "args": {"tag": "v0.9.0", "dest": str(tmp_path / "cache"), "timeout": 5,
                  "base_url": "http://mirror-user:pw-SECRET42@127.0.0.1:%d/{repo}/{tag}" % port}},
        {"name": "notes", "module": "carapace.fleet.cara_release_notes",
         "args": {"tag": "v0.9.0", "timeout": 5, "src": "http://notes-user:pw-SECRET43@127.0.0.1:%d/v0.9.0.md" % port}},
    ]
    _rc, results, out = run_tasks(tmp_path, tasks, verbosity=3)
    assert results is not None, out
    for name in ("release", "notes"):
        res = results[name]
        assert res.get("failed") is True, res
        assert "127.0.0.1" in res["msg"] and "-user" not in res["msg"], res
    text = json.dumps(results) + out
    assert "pw-SECRET42" not in text and "pw-SECRET43" not in text
