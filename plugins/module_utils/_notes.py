# -*- coding: utf-8 -*-
# Copyright: carapace.fleet maintainers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The release-notes gate of Carapace's release policy.

Domain logic only: the HTTP client is passed in (the module passes ansible-core's open_url), so this file has no
Ansible imports. The notes template of Carapace's release policy ("Release Notes Template") has seven sections:
Summary, Breaking Changes, Migration Steps, Rollback Steps, Security, Verification, Known Caveats. Every one must
be present and filled in ("None." counts as filled in), and breaking changes must be acknowledged by the operator
for the very tag being installed.

One alias is accepted: a section headed "Migration" stands for "Migration Steps". Carapace's own v0.9.0 notes use
that heading; its content is the migration steps the policy asks for, and refusing it over the heading would stop
every v0.9.0 upgrade on a spelling while nothing is missing. No other alias exists, and extra sections (v0.9.0's
"Platform Hardening") are kept and returned but not required.
"""

from __future__ import annotations

import os
import re
from urllib.parse import unquote, urlparse

from ansible_collections.carapace.fleet.plugins.module_utils._errors import FleetError
from ansible_collections.carapace.fleet.plugins.module_utils._http import (
    DEFAULT_RETRIES, DeadlineExceeded, attempts_note, deadline, is_transient, redact_url, retrying)
from ansible_collections.carapace.fleet.plugins.module_utils._version import normalize_tag

DEFAULT_SECTIONS = ("Summary", "Breaking Changes", "Migration Steps", "Rollback Steps", "Security", "Verification",
                    "Known Caveats")
BREAKING = "Breaking Changes"
# required section -> other headings accepted for it (compared case-insensitively)
ALIASES = {"Migration Steps": ("Migration",)}
MAX_BYTES = 1 << 20
ACK_VARIABLE = "cara_upgrade_ack_breaking"
QUOTE_LIMIT = 2000

_HEADING_RE = re.compile(r"^ {0,3}##(?:[ \t]+(.*?))?[ \t]*$")
_CLOSING_RE = re.compile(r"(?:^|[ \t]+)#+$")
_H1_RE = re.compile(r"^ {0,3}#(?:[ \t]|$)")
_FENCE_RE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
_COMMENT_RE = re.compile(r"<!--.*?-->", re.S)
_NONE_TEXTS = ("none", "n/a")


class NotesError(FleetError):
    """A gate failure with a machine-readable cause and an operator-facing message; `facts` are the parsed notes
    (sections, breaking, missing, ...) when the failure is about their content."""

    def __init__(self, cause, message, facts=None):
        super().__init__(cause, message)
        self.facts = facts or {}


def read_notes(src, opener, timeout, max_bytes=MAX_BYTES, retries=DEFAULT_RETRIES, sleep=None):
    """The text of the notes at `src`: a local path, a file:// URL or an http(s) URL.

    `opener(url, timeout)` returns a file-like HTTP response (the module passes ansible-core's open_url). A
    transient failure of an http(s) URL (connection reset, timeout, HTTP 5xx) is tried again up to `retries` more
    times with a short backoff; any other failure is final at once.
    """
    if not isinstance(src, str) or not src.strip():
        raise NotesError("bad_source", "src must name the release notes: a path, a file:// URL or an http(s) URL")
    parsed = urlparse(src)
    if parsed.scheme in ("http", "https"):
        try:
            data = retrying(lambda: _read_url(src, opener, timeout, max_bytes), retries,
                            lambda exc: isinstance(exc, NotesError) and is_transient(exc.cause, exc.facts.get("status")),
                            **({"sleep": sleep} if sleep else {}))
        except NotesError as exc:
            note = attempts_note(exc)
            if note:
                raise NotesError(exc.cause, exc.message + note, exc.facts) from exc
            raise
    elif parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise NotesError("bad_source", "src %s: file:// URLs must name a local path (file:///dir/notes.md)" % src)
        data = _read_file(unquote(parsed.path), src, max_bytes)
    elif parsed.scheme == "" or len(parsed.scheme) == 1:  # a plain path (or a Windows drive letter)
        data = _read_file(os.path.expanduser(src), src, max_bytes)
    else:
        raise NotesError("bad_source", "src %s: unsupported scheme %r; use a path, a file:// URL or an http(s) URL"
                         % (src, parsed.scheme))
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise NotesError("not_text", "src %s is not UTF-8 text (%s); point src at the release notes markdown "
                         "(docs/releases/<tag>.md)" % (src, exc)) from exc


def _read_file(path, src, max_bytes):
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except FileNotFoundError as exc:
        raise NotesError("not_found", "release notes not found at %s. Check src (the notes of a release are "
                         "docs/releases/<tag>.md in the Carapace repository)" % src) from exc
    except OSError as exc:
        raise NotesError("bad_source", "cannot read the release notes at %s: %s. Check src and its permissions"
                         % (src, exc)) from exc
    return _bounded(data, src, max_bytes)


def _read_url(url, opener, timeout, max_bytes):
    """The body of url, at most max_bytes + 1 bytes. `timeout` bounds the whole request (connection, headers and
    body together, _http.deadline); messages show the URL without credentials."""
    shown = redact_url(url)
    try:
        with deadline(timeout):
            try:
                resp = opener(url, timeout)
            except DeadlineExceeded:
                raise
            except Exception as exc:  # HTTPError, URLError, ssl, socket, ansible's ConnectionError, RedirectRefused
                raise _open_failure(shown, timeout, exc) from exc
            try:
                data = _read_body(resp, max_bytes)
            except DeadlineExceeded:
                raise
            except Exception as exc:
                raise NotesError("connection_error", "reading the release notes from %s failed (%s). Retry"
                                 % (shown, redact_url("%s: %s" % (type(exc).__name__, exc)))) from exc
            finally:
                resp.close()
    except DeadlineExceeded as exc:
        raise NotesError("timeout", "fetching the release notes from %s took longer than timeout=%ss (connection, "
                         "headers and body count together). Check the network or raise timeout" % (shown, timeout)) from exc
    return _bounded(data, shown, max_bytes)


def _read_body(resp, max_bytes):
    read = getattr(resp, "read1", None) or resp.read
    chunks, size = [], 0
    while size <= max_bytes:
        chunk = read(min(1 << 16, max_bytes + 1 - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _open_failure(url, timeout, exc):
    code = getattr(exc, "code", None)
    if code == 404:
        return NotesError("not_found", "release notes not found at %s (HTTP 404). Check src: the tag in the URL "
                          "and the path (docs/releases/<tag>.md)" % url)
    if isinstance(code, int):
        return NotesError("http_error", "HTTP %s fetching the release notes from %s. Retry later, or copy the "
                          "notes to a file and point src at it" % (code, url), {"status": code})
    text = redact_url("%s: %s" % (type(exc).__name__, exc))
    if isinstance(exc, TimeoutError) or "timed out" in text.lower():
        return NotesError("timeout", "no answer from %s within timeout=%ss (%s). Check the network or raise "
                          "timeout" % (url, timeout, text))
    return NotesError("connection_error", "cannot fetch the release notes from %s (%s). Check the network and "
                      "the proxy, or copy the notes to a file and point src at it" % (url, text))


def _bounded(data, src, max_bytes):
    if len(data) > max_bytes:
        raise NotesError("too_large", "%s is larger than %d bytes: that is not a release notes file. Check src"
                         % (src, max_bytes))
    return data


def _norm(name):
    return " ".join(name.replace("*", " ").replace("_", " ").split()).rstrip(":").strip().lower()


def parse_sections(text):
    """{heading: text} of the `## ` sections of a markdown document, in document order.

    Text before the first `## ` heading (the title) belongs to no section; a `# ` heading ends the current section;
    `###` and deeper headings are part of their section's text; headings inside fenced code blocks are text. A
    heading that appears twice has its texts joined.
    """
    sections = {}
    current = None
    fence = None
    for line in text.splitlines():
        m = _FENCE_RE.match(line)
        if fence is not None:
            if m and m.group(1)[0] == fence[0] and len(m.group(1)) >= len(fence) and not line.strip()[len(m.group(1)):]:
                fence = None
        elif m:
            fence = m.group(1)
        else:
            heading = _HEADING_RE.match(line)
            if heading:
                current = _CLOSING_RE.sub("", heading.group(1) or "").strip()
                sections.setdefault(current, [])
                if sections[current]:
                    sections[current].append("")
                continue
            if _H1_RE.match(line):
                current = None
                continue
        if current is not None:
            sections[current].append(line)
    return {name: "\n".join(lines).strip() for name, lines in sections.items()}


def _content(text):
    return _COMMENT_RE.sub("", text or "").strip()


def is_none(text):
    """True when a section says there is nothing: empty, "None", "None.", "N/A" (any case, bullet or emphasis)."""
    body = _content(text)
    body = re.sub(r"^[-*+][ \t]+", "", body)
    body = body.strip("*_` \t\n").rstrip(".").strip("*_` \t")
    return body.lower() in _NONE_TEXTS or not body


def find_section(sections, name):
    """(heading as written, text) of the section that stands for `name` (aliases included), or (None, None)."""
    wanted = [_norm(name)] + [_norm(alias) for alias in ALIASES.get(name, ())]
    for candidate in wanted:
        for heading, body in sections.items():
            if _norm(heading) == candidate:
                return heading, body
    return None, None


def _same_tag(a, b):
    try:
        return normalize_tag(a) == normalize_tag(b)
    except ValueError:
        return False


def _quote(text):
    if len(text) > QUOTE_LIMIT:
        text = text[:QUOTE_LIMIT].rstrip() + "\n[... %d more characters: read the notes]" % (len(text) - QUOTE_LIMIT)
    return "\n".join("> " + line if line else ">" for line in text.splitlines())


def check_notes(text, tag, ack_breaking=None, required_sections=DEFAULT_SECTIONS, src=None):
    """Gate release notes `text` for `tag`. Returns the facts, or raises NotesError with them.

    Facts: sections {heading: text}, breaking (text or None), acknowledged (ack_breaking names `tag`),
    missing (required sections absent), empty (required sections present with no text), aliases
    {required name: heading that stands for it}, warnings.
    """
    tag = normalize_tag(tag)
    where = src or "the release notes"
    sections = parse_sections(text)
    missing, empty, aliases = [], [], {}
    for name in required_sections:
        heading, body = find_section(sections, name)
        if heading is None:
            missing.append(name)
            continue
        if _norm(heading) != _norm(name):
            aliases[name] = heading
        if not _content(body):
            empty.append(name)
    breaking_heading, breaking_text = find_section(sections, BREAKING)
    breaking = None if breaking_heading is None or is_none(breaking_text) else breaking_text
    acknowledged = ack_breaking is not None and _same_tag(ack_breaking, tag)
    warnings = []
    if tag not in text and tag[1:] not in text:
        warnings.append("no mention of %s in %s: check that src is the notes of that release" % (tag, where))
    facts = {"sections": sections, "breaking": breaking, "acknowledged": acknowledged, "missing": missing,
             "empty": empty, "aliases": aliases, "warnings": warnings, "tag": tag}

    problems = []
    if missing or empty:
        parts = []
        if missing:
            parts.append("lack the required section%s %s" % ("s" if len(missing) > 1 else "", ", ".join(missing)))
        if empty:
            parts.append("have nothing under %s" % ", ".join(empty))
        problems.append(("missing_sections", "The release notes of %s (%s) %s. Carapace's release policy requires "
                         "every stable release's notes to have %s, each filled in (\"None.\" counts). Next step: "
                         "read the release's notes and changelog yourself before upgrading; point src at the complete "
                         "notes (docs/releases/%s.md), or, if your site gates on fewer sections, narrow "
                         "required_sections." % (tag, where, " and ".join(parts), ", ".join(required_sections), tag)))
    if breaking is not None and not acknowledged:
        if ack_breaking:
            given = "ack_breaking is %r, which does not acknowledge %s (it must name this very tag). " % (ack_breaking, tag)
        else:
            given = ""
        problems.append(("breaking_unacknowledged", "%s has breaking changes (section \"%s\" of %s):\n%s\n%sRead them "
                         "and the migration steps, prepare the hosts, then set `%s: %s` (module parameter "
                         "ack_breaking) to proceed."
                         % (tag, breaking_heading, where, _quote(breaking), given, ACK_VARIABLE, tag)))
    if problems:
        raise NotesError(problems[0][0], "\n\n".join(message for _cause, message in problems), facts)
    return facts
