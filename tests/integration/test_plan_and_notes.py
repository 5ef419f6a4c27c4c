"""The cara_upgrade_path filter and the cara_release_notes module run for real by ansible-playbook on localhost."""

import json
import os
import subprocess
import sys

import pytest

from playbook import BIN, COLLECTIONS, run_module
from release_factory import DEFAULT_REPO, release_notes

KNOWN = ["v0.7.0", "v0.8.0", "v0.9.0", "v0.9.1", "v0.9.2-preview1"]

PLAN_PLAYBOOK = """\
- name: Plan upgrades with the filter, on the controller
  hosts: localhost
  gather_facts: false
  vars:
    known: %(known)s
    cases:
      chain: "{{ 'v0.7.0' | carapace.fleet.cara_upgrade_path('v0.9.0', known) }}"
      next_line: "{{ '0.8.0' | carapace.fleet.cara_upgrade_path('v0.9.0', known) }}"
      same: "{{ '0.9.0' | carapace.fleet.cara_upgrade_path('v0.9.0', known) }}"
      preview: "{{ '0.9.1' | carapace.fleet.cara_upgrade_path('v0.9.2-preview1', known) }}"
      preview_allowed: "{{ '0.9.1' | carapace.fleet.cara_upgrade_path('v0.9.2-preview1', known, allow_preview=true) }}"
      downgrade: "{{ '0.9.1' | carapace.fleet.cara_upgrade_path('v0.9.0', known) }}"
      downgrade_allowed: "{{ '0.9.1' | carapace.fleet.cara_upgrade_path('v0.9.0', known, allow_downgrade=true) }}"
      no_chain: "{{ '0.7.0' | carapace.fleet.cara_upgrade_path('v0.9.0', known, allow_chain=false) }}"
      unknown: "{{ '0.8.0' | carapace.fleet.cara_upgrade_path('v0.9.7', known) }}"
  tasks:
    - name: Plan every case
      ansible.builtin.set_fact:
        plans: "{{ cases }}"
    - name: Save the plans for the test
      ansible.builtin.copy:
        content: "{{ plans | to_json }}"
        dest: "%(result)s"
        mode: "0600"
    - name: The plan's reason is the operator's message
      ansible.builtin.debug:
        msg: "{{ plans.chain.reason }}"
    - name: Refuse a downgrade the way a role does
      ansible.builtin.assert:
        that: plans.downgrade.steps is not none
        fail_msg: "{{ plans.downgrade.reason }}"
        quiet: true
"""

NOTES_PLAYBOOK = """\
- name: Gate on release notes from files and URLs
  hosts: localhost
  gather_facts: false
  tasks:
    - name: Complete notes from a path, in check mode
      carapace.fleet.cara_release_notes:
        src: "%(path)s"
        tag: v0.8.0
        ack_breaking: v0.8.0
      check_mode: true
      register: from_path
    - name: Complete notes from a file URL, no breaking changes
      carapace.fleet.cara_release_notes:
        src: "file://%(path_070)s"
        tag: v0.7.0
      register: from_file_url
    - name: Complete notes over HTTP, breaking changes acknowledged
      carapace.fleet.cara_release_notes:
        src: "%(url)s"
        tag: v0.9.0
        ack_breaking: v0.9.0
      register: from_url
    - name: The same without the acknowledgement
      carapace.fleet.cara_release_notes:
        src: "%(url)s"
        tag: v0.9.0
      register: unacknowledged
      ignore_errors: true
    - name: Notes that are not there
      carapace.fleet.cara_release_notes:
        src: "%(missing_url)s"
        tag: v0.9.0
      register: not_found
      ignore_errors: true
    - name: Save the results for the test
      ansible.builtin.copy:
        content: "{{ {'from_path': from_path, 'from_file_url': from_file_url, 'from_url': from_url,
                      'unacknowledged': unacknowledged, 'not_found': not_found} | to_json }}"
        dest: "%(result)s"
        mode: "0600"
      check_mode: false
"""


