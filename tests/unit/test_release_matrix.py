"""Every row of the offline-Sigstore accept/reject matrix (40 cases), through cara_release's own code path.

Each case is laid out as a one-asset release in a local directory and run through ReleaseCache.sync(), the
code the module runs: accepted bundles end up installed in dest/<tag>/, rejected ones fail with the cause an
operator is told, and leave nothing in dest.
"""

import os
import socket

import pytest

from ansible_collections.carapace.fleet.plugins.module_utils._release import ReleaseCache, ReleaseError
from ansible_collections.carapace.fleet.plugins.module_utils._digest import sha256_file
from ansible_collections.carapace.fleet.plugins.module_utils._verify import GITHUB_ISSUER, TrustRoot
from sigstore_lab import PrivateSigstore, matrix_cases

ASSET = "cara-x86_64-linux"
TAG = "v0.9.0"

# The cause each rejected row must be reported with (the operator-facing classification of the exception).
EXPECTED_CAUSE = {
    9: "digest_mismatch", 10: "digest_mismatch", 11: "digest_mismatch",
    12: "identity_mismatch", 13: "identity_mismatch", 14: "identity_mismatch", 15: "identity_mismatch",
    16: "identity_mismatch", 17: "identity_mismatch", 18: "identity_mismatch",
    19: "issuer_mismatch", 20: "issuer_mismatch",
    22: "untrusted_chain", 23: "untrusted_chain", 38: "untrusted_chain",
    24: "malformed_bundle", 25: "malformed_bundle", 26: "malformed_bundle", 27: "malformed_bundle",
    35: "malformed_bundle", 37: "malformed_bundle",
    28: "transparency", 29: "transparency", 30: "transparency", 31: "transparency", 32: "transparency",
    36: "transparency", 39: "transparency",
    33: "signature_invalid",
    34: "timestamp",
    40: "verification_failed",
}

_LAB = PrivateSigstore()
CASES = matrix_cases(_LAB)


@pytest.fixture(scope="module")
def lab_trust(tmp_path_factory):
    return TrustRoot(_LAB.write_trusted_root(tmp_path_factory.mktemp("root") / "trusted_root.json"))


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Verification is offline: any socket use fails the test."""
    def refuse(*_args, **_kwargs):
        raise AssertionError("network access during verification")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def _run(case, tmp_path, trust):
    src = tmp_path / "src"
    src.mkdir()
    (src / ASSET).write_bytes(case.artifact)
    (src / (ASSET + ".bundle")).write_bytes(case.bundle)
    dest = tmp_path / "cache"
    cache = ReleaseCache(tag=TAG, repo="puremachinery/carapace", assets=[ASSET], dest=str(dest), source=str(src),
                         trust=trust, identity=case.expected_identity, issuer=GITHUB_ISSUER, checksums="ignore",
                         opener=None, move=os.rename, timeout=30, max_bytes=1 << 20)
    return dest, cache


def test_matrix_is_complete():
    assert [c.number for c in CASES] == list(range(1, 41))
    assert {c.number for c in CASES if c.accept} == {1, 2, 3, 4, 5, 6, 7, 8, 21}
    assert set(EXPECTED_CAUSE) == {c.number for c in CASES if not c.accept}


@pytest.mark.parametrize("case", CASES, ids=["%02d-%s" % (c.number, c.name) for c in CASES])
def test_matrix_row(case, tmp_path, lab_trust):
    trust = TrustRoot(None) if case.trusted_root == "production" else lab_trust
    dest, cache = _run(case, tmp_path, trust)
    if case.accept:
        result = cache.sync()
        got = result["assets"][ASSET]
        assert result["changed"] is True
        assert got["path"] == str(dest / TAG / ASSET)
        assert sha256_file(got["path"])[0] == got["sha256"]
        assert open(got["path"], "rb").read() == case.artifact
        assert got["identity"] == case.expected_identity
        assert isinstance(got["log_index"], int)
        return
    with pytest.raises(ReleaseError) as err:
        cache.sync()
    assert err.value.cause == EXPECTED_CAUSE[case.number], err.value.message
    assert err.value.asset == ASSET
    assert err.value.message.startswith(ASSET + ":")
    # Fail closed: nothing of the run reached the cache, and no temp dir was left behind.
    assert not (dest / TAG).exists()
    assert not os.listdir(dest)


def test_identity_mismatch_names_both_identities(tmp_path, lab_trust):
    case = CASES[11]  # 12: cert for v0.8.0, v0.9.0 expected
    _dest, cache = _run(case, tmp_path, lab_trust)
    with pytest.raises(ReleaseError) as err:
        cache.sync()
    assert "expected %s" % case.expected_identity in err.value.message
    assert "refs/tags/v0.8.0" in err.value.message
    assert "security advisory" in err.value.message  # the next step is part of the message


def test_issuer_mismatch_names_both_issuers(tmp_path, lab_trust):
    case = CASES[18]  # 19: accounts.google.com
    _dest, cache = _run(case, tmp_path, lab_trust)
    with pytest.raises(ReleaseError) as err:
        cache.sync()
    assert "expected %s" % GITHUB_ISSUER in err.value.message
    assert "https://accounts.google.com" in err.value.message


def test_missing_issuer_extension_is_named(tmp_path, lab_trust):
    case = CASES[19]  # 20: only the legacy 1.1 extension
    _dest, cache = _run(case, tmp_path, lab_trust)
    with pytest.raises(ReleaseError) as err:
        cache.sync()
    assert "1.3.6.1.4.1.57264.1.8" in err.value.message


def test_a_file_changed_between_verification_and_install_is_refused(tmp_path, lab_trust):
    """The verified bytes are the bytes installed: a file that changes on disk after its verification (another
    process writing into dest) fails the run with digest_mismatch, and nothing at all is installed - not even the
    bundle that came with it."""
    case = CASES[0]  # a valid bundle of the expected identity
    assert case.accept
    dest, cache = _run(case, tmp_path, lab_trust)
    verify = cache._verify  # pylint: disable=protected-access

    def verify_then_tamper(name, digest, bundle_path):
        facts = verify(name, digest, bundle_path)
        with open(bundle_path[:-len(".bundle")], "ab") as f:  # the asset's temp file, already verified
            f.write(b"\0tampered")
        return facts
    cache._verify = verify_then_tamper  # pylint: disable=protected-access
    with pytest.raises(ReleaseError) as err:
        cache.sync()
    assert err.value.cause == "digest_mismatch" and err.value.asset == ASSET
    assert "between verification and install" in err.value.message
    assert not (dest / TAG).exists() or not os.listdir(dest / TAG)
    assert [n for n in os.listdir(dest) if n != TAG] == []
