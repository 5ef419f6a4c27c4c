"""carapace.fleet.cara_transaction run for real by ansible-playbook on localhost, with a state dir in tmp_path."""

import base64
import hashlib
import json
import os
import stat
import subprocess
import sys

from playbook import BIN, COLLECTIONS, run_module

from ansible_collections.carapace.fleet.plugins.module_utils import _transaction as txn

MODULE = "carapace.fleet.cara_transaction"
CARA_KEYS = ["id", "version", "assetName", "state", "attempt", "maxAttempts", "startedAtMs", "updatedAtMs", "stagedPath",
             "bundlePath", "sha256", "lastError", "phase", "retryable"]
STAGED = b"\x7fELF cara 0.9.0 staged\n" * 256

FULL_RUN = """\
- name: One upgrade's transaction, start to end
  hosts: localhost
  gather_facts: false
  vars:
    sd: "{{ state_dir }}"
  tasks:
    - {name: create, register: r_create, carapace.fleet.cara_transaction: {state_dir: "{{ sd }}", action: create,
       version: v0.9.0, facts: {run_id: run-42, from_version: 0.8.0}}}
    - {name: downloading, register: r_downloading, carapace.fleet.cara_transaction: {state_dir: "{{ sd }}", action: advance,
       phase: downloading}}
    - {name: downloaded, register: r_downloaded, carapace.fleet.cara_transaction: {state_dir: "{{ sd }}", action: advance,
       phase: downloaded, sha256: "{{ digest }}"}}
    - {name: verified, register: r_verified, carapace.fleet.cara_transaction: {state_dir: "{{ sd }}", action: advance,
       phase: verified, version: "0.9.0"}}
    - {name: fail, register: r_fail, carapace.fleet.cara_transaction: {state_dir: "{{ sd }}", action: fail,
       error: "backup failed: disk full", retryable: true}}
    - {name: resume, register: r_resume, carapace.fleet.cara_transaction: {state_dir: "{{ sd }}", action: resume,
       version: v0.9.0}}
    - {name: applying, register: r_applying, carapace.fleet.cara_transaction: {state_dir: "{{ sd }}", action: advance,
       phase: applying, facts: {backup: /var/backups/carapace/carapace-backup-v0.8.0.tar.gz}}}
    - {name: applied, register: r_applied, carapace.fleet.cara_transaction: {state_dir: "{{ sd }}", action: advance,
       phase: applied}}
    - name: the file as cara reads it after applied
      ansible.builtin.slurp: {src: "{{ sd }}/updates/transaction.json"}
      register: r_file
    - {name: clear, register: r_clear, carapace.fleet.cara_transaction: {state_dir: "{{ sd }}", action: clear}}
    - {name: clear again, register: r_clear_again, carapace.fleet.cara_transaction: {state_dir: "{{ sd }}", action: clear}}
    - name: Save the results for the test
      ansible.builtin.copy:
        dest: "{{ result_file }}"
        mode: "0600"
        content: "{{ {'create': r_create, 'downloading': r_downloading, 'downloaded': r_downloaded, 'verified': r_verified,
          'fail': r_fail, 'resume': r_resume, 'applying': r_applying, 'applied': r_applied, 'file': r_file,
          'clear': r_clear, 'clear_again': r_clear_again} | to_json }}"
"""


def run_playbook(tmp_path, text, extra_vars):
    """Run a whole playbook the way tests/support/playbook.py runs one task; returns (rc, results, output)."""
    work = tmp_path / "full-run"
    work.mkdir()
    (work / "play.yml").write_text(text)
    result_file = work / "result.json"
    (work / "vars.json").write_text(json.dumps(dict(extra_vars, result_file=str(result_file),
                                                    ansible_python_interpreter=sys.executable)))
    env = dict(os.environ, ANSIBLE_COLLECTIONS_PATH=COLLECTIONS, ANSIBLE_HOME=str(work / ".ansible"),
               ANSIBLE_LOCAL_TEMP=str(work / "tmp"), ANSIBLE_NOCOLOR="1", ANSIBLE_FORCE_COLOR="0",
               ANSIBLE_RETRY_FILES_ENABLED="0", ANSIBLE_DEPRECATION_WARNINGS="0")
    proc = subprocess.run([os.path.join(BIN, "ansible-playbook"), "-i", "localhost,", "-c", "local",
                           "-e", "@%s" % (work / "vars.json"), str(work / "play.yml")],
                          env=env, capture_output=True, text=True, timeout=300, check=False)
    results = json.loads(result_file.read_text()) if result_file.exists() else None
    return proc.returncode, results, proc.stdout + proc.stderr


def state_dir(tmp_path):
    path = tmp_path / "state"
    path.mkdir(mode=0o700)
    return path


