"""Lay out signed releases as GitHub serves them: <root>/<owner>/<repo>/releases/download/<tag>/<file>.

`publish()` writes the given assets, a `SHA256SUMS.txt` in `sha256sum` text format (sorted, assets only),
and a Sigstore bundle `<file>.bundle` for every file, signed by a `sigstore_lab.PrivateSigstore` with the
release workflow identity of the tag (or another identity/issuer/variant, to build broken releases).
"""

import hashlib
import os

from sigstore_lab import GITHUB_ISSUER, release_identity

SUMS = "SHA256SUMS.txt"


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
