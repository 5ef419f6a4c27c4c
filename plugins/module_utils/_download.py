# -*- coding: utf-8 -*-
# Copyright: carapace.fleet maintainers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Bounded, hashing downloads of release files from http(s) mirrors or local directories.

Domain logic only: the HTTP client is passed in (modules pass ansible-core's open_url), so this file has
no Ansible imports. Every transfer is bounded in bytes and in time, and its sha256 is computed while it
streams to disk.
"""

from __future__ import annotations

import hashlib
import os
import time
from urllib.parse import quote, unquote, urlparse

from ansible_collections.carapace.fleet.plugins.module_utils._errors import FleetError
from ansible_collections.carapace.fleet.plugins.module_utils._http import (
    DEFAULT_RETRIES, DeadlineExceeded, attempts_note, deadline, is_transient, redact_url, retrying)

_CHUNK = 1 << 20
DEFAULT_BASE_URL = "https://github.com/{repo}/releases/download/{tag}"


class FetchError(FleetError):
    """A download failure with a machine-readable cause (not_found, http_error, timeout, too_large, truncated,
    connection_error, bad_source) and an operator-facing message."""

    def __init__(self, cause, message, status=None):
        super().__init__(cause, message)
        self.status = status  # the HTTP status of an http_error


class Source:
    """Where a release's files come from: an http(s) base URL, or a local directory (plain path or file://).

    `{repo}` and `{tag}` in the base are replaced, so one mirror setting serves every tag.
    """

    def __init__(self, base_url, repo, tag):
        base = (base_url or DEFAULT_BASE_URL).replace("{repo}", repo).replace("{tag}", tag)
        self.base = base.rstrip("/")
        parsed = urlparse(self.base)
        if parsed.scheme in ("http", "https"):
            self.local_dir = None
        elif parsed.scheme == "file":
            if parsed.netloc not in ("", "localhost"):
                raise FetchError("bad_source",
                                 "base_url %s: file:// URLs must name a local path (file:///dir)" % redact_url(base))
            self.local_dir = unquote(parsed.path)
        elif parsed.scheme == "" or len(parsed.scheme) == 1:  # a plain path (or a Windows drive letter)
            self.local_dir = os.path.abspath(os.path.expanduser(self.base))
        else:
            raise FetchError("bad_source", "base_url %s: unsupported scheme %r; use https://, http://, file:// or a "
                             "local directory" % (redact_url(base), parsed.scheme))
        # what results and messages show: never the credentials of base_url
        self.display_base = redact_url(self.base)

    def location(self, name):
        """The URL or path of one file of the release."""
        if self.local_dir is not None:
            return os.path.join(self.local_dir, name)
        return "%s/%s" % (self.base, quote(name))

    def display(self, name):
        """location(name) as results and messages show it: credentials in the URL redacted."""
        return redact_url(self.location(name))


def fetch(source, name, dest_path, opener, timeout, max_bytes, retries=DEFAULT_RETRIES, sleep=None):
    """Copy one file of the release to `dest_path` (created 0600). Returns (sha256 hex, size).

    A transient failure (connection reset or refused, timeout, truncated body, HTTP 5xx) is tried again, up to
    `retries` more times with a short backoff (_http.retrying), each attempt with its own `timeout`; any other
    failure (HTTP 4xx, too large, a bad source) is final at once. What was downloaded is checked by the caller
    (digest, signature), never here: an integrity or authenticity failure is never retried.
    """
    tried = []

    def attempt():
        if tried and os.path.lexists(dest_path):  # what the failed attempt before left
            os.unlink(dest_path)
        tried.append(True)
        return _fetch_once(source, name, dest_path, opener, timeout, max_bytes)

    try:
        return retrying(attempt, retries, lambda exc: isinstance(exc, FetchError) and is_transient(exc.cause, exc.status),
                        **({"sleep": sleep} if sleep else {}))
    except FetchError as exc:
        note = attempts_note(exc)
        if note:
            raise FetchError(exc.cause, exc.message + note, exc.status) from exc
        raise


def _fetch_once(source, name, dest_path, opener, timeout, max_bytes):
    """One attempt of fetch().

    `opener(url, timeout)` returns a file-like HTTP response (the modules pass _http.ansible_opener: ansible-core's
    open_url with headers, certificate validation and the redirect policy). `timeout` bounds the whole request:
    connecting, the response headers and the body count against one deadline, so a server that drips bytes cannot
    hold the run. Messages show the URL without its credentials.
    """
    where = source.location(name)
    shown = redact_url(where)
    until = time.monotonic() + timeout
    if source.local_dir is not None:
        if not os.path.isfile(where):
            raise FetchError("not_found", "%s: not found at %s" % (name, where))
        with open(where, "rb") as src:
            return _stream(src, name, where, dest_path, until, timeout, max_bytes, os.path.getsize(where))
    try:
        with deadline(timeout):
            try:
                resp = opener(where, timeout)
            except DeadlineExceeded:
                raise
            except Exception as exc:  # HTTPError, URLError, ssl, socket, ansible's ConnectionError: all end the run
                raise _http_failure(name, shown, timeout, exc) from exc
            try:
                length = resp.headers.get("Content-Length") if getattr(resp, "headers", None) is not None else None
                expected = int(length) if length and length.strip().isdigit() else None
                return _stream(resp, name, shown, dest_path, until, timeout, max_bytes, expected)
            finally:
                resp.close()
    except DeadlineExceeded as exc:
        raise FetchError("timeout", "%s: download from %s took longer than timeout=%ss (connection, headers and body "
                         "count together). Check the mirror or raise timeout." % (name, shown, timeout)) from exc


def _stream(src, name, where, dest_path, until, timeout, max_bytes, expected):
    if expected is not None and expected > max_bytes:
        raise FetchError("too_large", "%s: %s is %d bytes, over max_bytes=%d. Raise max_bytes if this release's "
                         "files really are that large." % (name, where, expected, max_bytes))
    h = hashlib.sha256()
    size = 0
    # read1 returns what has arrived instead of blocking until a whole chunk is in, so the deadline is
    # checked while a slow server drips.
    read = getattr(src, "read1", src.read)
    fd = os.open(dest_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    with os.fdopen(fd, "wb") as out:
        while True:
            if time.monotonic() > until:
                raise FetchError("timeout", "%s: download from %s took longer than timeout=%ss. Check the mirror or "
                                 "raise timeout." % (name, where, timeout))
            try:
                chunk = read(_CHUNK)
            except DeadlineExceeded:
                raise
            except Exception as exc:
                raise _read_failure(name, where, timeout, exc) from exc
            if not chunk:
                break
            size += len(chunk)
            if size > max_bytes:
                raise FetchError("too_large", "%s: %s sent more than max_bytes=%d bytes. Raise max_bytes if this "
                                 "release's files really are that large." % (name, where, max_bytes))
            h.update(chunk)
            out.write(chunk)
    if expected is not None and size != expected:
        raise FetchError("truncated", "%s: transfer from %s was truncated (%d of %d bytes). Retry; if it persists, "
                         "check the mirror." % (name, where, size, expected))
    return h.hexdigest(), size


def _http_failure(name, where, timeout, exc):
    code = getattr(exc, "code", None)
    if code == 404:
        return FetchError("not_found", "%s: not found at %s (HTTP 404)" % (name, where))
    if isinstance(code, int):
        return FetchError("http_error", "%s: HTTP %d from %s. Retry later or use a mirror (base_url)." % (name, code, where),
                          status=code)
    return _read_failure(name, where, timeout, exc)


def _read_failure(name, where, timeout, exc):
    text = redact_url("%s: %s" % (type(exc).__name__, exc))
    if isinstance(exc, TimeoutError) or "timed out" in text.lower() or "timeout" in type(exc).__name__.lower():
        return FetchError("timeout", "%s: no answer from %s within timeout=%ss (%s). Check the mirror or raise timeout."
                          % (name, where, timeout, text))
    if "IncompleteRead" in text:
        return FetchError("truncated", "%s: transfer from %s was truncated (%s). Retry; if it persists, check the "
                          "mirror." % (name, where, text))
    return FetchError("connection_error", "%s: cannot download %s (%s). Check the network, the proxy, or use a "
                      "mirror or a local directory (base_url)." % (name, where, text))
