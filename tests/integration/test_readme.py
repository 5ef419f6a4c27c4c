"""The README's commands, run as written (issue 13 item 5), against a local fleet like the demo's: the `## Use` bash
block line by line, with the README's own `site.yml` example filled in with this fleet's release server and trust
root. Also what an operator meets around them: the drill picks its canary and refuses clearly (item 4), a passing
drill prints no error (item 8), errors name the variables to set (item 9), the service script needs no PATH (item 11).
"""

import os
import re
import shutil
import subprocess

import json5
import pytest
import yaml

from fleet import ROOT, LocalFleet


@pytest.fixture
def fleet(tmp_path, releases):
    # The operator's group_vars: the README's drill release (v0.9.1) never gets ready, and the default 120 s
    # deadline would only make the test wait to see its gate fail.
    local = LocalFleet(tmp_path / "f", releases, hosts=2, install="v0.8.0",
                       group_vars={"cara_upgrade_health_timeout": 20})
    yield local
    local.stop()


def readme():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        return f.read()


def use_commands():
    """The commands of the first bash block under `## Use`, continuation lines joined, comments dropped."""
    section = readme().split("## Use\n", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    commands, current = [], ""
    for line in block.splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        current += line.rstrip("\\").strip() + " "
        if not line.endswith("\\"):
            commands.append(current.strip())
            current = ""
    return commands


def site_example():
    """The README's site.yml example (the yaml block that starts with `# site.yml`)."""
    for block in re.findall(r"```yaml\n(.*?)```", readme(), re.S):
        if block.startswith("# site.yml"):
            return yaml.safe_load(block)
    raise AssertionError("README.md has no site.yml example")


def run(fleet, command):
    """One README command in the operator's directory (its inventory, site.yml, release notes; HOME there too, so
    the default lock and release cache are this fleet's)."""
    env = dict(fleet._env(), HOME=fleet.base)  # pylint: disable=protected-access
    # The window's async job file: with `-b` the status check expands ~ from root's passwd entry (/root), the job
    # wrapper from HOME; on a real host both are root's home. An absolute async dir keeps this HOME's.
    env["ANSIBLE_ASYNC_DIR"] = os.path.join(fleet.base, ".ansible_async")
    proc = subprocess.run(["bash", "-c", command], cwd=fleet.base, env=env, capture_output=True, text=True,
                          timeout=900, check=False)
    out = proc.stdout + proc.stderr
    fleet.runs += 1
    with open(os.path.join(fleet.base, "readme-%d.log" % fleet.runs), "w", encoding="utf-8") as f:
        f.write(command + "\n" + out)
    return proc.returncode, out


def test_readme_commands_run_as_written(fleet, releases):
    commands = use_commands()
    assert [c.split()[1] if c.split()[1].startswith("carapace.") else c.split()[3] for c in commands] == [
        "carapace.fleet.upgrade", "carapace.fleet.rollback_drill", "carapace.fleet.rollback",
        "carapace.fleet.verify_release"]
    site = site_example()
    assert sorted(site) == ["cara_release_base_url", "cara_trusted_root"]
    site["cara_release_base_url"] = fleet.server.url + "/{repo}/releases/download/{tag}"
    site["cara_trusted_root"] = os.path.join(releases, "trusted_root.json")
    with open(os.path.join(fleet.base, "site.yml"), "w", encoding="utf-8") as f:
        yaml.safe_dump(site, f)
    os.symlink(fleet.inventory, os.path.join(fleet.base, "inventory"))
    shutil.copy(os.path.join(releases, "puremachinery", "carapace", "docs", "releases", "v0.9.0.md"),
                os.path.join(fleet.base, "v0.9.0.md"))
    reports = os.path.join(fleet.base, "carapace-fleet-report")

    upgrade, drill, rollback, verify = commands
    rc, out = run(fleet, upgrade)
    assert rc == 0, out[-3000:]
    for name in ("cara-01", "cara-02"):
        assert fleet.health(name)["version"] == "0.9.0"
    assert fleet.report(reports, kind="upgrade")["summary"]["ok"] is True

    # item 11: the service script the role wrote finds cara without the caller's PATH
    hv = fleet.hostvars()["cara-02"]
    script = os.path.join(hv["cara_run_dir"], "cara-service")
    # no PATH at all (env -i); the double is a Python script (#!/usr/bin/env python3) that needs json5, which only
    # PYTHONPATH provides here - the real cara is one static binary
    site = os.path.dirname(os.path.dirname(json5.__file__))
    for action in ("stop", "start"):
        proc = subprocess.run(["env", "-i", "PYTHONPATH=" + site, script, action], capture_output=True, text=True,
                              timeout=120, check=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    assert fleet.health("cara-02")["version"] == "0.9.0"

    # item 4: the drill with the release every host runs already is refused, clearly, before anything changes
    rc, out = run(fleet, drill.replace("v0.9.1", "v0.9.0"))
    assert rc == 2
    assert "already runs v0.9.0" in out and "cara_drill_version" in out and "cara_drill_host" in out

    # items 4, 8: the README's drill: the faulty v0.9.1 fails its gate on the first host, is rolled back, and the drill
    # passes with that as its evidence, printing no error
    rc, out = run(fleet, drill)
    assert rc == 0, out[-3000:]
    assert "[ERROR]" not in out, out[-3000:]
    assert "Rollback drill passed on cara-01" in out and "failed (automatic rollback)" in out
    report = fleet.report(reports, kind="drill")
    assert report["summary"]["ok"] is True and report["hosts"][0]["details"]["drill"]["version_restored"]
    assert fleet.health("cara-01")["version"] == "0.9.0"

    rc, out = run(fleet, rollback)
    assert rc == 0, out[-3000:]
    assert fleet.health("cara-01")["version"] == "0.8.0" and fleet.health("cara-02")["version"] == "0.9.0"
    assert fleet.report(reports, kind="rollback")["hosts"][0]["to"] == "v0.8.0"
    assert fleet.report(reports, kind="upgrade")["summary"]["ok"] is True  # the upgrade's report is still there

    rc, out = run(fleet, verify)
    assert rc == 0, out[-3000:]
    assert os.path.isfile(os.path.join(reports, "verify", "latest", "release-verify-v0.9.0.json"))
    assert not os.path.exists(os.path.join(fleet.base, ".cache", "carapace-fleet", "run.lock"))
    fleet.assert_starts_terminal()


def test_errors_name_the_variables_to_set(fleet):
    """Item 9: a preview, a missing release notes file, an unreachable mirror, a wrong trust root: each message names
    the role variable an operator sets, not a module option; no host is touched."""
    rc, out = fleet.playbook("upgrade", cara_upgrade_version="v1.0.0-preview1",
                             cara_known_tags=["v0.8.0", "v1.0.0-preview1"])
    assert rc == 2 and "cara_upgrade_allow_preview: true" in out and "allow_preview=true" not in out

    rc, out = fleet.playbook("upgrade", cara_upgrade_version="v0.9.0",
                             cara_upgrade_release_notes=os.path.join(fleet.base, "missing.md"))
    assert rc == 2 and "Check cara_upgrade_release_notes" in out and "Check src" not in out

    rc, out = fleet.playbook("upgrade", cara_upgrade_version="v0.9.0",
                             cara_release_base_url="http://127.0.0.1:9/{repo}/releases/download/{tag}")
    assert rc == 2 and "(cara_release_base_url)" in out and "(base_url)" not in out

    # the releases are signed under the test Sigstore; without cara_trusted_root the pinned production root is used
    rc, out = fleet.playbook("upgrade", cara_upgrade_version="v0.9.0", cara_trusted_root="")
    assert rc == 2
    message = [line for line in out.splitlines() if "The likely cause: cara_trusted_root" in line]
    assert message, out[-3000:]
    assert message[0].index("cara_trusted_root") < message[0].index("supply-chain attack")
    for name in ("cara-01", "cara-02"):
        assert fleet.active(name) == "v0.8.0"
    assert fleet.report(kind="upgrade")["summary"]["refused"] == 2


PLAYBOOK_VARS = ("cara_drill_host", "cara_drill_version", "cara_drill_report_dir", "cara_upgrade_serial",
                 "cara_upgrade_max_fail_percentage", "cara_rollback_serial", "cara_verify_report_dir",
                 "cara_upgrade_window", "cara_upgrade_soak", "cara_notify_webhook_url")


def test_the_docs_an_operator_reads():
    """Item 10: every playbook-level variable in the README and in its playbook's header, the ansible-core requirement
    stated and pinned, role docs that render without raw lookups, and no make targets in what ansible-doc shows."""
    text = readme()
    for name in PLAYBOOK_VARS:
        assert "`%s`" % name in text, name
    assert "ansible-core 2.19" in text
    with open(os.path.join(ROOT, "requirements.txt"), encoding="utf-8") as f:
        assert re.search(r"^ansible-core>=2\.19,<2\.20$", f.read(), re.M)
    for playbook, names in (("upgrade", ("cara_upgrade_serial", "cara_upgrade_max_fail_percentage", "cara_upgrade_window",
                                         "cara_upgrade_soak", "cara_notify_webhook_url")),
                            ("rollback", ("cara_rollback_serial",)),
                            ("rollback_drill", ("cara_drill_host", "cara_drill_version", "cara_drill_report_dir")),
                            ("verify_release", ("cara_verify_report_dir",))):
        with open(os.path.join(ROOT, "playbooks", playbook + ".yml"), encoding="utf-8") as f:
            header = "".join(line for line in f if line.startswith("#"))
        for name in names:
            assert name in header, (playbook, name)
    env = dict(os.environ, ANSIBLE_COLLECTIONS_PATH=os.path.join(ROOT, ".collections"), ANSIBLE_NOCOLOR="1")
    docs = []
    for kind, names in (("role", ("cara_upgrade", "cara_rollback", "cara_service")),
                        ("module", ("cara_release", "cara_report", "cara_health", "cara_switch"))):
        for name in names:
            proc = subprocess.run([os.path.join(ROOT, ".venv", "bin", "ansible-doc")] + (["-t", "role"] if kind == "role" else [])
                                  + ["carapace.fleet." + name], env=env, capture_output=True, text=True, timeout=120,
                                  check=False)
            assert proc.returncode == 0, proc.stderr
            docs.append(proc.stdout)
            if kind == "role":  # the defaults as an operator reads them (module examples do use Jinja)
                assert "lookup(" not in proc.stdout and "{{" not in proc.stdout, name
    shown = "\n".join(docs)
    assert not re.search(r"make (test|demo|doc|lint|unit|integration|sanity|molecule|bench|refresh-trust-root)\b", shown)
