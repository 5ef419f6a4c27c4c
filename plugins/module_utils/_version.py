# -*- coding: utf-8 -*-
# Copyright: carapace.fleet maintainers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Carapace versions and tags (the one place that parses, compares and orders them), the N-1 upgrade contract, and
upgrade-path planning.

Domain logic only (no Ansible imports, no sigstore: host-side modules import it cheaply). Versions are ordered as
SemVer orders them: a pre-release sorts before its release (v0.9.0-rc.1 < v0.9.0), and pre-release identifiers
compare numerically where they are numbers (preview2 < preview12).

Carapace's release policy ("Versioned N-1 Contract"):
the supported upgrade is from the previous stable minor line (N-1) to the current one (N); previews are outside
the contract, and so is skipping stable lines without their intermediate migrations. A "line" is
(major, minor). Lines are read from the list of known stable tags, not computed: 0.9 -> 1.0 is N-1 -> N when no
0.10 was ever released.

A jump over several lines is planned as a chain of in-contract steps: the newest stable tag of each line in
between, then the target.
"""

from __future__ import annotations

import re

_TAG_RE = re.compile(r"v(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)(-[0-9A-Za-z][0-9A-Za-z.-]*)?")
_PATH_SAFE_RE = re.compile(r"[A-Za-z0-9._-]+")
_PATH_UNSAFE_CHAR_RE = re.compile(r"[^A-Za-z0-9._-]")
_OUTPUT_RE = re.compile(r"cara (\S+)\s*")


def check_tag(tag):
    """Return the tag if it is a release tag (vX.Y.Z or vX.Y.Z-<pre>); raise ValueError otherwise.

    The identity is matched exactly, so a tag written without its `v` would only ever fail later with a
    confusing identity mismatch: refuse it here instead.
    """
    if not isinstance(tag, str) or not _TAG_RE.fullmatch(tag):
        raise ValueError("tag %r is not a Carapace release tag: expected vMAJOR.MINOR.PATCH, e.g. v0.9.0 "
                         "(previews: v0.9.0-preview1)" % (tag,))
    return tag


def is_preview(tag):
    """True for a pre-release tag such as v0.1.0-preview3 (outside the upgrade contract); ValueError for no tag."""
    return parse_version(check_tag(tag)).is_preview


# Tags whose binary reports another version (cara --version, /health). Carapace v0.4.1 was tagged without a
# Cargo.toml bump, so it reports 0.4.0.
REPORTED_VERSION_QUIRKS = {"v0.4.1": "0.4.0"}

_PRE_PART_RE = re.compile(r"[0-9]+|[^0-9]+")

# Machine-readable causes of a refused plan.
CAUSES = ("invalid", "unknown_target", "preview", "downgrade", "chain")


class Version:
    """A parsed Carapace version: MAJOR.MINOR.PATCH with an optional pre-release suffix (e.g. preview3, rc.1).

    Ordered as SemVer orders versions: a pre-release sorts before its release, and pre-release identifiers
    compare numerically where they are numbers (preview2 < preview12).
    """

    __slots__ = ("major", "minor", "patch", "pre")

    def __init__(self, major, minor, patch, pre=None):
        self.major = major
        self.minor = minor
        self.patch = patch
        self.pre = pre or None

    @property
    def tag(self):
        """The canonical tag: vMAJOR.MINOR.PATCH[-pre]."""
        return "v%s" % self.version

    @property
    def version(self):
        """The version without its `v`, as `cara --version` prints it."""
        core = "%d.%d.%d" % (self.major, self.minor, self.patch)
        return core + ("-" + self.pre if self.pre else "")

    @property
    def line(self):
        """The release line (major, minor)."""
        return (self.major, self.minor)

    @property
    def is_preview(self):
        """True for any pre-release (previewN, rc.N, ...): outside Carapace's upgrade contract."""
        return self.pre is not None

    def _key(self):
        if self.pre is None:
            pre = (1,)
        else:
            pre = (0,) + tuple(_pre_identifier_key(part) for part in self.pre.split("."))
        return (self.major, self.minor, self.patch, pre)

    def __eq__(self, other):
        return isinstance(other, Version) and self._key() == other._key()

    def __lt__(self, other):
        return self._key() < other._key()

    def __le__(self, other):
        return self._key() <= other._key()

    def __gt__(self, other):
        return self._key() > other._key()

    def __ge__(self, other):
        return self._key() >= other._key()

    def __hash__(self):
        return hash(self._key())

    def __repr__(self):
        return "Version(%r)" % self.tag

    def __str__(self):
        return self.tag


