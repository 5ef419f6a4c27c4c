"""Prove that the offline test Sigstore (tests/support/sigstore_lab.py) is right.

Every matrix row is verified directly with sigstore-python against the lab's own
trusted root (or, for case 23, the production root embedded in the sigstore wheel),
with the network made unusable, so that the verdicts other tests rely on are the
real library's verdicts.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.resources
import json
import socket
from datetime import datetime, timezone

import pytest
import rfc8785
from cryptography import x509
from sigstore.hashes import Hashed
from sigstore.models import Bundle, TrustedRoot
from sigstore.verify import Verifier, policy
from sigstore_models.common.v1 import HashAlgorithm

from sigstore_lab import (
    DEFAULT_IDENTITY,
    GITHUB_ISSUER,
    OID_ISSUER_V1,
    OID_ISSUER_V2,
    VARIANTS,
    MatrixCase,
    PrivateSigstore,
    matrix_cases,
    release_identity,
)

ARTIFACT = b"some release asset\n"

# The public-good root shipped inside the sigstore wheel; read as a file, never through
# Verifier.production() (which would go through the TUF cache, see pitfall F1).
PRODUCTION_ROOT = importlib.resources.files("sigstore") / "_store" / "https%3A%2F%2Ftuf-repo-cdn.sigstore.dev" / "trusted_root.json"


class NetworkUsed(AssertionError):
    """Raised by the socket guard; an AssertionError so that it can never look like a verdict."""


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Make every attempt to resolve or connect fail loudly."""
    def refuse(*args, **kwargs):
        raise NetworkUsed(f"network access attempted: {args!r} {kwargs!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.fixture(scope="module", name="lab")
def lab_fixture() -> PrivateSigstore:
    """One lab for the whole module."""
    return PrivateSigstore()


@pytest.fixture(scope="module", name="root_path")
def root_path_fixture(lab, tmp_path_factory) -> str:
    """The lab's trusted_root.json on disk."""
    return lab.write_trusted_root(tmp_path_factory.mktemp("lab") / "trusted_root.json")


@pytest.fixture(scope="module", name="verifiers")
def verifiers_fixture(root_path) -> dict[str, Verifier]:
    """Verifiers keyed like MatrixCase.trusted_root."""
    with importlib.resources.as_file(PRODUCTION_ROOT) as production:
        production_root = TrustedRoot.from_file(str(production))
    return {
        "lab": Verifier(trusted_root=TrustedRoot.from_file(root_path)),
        "production": Verifier(trusted_root=production_root),
    }


@pytest.fixture(scope="module", name="cases")
def cases_fixture(lab) -> dict[int, MatrixCase]:
    """The matrix, by case number."""
    return {case.number: case for case in matrix_cases(lab)}


def verify(verifier: Verifier, artifact: bytes, bundle: bytes, identity: str) -> str | None:
    """Verify like the module does (policy P2, artifact as a sha256 digest, fail closed).

    Returns None when accepted, else "<ExceptionType>: <message>".
    """
    pol = policy.AllOf([policy.OIDCIssuerV2(GITHUB_ISSUER), policy.Identity(identity=identity)])
    hashed = Hashed(algorithm=HashAlgorithm.SHA2_256, digest=hashlib.sha256(artifact).digest())
    try:
        verifier.verify_artifact(hashed, Bundle.from_json(bundle), pol)
    except NetworkUsed:
        raise
    except Exception as exc:  # pylint: disable=broad-exception-caught  # fail closed on everything (pitfall F6)
        return f"{type(exc).__name__}: {exc}"
    return None


def leaf_cert(bundle: bytes) -> x509.Certificate:
    """The signing certificate of a v0.3 or v0.2 bundle."""
    material = json.loads(bundle)["verificationMaterial"]
    raw = material["certificate"]["rawBytes"] if "certificate" in material else material["x509CertificateChain"]["certificates"][0]["rawBytes"]
    return x509.load_der_x509_certificate(base64.b64decode(raw))


# ---- the matrix -------------------------------------------------------------

def test_matrix_has_40_rows_in_order(cases):
    """The matrix is complete and consistent with the spec's table."""
    assert sorted(cases) == list(range(1, 41))
    assert [case.number for case in matrix_cases(PrivateSigstore())] == list(range(1, 41))
    assert len({case.name for case in cases.values()}) == 40
    assert {case.trusted_root for case in cases.values()} == {"lab", "production"}
    assert [n for n, case in cases.items() if case.accept] == [1, 2, 3, 4, 5, 6, 7, 8, 21]
    assert all(bool(case.reason) != case.accept for case in cases.values())


@pytest.mark.parametrize("number", range(1, 41), ids=lambda n: f"case{n:02d}")
def test_matrix_case(number, cases, verifiers):
    """sigstore-python gives each row its expected verdict, for the expected reason."""
    case = cases[number]
    outcome = verify(verifiers[case.trusted_root], case.artifact, case.bundle, case.expected_identity)
    if case.accept:
        assert outcome is None, f"case {number} ({case.name}) rejected: {outcome}"
    else:
        assert outcome is not None, f"case {number} ({case.name}) accepted"
        assert case.reason in outcome, f"case {number} ({case.name}): {outcome!r} lacks {case.reason!r}"


def test_case_2_is_case_1(cases):
    """Case 2 differs from case 1 only in how the caller passes the artifact."""
    assert cases[2].bundle == cases[1].bundle
    assert cases[2].artifact == cases[1].artifact


def test_every_variant_signs(lab):
    """The variant names other code relies on all exist and produce a bundle."""
    assert set(VARIANTS) == {
        "valid", "single-leaf-tree", "v0.2-mediatype", "tsa-and-set", "tsa-only-no-set", "rekor-v2",
        "tsa-untrusted-plus-set", "issuer-v1-only", "issuer-v2-only", "untrusted-ca", "no-sct", "sct-untrusted-ctlog",
        "sct-bad-signature", "untrusted-rekor", "untrusted-set-key", "bad-signature", "tsa-untrusted-no-set",
        "rekor-v2-no-tsa", "bad-inclusion-proof", "no-promise", "integrated-time-outside-cert", "tlog-body-mismatch",
        "leaf-without-keyusage",
    }
    for variant in VARIANTS:
        assert json.loads(lab.sign(ARTIFACT, DEFAULT_IDENTITY, variant=variant))["messageSignature"]


def test_unknown_variant_is_refused(lab):
    """A typo in a variant name is an error, not a valid bundle."""
    with pytest.raises(ValueError, match="unknown variant"):
        lab.sign(ARTIFACT, DEFAULT_IDENTITY, variant="nope")


# ---- the lab's own properties ------------------------------------------------

def test_socket_guard_is_effective():
    """The network guard really blocks connections."""
    with pytest.raises(NetworkUsed):
        socket.create_connection(("127.0.0.1", 9), timeout=1)


def test_trusted_root_parses_and_has_every_service(lab, root_path):
    """The trusted root loads and lists Rekor v1/v2, CT, Fulcio and TSA."""
    root = TrustedRoot.from_file(root_path)
    assert len(root.get_fulcio_certs()) == 2
    assert len(root.get_timestamp_authorities()) == 1
    data = json.loads(lab.trusted_root_json())
    assert [t["publicKey"]["keyDetails"] for t in data["tlogs"]] == ["PKIX_ECDSA_P256_SHA_256", "PKIX_ED25519"]
    assert [t["publicKey"]["keyDetails"] for t in data["ctlogs"]] == ["PKIX_ECDSA_P256_SHA_256"]
    for log in data["tlogs"] + data["ctlogs"]:
        spki = base64.b64decode(log["publicKey"]["rawBytes"])
        assert base64.b64decode(log["logId"]["keyId"]) == hashlib.sha256(spki).digest()
    # validFor.start is backdated so that the verifier's wall clock is past it (pitfall F9).
    start = datetime.fromisoformat(data["certificateAuthorities"][0]["validFor"]["start"].replace("Z", "+00:00"))
    assert (lab.now - start).days == 2


def test_signed_cert_profile(lab):
    """The leaf carries the identity and issuer the way Fulcio does."""
    identity = release_identity("someone/project", "v1.2.3")
    cert = leaf_cert(lab.sign(ARTIFACT, identity))
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical
    assert san.value.get_values_for_type(x509.UniformResourceIdentifier) == [identity]
    assert cert.subject == x509.Name([])
    assert cert.extensions.get_extension_for_oid(OID_ISSUER_V1).value.value == GITHUB_ISSUER.encode()
    v2 = cert.extensions.get_extension_for_oid(OID_ISSUER_V2).value.value
    assert v2[0] == 0x0C and v2[1] == len(GITHUB_ISSUER) and v2[2:] == GITHUB_ISSUER.encode()  # DER UTF8String
    assert len(cert.extensions.get_extension_for_class(x509.PrecertificateSignedCertificateTimestamps).value) == 1
    assert cert.extensions.get_extension_for_class(x509.KeyUsage).critical


def test_log_body_is_rfc8785_canonical(lab):
    """The log entry body is canonical JSON (the SET payload is checked by sigstore itself in case 1)."""
    entry = json.loads(lab.sign(ARTIFACT, DEFAULT_IDENTITY))["verificationMaterial"]["tlogEntries"][0]
    body = base64.b64decode(entry["canonicalizedBody"])
    assert body == rfc8785.dumps(json.loads(body))
    assert entry["logIndex"] != entry["inclusionProof"]["logIndex"]  # global vs tree-local index


def test_rogue_material_is_not_in_the_trusted_root(lab):
    """Untrusted CA, Rekor and CT keys really are absent from the root."""
    root = json.loads(lab.trusted_root_json())
    ca_skis = {
        x509.load_der_x509_certificate(base64.b64decode(c["rawBytes"])).extensions.get_extension_for_class(
            x509.SubjectKeyIdentifier).value.digest
        for c in root["certificateAuthorities"][0]["certChain"]["certificates"]
    }
    log_ids = {log["logId"]["keyId"] for log in root["tlogs"]}
    ct_ids = {base64.b64decode(log["logId"]["keyId"]) for log in root["ctlogs"]}

    def issuer_ski(bundle: bytes) -> bytes:
        return leaf_cert(bundle).extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier

    def log_id(bundle: bytes) -> str:
        return json.loads(bundle)["verificationMaterial"]["tlogEntries"][0]["logId"]["keyId"]

    def sct_log_id(bundle: bytes) -> bytes:
        return leaf_cert(bundle).extensions.get_extension_for_class(x509.PrecertificateSignedCertificateTimestamps).value[0].log_id

    valid = lab.sign(ARTIFACT, DEFAULT_IDENTITY)
    assert issuer_ski(valid) in ca_skis and log_id(valid) in log_ids and sct_log_id(valid) in ct_ids
    assert issuer_ski(lab.sign(ARTIFACT, DEFAULT_IDENTITY, variant="untrusted-ca")) not in ca_skis
    assert log_id(lab.sign(ARTIFACT, DEFAULT_IDENTITY, variant="untrusted-rekor")) not in log_ids
    assert sct_log_id(lab.sign(ARTIFACT, DEFAULT_IDENTITY, variant="sct-untrusted-ctlog")) not in ct_ids


def test_other_lab_root_rejects(lab, verifiers, tmp_path):
    """A bundle from one lab does not verify against another lab's root."""
    other_root = PrivateSigstore().write_trusted_root(tmp_path / "other.json")
    bundle = lab.sign(ARTIFACT, DEFAULT_IDENTITY)
    assert verify(verifiers["lab"], ARTIFACT, bundle, DEFAULT_IDENTITY) is None
    outcome = verify(Verifier(trusted_root=TrustedRoot.from_file(other_root)), ARTIFACT, bundle, DEFAULT_IDENTITY)
    assert outcome is not None and "failed to build timestamp certificate chain" in outcome


@pytest.mark.parametrize("variant", ["valid", "tsa-only-no-set", "rekor-v2"])
def test_bundles_made_in_the_past_still_verify(variant, tmp_path):
    """Verification happens at the integrated/TSA time, so old bundles never expire."""
    old = PrivateSigstore(now=datetime(2021, 6, 1, 12, 0, tzinfo=timezone.utc))
    verifier = Verifier(trusted_root=TrustedRoot.from_file(old.write_trusted_root(tmp_path / "root.json")))
    assert verify(verifier, ARTIFACT, old.sign(ARTIFACT, DEFAULT_IDENTITY, variant=variant), DEFAULT_IDENTITY) is None