def run_playbook(tmp_path, text):
    """Run a playbook on localhost with the collection of this working tree; (rc, stdout + stderr)."""
    work = tmp_path / ("play-%d" % len(list(tmp_path.glob("play-*"))))
    work.mkdir()
    (work / "play.yml").write_text(text)
    env = dict(os.environ, ANSIBLE_COLLECTIONS_PATH=COLLECTIONS, ANSIBLE_HOME=str(work / ".ansible"),
               ANSIBLE_LOCAL_TEMP=str(work / "tmp"), ANSIBLE_NOCOLOR="1", ANSIBLE_FORCE_COLOR="0",
               ANSIBLE_RETRY_FILES_ENABLED="0", ANSIBLE_DEPRECATION_WARNINGS="0")
    cmd = [os.path.join(BIN, "ansible-playbook"), "-i", "localhost,", "-c", "local",
           "-e", "ansible_python_interpreter=%s" % sys.executable, str(work / "play.yml")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.fixture
def notes_server(release_server):
    """The release server with docs/releases/<tag>.md (complete) and docs/releases-incomplete/<tag>.md."""
    for kind, complete in (("releases", True), ("releases-incomplete", False)):
        base = os.path.join(release_server.root, *DEFAULT_REPO.split("/"), "docs", kind)
        os.makedirs(base)
        for tag in ("v0.7.0", "v0.8.0", "v0.9.0"):
            with open(os.path.join(base, tag + ".md"), "w", encoding="utf-8") as f:
                f.write(release_notes(tag, complete))
    return release_server


def notes_url(server, tag, kind="releases"):
    return "%s/%s/docs/%s/%s.md" % (server.url, DEFAULT_REPO, kind, tag)


def notes_path(server, tag, kind="releases"):
    return os.path.join(server.root, *DEFAULT_REPO.split("/"), "docs", kind, tag + ".md")


def test_filter_plans_in_a_playbook_and_refusals_fail_an_assert(tmp_path):
    result = tmp_path / "plans.json"
    rc, out = run_playbook(tmp_path, PLAN_PLAYBOOK % {"known": json.dumps(KNOWN), "result": result})
    plans = json.loads(result.read_text())
    assert plans["chain"]["steps"] == ["v0.8.0", "v0.9.0"]
    assert plans["chain"]["chain"] is True and plans["chain"]["in_contract"] is True
    assert plans["next_line"]["steps"] == ["v0.9.0"] and plans["next_line"]["chain"] is False
    assert plans["same"]["steps"] == []
    assert plans["preview"]["steps"] is None and plans["preview"]["cause"] == "preview"
    assert plans["preview_allowed"]["steps"] == ["v0.9.2-preview1"] and plans["preview_allowed"]["in_contract"] is False
    assert plans["downgrade"]["steps"] is None and plans["downgrade"]["cause"] == "downgrade"
    assert plans["downgrade_allowed"]["steps"] == ["v0.9.0"]
    assert plans["no_chain"]["steps"] is None and "v0.8.0" in plans["no_chain"]["reason"]
    assert plans["unknown"]["cause"] == "unknown_target"
    assert "Known tags: v0.7.0, v0.8.0, v0.9.0, v0.9.1, v0.9.2-preview1" in plans["unknown"]["reason"]
    # the refusal stops the play with its reason
    assert rc == 2, out
    assert "v0.9.0 is older than the installed v0.9.1" in out
    assert "planned as a chain of N-1 -> N upgrades: v0.8.0 -> v0.9.0" in out


def test_notes_module_from_path_file_url_and_http(tmp_path, notes_server):
    result = tmp_path / "notes.json"
    rc, out = run_playbook(tmp_path, NOTES_PLAYBOOK % {
        "path": notes_path(notes_server, "v0.8.0"), "path_070": notes_path(notes_server, "v0.7.0"),
        "url": notes_url(notes_server, "v0.9.0"), "missing_url": notes_url(notes_server, "v0.9.9"),
        "result": result})
    assert rc == 0, out
    res = json.loads(result.read_text())

    from_path = res["from_path"]
    assert from_path["changed"] is False and not from_path.get("failed")
    assert from_path["missing"] == [] and from_path["acknowledged"] is True
    assert "Built-in pricing is removed" in from_path["breaking"]
    assert list(from_path["sections"]) == ["Summary", "Breaking Changes", "Migration Steps", "Rollback Steps",
                                           "Security", "Verification", "Known Caveats"]

    assert res["from_file_url"]["breaking"] is None and res["from_file_url"]["changed"] is False

    from_url = res["from_url"]
    assert not from_url.get("failed") and from_url["tag"] == "v0.9.0" and from_url["acknowledged"] is True
    assert "--model" in from_url["breaking"]

    unack = res["unacknowledged"]
    assert unack["failed"] is True and unack["cause"] == "breaking_unacknowledged"
    assert "`cara_upgrade_ack_breaking: v0.9.0`" in unack["msg"]
    assert unack["sections"]["Summary"] == "Carapace v0.9.0 (test double release)."

    assert res["not_found"]["failed"] is True and res["not_found"]["cause"] == "not_found"
    assert "HTTP 404" in res["not_found"]["msg"]
    assert notes_server.downloads("v0.9.0.md") == 2


def test_gate_failure_output_names_sections_and_next_steps(tmp_path, notes_server):
    args = {"src": notes_url(notes_server, "v0.9.0", "releases-incomplete"), "tag": "v0.9.0"}
    rc, res, out = run_module(tmp_path, "carapace.fleet.cara_release_notes", args, keep_going=False)
    assert rc == 2
    assert res is None  # the play stopped at the gate
    assert "lack the required sections Rollback Steps, Verification" in out
    assert "docs/releases/v0.9.0.md" in out
    assert "cara_upgrade_ack_breaking: v0.9.0" in out
    assert "Non-interactive `cara setup` requires `--model`" in out


def test_ansible_doc_renders_the_filter_and_the_module():
    env = dict(os.environ, ANSIBLE_COLLECTIONS_PATH=COLLECTIONS, ANSIBLE_NOCOLOR="1")
    doc = os.path.join(BIN, "ansible-doc")
    proc = subprocess.run([doc, "-t", "filter", "--json", "carapace.fleet.cara_upgrade_path"], env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    filter_doc = json.loads(proc.stdout)["carapace.fleet.cara_upgrade_path"]
    assert set(filter_doc["doc"]["options"]) == {"_input", "target", "known_tags", "allow_preview", "allow_downgrade",
                                                 "allow_chain"}
    assert "steps" in filter_doc["return"]["_value"]["contains"]
    proc = subprocess.run([doc, "--json", "carapace.fleet.cara_release_notes"], env=env, capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    module_doc = json.loads(proc.stdout)["carapace.fleet.cara_release_notes"]
    assert set(module_doc["doc"]["options"]) == {"src", "tag", "ack_breaking", "required_sections", "timeout",
                                                 "retries", "validate_certs"}
    assert set(module_doc["doc"]["attributes"]) == {"check_mode", "diff_mode", "idempotent"}


@pytest.mark.parametrize("fault,cause,said", [
    ({"status": 404}, "not_found", "HTTP 404"),
    ({"status": 503}, "http_error", "503"),
    ({"delay": 10.0}, "timeout", "took longer than timeout=2s"),
])
def test_notes_http_failures_through_the_release_server(tmp_path, notes_server, fault, cause, said):
    """The notes gate on a server that fails (the release server's own faults): a cause per failure, the URL named,
    and the play stopped."""
    notes_server.faults["v0.9.0.md"] = fault
    url = notes_url(notes_server, "v0.9.0")
    rc, res, out = run_module(tmp_path, "carapace.fleet.cara_release_notes",
                              {"src": url, "tag": "v0.9.0", "ack_breaking": "v0.9.0", "timeout": 2})
    assert rc == 0 and res["failed"] is True, out
    assert res["cause"] == cause and said in res["msg"] and url in res["msg"], res["msg"]


def test_notes_connection_refused(tmp_path):
    rc, res, out = run_module(tmp_path, "carapace.fleet.cara_release_notes",
                              {"src": "http://127.0.0.1:9/v0.9.0.md", "tag": "v0.9.0", "timeout": 5})
    assert rc == 0 and res["failed"] is True and res["cause"] == "connection_error", out
