# -*- coding: utf-8 -*-
# Copyright: carapace.fleet maintainers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The release tags a release source publishes, and the newest stable one (`cara_upgrade_version: latest`).

Domain logic only: the HTTP client is passed in (the module passes ansible-core's open_url through
_http.ansible_opener), so this file has no Ansible imports.

What is listed depends on the source, the same `base_url` that _download.Source fetches from:
- no base_url (or GitHub's own `https://github.com/{repo}/releases/download/{tag}`): the GitHub releases API,
  `{api_url}/repos/{repo}/releases?per_page=100`, every page (the `Link: <...>; rel="next"` header), each a JSON list
  of objects with `tag_name`, `prerelease` and `draft`;
- an http(s) mirror: `releases.json` in the directory that holds the per-tag directories (the part of base_url before
  `{tag}`), in the API's shape (a mirror saves the API's answer there);
- a local directory or a file:// URL: the entries of the directory that holds the per-tag directories, keeping only the
  names that are release tags and whose own directory (base_url with that tag) holds at least one file.
A base_url without `{tag}` names the files of one release, not a tree of them: there is nothing to list, and that is
refused (cause `no_listing`).

Drafts never count. A pre-release (the `prerelease` flag, or a tag with a pre-release part such as `-preview1`) is
listed in `tags` but is never `stable`; `latest` is the newest stable tag, or the newest tag of all when previews are
allowed. Every failure (an HTTP error after its retries, a body that is not the expected JSON, an empty listing, no
stable tag) is a ReleaseTagsError with a machine-readable cause: the newest release is never guessed.
"""

from __future__ import annotations

import json
import os
import re
import time
from urllib.parse import unquote, urljoin, urlparse

from ansible_collections.carapace.fleet.plugins.module_utils._download import (
    DEFAULT_BASE_URL, FetchError, Source, _http_failure, _read_failure)
from ansible_collections.carapace.fleet.plugins.module_utils._errors import FleetError
from ansible_collections.carapace.fleet.plugins.module_utils._http import (
    DEFAULT_RETRIES, DeadlineExceeded, attempts_note, deadline, is_transient, origin, redact_url, retrying)
from ansible_collections.carapace.fleet.plugins.module_utils._version import check_tag, parse_version

DEFAULT_API_URL = "https://api.github.com"
INDEX_NAME = "releases.json"
PER_PAGE = 100  # GitHub's largest page
MAX_PAGES = 100  # 10000 releases: a Link chain longer than that is refused, not followed forever
MAX_BYTES = 16 * 1024 * 1024  # one page or index (release bodies make the API's answer large)
KINDS = ("api", "mirror", "directory")
CAUSES = ("not_found", "http_error", "timeout", "connection_error", "truncated", "too_large", "bad_listing", "empty",
          "no_stable", "no_listing", "bad_source")
NEXT_STEP = ("Set the target to a release tag instead (cara_upgrade_version: v0.9.0), or, for an air-gapped site, "
             "list its releases in cara_known_tags")

_REPO_RE = re.compile(r"[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+")
_LINK_NEXT_RE = re.compile(r'<([^>]*)>\s*;[^,]*\brel="?next"?', re.I)


class ReleaseTagsError(FleetError):
    """The tags of a source could not be read (or hold no usable release): `cause` is one of CAUSES, `message` names
    the source and the next step, `source` is where it was read (credentials redacted)."""

    def __init__(self, cause, message, source=None, status=None):
        super().__init__(cause, message)
        self.source = source
        self.status = status


class Listing:
    """Where the tags of a release source are listed: `kind` (api, mirror, directory), `location` (a URL or a local
    directory) and `display` (the location without credentials)."""

    def __init__(self, kind, location, base_url=None, repo=None):
        self.kind = kind
        self.location = location
        self.display = redact_url(location)
        self._base_url = base_url
        self._repo = repo

    def tag_dir(self, tag):
        """The local directory of one tag (directory listings only)."""
        return Source(self._base_url, self._repo, tag).local_dir


def check_repo(repo):
    """Return the repository if it is `owner/name` (as _verify.check_repo, without importing sigstore); raise
    ValueError otherwise."""
    if not isinstance(repo, str) or not _REPO_RE.fullmatch(repo):
        raise ValueError("repo %r is not a GitHub repository name of the form owner/name" % (repo,))
    return repo


def listing_for(base_url, repo, api_url=DEFAULT_API_URL):
    """The Listing of the source `base_url` (as cara_release takes it) of `repo`. Raises ReleaseTagsError
    (no_listing, bad_source) for a base_url that cannot be listed."""
    if not base_url or base_url.rstrip("/") == DEFAULT_BASE_URL:
        api = (api_url or DEFAULT_API_URL).rstrip("/")
        if urlparse(api).scheme not in ("http", "https"):
            raise ReleaseTagsError("bad_source", "api_url %s is not an http(s) URL; set it to the GitHub API "
                                   "(https://api.github.com) or an API mirror" % redact_url(api), redact_url(api))
        return Listing("api", "%s/repos/%s/releases?per_page=%d" % (api, repo, PER_PAGE))
    try:
        Source(base_url, repo, "v0.0.0")  # the scheme and file:// rules of cara_release
    except FetchError as exc:
        raise ReleaseTagsError(exc.cause, exc.message, redact_url(base_url)) from exc
    base = base_url.replace("{repo}", repo)
    shown = redact_url(base)
    if "{tag}" not in base:
        raise ReleaseTagsError("no_listing", "base_url %s has no {tag}: it names the files of one release, not a tree "
                               "of releases, so there are no tags to list. %s, or write base_url with {tag} where "
                               "the tag's directory is (e.g. /srv/mirror/{tag})." % (shown, NEXT_STEP), shown)
    parent, _sep, rest = base.partition("{tag}")
    if not (parent.endswith("/") or parent == "") or not (rest == "" or rest.startswith("/")):
        raise ReleaseTagsError("no_listing", "base_url %s: {tag} is not a whole directory name, so the directory of "
                               "the releases cannot be listed. %s, or write base_url with {tag} as its own path "
                               "segment (.../{tag}/...)." % (shown, NEXT_STEP), shown)
    parsed = urlparse(parent or ".")
    if parsed.scheme in ("http", "https"):
        return Listing("mirror", parent + INDEX_NAME)
    if parsed.scheme == "file":
        where = unquote(parsed.path)
    else:
        where = os.path.abspath(os.path.expanduser(parent or "."))
    return Listing("directory", where.rstrip("/") or "/", base_url=base_url, repo=repo)


def read_tags(listing, opener=None, timeout=30, retries=DEFAULT_RETRIES, max_bytes=MAX_BYTES, sleep=None,
              max_pages=MAX_PAGES):
    """[(tag, prerelease)] of every release the listing names, drafts left out, in no particular order."""
    if listing.kind == "directory":
        return _read_directory(listing)
    if listing.kind == "mirror":
        data, _next = _get_json(listing.location, opener, timeout, retries, max_bytes, sleep)
        return _parse_releases(data, listing.display)
    found = []
    url, first = listing.location, origin(listing.location)
    for _page in range(max_pages):
        data, next_url = _get_json(url, opener, timeout, retries, max_bytes, sleep)
        found.extend(_parse_releases(data, redact_url(url)))
        if not next_url:
            return found
        next_url = urljoin(url, next_url)
        if origin(next_url) != first:
            raise ReleaseTagsError("bad_listing", "the release list at %s links its next page to another server (%s); "
                                   "refusing to follow it. %s." % (listing.display, redact_url(next_url), NEXT_STEP),
                                   listing.display)
        url = next_url
    raise ReleaseTagsError("bad_listing", "the release list at %s has more than %d pages; refusing to read on. %s."
                           % (listing.display, max_pages, NEXT_STEP), listing.display)


def summarize(entries, source, allow_preview=False):
    """{tags, stable, latest} of read_tags()'s entries: `tags` every tag (semver order, oldest first), `stable` the
    tags that are neither flagged nor named pre-releases, `latest` the newest stable one (the newest of all with
    `allow_preview`). Raises ReleaseTagsError (empty, no_stable) rather than guess."""
    flagged = {}
    for tag, prerelease in entries:
        version = parse_version(tag)
        flagged[version] = flagged.get(version, False) or bool(prerelease) or version.is_preview
    if not flagged:
        raise ReleaseTagsError("empty", "the release source %s lists no release tag. %s." % (source, NEXT_STEP), source)
    tags = sorted(flagged)
    stable = [v for v in tags if not flagged[v]]
    if not stable and not allow_preview:
        raise ReleaseTagsError("no_stable", "the release source %s lists only pre-releases (%s), no stable tag. %s, "
                               "or allow previews." % (source, ", ".join(v.tag for v in tags), NEXT_STEP), source)
    latest = tags[-1] if allow_preview else stable[-1]
    return {"tags": [v.tag for v in tags], "stable": [v.tag for v in stable], "latest": latest.tag}


def release_tags(base_url, repo, api_url=DEFAULT_API_URL, opener=None, timeout=30, retries=DEFAULT_RETRIES,
                 allow_preview=False, sleep=None, max_bytes=MAX_BYTES):
    """The tags of the release source: {tags, stable, latest, source, kind}. Raises ReleaseTagsError."""
    listing = listing_for(base_url, repo, api_url)
    entries = read_tags(listing, opener, timeout, retries, max_bytes, sleep)
    return dict(summarize(entries, listing.display, allow_preview), source=listing.display, kind=listing.kind)


def _is_tag(name):
    try:
        check_tag(name)
    except ValueError:
        return False
    return True


def _read_directory(listing):
    where = listing.location
    try:
        names = os.listdir(where)
    except FileNotFoundError as exc:
        raise ReleaseTagsError("not_found", "the release directory %s does not exist. Check base_url (the directory "
                               "before {tag} must hold one directory per tag). %s." % (where, NEXT_STEP), where) from exc
    except OSError as exc:
        raise ReleaseTagsError("bad_source", "cannot list the release directory %s: %s. Check base_url and its "
                               "permissions. %s." % (where, exc, NEXT_STEP), where) from exc
    found = []
    for name in names:
        if not _is_tag(name):
            continue
        tag_dir = listing.tag_dir(name)
        try:
            holds_files = os.path.isdir(tag_dir) and any(entry.is_file() for entry in os.scandir(tag_dir))
        except OSError:
            holds_files = False
        if holds_files:
            found.append((name, False))
    return found


def _get_json(url, opener, timeout, retries, max_bytes, sleep):
    """(parsed JSON, the URL of the next page or None) of one GET, transient failures tried again."""
    try:
        body, link = retrying(lambda: _get_once(url, opener, timeout, max_bytes), retries,
                              lambda exc: isinstance(exc, FetchError) and is_transient(exc.cause, exc.status),
                              **({"sleep": sleep} if sleep else {}))
    except FetchError as exc:
        shown = redact_url(url)
        raise ReleaseTagsError(exc.cause, "%s%s. %s." % (exc.message.rstrip(". "), attempts_note(exc), NEXT_STEP),
                               shown, exc.status) from exc
    try:
        data = json.loads(body.decode("utf-8-sig"))
    except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError alike
        raise ReleaseTagsError("bad_listing", "the release list at %s is not JSON (%s). It must be the GitHub releases "
                               "API's answer: a list of objects with tag_name, prerelease and draft. %s."
                               % (redact_url(url), exc, NEXT_STEP), redact_url(url)) from exc
    match = _LINK_NEXT_RE.search(link or "")
    return data, (match.group(1) if match else None)


def _get_once(url, opener, timeout, max_bytes):
    shown = redact_url(url)
    name = "the release list"
    try:
        with deadline(timeout):
            try:
                resp = opener(url, timeout)
            except DeadlineExceeded:
                raise
            except Exception as exc:  # HTTPError, URLError, ssl, socket, RedirectRefused: all end this attempt
                raise _http_failure(name, shown, timeout, exc) from exc
            try:
                headers = getattr(resp, "headers", None)
                link = headers.get("Link") if headers is not None else None
                length = headers.get("Content-Length") if headers is not None else None
                expected = int(length) if length and length.strip().isdigit() else None
                body = _read_body(resp, name, shown, timeout, max_bytes)
            finally:
                resp.close()
    except DeadlineExceeded as exc:
        raise FetchError("timeout", "%s: reading %s took longer than timeout=%ss" % (name, shown, timeout)) from exc
    if expected is not None and len(body) != expected:
        raise FetchError("truncated", "%s: transfer from %s was truncated (%d of %d bytes)"
                         % (name, shown, len(body), expected))
    return body, link


def _read_body(resp, name, shown, timeout, max_bytes):
    read = getattr(resp, "read1", None) or resp.read
    chunks, size = [], 0
    until = time.monotonic() + timeout
    while True:
        if time.monotonic() > until:
            raise FetchError("timeout", "%s: reading %s took longer than timeout=%ss" % (name, shown, timeout))
        try:
            chunk = read(1 << 16)
        except DeadlineExceeded:
            raise
        except Exception as exc:
            raise _read_failure(name, shown, timeout, exc) from exc
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > max_bytes:
            raise FetchError("too_large", "%s: %s sent more than %d bytes" % (name, shown, max_bytes))
        chunks.append(chunk)


def _parse_releases(data, where):
    if not isinstance(data, list):
        raise ReleaseTagsError("bad_listing", "the release list at %s is not a JSON list of releases (got %s). It must "
                               "be the GitHub releases API's answer: a list of objects with tag_name, prerelease and "
                               "draft. %s." % (where, type(data).__name__, NEXT_STEP), where)
    found = []
    for index, item in enumerate(data):
        if not isinstance(item, dict) or not isinstance(item.get("tag_name"), str):
            raise ReleaseTagsError("bad_listing", "the release list at %s: entry %d is not a release object with a "
                                   "tag_name string. %s." % (where, index, NEXT_STEP), where)
        for flag in ("draft", "prerelease"):
            if not isinstance(item.get(flag, False), bool):
                raise ReleaseTagsError("bad_listing", "the release list at %s: %s of %s is not true or false. %s."
                                       % (where, flag, item["tag_name"], NEXT_STEP), where)
        if item.get("draft", False) or not _is_tag(item["tag_name"]):
            continue  # a draft is not published; a tag such as `nightly` is not a release of the contract
        found.append((item["tag_name"], item.get("prerelease", False)))
    return found
