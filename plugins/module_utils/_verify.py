# -*- coding: utf-8 -*-
# Copyright: carapace.fleet maintainers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Sigstore verification of Carapace release files, offline and fail closed.

Domain logic only (no Ansible imports). Policy, as Carapace's release policy states it: the signing
certificate's OIDC issuer (extension 1.3.6.1.4.1.57264.1.8) is GitHub Actions' and its SAN is exactly the
release workflow of the target tag. The trust root is a pinned trusted_root.json, never sigstore's TUF
cache (Verifier.production(offline=True) trusts whatever sits in that cache).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import traceback

try:
    from cryptography import x509
    from sigstore.hashes import Hashed
    from sigstore.models import Bundle, TrustedRoot
    from sigstore.verify import Verifier, policy
    from sigstore_models.common.v1 import HashAlgorithm
except ImportError:
    HAS_SIGSTORE = False
    SIGSTORE_IMPORT_ERROR = traceback.format_exc()
else:
    HAS_SIGSTORE = True
    SIGSTORE_IMPORT_ERROR = None

from ansible_collections.carapace.fleet.plugins.module_utils import _pinned_root
from ansible_collections.carapace.fleet.plugins.module_utils._errors import FleetError
# Tag syntax lives with the version logic (no sigstore import there, so planning stays cheap).
from ansible_collections.carapace.fleet.plugins.module_utils._version import check_tag

GITHUB_ISSUER = "https://token.actions.githubusercontent.com"
DEFAULT_REPO = "puremachinery/carapace"
OID_ISSUER_V2 = "1.3.6.1.4.1.57264.1.8"
OID_ISSUER_V1 = "1.3.6.1.4.1.57264.1.1"

_REPO_RE = re.compile(r"[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+")
_HEX64_RE = re.compile(r"[0-9a-fA-F]{64}")


class VerifyError(FleetError):
    """A verification failure, with a machine-readable cause and an operator-facing message."""


def check_repo(repo):
    """Return the repository if it is `owner/name`; raise ValueError otherwise."""
    if not isinstance(repo, str) or not _REPO_RE.fullmatch(repo):
        raise ValueError("repo %r is not a GitHub repository name of the form owner/name" % (repo,))
    return repo


def release_identity(repo, tag):
    """The exact certificate identity (SAN URI) of the release workflow that signs `tag` of `repo`."""
    return "https://github.com/%s/.github/workflows/release.yml@refs/tags/%s" % (check_repo(repo), check_tag(tag))


def build_policy(identity, issuer=GITHUB_ISSUER):
    """AllOf([OIDCIssuerV2(issuer), Identity(identity)]): both must match exactly."""
    if not identity or not issuer:
        raise ValueError("an expected identity and issuer are required: verification never runs without a policy")
    return policy.AllOf([policy.OIDCIssuerV2(issuer), policy.Identity(identity=identity)])


class TrustRoot:
    """A loaded trusted_root.json: the pinned production root by default, or a file the caller names."""

    def __init__(self, path=None):
        self.path = path
        try:
            if path:
                with open(path, "rb") as f:
                    data = f.read()
                self.sha256 = hashlib.sha256(data).hexdigest()
                self.source = path
                self.verifier = Verifier(trusted_root=TrustedRoot.from_file(path))
            else:
                data = _pinned_root.TRUSTED_ROOT_JSON.encode("utf-8")
                self.sha256 = hashlib.sha256(data).hexdigest()
                if self.sha256 != _pinned_root.SHA256:
                    raise ValueError("embedded root does not match its recorded sha256 %s" % _pinned_root.SHA256)
                self.source = "pinned production root (%s, taken %s)" % (_pinned_root.SOURCE, _pinned_root.TAKEN_ON)
                self.verifier = Verifier(trusted_root=_root_from_bytes(data))
        except Exception as exc:  # fail closed: a root we cannot load verifies nothing
            raise VerifyError("trust_root", "cannot load the Sigstore trust root %s: %s: %s. Point trusted_root at a "
                              "valid trusted_root.json (refreshed on a connected machine, or the one pinned in the collection)"
                              % (path or "(pinned)", type(exc).__name__, exc)) from exc


