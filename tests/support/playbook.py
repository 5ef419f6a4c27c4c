"""Run real `ansible-playbook` processes against localhost with the collection from this working tree."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COLLECTIONS = os.path.join(ROOT, ".collections")
BIN = os.path.dirname(sys.executable)

TASK_PLAYBOOK = """\
- name: Run one module task and save its result
  hosts: localhost
  gather_facts: false
  tasks:
    - name: The task under test
      {module}: "{{{{ module_args }}}}"
      register: outcome
      ignore_errors: "{{{{ keep_going }}}}"
    - name: Save the result for the test
      ansible.builtin.copy:
        content: "{{{{ outcome | to_json }}}}"
        dest: "{{{{ result_file }}}}"
        mode: "0600"
      check_mode: false
"""


def run_module(tmp_path, module, args, *, check=False, diff=False, keep_going=True, verbosity=0):
    """Run `module` with `args` in a playbook on localhost. Returns (rc, result dict or None, stdout+stderr)."""
    work = tmp_path / ("run-%d" % len(list(tmp_path.glob("run-*"))))
    work.mkdir()
    (work / "play.yml").write_text(TASK_PLAYBOOK.format(module=module))
    result_file = work / "result.json"
    (work / "vars.json").write_text(json.dumps({
        "module_args": args, "keep_going": keep_going, "result_file": str(result_file),
        "ansible_python_interpreter": sys.executable,
    }))
    cmd = [os.path.join(BIN, "ansible-playbook"), "-i", "localhost,", "-c", "local", "-e", "@%s" % (work / "vars.json"),
           str(work / "play.yml")]
    if check:
        cmd.append("--check")
    if diff:
        cmd.append("--diff")
    if verbosity:
        cmd.append("-" + "v" * verbosity)
    env = dict(os.environ, ANSIBLE_COLLECTIONS_PATH=COLLECTIONS, ANSIBLE_HOME=str(work / ".ansible"),
               ANSIBLE_LOCAL_TEMP=str(work / "tmp"), ANSIBLE_NOCOLOR="1", ANSIBLE_FORCE_COLOR="0",
               ANSIBLE_RETRY_FILES_ENABLED="0", ANSIBLE_DEPRECATION_WARNINGS="0")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    result = json.loads(result_file.read_text()) if result_file.exists() else None
    return proc.returncode, result, proc.stdout + proc.stderr


def run_tasks(tmp_path, tasks, *, environment=None, verbosity=0):
    """Run several module tasks in ONE ansible-playbook run on localhost (each costs seconds to start).

    `tasks`: [{"name": unique str, "module": FQCN, "args": dict, "check_mode": bool (optional), "diff": bool
    (optional)}]. Every task runs with ignore_errors, so a failing one does not stop the rest. `environment` is the
    play's `environment:`. Returns (rc, {name: registered result}, stdout+stderr).
    """
    work = tmp_path / ("tasks-%d" % len(list(tmp_path.glob("tasks-*"))))
    work.mkdir()
    result_file = work / "results.json"
    play_tasks = []
    for i, task in enumerate(tasks):
        entry = {"name": task["name"], task["module"]: "{{ task_args[%d] }}" % i, "register": "result_%d" % i,
                 "ignore_errors": True}
        for key in ("check_mode", "diff"):
            if key in task:
                entry[key] = task[key]
        play_tasks.append(entry)
    registered = ["result_%d" % i for i in range(len(tasks))]
    play_tasks.append({
        "name": "Save the results for the test",
        "ansible.builtin.copy": {
            "content": "{{ dict(task_names | zip([%s])) | to_json }}" % ", ".join(registered),
            "dest": "{{ result_file }}", "mode": "0600"},
        "check_mode": False,
    })
    play = [{"name": "Run module tasks and save their results", "hosts": "localhost", "gather_facts": False,
             "environment": environment or {}, "tasks": play_tasks}]
    (work / "play.yml").write_text(json.dumps(play, indent=2))  # JSON is YAML
    (work / "vars.json").write_text(json.dumps({
        "task_args": [task.get("args") or {} for task in tasks], "task_names": [task["name"] for task in tasks],
        "result_file": str(result_file), "ansible_python_interpreter": sys.executable,
    }))
    cmd = [os.path.join(BIN, "ansible-playbook"), "-i", "localhost,", "-c", "local", "-e", "@%s" % (work / "vars.json"),
           str(work / "play.yml")]
    if verbosity:
        cmd.append("-" + "v" * verbosity)
    env = dict(os.environ, ANSIBLE_COLLECTIONS_PATH=COLLECTIONS, ANSIBLE_HOME=str(work / ".ansible"),
               ANSIBLE_LOCAL_TEMP=str(work / "tmp"), ANSIBLE_REMOTE_TEMP=str(work / "remote-tmp"),
               ANSIBLE_NOCOLOR="1", ANSIBLE_FORCE_COLOR="0", ANSIBLE_RETRY_FILES_ENABLED="0",
               ANSIBLE_DEPRECATION_WARNINGS="0")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
    results = json.loads(result_file.read_text()) if result_file.exists() else None
    return proc.returncode, results, proc.stdout + proc.stderr
