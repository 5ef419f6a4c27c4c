"""Policy, identity, trust-root and SHA256SUMS logic of module_utils/_verify.py."""

import hashlib
import json
import os

import pytest

from ansible_collections.carapace.fleet.plugins.module_utils import _pinned_root, _verify, _version

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("repo,tag,expected", [
    ("puremachinery/carapace", "v0.9.0",
     "https://github.com/puremachinery/carapace/.github/workflows/release.yml@refs/tags/v0.9.0"),
    ("puremachinery/carapace", "v0.1.0-preview12",
     "https://github.com/puremachinery/carapace/.github/workflows/release.yml@refs/tags/v0.1.0-preview12"),
    ("acme-corp/carapace.fork", "v1.2.3",
     "https://github.com/acme-corp/carapace.fork/.github/workflows/release.yml@refs/tags/v1.2.3"),
])
def test_release_identity(repo, tag, expected):
    assert _verify.release_identity(repo, tag) == expected


@pytest.mark.parametrize("tag", ["0.9.0", "v0.9", "v0.9.0.1", "V0.9.0", "v0.9.0-", "latest", "", "v01.2.3",
                                 "v0.9.0/../x", "v0.9.0 "])
def test_tags_that_are_not_release_tags_are_refused(tag):
    with pytest.raises(ValueError, match="not a Carapace release tag"):
        _verify.release_identity("puremachinery/carapace", tag)


@pytest.mark.parametrize("repo", ["carapace", "a/b/c", "", "evil/", "/carapace", "own er/x"])
def test_bad_repos_are_refused(repo):
    with pytest.raises(ValueError, match="owner/name"):
        _verify.release_identity(repo, "v0.9.0")


@pytest.mark.parametrize("tag,preview", [("v0.9.0", False), ("v0.1.0-preview3", True), ("v1.0.0-rc.1", True)])
def test_previews(tag, preview):
    assert _version.is_preview(tag) is preview


def test_identity_is_case_and_prefix_exact(lab, lab_root):
    """v0.9.0's bundle satisfies only v0.9.0's identity, not a prefix, a longer tag or another case."""
    data = b"cara"
    bundle = lab.sign(data, _verify.release_identity("puremachinery/carapace", "v0.9.0"))
    trust = _verify.TrustRoot(lab_root)
    digest = hashlib.sha256(data).hexdigest()
    assert _verify.verify_bundle(trust, "a", digest, bundle, _verify.release_identity("puremachinery/carapace", "v0.9.0"))
    for other in ("https://github.com/PureMachinery/carapace/.github/workflows/release.yml@refs/tags/v0.9.0",
                  "https://github.com/puremachinery/carapace/.github/workflows/release.yml@refs/tags/v0.9.0-preview1",
                  "https://github.com/puremachinery/carapace/.github/workflows/release.yml@refs/tags/v0.9",
                  "https://github.com/puremachinery/carapace/.github/workflows/release.yml@refs/heads/v0.9.0"):
        with pytest.raises(_verify.VerifyError) as err:
            _verify.verify_bundle(trust, "a", digest, bundle, other)
        assert err.value.cause == "identity_mismatch"


def test_policy_needs_identity_and_issuer():
    with pytest.raises(ValueError):
        _verify.build_policy("", _verify.GITHUB_ISSUER)
    with pytest.raises(ValueError):
        _verify.build_policy("https://x", "")
    pol = _verify.build_policy("https://x")
    assert type(pol).__name__ == "AllOf"


def test_verified_bundle_facts(lab, lab_root):
    data = b"facts"
    ident = _verify.release_identity("puremachinery/carapace", "v0.9.0")
    bundle = lab.sign(data, ident)
    facts = _verify.verify_bundle(_verify.TrustRoot(lab_root), "a", hashlib.sha256(data).hexdigest(), bundle, ident)
    entry = json.loads(bundle)["verificationMaterial"]["tlogEntries"][0]
    assert facts == {"log_index": int(entry["logIndex"]), "integrated_time": int(entry["integratedTime"])}


def test_tsa_only_bundle_reports_no_integrated_time(lab, lab_root):
    data = b"tsa"
    ident = _verify.release_identity("puremachinery/carapace", "v0.9.0")
    bundle = lab.sign(data, ident, variant="tsa-only-no-set")
    facts = _verify.verify_bundle(_verify.TrustRoot(lab_root), "a", hashlib.sha256(data).hexdigest(), bundle, ident)
    assert facts["integrated_time"] is None


