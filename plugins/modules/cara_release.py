#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: carapace.fleet maintainers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: cara_release
short_description: Download a Carapace release and verify it with Sigstore, offline and fail closed
version_added: 0.1.0
description:
  - Downloads release assets of Carapace (C(cara)) with their Sigstore bundles from GitHub, an http(s) mirror,
    a C(file://) URL or a local directory, and verifies every file before it is placed in a local cache
    O(dest)/<tag>/.
  - Verification follows Carapace's release policy. The bundle C(<asset>.bundle) must verify against a pinned
    Sigstore trust root, with the certificate's OIDC issuer (extension 1.3.6.1.4.1.57264.1.8) equal to
    O(expected_issuer) and its SAN equal, exactly, to O(expected_identity) (the release workflow of the target
    tag). C(SHA256SUMS.txt) is a secondary check after that, never a substitute.
  - Verification is offline. The trust root is the Sigstore public-good production C(trusted_root.json) pinned
    in this collection (its sha256 and the date it was taken are recorded in C(files/sigstore/)), or the file
    named by O(trusted_root). The user's Sigstore TUF cache is never read.
  - Fails closed. Every file is downloaded to a private temporary directory, verified, re-hashed and only then
    moved atomically into O(dest)/<tag>/. When any file of the run fails, nothing of the run is installed and
    the task fails with a message that names the file, the cause and the next step.
  - Cached files are re-hashed and re-verified on every run (cheap) and reported unchanged. A cached file that
    no longer verifies is removed and fetched again.
  - "Usually run once per release on the controller (C(delegate_to: localhost), C(run_once: true)); the roles of
    this collection do so and copy the verified files to the hosts."
author:
  - carapace.fleet maintainers (@carapace-fleet)
requirements:
  - sigstore >= 4.5, < 5 (Python) on the host that runs the module
extends_documentation_fragment: []
attributes:
  check_mode:
    support: full
    description: Re-verifies cached files read-only and reports what would be fetched; downloads nothing.
  diff_mode:
    support: full
    description: Shows the files of O(dest)/<tag>/ before and after.
  idempotent:
    support: full
    description: A second run with the same arguments re-verifies the cache and reports C(changed=false).
options:
  repo:
    description: GitHub repository (C(owner/name)) that publishes the release.
    type: str
    default: puremachinery/carapace
  tag:
    description:
      - Release tag, C(vMAJOR.MINOR.PATCH) (previews C(vMAJOR.MINOR.PATCH-previewN)).
      - The tag is part of the expected signer identity, so a bundle signed for any other tag is refused.
    type: str
    required: true
  assets:
    description:
      - Asset names to fetch, for example C(cara-x86_64-linux), C(cara-aarch64-linux), C(cara-x86_64-darwin),
        C(cara-aarch64-darwin), C(cara-x86_64-windows.exe).
    type: list
    elements: str
    default: [cara-x86_64-linux]
  base_url:
    description:
      - Where the release files are. C({repo}) and C({tag}) are replaced by O(repo) and O(tag).
      - An C(https://) or C(http://) mirror, a C(file:///dir) URL or a plain local directory holding C(<asset>),
        C(<asset>.bundle), C(SHA256SUMS.txt) and C(SHA256SUMS.txt.bundle). Air-gapped sites copy a release into a
        directory and point this at it; verification is the same.
      - Defaults to C(https://github.com/{repo}/releases/download/{tag}).
    type: str
  dest:
    description:
      - Cache directory. Verified files land in O(dest)/<tag>/ (created 0755, files 0644).
      - Temporary downloads live in hidden C(.incoming-*) directories under O(dest) and are removed when the run ends;
        ones left by a killed run are removed by the next run.
    type: path
    required: true
  trusted_root:
    description:
      - Path to a Sigstore C(trusted_root.json) to trust instead of the pinned production root (a private Sigstore,
        or a root refreshed on a connected machine with C(sigstore plumbing update-trust-root)).
      - Defaults to the production root pinned in this collection.
    type: path
  expected_identity:
    description:
      - Exact certificate SAN the signer must have. No pattern matching.
      - Defaults to C(https://github.com/{repo}/.github/workflows/release.yml@refs/tags/{tag}).
    type: str
  expected_issuer:
    description: OIDC issuer the signing certificate must carry in extension 1.3.6.1.4.1.57264.1.8.
    type: str
    default: https://token.actions.githubusercontent.com
  checksums:
    description:
      - The secondary C(SHA256SUMS.txt) check. When the file is used, its own C(SHA256SUMS.txt.bundle) is verified with
        the same policy first, and the file must have exactly one line for each asset, equal to its sha256.
      - V(if_present) checks it when the release publishes it (a release without it passes on the bundle alone).
      - V(required) fails when the release has no C(SHA256SUMS.txt).
      - V(ignore) does not fetch it.
      - Sigstore signs digests, not names, so C(SHA256SUMS.txt) is the only binding of each file to its asset name;
        the module warns whenever it runs without it. The roles of this collection use V(required).
    type: str
    choices: [if_present, required, ignore]
    default: if_present
  validate_certs:
    description: Validate TLS certificates of https sources. Turn off only for a mirror you trust by other means.
    type: bool
    default: true
  timeout:
    description: Seconds one file's whole transfer may take (connection and every read included).
    type: int
    default: 60
  retries:
    description:
      - How many more times a transient failure of one download is tried (connection refused or reset, a timeout, a
        truncated body, HTTP 5xx), after 0.5, 1, 2, 4... seconds (at most 8); each attempt gets its own O(timeout).
      - An HTTP 4xx answer is never retried, and neither is a file that fails its integrity or authenticity check
        (digest, C(SHA256SUMS.txt), Sigstore bundle), which is refused at once. V(0) tries once.
    type: int
    default: 3
  max_bytes:
    description: Largest size accepted for any one file; a larger one is refused before or while it streams.
    type: int
    default: 268435456
  headers:
    description:
      - Extra HTTP headers, for example C(Authorization) with a token for a private mirror. Never logged.
    type: dict
    default: {}
notes:
  - The real C(cara update) fetches its trust root online through TUF; this module is offline by design. Refresh the
    pinned root when Sigstore rotates keys; a newer release of this collection ships it, or point O(trusted_root) at a
    C(trusted_root.json) refreshed on a connected machine.
  - The module never uses sigstore's C(Verifier.production()) (offline, it trusts the user's cache) nor a no-op policy.
seealso:
  - name: Carapace release policy
    description: Updater authenticity contract (docs/release.md in the Carapace repository).
    link: https://github.com/puremachinery/carapace/blob/master/docs/release.md
"""

EXAMPLES = r"""
- name: Fetch and verify v0.9.0 for the fleet's architectures, once, on the controller
  carapace.fleet.cara_release:
    tag: v0.9.0
    assets: [cara-x86_64-linux, cara-aarch64-linux]
    dest: "{{ playbook_dir }}/.cache/carapace"
  delegate_to: localhost
  run_once: true
  register: release

- name: Air-gapped site, release copied into a local directory
  carapace.fleet.cara_release:
    tag: v0.9.0
    base_url: /srv/mirror/carapace/{tag}
    dest: /var/cache/carapace-releases
    checksums: required

- name: Private mirror that needs a token
  carapace.fleet.cara_release:
    tag: v0.9.0
    base_url: https://mirror.example.internal/{repo}/releases/download/{tag}
    dest: /var/cache/carapace-releases
    headers:
      Authorization: "Bearer {{ mirror_token }}"
"""

RETURN = r"""
assets:
  description: One entry per asset name.
  returned: always
  type: dict
  contains:
    path:
      description: Verified file in the cache.
      type: str
      sample: /var/cache/carapace-releases/v0.9.0/cara-x86_64-linux
    sha256:
      description: Its sha256 (hex). V(null) in check mode for a file not yet fetched.
      type: str
    size:
      description: Its size in bytes.
      type: int
    bundle_path:
      description: Its Sigstore bundle in the cache.
      type: str
    identity:
      description: Signer identity that was required (and matched).
      type: str
    issuer:
      description: OIDC issuer that was required (and matched).
      type: str
    log_index:
      description: Rekor log index of the verified entry.
      type: int
    integrated_time:
      description: Rekor integrated time (Unix seconds) when the bundle carries one, else V(null).
      type: int
    checksum_verified:
      description: Whether the signed C(SHA256SUMS.txt) line for the asset was checked and matched.
      type: bool
    cached:
      description: Whether the file came from the cache (re-verified) rather than a download of this run.
      type: bool
    url:
      description: Where the file is (or would be) fetched from.
      type: str
  sample:
    cara-x86_64-linux:
      path: /var/cache/carapace-releases/v0.9.0/cara-x86_64-linux
      sha256: 9f2c0e7d8a5b4c3e2f1a0b9c8d7e6f5a4b3c2d1e0f9a8b7c6d5e4f3a2b1c0d9e
      size: 31457280
      bundle_path: /var/cache/carapace-releases/v0.9.0/cara-x86_64-linux.bundle
      identity: https://github.com/puremachinery/carapace/.github/workflows/release.yml@refs/tags/v0.9.0
      issuer: https://token.actions.githubusercontent.com
      log_index: 1164501938
      integrated_time: 1779000000
      checksum_verified: true
      cached: false
      url: https://github.com/puremachinery/carapace/releases/download/v0.9.0/cara-x86_64-linux
trusted_root:
  description: Which trust root was used.
  returned: always
  type: str
trusted_root_sha256:
  description: sha256 of the trust root file that was used.
  returned: always
  type: str
  sample: 6494e21ea73fa7ee769f85f57d5a3e6a08725eae1e38c755fc3517c9e6bc0b66
dest:
  description: The directory O(dest)/<tag>.
  returned: always
  type: str
identity:
  description: Required signer identity.
  returned: always
  type: str
issuer:
  description: Required OIDC issuer.
  returned: always
  type: str
checksums:
  description: What became of the C(SHA256SUMS.txt) check.
  returned: always
  type: dict
  contains:
    mode:
      description: The O(checksums) setting.
      type: str
    present:
      description: Whether the release's signed C(SHA256SUMS.txt) was used.
      type: bool
    path:
      description: Its path in the cache, when present.
      type: str
actions:
  description: What the run did (or, in check mode, would do).
  returned: always
  type: list
  elements: str
cause:
  description:
    - On failure, a machine-readable cause, one of C(identity_mismatch), C(issuer_mismatch), C(digest_mismatch),
      C(signature_invalid), C(untrusted_chain), C(transparency), C(timestamp), C(malformed_bundle), C(missing_bundle),
      C(verification_failed), C(checksum_mismatch), C(checksum_missing), C(checksums_absent), C(not_found), C(http_error),
      C(timeout), C(too_large), C(truncated), C(connection_error), C(bad_source), C(trust_root), C(bad_argument).
  returned: failure
  type: str
asset:
  description: On failure, the file that failed.
  returned: failure
  type: str
"""

import os
import traceback

from ansible.module_utils.basic import AnsibleModule, missing_required_lib
from ansible.module_utils.urls import open_url

from ansible_collections.carapace.fleet.plugins.module_utils import _http, _verify
from ansible_collections.carapace.fleet.plugins.module_utils._download import FetchError, Source
from ansible_collections.carapace.fleet.plugins.module_utils._release import CHECKSUM_MODES, ReleaseCache, ReleaseError


def main():
    module = AnsibleModule(
        argument_spec=dict(
            repo=dict(type="str", default=_verify.DEFAULT_REPO),
            tag=dict(type="str", required=True),
            assets=dict(type="list", elements="str", default=["cara-x86_64-linux"]),
            base_url=dict(type="str"),
            dest=dict(type="path", required=True),
            trusted_root=dict(type="path"),
            expected_identity=dict(type="str"),
            expected_issuer=dict(type="str", default=_verify.GITHUB_ISSUER),
            checksums=dict(type="str", choices=list(CHECKSUM_MODES), default="if_present"),
            validate_certs=dict(type="bool", default=True),
            retries=dict(type="int", default=_http.DEFAULT_RETRIES),
            timeout=dict(type="int", default=60),
            max_bytes=dict(type="int", default=256 * 1024 * 1024),
            headers=dict(type="dict", default={}, no_log=True),
        ),
        supports_check_mode=True,
    )
    if not _verify.HAS_SIGSTORE:
        module.fail_json(msg=missing_required_lib("sigstore>=4.5,<5"), exception=_verify.SIGSTORE_IMPORT_ERROR,
                         cause="bad_argument")
    p = module.params
    # credentials in base_url (https://user:password@mirror/...) are masked in everything the module returns
    module.no_log_values.update(_http.url_credentials(p["base_url"]))
    try:
        _verify.check_tag(p["tag"])
        _verify.check_repo(p["repo"])
        if not p["assets"] or any(not a or "/" in a or a.startswith(".") for a in p["assets"]):
            raise ValueError("assets must be a non-empty list of plain file names, e.g. [cara-x86_64-linux]")
        if p["timeout"] <= 0 or p["max_bytes"] <= 0:
            raise ValueError("timeout and max_bytes must be positive")
        if p["retries"] < 0:
            raise ValueError("retries must be 0 or more")
        identity = p["expected_identity"] or _verify.release_identity(p["repo"], p["tag"])
        source = Source(p["base_url"], p["repo"], p["tag"])
    except ValueError as exc:
        module.fail_json(msg=str(exc), cause="bad_argument")
    except FetchError as exc:
        module.fail_json(msg=exc.message, cause=exc.cause)

    # Redirects are followed by _http (custom headers stay with the first origin, https -> http is refused), and
    # the timeout bounds each whole request.
    opener = _http.ansible_opener(open_url, headers=p["headers"], validate_certs=p["validate_certs"],
                                  http_agent="carapace.fleet cara_release")

    try:
        trust = _verify.TrustRoot(p["trusted_root"])
        cache = ReleaseCache(tag=p["tag"], repo=p["repo"], assets=p["assets"], dest=p["dest"], source=source,
                             trust=trust, identity=identity, issuer=p["expected_issuer"], checksums=p["checksums"],
                             opener=opener, move=module.atomic_move, timeout=p["timeout"], max_bytes=p["max_bytes"],
                             retries=p["retries"])
        result = cache.plan() if module.check_mode else cache.sync()
    except _verify.VerifyError as exc:
        module.fail_json(msg=exc.message, cause=exc.cause)
    except ReleaseError as exc:
        module.fail_json(msg=exc.message, cause=exc.cause, asset=exc.asset, tag=p["tag"])
    except OSError as exc:
        module.fail_json(msg="cannot write the release cache %s: %s. Check that dest is a writable directory."
                         % (os.path.join(p["dest"], p["tag"]), exc), cause="bad_argument")
    except Exception as exc:  # fail closed, but say what happened
        module.fail_json(msg="unexpected error while fetching %s %s: %s: %s. Nothing was installed."
                         % (p["repo"], p["tag"], type(exc).__name__, _http.redact_url(str(exc))),
                         cause="verification_failed", exception=_http.redact_url(traceback.format_exc()))
    for warning in result.pop("warnings"):
        module.warn(warning)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
