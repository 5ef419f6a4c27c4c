"""The release-notes gate (module_utils/_notes.py): sections, breaking changes and their acknowledgement, sources."""

import io

import pytest

from ansible_collections.carapace.fleet.plugins.module_utils import _notes
from ansible_collections.carapace.fleet.plugins.module_utils._notes import NotesError, check_notes, parse_sections
from release_factory import NOTES_SECTIONS, release_notes

# Shaped like Carapace's real docs/releases/v0.9.0.md (cara-contract.md 6.1): "Migration" instead of "Migration
# Steps", an extra "Platform Hardening", Security before Rollback Steps.
V090 = """\
# Carapace v0.9.0

Release date: unreleased.

## Summary

v0.9.0 hardens readiness and the setup flow.

## Breaking Changes

- `/health/ready` now returns 503 while any configured channel is in Error.
- Non-interactive `cara setup` now requires `--model`.

## Migration

1. Back up: `cara backup --output ./carapace-backup-v0.8.x.tar.gz`.
2. Pass `--model provider:model` to scripted `cara setup` runs.

## Security

- Restore refuses symlinked section roots.

## Platform Hardening

- State directories are created 0700.

## Rollback Steps

1. Stop Cara.
2. Reinstall v0.8.0 from its pinned tag URL.
3. `cara restore ./carapace-backup-v0.8.x.tar.gz`
4. Start Cara and run `cara status --port 18789`.

## Verification

```sh
RELEASE_TAG=v0.9.0 ./scripts/smoke/verify-release-artifacts.sh
## not a heading: inside a code block
```

## Known Caveats

None.
"""


def test_factory_notes_are_complete_and_pass():
    facts = check_notes(release_notes("v0.7.0"), "v0.7.0")
    assert list(facts["sections"]) == list(NOTES_SECTIONS)
    assert facts["missing"] == [] and facts["empty"] == [] and facts["aliases"] == {}
    assert facts["breaking"] is None and facts["acknowledged"] is False
    assert facts["sections"]["Known Caveats"] == "None."
    assert facts["sections"]["Verification"] == "`RELEASE_TAG=v0.7.0 ./scripts/smoke/verify-release-artifacts.sh`"
    assert facts["warnings"] == []


def test_incomplete_notes_fail_naming_the_missing_sections():
    with pytest.raises(NotesError) as err:
        check_notes(release_notes("v0.7.0", complete=False), "v0.7.0", src="notes.md")
    exc = err.value
    assert exc.cause == "missing_sections"
    assert exc.facts["missing"] == ["Rollback Steps", "Verification"]
    assert "lack the required sections Rollback Steps, Verification" in exc.message
    assert "notes.md" in exc.message and "docs/releases/v0.7.0.md" in exc.message  # where, and the next step
    assert "required_sections" in exc.message


def test_empty_section_fails_but_none_counts_as_filled_in():
    text = release_notes("v0.7.0").replace("No security fixes.", "<!-- fill in -->")
    with pytest.raises(NotesError) as err:
        check_notes(text, "v0.7.0")
    assert err.value.cause == "missing_sections"
    assert err.value.facts["empty"] == ["Security"] and err.value.facts["missing"] == []
    assert "have nothing under Security" in err.value.message
    check_notes(release_notes("v0.7.0").replace("No security fixes.", "None."), "v0.7.0")


def test_breaking_changes_need_the_ack_for_this_tag():
    text = release_notes("v0.9.0")
    with pytest.raises(NotesError) as err:
        check_notes(text, "v0.9.0")
    exc = err.value
    assert exc.cause == "breaking_unacknowledged"
    assert "> - `/health/ready` answers 503 while a channel is in Error." in exc.message  # quoted
    assert "`cara_upgrade_ack_breaking: v0.9.0`" in exc.message
    assert exc.facts["breaking"].startswith("- `/health/ready`") and exc.facts["acknowledged"] is False

    facts = check_notes(text, "v0.9.0", ack_breaking="v0.9.0")
    assert facts["acknowledged"] is True and "--model" in facts["breaking"]
    assert check_notes(text, "0.9.0", ack_breaking="v0.9.0")["acknowledged"] is True  # `v` optional on either


def test_ack_for_another_release_does_not_carry_over():
    with pytest.raises(NotesError) as err:
        check_notes(release_notes("v0.9.0"), "v0.9.0", ack_breaking="v0.8.0")
    assert err.value.cause == "breaking_unacknowledged"
    assert "ack_breaking is 'v0.8.0', which does not acknowledge v0.9.0" in err.value.message
    with pytest.raises(NotesError):
        check_notes(release_notes("v0.9.0"), "v0.9.0", ack_breaking="yes")


@pytest.mark.parametrize("body", ["None.", "None", "none", "N/A", "n/a.", "- None.", "_None._", "**N/A**",
                                  "<!-- nothing this time -->\nNone."])
def test_no_breaking_changes_spellings(body):
    assert _notes.is_none(body)
    text = release_notes("v0.7.0").replace("## Breaking Changes\n\nNone.", "## Breaking Changes\n\n" + body)
    assert check_notes(text, "v0.7.0")["breaking"] is None