# -- the pinned production trust root -------------------------------------------------------------------
def test_pinned_root_matches_shipped_file_and_record():
    with open(os.path.join(ROOT, "files", "sigstore", "trusted_root.json"), "rb") as f:
        shipped = f.read()
    with open(os.path.join(ROOT, "files", "sigstore", "trusted_root.json.sha256"), encoding="utf-8") as f:
        record = f.read()
    digest = hashlib.sha256(shipped).hexdigest()
    assert _pinned_root.TRUSTED_ROOT_JSON.encode("utf-8") == shipped
    assert _pinned_root.SHA256 == digest
    assert record.startswith(digest + "  trusted_root.json\n")
    assert "taken on %s" % _pinned_root.TAKEN_ON in record


def test_pinned_root_is_the_public_good_production_root():
    root = json.loads(_pinned_root.TRUSTED_ROOT_JSON)
    assert root["mediaType"] == "application/vnd.dev.sigstore.trustedroot+json;version=0.1"
    assert "https://rekor.sigstore.dev" in [t["baseUrl"] for t in root["tlogs"]]
    assert any("fulcio.sigstore.dev" in ca["uri"] for ca in root["certificateAuthorities"])
    trust = _verify.TrustRoot(None)
    assert trust.sha256 == _pinned_root.SHA256
    assert "pinned production root" in trust.source


def test_pinned_root_does_not_touch_the_user_tuf_cache(tmp_path, monkeypatch):
    """Loading the default root must not read or create sigstore's TUF cache (Verifier.production's trap)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    _verify.TrustRoot(None)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "data").exists()


def test_lab_bundles_fail_against_the_pinned_root(lab):
    data = b"lab"
    ident = _verify.release_identity("puremachinery/carapace", "v0.9.0")
    with pytest.raises(_verify.VerifyError) as err:
        _verify.verify_bundle(_verify.TrustRoot(None), "a", hashlib.sha256(data).hexdigest(), lab.sign(data, ident), ident)
    assert err.value.cause == "untrusted_chain"


@pytest.mark.parametrize("content", [b"", b"{}", b"not json", b'{"mediaType": "x"}'])
def test_unloadable_trust_root_fails_closed(tmp_path, content):
    path = tmp_path / "trusted_root.json"
    path.write_bytes(content)
    with pytest.raises(_verify.VerifyError) as err:
        _verify.TrustRoot(str(path))
    assert err.value.cause == "trust_root"
    assert str(path) in err.value.message


def test_missing_trust_root_file_fails_closed(tmp_path):
    with pytest.raises(_verify.VerifyError) as err:
        _verify.TrustRoot(str(tmp_path / "nope.json"))
    assert err.value.cause == "trust_root"


# -- SHA256SUMS.txt -------------------------------------------------------------------------------------
A = "a" * 64
B = "b" * 64


def test_parse_sha256sums_text_and_binary_mode():
    sums = _verify.parse_sha256sums("%s  cara-x86_64-linux\n%s *cara-aarch64-linux\n\n# comment\n%s  dir/cara-x86_64-darwin\n"
                                    % (A, B.upper(), A))
    assert sums == {"cara-x86_64-linux": [A], "cara-aarch64-linux": [B], "cara-x86_64-darwin": [A]}


def test_check_sha256sums():
    sums = _verify.parse_sha256sums("%s  cara-x86_64-linux\n" % A)
    assert _verify.check_sha256sums(sums, "cara-x86_64-linux", A) is True
    with pytest.raises(_verify.VerifyError) as err:
        _verify.check_sha256sums(sums, "cara-x86_64-linux", B)
    assert err.value.cause == "checksum_mismatch" and A in err.value.message and B in err.value.message
    with pytest.raises(_verify.VerifyError) as err:
        _verify.check_sha256sums(sums, "cara-aarch64-linux", A)
    assert err.value.cause == "checksum_missing"


def test_conflicting_sha256sums_lines_are_refused():
    sums = _verify.parse_sha256sums("%s  cara-x86_64-linux\n%s  cara-x86_64-linux\n" % (A, B))
    with pytest.raises(_verify.VerifyError) as err:
        _verify.check_sha256sums(sums, "cara-x86_64-linux", A)
    assert err.value.cause == "checksum_mismatch"