def _root_from_bytes(data):
    # TrustedRoot has a public from_file() only; go through a private temp file rather than a private API.
    fd, tmp = tempfile.mkstemp(prefix="trusted_root-", suffix=".json")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return TrustedRoot.from_file(tmp)
    finally:
        os.unlink(tmp)


def verify_bundle(trust, name, digest_hex, bundle_bytes, identity, issuer=GITHUB_ISSUER):
    """Verify `bundle_bytes` for a file whose sha256 is `digest_hex` under the exact identity/issuer policy.

    Returns facts from the verified bundle (log_index, integrated_time). Raises VerifyError on anything
    else, whatever the exception type: sigstore is not the only thing that raises (cryptography's
    ExtensionNotFound on a leaf without KeyUsage, pydantic on odd JSON).
    """
    try:
        pol = build_policy(identity, issuer)
        bundle = Bundle.from_json(bundle_bytes)
    except Exception as exc:
        raise VerifyError("malformed_bundle", "%s: the Sigstore bundle is malformed (%s: %s)"
                          % (name, type(exc).__name__, _first_line(exc))) from exc
    try:
        artifact = Hashed(algorithm=HashAlgorithm.SHA2_256, digest=bytes.fromhex(digest_hex))
        trust.verifier.verify_artifact(artifact, bundle, pol)
    except Exception as exc:
        raise _explain(name, exc, bundle, identity, issuer) from exc
    return _bundle_facts(bundle_bytes)


def _first_line(exc):
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _bundle_facts(bundle_bytes):
    # Read after verification succeeded: the entry is then the one the log vouched for.
    entry = json.loads(bundle_bytes)["verificationMaterial"]["tlogEntries"][0]
    integrated = entry.get("integratedTime")
    return {
        "log_index": int(entry["logIndex"]),
        "integrated_time": int(integrated) if integrated not in (None, "", "0") else None,
    }


def certificate_claims(bundle):
    """The SAN URIs and issuer extensions of a bundle's signing certificate (for error messages)."""
    claims = {"sans": [], "issuer_v2": None, "issuer_v1": None}
    try:
        cert = bundle.signing_certificate
    except Exception:  # claims only decorate a message: a broken cert leaves them empty
        return claims
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        claims["sans"] = [str(v) for v in san.get_values_for_type(x509.UniformResourceIdentifier)]
        claims["sans"] += [str(v) for v in san.get_values_for_type(x509.RFC822Name)]
    except Exception:
        claims["sans"] = []
    for ext in cert.extensions:
        if ext.oid.dotted_string == OID_ISSUER_V2:
            claims["issuer_v2"] = _der_utf8(ext.value.value)
        elif ext.oid.dotted_string == OID_ISSUER_V1:
            claims["issuer_v1"] = ext.value.value.decode("utf-8", "replace")
    return claims


def _der_utf8(raw):
    # Extension 1.8 is a DER UTF8String: tag 0x0c, a short-form length (URLs are < 128 bytes), the text.
    if len(raw) >= 2 and raw[0] == 0x0C and raw[1] < 0x80:
        return raw[2:2 + raw[1]].decode("utf-8", "replace")
    return raw.decode("utf-8", "replace")


_NEXT_STEP = ("Nothing was installed. Check that the source serves the official release files for this tag "
              "(re-download from the pinned tag URL); if it persists, treat it as a possible supply-chain "
              "attack and report it to the Carapace maintainers through a security advisory.")