@pytest.mark.parametrize("body", ["None for Linux; macOS drops the launchd helper.", "- Removes `--path`.", "Nothing"])
def test_anything_else_is_a_breaking_change(body):
    assert not _notes.is_none(body)


def test_missing_sections_and_unacknowledged_breaking_are_reported_together():
    with pytest.raises(NotesError) as err:
        check_notes(release_notes("v0.9.0", complete=False), "v0.9.0")
    assert err.value.cause == "missing_sections"
    assert "Rollback Steps, Verification" in err.value.message
    assert "cara_upgrade_ack_breaking: v0.9.0" in err.value.message


def test_real_v0_9_0_notes_pass_with_migration_as_migration_steps():
    facts = check_notes(V090, "v0.9.0", ack_breaking="v0.9.0")
    assert facts["missing"] == [] and facts["empty"] == []
    assert facts["aliases"] == {"Migration Steps": "Migration"}
    assert list(facts["sections"]) == ["Summary", "Breaking Changes", "Migration", "Security", "Platform Hardening",
                                       "Rollback Steps", "Verification", "Known Caveats"]
    assert facts["sections"]["Platform Hardening"] == "- State directories are created 0700."
    assert "## not a heading: inside a code block" in facts["sections"]["Verification"]
    assert "Release date" not in "".join(facts["sections"].values())  # the preamble is no section
    assert facts["breaking"].splitlines() == [
        "- `/health/ready` now returns 503 while any configured channel is in Error.",
        "- Non-interactive `cara setup` now requires `--model`."]


def test_real_v0_9_0_notes_without_ack_fail_on_breaking_only():
    with pytest.raises(NotesError) as err:
        check_notes(V090, "v0.9.0")
    assert err.value.cause == "breaking_unacknowledged"
    assert err.value.facts["missing"] == []


def test_migration_alias_is_only_for_migration_steps():
    text = V090.replace("## Rollback Steps", "## Rollback")
    with pytest.raises(NotesError) as err:
        check_notes(text, "v0.9.0", ack_breaking="v0.9.0")
    assert err.value.facts["missing"] == ["Rollback Steps"]


def test_custom_required_sections():
    facts = check_notes(release_notes("v0.7.0", complete=False), "v0.7.0", required_sections=["Summary", "Security"])
    assert facts["missing"] == []
    with pytest.raises(NotesError) as err:
        check_notes(V090, "v0.9.0", ack_breaking="v0.9.0", required_sections=["Summary", "Upgrade Statement"])
    assert err.value.facts["missing"] == ["Upgrade Statement"]


def test_parse_sections_details():
    text = ("# Title\nintro\n## Summary ##\nA\n### Detail\nB\n## summary\nC\n# Appendix\nnot in a section\n"
            "##NoSpace\n~~~\n## fenced\n~~~\n##\n")
    sections = parse_sections(text)
    assert sections == {"Summary": "A\n### Detail\nB", "summary": "C", "": ""}
    # headings compare case- and emphasis-insensitively
    assert _notes.find_section({"**breaking changes**": "x"}, "Breaking Changes") == ("**breaking changes**", "x")


def test_tag_not_mentioned_is_a_warning():
    facts = check_notes(release_notes("v0.7.0"), "v0.8.0")
    assert facts["warnings"] == ["no mention of v0.8.0 in the release notes: check that src is the notes of that release"]


# -- sources -------------------------------------------------------------------------------------------------------

def _no_http(url, timeout):
    raise AssertionError("no HTTP expected for %s" % url)


def test_read_from_path_and_file_url(tmp_path):
    path = tmp_path / "v0.9 notes.md"
    path.write_text("\ufeff" + V090, encoding="utf-8")
    assert _notes.read_notes(str(path), _no_http, 5) == V090
    assert _notes.read_notes("file://" + str(path).replace(" ", "%20"), _no_http, 5) == V090


def test_read_from_url_uses_the_opener():
    seen = []

    class Resp(io.BytesIO):
        pass

    def opener(url, timeout):
        seen.append((url, timeout))
        return Resp(V090.encode())

    assert _notes.read_notes("https://mirror.example/v0.9.0.md", opener, 7) == V090
    assert seen == [("https://mirror.example/v0.9.0.md", 7)]


def test_source_failures(tmp_path):
    with pytest.raises(NotesError) as err:
        _notes.read_notes(str(tmp_path / "absent.md"), _no_http, 5)
    assert err.value.cause == "not_found" and "absent.md" in err.value.message
    with pytest.raises(NotesError) as err:
        _notes.read_notes("ftp://example.org/notes.md", _no_http, 5)
    assert err.value.cause == "bad_source"
    with pytest.raises(NotesError) as err:
        _notes.read_notes("file://otherhost/notes.md", _no_http, 5)
    assert err.value.cause == "bad_source"
    big = tmp_path / "big.md"
    big.write_bytes(b"x" * 2048)
    with pytest.raises(NotesError) as err:
        _notes.read_notes(str(big), _no_http, 5, max_bytes=1024)
    assert err.value.cause == "too_large"
    binary = tmp_path / "cara"
    binary.write_bytes(b"\x7fELF\xff\xfe\x00")
    with pytest.raises(NotesError) as err:
        _notes.read_notes(str(binary), _no_http, 5)
    assert err.value.cause == "not_text"
