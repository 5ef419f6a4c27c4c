"""The Molecule scenarios' release source: signed releases of the `cara` double and the broken ones of `fail_closed`.

    python molecule/release_lab.py --out build/molecule/releases

Writes, under --out (served by `tests/support/fleetctl.py serve` on 127.0.0.1; scripts/molecule_run.sh does both):
    trusted_root.json, releases.json, puremachinery/carapace/...   v0.7.0 .. the faulty v0.9.1 (release_factory)
    cases/<case>/puremachinery/carapace/releases/download/v0.9.0/  one broken v0.9.0 per fail_closed case
    cases.json                                                      {case: the cara_release cause it must fail with}

Every case is signed by the same private test Sigstore as the good releases (one trust root for all), and breaks
exactly one thing, so that the run can only fail for that reason. GitHub itself is what this stands in for.
"""

import argparse
import json
import os
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "support"))

from release_factory import DEFAULT_REPO, build_releases, double_assets, publish, sha256sums_text  # noqa: E402  pylint: disable=wrong-import-position
from sigstore_lab import PrivateSigstore, release_identity  # noqa: E402  pylint: disable=wrong-import-position

TAG = "v0.9.0"
ASSET = "cara-x86_64-linux"
OTHER_ISSUER = "https://accounts.google.com"


def _case_tampered(lab, root, assets):
    """Signed as released, then one byte of the asset changed (a mirror or a proxy rewrote it)."""
    out = publish(lab, root, DEFAULT_REPO, TAG, assets)
    data = bytearray(assets[ASSET])
    data[len(data) // 2] ^= 0x01
    with open(os.path.join(out, ASSET), "wb") as f:
        f.write(bytes(data))


def _case_other_tag(lab, root, assets):
    """Bundles made by the release workflow of another tag (v0.8.0): a genuine signature, the wrong identity."""
    publish(lab, root, DEFAULT_REPO, TAG, assets, identity=release_identity(DEFAULT_REPO, "v0.8.0"))


def _case_wrong_issuer(lab, root, assets):
    """The right identity URI, certified by an OIDC issuer that is not GitHub Actions."""
    publish(lab, root, DEFAULT_REPO, TAG, assets, issuer=OTHER_ISSUER)


def _case_missing_bundle(lab, root, assets):
    """The asset published without its .bundle."""
    out = publish(lab, root, DEFAULT_REPO, TAG, assets)
    os.unlink(os.path.join(out, ASSET + ".bundle"))


def _case_sums_mismatch(lab, root, assets):
    """Asset and bundle genuine; SHA256SUMS.txt (itself validly signed) lists another digest for the asset."""
    wrong = dict(assets)
    wrong[ASSET] = assets[ASSET] + b"# not what was released\n"
    publish(lab, root, DEFAULT_REPO, TAG, assets, sums_text=sha256sums_text(wrong))


# case -> (how to build it, the cause cara_release reports)
CASES = {
    "tampered": (_case_tampered, "digest_mismatch"),
    "other_tag": (_case_other_tag, "identity_mismatch"),
    "wrong_issuer": (_case_wrong_issuer, "issuer_mismatch"),
    "missing_bundle": (_case_missing_bundle, "missing_bundle"),
    "sums_mismatch": (_case_sums_mismatch, "checksum_mismatch"),
}


def build(out):
    lab = PrivateSigstore()
    if os.path.isdir(out):
        shutil.rmtree(out)
    build_releases(lab, out)
    assets = {ASSET: double_assets(TAG)[ASSET]}
    for case, (make, _cause) in CASES.items():
        make(lab, os.path.join(out, "cases", case), assets)
    with open(os.path.join(out, "cases.json"), "w", encoding="utf-8") as f:
        json.dump({case: cause for case, (_make, cause) in CASES.items()}, f, indent=2, sort_keys=True)
        f.write("\n")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    build(os.path.abspath(args.out))
    print("release_lab: releases and %d fail_closed cases in %s" % (len(CASES), args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
