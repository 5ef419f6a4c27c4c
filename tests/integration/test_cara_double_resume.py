"""The double's startup auto-resume of updates/transaction.json (spec 3.3-3.6, 10), both flavors.

"GitHub" is the loopback release server (fixture `release_server`), named to the double by the test-only variable
CARA_DOUBLE_GITHUB_URL; CARA_DOUBLE_START_LOG records what each start saw before the resume task ran.
"""
import hashlib
import json
import os
import stat
import time

import pytest

from cara_double import expected_asset_name
from release_factory import DEFAULT_REPO, double_assets, publish

ASSET = expected_asset_name()
V080_KEYS = ["id", "version", "assetName", "state", "attempt", "maxAttempts", "startedAtMs", "updatedAtMs",
             "stagedPath", "bundlePath", "sha256", "lastError", "phase", "retryable"]


def now_ms():
    return int(time.time() * 1000)


def write_tx(host, version, **fields):
    tx = {"id": "0b6d1c52-3f0e-4a6e-9f7e-2f1c0d9a8b7c", "version": version, "assetName": ASSET,
          "state": "in_progress", "attempt": 0, "maxAttempts": 3, "startedAtMs": now_ms() - 1000,
          "updatedAtMs": now_ms() - 1000, "stagedPath": None, "bundlePath": None, "sha256": None, "lastError": None,
          "phase": "created", "retryable": True, "operatorNote": {"kept": "?"}}
    tx.update(fields)
    path = host.state / "updates" / "transaction.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(tx, indent=2) + "\n")
    return path


