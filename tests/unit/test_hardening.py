"""Regression tests of issue 12 (hardening): strict inputs, bounded work, no leaks.

Each test names the item of the issue it covers.
"""

import pytest

from ansible_collections.carapace.fleet.plugins.module_utils import _backup, _switch, _verify, _version


# -- item 11: tag and version patterns match the whole string -------------------------------------------------------

@pytest.mark.parametrize("check", [_version.check_tag, _backup.check_tag, _switch.check_tag])
def test_item11_a_tag_with_a_trailing_newline_is_refused(check):
    assert check("v0.9.0") == "v0.9.0"
    with pytest.raises(Exception):
        check("v0.9.0\n")


def test_item11_tag_used_as_a_directory_name_keeps_its_exact_text():
    # parse_version strips command output on purpose; the tag checks behind paths do not
    assert _version.normalize_tag(" v0.9.0\n") == "v0.9.0"
    with pytest.raises(ValueError):
        _verify.release_identity("puremachinery/carapace", "v0.9.0\n")


def test_item11_repo_and_digest_patterns_match_the_whole_string():
    with pytest.raises(ValueError):
        _verify.check_repo("owner/name\n")
    assert _verify.parse_sha256sums("%s  cara\n" % ("a" * 64)) == {"cara": ["a" * 64]}
    assert _verify.parse_sha256sums("%s\n  cara\n" % ("a" * 64)) == {}
