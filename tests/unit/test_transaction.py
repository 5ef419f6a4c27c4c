"""The update transaction state machine (module_utils/_transaction.py) against cara's own rules (contract section 3)."""

import hashlib
import json
import os
import re
import stat
import subprocess
import sys
import uuid

import pytest

from ansible_collections.carapace.fleet.plugins.module_utils import _transaction as txn
from ansible_collections.carapace.fleet.plugins.module_utils._transaction import TransactionError

# --- cara's load-time validation (contract section 3.2), written from the spec, independent of the implementation ---
CARA_KEYS = ["id", "version", "assetName", "state", "attempt", "maxAttempts", "startedAtMs", "updatedAtMs", "stagedPath",
             "bundlePath", "sha256", "lastError", "phase", "retryable", "applyConfirmedUntilMs"]
CARA_ASSETS = {"cara-x86_64-linux", "cara-aarch64-linux", "cara-x86_64-darwin", "cara-aarch64-darwin",
               "cara-x86_64-windows.exe"}
CARA_STATES = {"in_progress", "applied", "failed"}
CARA_PHASES = {"created", "downloading", "downloaded", "verified", "applying", "applied", "failed"}


def _u(value):
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def cara_rejects(state_dir, path=None):
    """Why cara would refuse the transaction file on load (empty list: it loads), plus our write-format rules."""
    path = path or os.path.join(str(state_dir), "updates", "transaction.json")
    raw = open(path, "rb").read()
    errors = []
    if len(raw) > 64 * 1024:
        return ["over 64 KiB"]
    tx = json.loads(raw)
    if raw != (json.dumps(tx, indent=2, ensure_ascii=False) + "\n").encode():
        errors.append("not pretty JSON + newline")
    known = [k for k in tx if k in CARA_KEYS]
    if known != [k for k in CARA_KEYS if k in tx]:
        errors.append("keys out of order: %s" % known)
    if list(tx)[:len(known)] != known:
        errors.append("extra keys before cara's keys")
    for key in CARA_KEYS[:-1]:
        if key not in tx:
            errors.append("missing " + key)
    if errors:
        return errors
    version = tx["version"]
    if not isinstance(version, str) or not re.fullmatch(r"[A-Za-z0-9._-]+", version) or version in (".", "..") \
            or version.startswith("v"):
        errors.append("version")
    uuid_ok = isinstance(tx["id"], str) and str(uuid.UUID(tx["id"])) == tx["id"] and uuid.UUID(tx["id"]).version == 4
    if not uuid_ok:
        errors.append("id")
    if tx["assetName"] not in CARA_ASSETS:
        errors.append("assetName")
    if tx["state"] not in CARA_STATES or tx["phase"] not in CARA_PHASES:
        errors.append("state/phase")
    if not (_u(tx["attempt"]) and _u(tx["maxAttempts"]) and tx["maxAttempts"] >= 1 and tx["attempt"] <= tx["maxAttempts"]):
        errors.append("attempt")
    if not (_u(tx["startedAtMs"]) and _u(tx["updatedAtMs"]) and tx["updatedAtMs"] >= tx["startedAtMs"]):
        errors.append("times")
    staged = "%s/updates/cara-%s" % (state_dir, re.sub(r"[^A-Za-z0-9._-]", "_", str(version)))
    if tx["stagedPath"] not in (None, staged):
        errors.append("stagedPath")
    if tx["bundlePath"] not in (None, staged + ".bundle"):
        errors.append("bundlePath")
    if tx["sha256"] is not None and not re.fullmatch(r"[0-9a-f]{64}", tx["sha256"]):
        errors.append("sha256")
    if tx["lastError"] is not None and not isinstance(tx["lastError"], str):
        errors.append("lastError")
    if not isinstance(tx["retryable"], bool):
        errors.append("retryable")
    if stat.S_IMODE(os.stat(path).st_mode) != 0o600:
        errors.append("mode %o" % stat.S_IMODE(os.stat(path).st_mode))
    return errors


# --- helpers ---

@pytest.fixture
def sd(tmp_path):
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    return str(state)


def txfile(sd):
    return os.path.join(sd, "updates", "transaction.json")