def _pre_identifier_key(identifier):
    # Natural order inside one identifier ("preview12" > "preview2"); numbers sort before text, as in SemVer.
    return tuple((0, int(run), "") if run.isdigit() else (1, 0, run) for run in _PRE_PART_RE.findall(identifier))


def parse_version(value):
    """Parse a tag or version (`v0.9.0`, `0.9.0`, `v0.1.0-preview3`) into a Version; raise ValueError otherwise.

    A Version is returned as is. Surrounding whitespace is ignored (command output often ends in a newline).
    """
    if isinstance(value, Version):
        return value
    if not isinstance(value, str) or not value.strip():
        raise ValueError("%r is not a Carapace version: expected a tag such as v0.9.0 or a version such as 0.9.0 "
                         "(previews: v0.9.0-preview1)" % (value,))
    text = value.strip()
    tag = text if text.startswith("v") else "v" + text
    try:
        check_tag(tag)
    except ValueError:
        raise ValueError("%r is not a Carapace version: expected a tag such as v0.9.0 or a version such as 0.9.0 "
                         "(previews: v0.9.0-preview1)" % (value,)) from None
    parts = tag[1:].split("-", 1)
    major, minor, patch = (int(part) for part in parts[0].split("."))
    return Version(major, minor, patch, parts[1] if len(parts) > 1 else None)


def normalize_tag(value):
    """The canonical tag (with `v`) of a tag or version string."""
    return parse_version(value).tag


def compare(a, b):
    """-1, 0 or 1 as version `a` is older than, the same as, or newer than `b`."""
    va, vb = parse_version(a), parse_version(b)
    return (va > vb) - (va < vb)


def sort_key(name):
    """An ordering key for names that are usually tags (release directories, say): versions first, oldest first,
    in the order of Version; any other name after them, by name."""
    try:
        return (0, parse_version(name)._key(), name)  # pylint: disable=protected-access
    except ValueError:
        return (1, (), name)


def version_from_output(text):
    """The version `cara --version` prints (`cara 0.9.0` -> "0.9.0", first line only), else None. The string is
    returned as printed, whether or not it is a release version."""
    first = (text or "").strip().splitlines()[:1]
    match = _OUTPUT_RE.fullmatch(first[0]) if first else None
    return match.group(1) if match else None


def bare_version(value):
    """A version as /health and `cara status` compare it: stripped, without one leading `v` or `V`; None stays None."""
    if value is None:
        return None
    value = str(value).strip()
    return value[1:] if value[:1] in ("v", "V") else value


def sanitize_for_path(text):
    """cara's `sanitize_version_for_path`: any character outside [A-Za-z0-9._-] becomes `_`."""
    return _PATH_UNSAFE_CHAR_RE.sub("_", text)


def tag_for_version(version):
    """`0.9.0` -> `v0.9.0`, the tag a reported version names files with; characters a file name should not carry
    become `_` (a version that is no release tag still names its backup)."""
    return sanitize_for_path(version if version.startswith("v") else "v" + version)


def is_path_safe(version):
    """True for a non-empty version made only of [A-Za-z0-9._-] that is not `.` or `..` (cara's rule for the
    version in transaction.json)."""
    return isinstance(version, str) and bool(_PATH_SAFE_RE.fullmatch(version)) and version not in (".", "..")