def read_tx(path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


@pytest.fixture
def github(lab, release_server):
    """publish(tag) lays out the double's release `tag` (this platform's asset) on the loopback release server."""
    def publish_tag(tag, **kwargs):
        assets = double_assets(tag, asset_names=(ASSET,))
        publish(lab, str(release_server.root), DEFAULT_REPO, tag, assets, **kwargs)
        return assets[ASSET]
    publish_tag.server = release_server
    return publish_tag


def env_with(host, github=None, **extra):
    start_log = host.root / "starts.jsonl"
    return host.env(CARA_DOUBLE_GITHUB_URL=github.server.url if github else None, CARA_DOUBLE_START_LOG=str(start_log),
                    **extra)


def starts(host):
    path = host.root / "starts.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# -- v0.8.0: applies whatever GitHub serves, drops unknown keys, cleans every *.bak/*.old -------------------------

def test_v080_resume_applies_the_release_from_github(cara_hosts, github):
    host = cara_hosts("0.8.0")
    new_bytes = github("v0.9.0")
    old_bytes = host.binary.read_bytes()
    tx_path = write_tx(host, "0.9.0")
    before = json.loads(tx_path.read_text())
    proc = host.start(env=env_with(host, github))
    host.wait_for(lambda: not tx_path.exists(), timeout=30, what="the transaction to be applied and deleted")
    host.wait_for(lambda: "resumed pending update transaction" in host.stdout(proc), what="the resume log line")
    assert host.binary.read_bytes() == new_bytes != old_bytes
    assert stat.S_IMODE(host.binary.stat().st_mode) == 0o755
    assert not host.binary.with_name("cara.bak").exists()
    staged = host.state / "updates" / "cara-0.9.0"
    assert staged.read_bytes() == new_bytes and (host.state / "updates" / "cara-0.9.0.bundle").is_file()
    assert not (host.state / "updates" / "rollback.json").exists()  # v0.8.0 writes no rollback marker
    # each file: a HEAD by the release lookup (the double's stand-in for the GitHub API), then one GET
    assert [github.server.downloads(n) for n in (ASSET, ASSET + ".bundle", "SHA256SUMS.txt")] == [2, 2, 2]
    # the daemon keeps running its old code until restarted
    assert json.loads(host.get("/health")[2])["version"] == "0.8.0"
    [seen] = starts(host)
    assert (seen["version"], seen["flavor"], seen["pid"], seen["embedded"]) == ("0.8.0", "v0.8.0", proc.pid, False)
    assert seen["transaction"] == before and seen["exe"] == os.path.realpath(host.binary)
    audit = [json.loads(line) for line in (host.state / "audit.jsonl").read_text().splitlines()]
    assert audit[-1]["event"] == "update_resume_applied" and audit[-1]["targetVersion"] == "0.9.0"
    assert host.stop(proc) == 0
    host.binary.chmod(0o755)
    assert host.run("--version").stdout == "cara 0.9.0\n"  # the next start runs the new release


def test_v080_resume_without_github_is_a_retryable_failure(cara_hosts):
    """Nothing answers for GitHub: the attempt counts, the failure is retryable, unknown keys are gone."""
    host = cara_hosts("0.8.0")
    tx_path = write_tx(host, "0.9.0")
    proc = host.start(env=env_with(host))
    failed = host.wait_for(lambda: (read_tx(tx_path) or {}).get("state") == "failed" and read_tx(tx_path),
                           what="the first attempt to fail")
    assert list(failed) == V080_KEYS  # re-persisted as the struct: operatorNote dropped
    assert (failed["attempt"], failed["retryable"], failed["phase"]) == (1, True, "failed")
    assert failed["lastError"].startswith("failed to fetch release info: error sending request for url "
                                          "(https://api.github.com/repos/puremachinery/carapace/releases/tags/v0.9.0)")
    host.wait_for(lambda: '"backoff_seconds": 5' in host.stdout(proc), what="the 5 s backoff")
    assert host.stop(proc) == 0  # shutdown ends the backoff wait
    assert read_tx(tx_path)["attempt"] == 1


def test_v080_resume_stops_when_the_budget_is_spent(cara_hosts):
    host = cara_hosts("0.8.0")
    tx_path = write_tx(host, "0.9.0", state="failed", phase="failed", attempt=2, lastError="earlier")
    proc = host.start(env=env_with(host))
    host.wait_for(lambda: "failed to resume pending update transaction" in host.stdout(proc), what="the give-up")
    tx = read_tx(tx_path)
    assert (tx["state"], tx["attempt"], tx["retryable"]) == ("failed", 3, True)
    line = [json.loads(x) for x in host.stdout(proc).splitlines() if "failed to resume" in x][0]
    assert line["level"] == "WARN" and line["fields"]["error"].endswith("(retry budget exhausted at attempt 3/3)")
    host.stop(proc)
    before = tx_path.read_bytes()
    proc = host.start(env=env_with(host))  # attempt 3 of 3: no longer resume-pending, left alone
    host.wait_for(lambda: len(starts(host)) == 2, what="the second start")
    assert host.stop(proc) == 0 and tx_path.read_bytes() == before


def test_v080_checksum_mismatch_is_terminal(cara_hosts, github):
    host = cara_hosts("0.8.0")
    github("v0.9.0", sums_text="%s  %s\n" % ("0" * 64, ASSET))
    old_bytes = host.binary.read_bytes()
    tx_path = write_tx(host, "0.9.0")
    proc = host.start(env=env_with(host, github))
    tx = host.wait_for(lambda: (read_tx(tx_path) or {}).get("state") == "failed" and read_tx(tx_path),
                       what="the verification failure")
    assert tx["retryable"] is False and tx["lastError"].startswith("SHA-256 mismatch: expected " + "0" * 64)
    assert host.binary.read_bytes() == old_bytes
    assert host.stop(proc) == 0


def test_v080_unknown_state_does_not_parse(cara_hosts, github):
    host = cara_hosts("0.8.0")
    github("v0.9.0")
    tx_path = write_tx(host, "0.9.0", state="paused")
    before = tx_path.read_bytes()
    proc = host.start(env=env_with(host, github))
    host.wait_for(lambda: "failed to resume pending update transaction" in host.stdout(proc), what="the parse error")
    assert "unknown variant `paused`" in host.stdout(proc)
    assert tx_path.read_bytes() == before and github.server.downloads(ASSET) == 0
    assert host.stop(proc) == 0


def test_resume_runs_inside_the_embedded_gateway_of_verify(cara_hosts, llm):
    """verify's embedded gateway runs the same startup, auto-resume included (spec 3.6); a slow chat (4 s) keeps it
    up well past the resume task's 1 s delay."""
    host = cara_hosts("0.8.0")
    host.write_config({"gateway": {"port": host.port, "auth": {"mode": "none"}}})
    tx_path = write_tx(host, "0.9.0")
    llm.set_faults(delay_s=4.0)
    result = host.run("verify", "--outcome", "local-chat", env=env_with(host))
    assert result.returncode == 0, result.stdout + result.stderr
    [seen] = starts(host)
    assert seen["embedded"] is True and seen["transaction"]["attempt"] == 0
    tx = read_tx(tx_path)
    assert (tx["state"], tx["attempt"]) == ("failed", 1) and "operatorNote" not in tx


# -- HEAD: the 15-minute confirmation gate, unknown keys kept --------------------------------------------------------

def test_head_stale_confirmation_is_a_terminal_failure(cara_hosts, github):
    host = cara_hosts("0.9.0")
    github("v0.9.1")
    old_bytes = host.binary.read_bytes()
    tx_path = write_tx(host, "0.9.1", phase="verified", attempt=1, applyConfirmedUntilMs=now_ms() - 1000)
    proc = host.start(env=env_with(host, github))
    tx = host.wait_for(lambda: (read_tx(tx_path) or {}).get("state") == "failed" and read_tx(tx_path),
                       what="the stale transaction to be marked failed")
    assert tx["lastError"] == ("stale update transaction 0b6d1c52-3f0e-4a6e-9f7e-2f1c0d9a8b7c requires fresh operator "
                               "confirmation before applying; rerun `cara update` to resume intentionally")
    assert (tx["retryable"], tx["phase"], tx["attempt"]) == (False, "failed", 1)  # no attempt spent
    assert tx["operatorNote"] == {"kept": "?"} and "applyConfirmedUntilMs" in tx
    assert host.binary.read_bytes() == old_bytes and github.server.downloads(ASSET) == 0
    host.wait_for(lambda: "failed to resume pending update transaction" in host.stdout(proc), what="the log line")
    assert host.stop(proc) == 0


def test_head_unknown_state_reads_as_failed(cara_hosts, github):
    """HEAD reads an unknown state as failed: failed + retryable + budget left is resume-pending, then stale."""
    host = cara_hosts("0.9.0")
    tx_path = write_tx(host, "0.9.1", state="suspended", phase="teleporting")
    proc = host.start(env=env_with(host, github))
    tx = host.wait_for(lambda: (read_tx(tx_path) or {}).get("state") == "failed" and read_tx(tx_path),
                       what="the transaction to be rewritten")
    assert tx["retryable"] is False and "requires fresh operator confirmation" in tx["lastError"]
    assert tx["operatorNote"] == {"kept": "?"}
    assert host.stop(proc) == 0


def test_head_confirmed_resume_applies_and_keeps_a_rollback_backup(cara_hosts, github):
    host = cara_hosts("0.9.0")
    new_bytes = github("v0.9.1")
    old_bytes = host.binary.read_bytes()
    tx_path = write_tx(host, "0.9.1", applyConfirmedUntilMs=now_ms() + 15 * 60 * 1000)
    proc = host.start(env=env_with(host, github))
    host.wait_for(lambda: not tx_path.exists(), timeout=30, what="the transaction to be applied")
    backup = host.binary.with_name("cara.bak")
    assert host.binary.read_bytes() == new_bytes and backup.read_bytes() == old_bytes
    marker = json.loads((host.state / "updates" / "rollback.json").read_text())
    assert marker["startupState"] == "pending" and marker["binaryPath"] == os.path.realpath(host.binary)
    assert marker["backupSha256"] == hashlib.sha256(old_bytes).hexdigest()
    assert marker["sha256"] == hashlib.sha256(new_bytes).hexdigest()
    assert host.stop(proc) == 0