def on_disk(sd):
    with open(txfile(sd), "rb") as f:
        return json.loads(f.read())


def raw(sd):
    with open(txfile(sd), "rb") as f:
        return f.read()


def stage(sd, version="0.9.0", data=b"\x7fELF cara 0.9.0\n" * 64, bundle=True):
    path = os.path.join(sd, "updates", "cara-" + version)
    with open(path, "wb") as f:
        f.write(data)
    if bundle:
        with open(path + ".bundle", "w", encoding="utf-8") as f:
            f.write("{}")
    return hashlib.sha256(data).hexdigest()


def write_raw(sd, content):
    os.makedirs(os.path.join(sd, "updates"), mode=0o700, exist_ok=True)
    with open(txfile(sd), "wb") as f:
        f.write(content if isinstance(content, bytes) else json.dumps(content, indent=2).encode() + b"\n")
    os.chmod(txfile(sd), 0o600)


def cara_tx(sd, **over):
    """A transaction as cara's own updater writes it (no `fleet` key)."""
    tx = {"id": str(uuid.uuid4()), "version": "0.9.0", "assetName": "cara-x86_64-linux", "state": "in_progress",
          "attempt": 1, "maxAttempts": 3, "startedAtMs": 1767225600000, "updatedAtMs": 1767225604210,
          "stagedPath": os.path.join(sd, "updates", "cara-0.9.0"),
          "bundlePath": os.path.join(sd, "updates", "cara-0.9.0.bundle"), "sha256": None, "lastError": None,
          "phase": "downloading", "retryable": True}
    tx.update(over)
    return tx


def refused(cause, fn, *args, **kwargs):
    with pytest.raises(TransactionError) as info:
        fn(*args, **kwargs)
    assert info.value.cause == cause, info.value.message
    return info.value


def to_verified(sd, version="v0.9.0"):
    txn.run(sd, "create", version=version, facts={"run_id": "run-1"})
    txn.run(sd, "advance", phase="downloading")
    digest = stage(sd)
    txn.run(sd, "advance", phase="downloaded", sha256=digest)
    txn.run(sd, "advance", phase="verified")
    return digest


# --- create and the forward path ---

def test_create_writes_carapace_schema_privately(sd):
    res = txn.run(sd, "create", version="v0.9.0", facts={"run_id": "run-1", "from_version": "0.8.0"})
    assert res["changed"] is True and res["owner"] == "fleet" and res["resume_from"] == "created"
    assert cara_rejects(sd) == []
    tx = on_disk(sd)
    assert res["transaction"] == tx
    assert list(tx) == CARA_KEYS[:-1] + ["fleet"]
    assert tx["version"] == "0.9.0" and tx["assetName"] == "cara-x86_64-linux"
    assert (tx["state"], tx["phase"], tx["attempt"], tx["maxAttempts"]) == ("in_progress", "created", 1, 3)
    assert tx["stagedPath"] == sd + "/updates/cara-0.9.0" and tx["bundlePath"] == sd + "/updates/cara-0.9.0.bundle"
    assert tx["fleet"]["run_id"] == "run-1" and tx["fleet"]["from_version"] == "0.8.0"
    assert tx["fleet"]["history"][0]["event"] == "created"
    assert stat.S_IMODE(os.stat(os.path.join(sd, "updates")).st_mode) == 0o700
    assert os.path.isfile(os.path.join(sd, "updates", "update.lock.lock"))
    assert not [n for n in os.listdir(os.path.join(sd, "updates")) if n.endswith(".tmp")]


def test_file_mode_is_0600_whatever_the_umask_and_previous_mode(sd):
    old = os.umask(0o277)  # would leave a new file 0400 and a new directory 0500
    try:
        txn.run(sd, "create", version="0.9.0")
        assert stat.S_IMODE(os.stat(txfile(sd)).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(os.path.join(sd, "updates")).st_mode) == 0o700
        os.chmod(txfile(sd), 0o644)
        txn.run(sd, "advance", phase="downloading")
        assert stat.S_IMODE(os.stat(txfile(sd)).st_mode) == 0o600
    finally:
        os.umask(old)