def _explain(name, exc, bundle, identity, issuer):
    """Turn a verification exception into a cause and a message in operator terms."""
    text = "%s: %s" % (type(exc).__name__, _first_line(exc))
    if "message digest mismatch" in text:
        return VerifyError("digest_mismatch", "%s: the file's sha256 does not match the digest its Sigstore bundle "
                           "signs (tampered or truncated file, or a bundle for another file). %s" % (name, _NEXT_STEP))
    if "Signature is invalid" in text:
        return VerifyError("signature_invalid", "%s: the bundle's signature is not valid for this file. %s"
                           % (name, _NEXT_STEP))
    if "SANs do not match" in text:
        sans = certificate_claims(bundle)["sans"]
        return VerifyError("identity_mismatch", "%s: signer identity mismatch: expected %s, the certificate has %s. %s"
                           % (name, identity, ", ".join(sans) or "no SAN", _NEXT_STEP))
    if "OIDCIssuerV2" in text or "OIDC issuer" in text.lower():
        got = certificate_claims(bundle)["issuer_v2"]
        return VerifyError("issuer_mismatch", "%s: OIDC issuer mismatch: expected %s, the certificate has %s. %s"
                           % (name, issuer, got or "no issuer extension %s" % OID_ISSUER_V2, _NEXT_STEP))
    if "CertValidationError" in text or "certificate chain" in text:
        return VerifyError("untrusted_chain", "%s: the signing certificate does not chain to a Fulcio CA of the trusted "
                           "root at the signing time. The likely cause: trusted_root is not the root this release was "
                           "signed under (a mirror signed by another Sigstore instance, or a stale root): check "
                           "trusted_root first. If it is the right root: %s (%s)" % (name, _NEXT_STEP, text))
    if "SCT" in text:
        return VerifyError("transparency", "%s: the certificate's transparency (SCT) proof is invalid (%s). %s"
                           % (name, text, _NEXT_STEP))
    if "log entry" in text or "inclusion" in text or "checkpoint" in text or "transparency log" in text:
        return VerifyError("transparency", "%s: the Rekor transparency log proof is invalid (%s). %s"
                           % (name, text, _NEXT_STEP))
    if "sources of verified time" in text or "imestamp" in text:
        return VerifyError("timestamp", "%s: no trusted signing time (%s). %s" % (name, text, _NEXT_STEP))
    if "InvalidBundle" in text:
        return VerifyError("malformed_bundle", "%s: the Sigstore bundle is malformed (%s). %s" % (name, text, _NEXT_STEP))
    return VerifyError("verification_failed", "%s: Sigstore verification failed (%s). %s" % (name, text, _NEXT_STEP))


def parse_sha256sums(text):
    """Parse `sha256sum` output: {file name: [lower-case hex, ...]}.

    Accepts text (`<hex>  <name>`) and binary (`<hex> *<name>`) mode; the name is reduced to its
    basename as Carapace's updater does. Lines that are not checksum lines are ignored.
    """
    sums = {}
    for line in text.splitlines():
        parts = line.strip().split(None, 1)
        if len(parts) != 2 or not _HEX64_RE.fullmatch(parts[0]):
            continue
        fname = parts[1].strip().lstrip("*").replace("\\", "/").rsplit("/", 1)[-1]
        sums.setdefault(fname, []).append(parts[0].lower())
    return sums


def check_sha256sums(sums, name, digest_hex):
    """The secondary check: exactly one line for `name`, equal to `digest_hex`. Raises VerifyError."""
    lines = sums.get(name, [])
    if not lines:
        raise VerifyError("checksum_missing", "%s: the signed SHA256SUMS.txt has no line for this asset; the release "
                          "is inconsistent. Nothing was installed; re-check the release or set checksums=ignore "
                          "only if the maintainers confirm the file is known to be incomplete." % name)
    if len(set(lines)) != 1:
        raise VerifyError("checksum_mismatch", "%s: SHA256SUMS.txt lists %d different digests for this asset. Nothing "
                          "was installed; report the release as inconsistent." % (name, len(set(lines))))
    if lines[0] != digest_hex.lower():
        raise VerifyError("checksum_mismatch", "%s: sha256 %s does not match SHA256SUMS.txt (%s). Nothing was "
                          "installed; re-download the release from the pinned tag URL." % (name, digest_hex, lines[0]))
    return True