def normalize_version(version):
    """The version as cara stores it in transaction.json: without one leading `v`, non-empty and path-safe, else
    ValueError. Not necessarily a release version: cara accepts any path-safe one."""
    text = (version or "").strip()
    if text[:1] == "v":
        text = text[1:]
    if not is_path_safe(text):
        raise ValueError("version %r is not a release version: expected a tag such as v0.9.0 or 0.9.0 "
                         "(letters, digits, '.', '_', '-')" % (version,))
    return text


def reported_version(tag):
    """The version the binary of `tag` reports (`cara --version`, /health): v0.4.1 reports 0.4.0."""
    v = parse_version(tag)
    return REPORTED_VERSION_QUIRKS.get(v.tag, v.version)


def sort_tags(tags):
    """Canonical tags, deduplicated, oldest first."""
    return [v.tag for v in sorted({parse_version(t) for t in tags})]


def newest_by_line(tags):
    """{line: newest stable Version of that line} of the stable tags among `tags`."""
    newest = {}
    for v in (parse_version(t) for t in tags):
        if not v.is_preview and (v.line not in newest or v > newest[v.line]):
            newest[v.line] = v
    return newest


def _result(installed, target, steps, reason, in_contract=False, chain=False, cause=None, expect_version=None):
    return {"from": installed, "to": target, "steps": steps, "in_contract": in_contract, "chain": chain,
            "reason": reason, "cause": cause, "expect_version": expect_version}


def _line_text(line):
    return "%d.%d" % line