def test_group_and_other_bits_are_removed_like_cara(sd):
    os.makedirs(os.path.join(sd, "updates"))
    os.chmod(sd, 0o755)
    os.chmod(os.path.join(sd, "updates"), 0o775)
    res = txn.run(sd, "create", version="0.9.0")
    assert stat.S_IMODE(os.stat(sd).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(os.path.join(sd, "updates")).st_mode) == 0o700
    assert any("removed group/other permissions" in a for a in res["actions"])


def test_forward_path_every_write_loads_in_cara_then_clear(sd):
    clock = iter(range(1767225600000, 1767225600000 + 100))
    res = txn.run(sd, "create", version="0.9.0", clock=lambda: next(clock))
    seen = [res["transaction"]["updatedAtMs"]]
    digest = stage(sd)
    for phase, extra in (("downloading", {}), ("downloaded", {"sha256": digest.upper()}), ("verified", {}),
                         ("applying", {"facts": {"backup": "/var/backups/carapace/b.tar.gz"}}), ("applied", {})):
        res = txn.run(sd, "advance", phase=phase, clock=lambda: next(clock), **extra)
        assert res["changed"] is True and cara_rejects(sd) == [], phase
        tx = on_disk(sd)
        assert tx["phase"] == phase and tx == res["transaction"]
        assert tx["updatedAtMs"] > seen[-1]
        seen.append(tx["updatedAtMs"])
    assert (tx["state"], tx["retryable"], tx["sha256"]) == ("applied", False, digest)
    assert tx["fleet"]["backup"] == "/var/backups/carapace/b.tar.gz"
    assert set(tx["fleet"]["phase_entered_ms"]) == {"created", "downloading", "downloaded", "verified", "applying", "applied"}
    assert res["resume_pending"] is False
    res = txn.run(sd, "clear")
    assert res["changed"] is True and res["transaction"] is None and res["before"]["state"] == "applied"
    assert not os.path.exists(txfile(sd))
    res = txn.run(sd, "clear")
    assert res["changed"] is False


def test_idempotence(sd):
    first = txn.run(sd, "create", version="v0.9.0", facts={"run_id": "r"})
    again = txn.run(sd, "create", version="0.9.0", facts={"run_id": "r"})
    assert again["changed"] is False and again["transaction"] == first["transaction"]
    digest = stage(sd)
    txn.run(sd, "advance", phase="downloaded", sha256=digest)
    before = raw(sd)
    for kwargs in ({}, {"sha256": digest}, {"version": "v0.9.0", "asset_name": "cara-x86_64-linux"}):
        res = txn.run(sd, "advance", phase="downloaded", **kwargs)
        assert res["changed"] is False, kwargs
    assert raw(sd) == before
    res = txn.run(sd, "advance", phase="downloaded", facts={"timings": {"download_s": 1.5}})
    assert res["changed"] is True and on_disk(sd)["phase"] == "downloaded"
    txn.run(sd, "fail", error="disk full", retryable=True)
    before = raw(sd)
    assert txn.run(sd, "fail", error="disk full", retryable=True)["changed"] is False
    assert raw(sd) == before
    refused("version_mismatch", txn.run, sd, "clear", version="0.9.1")
    assert txn.run(sd, "clear", version="v0.9.0")["changed"] is True
    assert txn.run(sd, "clear")["changed"] is False
    assert txn.run(str(os.path.join(sd, "nowhere")), "clear")["changed"] is False


def test_facts_merge_under_one_key(sd):
    txn.run(sd, "create", version="0.9.0", facts={"run_id": "r", "timings": {"fetch_s": 2}})
    txn.run(sd, "advance", phase="downloading", facts={"timings": {"download_s": 3}, "from_sha256": "ab" * 32})
    tx = on_disk(sd)
    assert tx["fleet"]["timings"] == {"fetch_s": 2, "download_s": 3}
    assert tx["fleet"]["run_id"] == "r" and tx["fleet"]["from_sha256"] == "ab" * 32
    assert [k for k in tx if k not in CARA_KEYS] == ["fleet"]
    err = refused("bad_argument", txn.run, sd, "advance", phase="downloaded", facts={"history": []})
    assert "history" in err.message
    before = raw(sd)
    err = refused("bad_argument", txn.run, sd, "advance", phase="downloaded", facts={"blob": "x" * 70000})
    assert "64 KiB" in err.message and raw(sd) == before