def test_check_mode_then_create_then_idempotent(tmp_path):
    sd = state_dir(tmp_path)
    args = {"state_dir": str(sd), "action": "create", "version": "v0.9.0", "facts": {"run_id": "run-1"}}
    rc, res, out = run_module(tmp_path, MODULE, args, check=True, diff=True)
    assert rc == 0, out
    assert res["changed"] is True and not res.get("failed"), res
    assert res["transaction"]["version"] == "0.9.0" and res["transaction"]["phase"] == "created"
    assert res["diff"]["before"] is None and res["diff"]["after"]["id"] == res["transaction"]["id"]
    assert all(a.startswith("would ") for a in res["actions"])
    assert list(sd.iterdir()) == []  # no updates/, no lock file, no transaction
    assert "+++ after: %s/updates/transaction.json" % sd in out

    rc, res, out = run_module(tmp_path, MODULE, args)
    assert rc == 0, out
    assert res["changed"] is True and res["owner"] == "fleet" and res["resume_from"] == "created"
    path = sd / "updates" / "transaction.json"
    on_disk = json.loads(path.read_text())
    assert on_disk == res["transaction"] and list(on_disk) == CARA_KEYS + ["fleet"]
    assert on_disk["fleet"]["run_id"] == "run-1"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    written = path.read_bytes()

    rc, res, out = run_module(tmp_path, MODULE, dict(args, version="0.9.0"))
    assert rc == 0, out
    assert res["changed"] is False and res["transaction"] == on_disk
    assert path.read_bytes() == written


def test_bad_transition_fails_with_a_message_and_changes_nothing(tmp_path):
    sd = state_dir(tmp_path)
    txn.run(str(sd), "create", version="0.9.0")
    txn.run(str(sd), "advance", phase="applied")
    path = sd / "updates" / "transaction.json"
    before = path.read_bytes()
    rc, res, out = run_module(tmp_path, MODULE, {"state_dir": str(sd), "action": "advance", "phase": "downloading"})
    assert rc == 0, out  # ignore_errors: the result is saved
    assert res["failed"] is True and res["changed"] is False
    assert res["cause"] == "bad_transition" and res["retryable"] is False
    assert "already applied: there is no going back to downloading" in res["msg"]
    assert "action=create" in res["msg"]
    assert res["transaction"]["state"] == "applied" and res["owner"] == "fleet"
    assert path.read_bytes() == before


def test_full_run_create_to_applied_to_clear(tmp_path):
    sd = state_dir(tmp_path)
    (sd / "updates").mkdir(mode=0o700)
    (sd / "updates" / "cara-0.9.0").write_bytes(STAGED)
    (sd / "updates" / "cara-0.9.0.bundle").write_text("{}")
    digest = hashlib.sha256(STAGED).hexdigest()
    rc, r, out = run_playbook(tmp_path, FULL_RUN, {"state_dir": str(sd), "digest": digest})
    assert rc == 0, out
    assert all(r[k]["changed"] is True for k in ("create", "downloading", "downloaded", "verified", "fail", "resume",
                                                 "applying", "applied", "clear")), out
    assert [r[k]["transaction"]["phase"] for k in ("create", "downloading", "downloaded", "verified", "fail", "resume",
                                                   "applying", "applied")] == [
        "created", "downloading", "downloaded", "verified", "failed", "verified", "applying", "applied"]
    created = r["create"]["transaction"]
    assert r["applied"]["transaction"]["id"] == created["id"]
    assert r["downloaded"]["transaction"]["sha256"] == digest
    assert r["fail"]["transaction"]["lastError"] == "backup failed: disk full"
    assert r["fail"]["transaction"]["retryable"] is True
    assert r["resume"]["resume_from"] == "verified" and r["resume"]["transaction"]["attempt"] == 2
    assert digest in r["resume"]["resume_reason"]
    applied = json.loads(base64.b64decode(r["file"]["content"]))
    assert applied == r["applied"]["transaction"]
    assert list(applied)[:len(CARA_KEYS)] == CARA_KEYS
    assert (applied["state"], applied["retryable"], applied["attempt"]) == ("applied", False, 2)
    assert applied["stagedPath"] == "%s/updates/cara-0.9.0" % sd
    assert applied["fleet"]["run_id"] == "run-42" and applied["fleet"]["backup"].endswith("v0.8.0.tar.gz")
    assert [h["event"] for h in applied["fleet"]["history"]] == ["created", "failed", "resumed", "applied"]
    assert r["clear"]["transaction"] is None and r["clear_again"]["changed"] is False
    assert not (sd / "updates" / "transaction.json").exists()
    assert (sd / "updates" / "cara-0.9.0").read_bytes() == STAGED


def test_lock_held_by_another_process_fails_retryably(tmp_path):
    sd = state_dir(tmp_path)
    txn.run(str(sd), "create", version="0.9.0")
    lock = sd / "updates" / "update.lock.lock"
    holder = ("import fcntl, os, sys\nfd = os.open(sys.argv[1], os.O_RDWR)\nfcntl.flock(fd, fcntl.LOCK_EX)\n"
              "print('locked', flush=True)\nsys.stdin.read()\n")
    with subprocess.Popen([sys.executable, "-c", holder, str(lock)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          text=True) as proc:
        try:
            assert proc.stdout.readline().strip() == "locked"
            rc, res, out = run_module(tmp_path, MODULE, {"state_dir": str(sd), "action": "advance", "phase": "downloading"})
        finally:
            proc.stdin.close()
            proc.wait(timeout=30)
    assert rc == 0, out
    assert res["failed"] is True and res["cause"] == "lock_held" and res["retryable"] is True
    assert "another update is running on this host (lock %s held)" % lock in res["msg"]
    assert json.loads((sd / "updates" / "transaction.json").read_text())["phase"] == "created"
