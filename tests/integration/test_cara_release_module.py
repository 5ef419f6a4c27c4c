"""carapace.fleet.cara_release run for real by ansible-playbook on localhost, against a loopback release server."""

import os

import pytest

from playbook import run_module
from release_factory import publish, release_dir

REPO = "puremachinery/carapace"
TAG = "v0.9.0"
ASSETS = {"cara-x86_64-linux": b"\x7fELF x86_64 cara 0.9.0\n" * 512, "cara-aarch64-linux": b"\x7fELF aarch64 cara 0.9.0\n" * 512}
SECRET = "ghp_SECRET-TOKEN-never-logged-42"


@pytest.fixture
def release(lab, release_server):
    publish(lab, release_server.root, REPO, TAG, ASSETS)
    return release_server


def args_for(tmp_path, lab_root, server, **extra):
    args = {"tag": TAG, "assets": list(ASSETS), "dest": str(tmp_path / "cache"), "trusted_root": str(lab_root),
            "base_url": server.url + "/{repo}/releases/download/{tag}"}
    args.update(extra)
    return args


def test_check_mode_then_real_run_then_idempotent(tmp_path, lab_root, release):
    args = args_for(tmp_path, lab_root, release)
    rc, res, out = run_module(tmp_path, "carapace.fleet.cara_release", args, check=True, diff=True)
    assert rc == 0, out
    assert res["changed"] is True and not res.get("failed")
    assert release.requests == []  # check mode downloads nothing
    assert not (tmp_path / "cache").exists()
    assert "cara-x86_64-linux" in res["diff"]["after"]["files"]

    rc, res, out = run_module(tmp_path, "carapace.fleet.cara_release", args)
    assert rc == 0, out
    assert res["changed"] is True
    linux = res["assets"]["cara-x86_64-linux"]
    assert linux["checksum_verified"] is True and linux["cached"] is False
    assert linux["identity"] == "https://github.com/%s/.github/workflows/release.yml@refs/tags/%s" % (REPO, TAG)
    assert linux["issuer"] == "https://token.actions.githubusercontent.com"
    assert isinstance(linux["log_index"], int) and isinstance(linux["integrated_time"], int)
    assert open(linux["path"], "rb").read() == ASSETS["cara-x86_64-linux"]
    assert len(res["trusted_root_sha256"]) == 64

    rc, res2, out = run_module(tmp_path, "carapace.fleet.cara_release", args)
    assert rc == 0, out
    assert res2["changed"] is False
    assert all(a["cached"] for a in res2["assets"].values())
    assert release.downloads("cara-x86_64-linux") == 1

    rc, res3, out = run_module(tmp_path, "carapace.fleet.cara_release", args, check=True)
    assert rc == 0 and res3["changed"] is False, out


def test_failure_output_names_asset_cause_and_next_step(tmp_path, lab_root, release):
    release.faults["cara-x86_64-linux"] = {"tamper": True}
    rc, res, out = run_module(tmp_path, "carapace.fleet.cara_release", args_for(tmp_path, lab_root, release),
                              keep_going=False)
    assert rc == 2
    assert res is None  # the play stopped at the failed task
    assert "cara-x86_64-linux: the file's sha256 does not match" in out
    assert "Nothing was installed" in out
    assert not os.path.exists(tmp_path / "cache" / TAG)


def test_failure_result_fields(tmp_path, lab_root, lab, release):
    # a bundle signed for v0.8.0 served as v0.9.0's
    bundle = os.path.join(release_dir(release.root, REPO, TAG), "cara-x86_64-linux.bundle")
    with open(bundle, "wb") as f:
        f.write(lab.sign(ASSETS["cara-x86_64-linux"],
                         "https://github.com/%s/.github/workflows/release.yml@refs/tags/v0.8.0" % REPO))
    rc, res, out = run_module(tmp_path, "carapace.fleet.cara_release", args_for(tmp_path, lab_root, release))
    assert rc == 0, out
    assert res["failed"] is True
    assert res["cause"] == "identity_mismatch" and res["asset"] == "cara-x86_64-linux"
    assert "refs/tags/v0.8.0" in res["msg"] and "refs/tags/v0.9.0" in res["msg"]


def test_default_trust_root_is_the_pinned_production_root(tmp_path, release):
    """Without trusted_root, lab-signed files are refused: only the real Sigstore's signatures are trusted."""
    args = args_for(tmp_path, None, release)
    del args["trusted_root"]
    rc, res, out = run_module(tmp_path, "carapace.fleet.cara_release", args)
    assert rc == 0, out
    assert res["failed"] is True and res["cause"] == "untrusted_chain"
    assert not os.path.exists(tmp_path / "cache" / TAG)


def test_headers_are_never_logged(tmp_path, lab_root, release):
    args = args_for(tmp_path, lab_root, release, headers={"Authorization": "Bearer " + SECRET})
    rc, res, out = run_module(tmp_path, "carapace.fleet.cara_release", args, verbosity=3)
    assert rc == 0 and res["changed"] is True, out
    assert SECRET not in out
    assert SECRET not in str(res)


@pytest.mark.parametrize("bad,message", [
    ({"tag": "0.9.0"}, "not a Carapace release tag"),
    ({"repo": "carapace"}, "owner/name"),
    ({"assets": ["../etc/passwd"]}, "plain file names"),
    ({"base_url": "ftp://mirror.example/x"}, "unsupported scheme"),
    ({"timeout": 0}, "must be positive"),
])
def test_bad_arguments_fail_before_any_download(tmp_path, lab_root, release, bad, message):
    rc, res, out = run_module(tmp_path, "carapace.fleet.cara_release", args_for(tmp_path, lab_root, release, **bad))
    assert rc == 0, out
    assert res["failed"] is True and message in res["msg"]
    assert release.requests == []