# --- refusals ---

def test_no_going_back(sd):
    to_verified(sd)
    before = raw(sd)
    err = refused("bad_transition", txn.run, sd, "advance", phase="downloading")
    assert "cannot go back from phase verified to downloading" in err.message and "resume" in err.message
    err = refused("bad_transition", txn.run, sd, "advance", phase="downloaded", sha256="cd" * 32)
    assert raw(sd) == before
    err = refused("bad_transition", txn.run, sd, "advance", phase="applying", sha256="cd" * 32)
    assert "may no longer change" in err.message
    txn.run(sd, "advance", phase="applied")
    for phase in ("downloading", "verified", "applying"):
        err = refused("bad_transition", txn.run, sd, "advance", phase=phase)
        assert "already applied" in err.message and "no going back" in err.message
    err = refused("bad_transition", txn.run, sd, "fail", error="x", retryable=True)
    assert "cannot be retryable" in err.message
    err = refused("not_resumable", txn.run, sd, "resume")
    assert "already applied" in err.message
    # a health gate that failed after the switch: failed, non-retryable, and never back to in_progress
    res = txn.run(sd, "fail", error="health gate failed: /health/ready 503; rolled back to 0.8.0")
    tx = res["transaction"]
    assert (tx["state"], tx["phase"], tx["retryable"], tx["fleet"]["failed_phase"]) == ("failed", "failed", False, "applied")
    assert cara_rejects(sd) == []
    refused("bad_transition", txn.run, sd, "advance", phase="applied")
    refused("not_resumable", txn.run, sd, "resume")
    err = refused("bad_transition", txn.run, sd, "fail", error="again", retryable=True)
    assert "cannot become retryable" in err.message


def test_failed_transaction_cannot_advance_and_wrong_target_is_refused(sd):
    txn.run(sd, "create", version="0.9.0")
    res = txn.run(sd, "fail", error="network down", retryable=True)
    assert res["resume_pending"] is True and "before cara starts" in res["warnings"][0]
    assert txn.run(sd, "fail", error="network down", retryable=False)["resume_pending"] is False
    txn.run(sd, "create", version="0.9.0")
    txn.run(sd, "fail", error="network down", retryable=True)
    err = refused("bad_transition", txn.run, sd, "advance", phase="downloading")
    assert "resume" in err.message and "network down" in err.message
    err = refused("version_mismatch", txn.run, sd, "resume", version="v0.9.1")
    assert "0.9.1" in err.message and "action=create" in err.message
    refused("version_mismatch", txn.run, sd, "resume", asset_name="cara-aarch64-linux")
    refused("bad_argument", txn.run, sd, "advance", phase="failed")
    refused("bad_argument", txn.run, sd, "fail", error="  ")


def test_actions_without_a_transaction(sd):
    for action, kwargs in (("advance", {"phase": "downloading"}), ("fail", {"error": "x"}), ("resume", {})):
        err = refused("no_transaction", txn.run, sd, action, **kwargs)
        assert "action=create" in err.message
    err = refused("state_dir_missing", txn.run, os.path.join(sd, "missing"), "create", version="0.9.0")
    assert "CARAPACE_STATE_DIR" in err.message
    assert not os.path.exists(os.path.join(sd, "missing"))


@pytest.mark.parametrize("version", ["", "v", "../0.9.0", "0.9.0/x", "0.9 .0", "..", "0.9.0\x00", "0.9.0\n1"])
def test_unsafe_versions_are_refused(sd, version):
    refused("bad_argument", txn.run, sd, "create", version=version)
    assert not os.path.exists(txfile(sd))


def test_bad_arguments(sd):
    refused("bad_argument", txn.run, sd, "create", version="0.9.0", asset_name="cara-riscv64-linux")
    refused("bad_argument", txn.run, sd, "create", version="0.9.0", max_attempts=0)
    refused("bad_argument", txn.run, sd, "explode")
    txn.run(sd, "create", version="0.9.0")
    refused("bad_argument", txn.run, sd, "advance", phase="downloaded", sha256="xyz")


