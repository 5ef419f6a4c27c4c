"""Signed releases of the `cara` double, laid out as GitHub serves them.

Layout under a root directory:
    <root>/trusted_root.json                                       the test Sigstore's trust root
    <root>/<owner>/<repo>/releases/download/<tag>/<file>           every asset, SHA256SUMS.txt, and <file>.bundle
    <root>/<owner>/<repo>/docs/releases/<tag>.md                   release notes, the policy's seven sections
    <root>/<owner>/<repo>/docs/releases-incomplete/<tag>.md        a deliberately incomplete set (notes gate)
    <root>/releases.json                                           what was built: tags, assets, digests, faults

`publish()` lays out one release from given bytes (any content, any identity/issuer/variant, to build broken
releases); `build_releases()` builds the double's releases (default v0.7.0, v0.8.0, v0.9.0 and the faulty v0.9.1)
for every asset name of the release workflow. Every file is signed by a `sigstore_lab.PrivateSigstore` with the
release workflow identity of its tag.
"""

import hashlib
import json
import os
import tempfile

import cara_double
from sigstore_lab import GITHUB_ISSUER, release_identity

SUMS = "SHA256SUMS.txt"
DEFAULT_REPO = "puremachinery/carapace"
DEFAULT_TAGS = ("v0.7.0", "v0.8.0", "v0.9.0", "v0.9.1")
# Asset names of the release workflow (cara-contract.md 5.1). Only the linux ones must run here; the others are
# the same program, told apart by a trailing comment so that every asset has its own digest.
ASSET_NAMES = ("cara-x86_64-linux", "cara-aarch64-linux", "cara-x86_64-darwin", "cara-aarch64-darwin",
               "cara-x86_64-windows.exe")
# v0.9.1 is the faulty release of the drills: its first start migrates tasks/queue.json to a shape older releases
# cannot parse (`attempts` becomes {"count": n}; v0.9.0 and older then refuse to start until the pre-upgrade backup
# is restored) and it never becomes ready, so it fails any health gate.
DEFAULT_FAULTS = {"v0.9.1": {"migrate_state": True, "ready_never": True}}

NOTES_SECTIONS = ("Summary", "Breaking Changes", "Migration Steps", "Rollback Steps", "Security", "Verification",
                  "Known Caveats")
BREAKING = {
    "v0.8.0": "- Built-in pricing is removed; plaintext credential files and legacy secret envelopes are rejected.",
    "v0.9.0": "- `/health/ready` answers 503 while a channel is in Error.\n- Non-interactive `cara setup` requires `--model`.",
}


def release_dir(root, repo, tag):
    return os.path.join(root, *repo.split("/"), "releases", "download", tag)


def sha256sums_text(assets):
    """`sha256sum` text-mode lines for the given {name: bytes}, sorted by name."""
    return "".join("%s  %s\n" % (hashlib.sha256(data).hexdigest(), name) for name, data in sorted(assets.items()))


def publish(lab, root, repo, tag, assets, *, sums=True, sums_text=None, identity=None, issuer=GITHUB_ISSUER,
            variant="valid"):
    """Write one release; returns its directory. `sums_text` overrides the SHA256SUMS.txt content."""
    out = release_dir(root, repo, tag)
    os.makedirs(out, exist_ok=True)
    ident = identity or release_identity(repo, tag)
    files = dict(assets)
    if sums:
        files[SUMS] = (sums_text if sums_text is not None else sha256sums_text(assets)).encode()
    for name, data in files.items():
        with open(os.path.join(out, name), "wb") as f:
            f.write(data)
        with open(os.path.join(out, name + ".bundle"), "wb") as f:
            f.write(lab.sign(data, ident, issuer=issuer, variant=variant))
    return out


def double_assets(tag, faults=None, asset_names=ASSET_NAMES):
    """{asset name: bytes} of the double's release `tag` (flavor by version, faults baked in)."""
    with tempfile.TemporaryDirectory() as tmp:
        program = cara_double.build_release(tag, os.path.join(tmp, "cara"), faults=faults).read_bytes()
    return {name: program + ("# release asset %s of %s\n" % (name, tag)).encode() for name in asset_names}


def release_notes(tag, complete=True):
    """Release notes in the policy's template (docs/release.md section 8); `complete=False` drops two sections."""
    body = {
        "Summary": "Carapace %s (test double release)." % tag,
        "Breaking Changes": BREAKING.get(tag, "None."),
        "Migration Steps": "Run `cara backup --output ./carapace-backup-%s.tar.gz` before upgrading." % tag,
        "Rollback Steps": "Stop cara, reinstall the previous pinned binary, `cara restore <backup> --force`, start, "
                          "then `cara status`, `cara verify --outcome auto`, `cara verify --outcome autonomy`.",
        "Security": "No security fixes.",
        "Verification": "`RELEASE_TAG=%s ./scripts/smoke/verify-release-artifacts.sh`" % tag,
        "Known Caveats": "None.",
    }
    sections = NOTES_SECTIONS if complete else tuple(s for s in NOTES_SECTIONS if s not in ("Rollback Steps", "Verification"))
    return "# Carapace %s\n\n" % tag + "".join("## %s\n\n%s\n\n" % (s, body[s]) for s in sections)


def build_releases(lab, root, repo=DEFAULT_REPO, tags=DEFAULT_TAGS, faults=None, asset_names=ASSET_NAMES):
    """Build, sign and lay out the double's releases under `root`; returns the manifest (also in releases.json)."""
    faults = DEFAULT_FAULTS if faults is None else faults
    os.makedirs(root, exist_ok=True)
    lab.write_trusted_root(os.path.join(root, "trusted_root.json"))
    manifest = {"repo": repo, "trusted_root": os.path.join(root, "trusted_root.json"), "releases": {}}
    for tag in tags:
        assets = double_assets(tag, faults.get(tag), asset_names)
        publish(lab, root, repo, tag, assets)
        for kind, complete in (("releases", True), ("releases-incomplete", False)):
            notes = os.path.join(root, *repo.split("/"), "docs", kind, tag + ".md")
            os.makedirs(os.path.dirname(notes), exist_ok=True)
            with open(notes, "w", encoding="utf-8") as f:
                f.write(release_notes(tag, complete))
        manifest["releases"][tag] = {
            "faults": faults.get(tag, {}),
            "flavor": cara_double.default_flavor(tag.lstrip("v")),
            "assets": {n: hashlib.sha256(d).hexdigest() for n, d in assets.items()},
        }
    with open(os.path.join(root, "releases.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
        f.write("\n")
    return manifest