def plan_upgrade(installed, target, known_tags, allow_preview=False, allow_downgrade=False, allow_chain=True):
    """Plan the move of a host from version `installed` to tag `target`, given the release's `known_tags`.

    Never raises for bad input: every refusal comes back as a plan with `steps` None, a `cause` (one of CAUSES)
    and a `reason` that names the cause and the operator's next step.

    Returns {"from", "to", "steps", "in_contract", "chain", "reason", "cause", "expect_version"}:
      steps           tags to install in order; [] when the host already runs the target; None when refused
      in_contract     every step is a stable N-1 -> N (or patch) upgrade of Carapace's release policy
      chain           the jump crosses lines and is (or would be) done through intermediate tags
      expect_version  the version the target binary reports (v0.4.1 reports 0.4.0), for health gates
    """
    shown_from = installed.strip() if isinstance(installed, str) else installed
    shown_to = target.strip() if isinstance(target, str) else target
    try:
        x = parse_version(installed)
    except ValueError as exc:
        return _result(shown_from, shown_to, None, "refused: installed version %s. Check what the host reports "
                       "(cara --version) and pass that version or the tag it was installed from." % exc,
                       cause="invalid")
    try:
        t = parse_version(target)
    except ValueError as exc:
        return _result(x.tag, shown_to, None, "refused: target %s. Set the target to one release tag, e.g. v0.9.0."
                       % exc, cause="invalid")
    if isinstance(known_tags, str) or not isinstance(known_tags, (list, tuple, set, frozenset)):
        return _result(x.tag, t.tag, None, "refused: the known tags must be a list of release tags (e.g. "
                       "['v0.8.0', 'v0.9.0']), got %s." % type(known_tags).__name__, cause="invalid")
    known = set()
    bad = []
    for tag in known_tags:
        try:
            known.add(parse_version(tag))
        except ValueError:
            bad.append(tag)
    if bad:
        return _result(x.tag, t.tag, None, "refused: the known tags contain entries that are not release tags: %s. "
                       "Fix the list of known releases (tags such as v0.9.0)." % ", ".join(repr(b) for b in bad),
                       cause="invalid")
    expect = reported_version(t)
    known_list = ", ".join(v.tag for v in sorted(known)) or "(none)"

    if t not in known:
        return _result(x.tag, t.tag, None, "refused: target %s is not a known release. Known tags: %s. Pick one of "
                       "them, or add the tag to the known releases if it was published after the list was made."
                       % (t.tag, known_list), cause="unknown_target", expect_version=expect)

    # A bare reported version is ambiguous when another tag reports the same one (v0.4.1 says 0.4.0): it is read as
    # the tag of that version, which plans at most a harmless reinstall of the patch release.
    quirk = ""
    twins = sorted(tag for tag, rep in REPORTED_VERSION_QUIRKS.items() if rep == x.version and tag != x.tag)
    if twins and isinstance(installed, str) and not installed.strip().startswith("v"):
        quirk = " (%s reports %s too; read as %s, pass the installed tag to tell them apart)" % (
            ", ".join(twins), x.version, x.tag)

    if x == t:
        return _result(x.tag, t.tag, [], "already at %s: nothing to do%s." % (t.tag, quirk), in_contract=True,
                       expect_version=expect)

    previews = [v.tag for v in (x, t) if v.is_preview]
    if previews and not allow_preview:
        which = "%s %s" % (" and ".join(previews), "are preview releases" if len(previews) > 1 else "is a preview release")
        pick = "Pick a stable target, or take" if not x.is_preview else "Take"
        return _result(x.tag, t.tag, None, "refused: %s; previews are outside Carapace's N-1 upgrade contract (best "
                       "effort only). %s a backup and opt in with allow_preview=true." % (which, pick),
                       cause="preview", expect_version=expect)

    if t < x:
        if not allow_downgrade:
            return _result(x.tag, t.tag, None, "refused: %s is older than the installed %s (a downgrade). Downgrades "
                           "are not upgrades: %s may not read state written by %s. Use the rollback runbook (the "
                           "cara_rollback role: reinstall %s and restore the backup taken before the upgrade), which "
                           "sets allow_downgrade=true." % (t.tag, x.tag, t.tag, x.tag, t.tag),
                           cause="downgrade", expect_version=expect)
        return _result(x.tag, t.tag, [t.tag], "downgrade from %s to %s allowed (allow_downgrade): outside the N-1 "
                       "upgrade contract; restore the backup taken before the upgrade to %s%s."
                       % (x.tag, t.tag, x.tag, quirk), expect_version=expect)

    if previews:
        return _result(x.tag, t.tag, [t.tag], "preview upgrade from %s to %s allowed (allow_preview): outside the N-1 "
                       "contract, in one step; take a backup first%s." % (x.tag, t.tag, quirk), expect_version=expect)

    if x.line == t.line:
        return _result(x.tag, t.tag, [t.tag], "patch upgrade within line %s: in contract%s."
                       % (_line_text(t.line), quirk), in_contract=True, expect_version=expect)

    newest = newest_by_line(known)
    between = sorted(line for line in newest if x.line < line < t.line)
    if not between:
        return _result(x.tag, t.tag, [t.tag], "upgrade from line %s to the next line %s (N-1 -> N): in contract%s."
                       % (_line_text(x.line), _line_text(t.line), quirk), in_contract=True, expect_version=expect)

    intermediate = [newest[line].tag for line in between]
    steps = intermediate + [t.tag]
    if not allow_chain:
        return _result(x.tag, t.tag, None, "refused: %s to %s skips the stable line%s %s; Carapace supports only N-1 -> "
                       "N upgrades. Upgrade through the intermediate tag%s %s first (in order: %s), or allow the "
                       "chain (allow_chain=true) to do it step by step."
                       % (x.tag, t.tag, "s" if len(between) > 1 else "", ", ".join(_line_text(line) for line in between),
                          "s" if len(intermediate) > 1 else "", ", ".join(intermediate), " -> ".join(steps)),
                       chain=True, cause="chain", expect_version=expect)
    return _result(x.tag, t.tag, steps, "%s to %s crosses %d stable line%s: planned as a chain of N-1 -> N upgrades: "
                   "%s%s." % (x.tag, t.tag, len(between), "s" if len(between) > 1 else "", " -> ".join(steps), quirk),
                   in_contract=True, chain=True, expect_version=expect)