# --- the lock shared with `cara update` ---

HOLDER = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
sys.stdin.read()
"""


def test_lock_contention_is_refused_retryably(sd):
    txn.run(sd, "create", version="0.9.0")
    before = raw(sd)
    lock = os.path.join(sd, "updates", "update.lock.lock")
    with subprocess.Popen([sys.executable, "-c", HOLDER, lock], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          text=True) as holder:
        try:
            assert holder.stdout.readline().strip() == "locked"
            for check_mode in (False, True):
                err = refused("lock_held", txn.run, sd, "advance", phase="downloading", check_mode=check_mode)
                assert "another update is running on this host (lock %s held)" % lock in err.message
                assert err.retryable is True
            refused("lock_held", txn.run, sd, "clear")
            assert raw(sd) == before
        finally:
            holder.stdin.close()
            holder.wait(timeout=30)
    assert txn.run(sd, "advance", phase="downloading")["changed"] is True


# --- corrupt and unsafe files ---

def _oversize(sd):
    tx = cara_tx(sd)
    tx["padding"] = "x" * (64 * 1024)
    return tx


CORRUPT = {
    "bad_json": (lambda sd: b"{\"id\": \"x\", ", "not valid JSON"),
    "not_an_object": (lambda sd: b"[1, 2]\n", "not a JSON object"),
    "not_utf8": (lambda sd: b"\xff\xfe{}", "not UTF-8"),
    "asset": (lambda sd: cara_tx(sd, assetName="cara-riscv64-linux"), "assetName 'cara-riscv64-linux'"),
    "staged_path": (lambda sd: cara_tx(sd, stagedPath="/tmp/cara-0.9.0"), "stagedPath '/tmp/cara-0.9.0'"),
    "bundle_path": (lambda sd: cara_tx(sd, bundlePath=os.path.join(sd, "updates", "x.bundle")), "bundlePath"),
    "attempt": (lambda sd: cara_tx(sd, attempt=4), "attempt 4 is greater than maxAttempts 3"),
    "max_attempts": (lambda sd: cara_tx(sd, maxAttempts=0), "maxAttempts must be an integer >= 1"),
    "sha256": (lambda sd: cara_tx(sd, sha256="abc"), "sha256 must be 64 hex"),
    "sha256_newline": (lambda sd: cara_tx(sd, sha256="ab" * 32 + "\n"), "sha256 must be 64 hex"),
    "times": (lambda sd: cara_tx(sd, updatedAtMs=1), "updatedAtMs is earlier than startedAtMs"),
    "version": (lambda sd: cara_tx(sd, version="../../bin"), "version '../../bin'"),
    "missing": (lambda sd: {k: v for k, v in cara_tx(sd).items() if k != "retryable"}, "missing keys: retryable"),
    "oversize": (_oversize, "larger than 64 KiB"),
}


@pytest.mark.parametrize("case", sorted(CORRUPT))
def test_corrupt_file_is_terminal_with_remediation(sd, case):
    make, what = CORRUPT[case]
    write_raw(sd, make(sd))
    before = raw(sd)
    for action, kwargs in (("create", {"version": "0.9.0"}), ("advance", {"phase": "downloaded"}),
                           ("fail", {"error": "x"}), ("resume", {}), ("clear", {})):
        err = refused("corrupt", txn.run, sd, action, **kwargs)
        assert what in err.message, err.message
        assert "action=clear and force=true" in err.message and "Inspect" in err.message
        assert err.retryable is False
    assert raw(sd) == before
    res = txn.run(sd, "clear", force=True)
    assert res["changed"] is True and not os.path.exists(txfile(sd))


def test_create_with_force_replaces_a_corrupt_file(sd):
    write_raw(sd, b"garbage")
    res = txn.run(sd, "create", version="0.9.0", force=True)
    assert res["changed"] is True and res["owner"] == "fleet"
    assert any("invalid" in a for a in res["actions"])
    assert cara_rejects(sd) == []


def test_symlinked_transaction_json_is_never_followed(sd, tmp_path):
    target = tmp_path / "elsewhere.json"
    target.write_text(json.dumps(cara_tx(sd, phase="created")))
    os.makedirs(os.path.join(sd, "updates"), mode=0o700)
    os.symlink(str(target), txfile(sd))
    content = target.read_bytes()
    err = refused("corrupt", txn.run, sd, "create", version="0.9.0")
    assert "is a symlink" in err.message
    refused("corrupt", txn.run, sd, "advance", phase="downloading")
    refused("corrupt", txn.run, sd, "clear")
    assert target.read_bytes() == content
    txn.run(sd, "clear", force=True)
    assert not os.path.lexists(txfile(sd)) and target.read_bytes() == content


def test_symlinked_or_non_directory_dirs_are_refused(sd, tmp_path):
    real = tmp_path / "real-updates"
    real.mkdir(mode=0o700)
    os.symlink(str(real), os.path.join(sd, "updates"))
    for action, kwargs in (("create", {"version": "0.9.0"}), ("clear", {"force": True})):
        err = refused("insecure_dir", txn.run, sd, action, **kwargs)
        assert "updates is a symlink" in err.message and "0700" in err.message
    assert list(real.iterdir()) == []
    os.unlink(os.path.join(sd, "updates"))
    with open(os.path.join(sd, "updates"), "w", encoding="utf-8") as f:
        f.write("")
    err = refused("insecure_dir", txn.run, sd, "create", version="0.9.0")
    assert "is not a directory" in err.message
    link = tmp_path / "state-link"
    os.symlink(sd, str(link))
    err = refused("insecure_dir", txn.run, str(link), "create", version="0.9.0")
    assert "state-link is a symlink" in err.message


def test_foreign_owned_updates_dir_is_refused(sd, monkeypatch):
    os.makedirs(os.path.join(sd, "updates"), mode=0o700)
    if os.geteuid() == 0:
        os.chown(os.path.join(sd, "updates"), 65534, 65534)
    else:  # unprivileged: pretend to be someone else instead
        real = os.geteuid()
        monkeypatch.setattr(os, "geteuid", lambda: real + 1)
        os.chown(sd, real, -1)
    err = refused("insecure_dir", txn.run, sd, "create", version="0.9.0")
    assert "is owned by" in err.message and "become_user" in err.message
    assert not os.path.exists(txfile(sd))


# --- schema round trip ---

def test_unknown_keys_and_order_survive_a_rewrite(sd):
    tx = cara_tx(sd, applyConfirmedUntilMs=1767226500000)
    tx["fleet"] = {"run_id": "r0"}
    # cara's keys scrambled, extra keys in between
    scrambled = {"zeta": {"nested": [1, 2, {"k": None}]}, "phase": tx["phase"], "alpha": "kept", "id": tx["id"]}
    scrambled.update({k: v for k, v in tx.items() if k not in scrambled})
    scrambled["omega"] = 3.5
    write_raw(sd, scrambled)
    res = txn.run(sd, "advance", phase="downloaded", facts={"run_id": "r1"})
    assert res["changed"] is True
    out = on_disk(sd)
    assert list(out) == CARA_KEYS + ["zeta", "alpha", "fleet", "omega"]
    assert out["zeta"] == {"nested": [1, 2, {"k": None}]} and out["alpha"] == "kept" and out["omega"] == 3.5
    assert out["applyConfirmedUntilMs"] == 1767226500000 and out["id"] == tx["id"]
    assert out["fleet"]["run_id"] == "r1"
    assert cara_rejects(sd) == []


# --- retry budget and resume ---

def test_retry_budget_is_three_attempts_then_terminal(sd):
    txn.run(sd, "create", version="0.9.0")
    for attempt in (2, 3):
        txn.run(sd, "fail", error="download timed out", retryable=True)
        res = txn.run(sd, "resume")
        assert res["transaction"]["attempt"] == attempt and res["resumed"] is True
        assert cara_rejects(sd) == []
    txn.run(sd, "fail", error="download timed out", retryable=True)
    assert txn.resume_pending(on_disk(sd)) is False  # attempt 3 of 3: cara would not resume it either
    err = refused("budget_exhausted", txn.run, sd, "resume")
    assert err.message.startswith("update transaction retry budget exhausted (3/3)")
    assert "download timed out" in err.message and "action=create" in err.message
    assert err.retryable is False and err.changed is True
    tx = on_disk(sd)
    assert (tx["state"], tx["phase"], tx["retryable"]) == ("failed", "failed", False)
    assert tx["lastError"] == "update transaction retry budget exhausted (3/3)"
    assert err.transaction == tx and cara_rejects(sd) == []
    refused("not_resumable", txn.run, sd, "resume")
    res = txn.run(sd, "create", version="0.9.0")  # cara's table: failed non-retryable -> start fresh
    assert res["transaction"]["id"] != tx["id"] and res["transaction"]["attempt"] == 1


def test_budget_exhaustion_in_check_mode_writes_nothing(sd):
    txn.run(sd, "create", version="0.9.0", max_attempts=1)
    before = raw(sd)
    err = refused("budget_exhausted", txn.run, sd, "resume", check_mode=True)
    assert "retry budget exhausted (1/1)" in err.message and err.changed is False
    assert raw(sd) == before


def test_create_over_a_resumable_transaction_resumes_it(sd):
    first = txn.run(sd, "create", version="0.9.0")["transaction"]
    txn.run(sd, "advance", phase="downloading")
    res = txn.run(sd, "create", version="v0.9.0")
    tx = res["transaction"]
    assert res["changed"] is True and res["resumed"] is True and res["resume_from"] == "downloading"
    assert tx["id"] == first["id"] and tx["attempt"] == 2
    txn.run(sd, "fail", error="503 from mirror", retryable=True)
    res = txn.run(sd, "create", version="0.9.0")
    assert res["transaction"]["id"] == first["id"] and res["transaction"]["attempt"] == 3
    assert res["transaction"]["state"] == "in_progress"


@pytest.mark.parametrize("existing, replaced", [
    ({"phase": "applied", "state": "applied", "retryable": False}, True),
    ({"phase": "failed", "state": "failed", "retryable": False, "lastError": "bundle verification failed"}, True),
    ({"version": "0.8.1", "stagedPath": "{sd}/updates/cara-0.8.1", "bundlePath": "{sd}/updates/cara-0.8.1.bundle"}, True),
    ({"assetName": "cara-aarch64-linux"}, True),
    ({"phase": "created"}, False),
])
def test_create_decision_table(sd, existing, replaced):
    tx = cara_tx(sd, **{k: v.format(sd=sd) if isinstance(v, str) else v for k, v in existing.items()})
    tx["fleet"] = {"run_id": "old"}
    write_raw(sd, tx)
    res = txn.run(sd, "create", version="0.9.0")
    assert (res["transaction"]["id"] != tx["id"]) is replaced
    assert res["changed"] is replaced
    assert cara_rejects(sd) == []


def test_resume_rehashes_the_staged_file(sd):
    digest = to_verified(sd)
    txn.run(sd, "fail", error="service did not stop", retryable=True)
    res = txn.run(sd, "resume")
    assert res["resume_from"] == "verified" and "matches the recorded sha256" in res["resume_reason"]
    tx = res["transaction"]
    assert (tx["phase"], tx["state"], tx["sha256"], tx["attempt"]) == ("verified", "in_progress", digest, 2)
    assert "failed_phase" not in tx["fleet"] and tx["fleet"]["history"][-1]["event"] == "resumed"
    assert cara_rejects(sd) == []

    # tampered after verification
    staged = os.path.join(sd, "updates", "cara-0.9.0")
    with open(staged, "ab") as f:
        f.write(b"evil")
    tampered = hashlib.sha256(open(staged, "rb").read()).hexdigest()
    res = txn.run(sd, "resume")
    assert res["resume_from"] == "downloading"
    assert tampered in res["resume_reason"] and digest in res["resume_reason"] and "changed" in res["resume_reason"]
    assert res["transaction"]["sha256"] is None and res["transaction"]["phase"] == "downloading"
    assert cara_rejects(sd) == []


def test_resume_with_a_missing_or_symlinked_staged_file(sd, tmp_path):
    to_verified(sd)
    staged = os.path.join(sd, "updates", "cara-0.9.0")
    os.unlink(staged)
    res = txn.run(sd, "resume", check_mode=True)
    assert res["resume_from"] == "downloading" and "is missing" in res["resume_reason"]
    assert on_disk(sd)["phase"] == "verified"  # check mode wrote nothing

    # a symlink to the right bytes is still not trusted
    good = tmp_path / "good"
    good.write_bytes(b"\x7fELF cara 0.9.0\n" * 64)
    os.symlink(str(good), staged)
    res = txn.run(sd, "resume")
    assert res["resume_from"] == "downloading" and "not a regular file" in res["resume_reason"]


def test_resume_after_failure_while_applying_and_without_digest(sd):
    to_verified(sd)
    txn.run(sd, "advance", phase="applying")
    txn.run(sd, "fail", error="switch failed: EROFS", retryable=True)
    res = txn.run(sd, "resume")
    assert res["resume_from"] == "applying"
    txn.run(sd, "create", version="0.9.1")  # replaces: another version
    txn.run(sd, "advance", phase="downloaded")  # no digest given
    txn.run(sd, "fail", error="x", retryable=True)
    res = txn.run(sd, "resume")
    assert res["resume_from"] == "downloading" and "no sha256 is recorded" in res["resume_reason"]


# --- a transaction that `cara update` started ---

def test_cara_owned_transaction_is_reported_and_not_driven(sd):
    write_raw(sd, cara_tx(sd))
    before = raw(sd)
    err = refused("foreign", txn.run, sd, "create", version="0.9.0")
    assert "cara's own updater" in err.message and "force=true" in err.message
    assert txn.owner(err.transaction) == "cara"
    for action, kwargs in (("advance", {"phase": "downloaded"}), ("fail", {"error": "x"}), ("resume", {}), ("clear", {})):
        refused("foreign", txn.run, sd, action, **kwargs)
    assert raw(sd) == before
    res = txn.run(sd, "create", version="0.9.0", check_mode=True, force=True)
    assert res["owner"] == "fleet" and raw(sd) == before
    res = txn.run(sd, "create", version="0.9.0", force=True)
    assert res["owner"] == "fleet" and res["before"]["id"] != res["transaction"]["id"]
    assert any("cara's own transaction" in a for a in res["actions"])


def test_finished_cara_transaction_is_replaced_like_cara_does(sd):
    write_raw(sd, cara_tx(sd, state="failed", phase="failed", retryable=False, lastError="release not found"))
    res = txn.run(sd, "create", version="0.9.0")
    assert res["changed"] is True and res["owner"] == "fleet" and on_disk(sd)["lastError"] is None


def test_owner_and_resume_pending():
    assert txn.owner(None) is None and txn.owner({"fleet": {}}) == "fleet" and txn.owner({}) == "cara"
    assert txn.resume_pending({"state": "in_progress"}) is True
    assert txn.resume_pending({"state": "failed", "retryable": True, "attempt": 2, "maxAttempts": 3}) is True
    assert txn.resume_pending({"state": "failed", "retryable": True, "attempt": 3, "maxAttempts": 3}) is False
    assert txn.resume_pending({"state": "failed", "retryable": False, "attempt": 1, "maxAttempts": 3}) is False
    assert txn.resume_pending({"state": "applied"}) is False


# --- check mode ---

def test_check_mode_creates_and_writes_nothing(sd):
    os.chmod(sd, 0o750)
    res = txn.run(sd, "create", version="0.9.0", check_mode=True)
    assert res["changed"] is True and res["transaction"]["version"] == "0.9.0"
    assert os.listdir(sd) == [] and stat.S_IMODE(os.stat(sd).st_mode) == 0o750
    assert all(a.startswith("would ") for a in res["actions"])
    txn.run(sd, "create", version="0.9.0")
    before = raw(sd)
    res = txn.run(sd, "advance", phase="downloading", check_mode=True)
    assert res["changed"] is True and res["transaction"]["phase"] == "downloading"
    res = txn.run(sd, "clear", check_mode=True)
    assert res["changed"] is True and res["transaction"] is None
    assert raw(sd) == before
