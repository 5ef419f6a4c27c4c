# -*- coding: utf-8 -*-
# Copyright: carapace.fleet maintainers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""HTTP helpers shared by the modules that fetch from mirrors (cara_release, cara_release_notes).

Domain logic only (no Ansible imports): the client that opens one URL is passed in.
- redact_url: credentials in URLs (https://user:password@host/) never reach a result or an error message.
- redirect_opener / ansible_opener: redirects are followed here, not by the HTTP client, so that custom headers
  (Authorization, ...) are dropped once a redirect leaves the origin they were given for, and a redirect from https
  to http (or to any other scheme) is refused.
- retrying: a bounded number of attempts for transient failures (connection reset, timeout, HTTP 5xx); any other
  failure, and every integrity or authenticity failure (checked by the callers after a download), is final.
- deadline: one deadline for a whole request (DNS, connect, TLS, the headers and the body), so a server that drips its
  headers or its body cannot hold a task past `timeout`.
"""

from __future__ import annotations

import contextlib
import re
import signal
import threading
import time
import urllib.error
import urllib.parse
from urllib.parse import urlsplit

REDACTED_USERINFO = "********"
_USERINFO_RE = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)([^/?#@\s\"'<>]*)@")


def redact_url(text):
    """`text` with the userinfo of every URL in it replaced: https://u:p@host/x -> https://********@host/x."""
    if not isinstance(text, str):
        return text
    return _USERINFO_RE.sub(lambda m: m.group(1) + REDACTED_USERINFO + "@", text)


def url_credentials(url):
    """The secrets in a URL's userinfo, for a module's no_log values: the whole userinfo (a token is often the user
    part alone) and the password. Not a user name next to a password: no_log masks every occurrence of a value, and a
    short user name ("git") would garble unrelated text."""
    if not isinstance(url, str):
        return set()
    parts = urlsplit(url)
    found = set()
    if "@" in parts.netloc:
        userinfo = parts.netloc.rsplit("@", 1)[0]
        found.add(userinfo)
        if ":" in userinfo:
            found.add(userinfo.split(":", 1)[1])
    return {value for value in found if len(value) >= 3}


REDIRECT_CODES = (301, 302, 303, 307, 308)
MAX_REDIRECTS = 10


class RedirectRefused(Exception):
    """A redirect this client does not follow (https to http, a non-http scheme, too many hops)."""


class DeadlineExceeded(TimeoutError):
    """The whole request took longer than its timeout."""


def origin(url):
    """(scheme, host, port) of a URL, the port defaulted by scheme."""
    parts = urlsplit(url)
    scheme = (parts.scheme or "").lower()
    try:
        port = parts.port
    except ValueError:
        port = None
    return scheme, (parts.hostname or "").lower(), port or {"http": 80, "https": 443}.get(scheme)


def redirect_opener(raw_open, headers, max_redirects=MAX_REDIRECTS):
    """An opener(url, timeout) that follows redirects itself over raw_open(url, headers, timeout), a client that
    does NOT follow them (it raises urllib's HTTPError for a 3xx, as ansible-core's open_url does with
    follow_redirects="none").

    The custom `headers` go to the origin of the first URL only: from the first hop that changes scheme, host or
    port on, no custom header is sent again. A redirect from https to http, or to a scheme other than http(s), is
    refused (RedirectRefused). Each hop gets the time left of `timeout`.
    """
    headers = dict(headers or {})

    def opener(url, timeout):
        start = time.monotonic()
        first = origin(url)
        send = dict(headers)
        current = url
        for _hop in range(max_redirects + 1):
            left = max(timeout - (time.monotonic() - start), 0.001)
            try:
                return raw_open(current, send, left)
            except urllib.error.HTTPError as exc:
                location = exc.headers.get("Location") if exc.code in REDIRECT_CODES and exc.headers else None
                if not location:
                    raise
                target = exc.geturl() or location
                exc.close()
            target = urllib.parse.urljoin(current, target)
            scheme, cur_scheme = urlsplit(target).scheme.lower(), urlsplit(current).scheme.lower()
            if scheme not in ("http", "https"):
                raise RedirectRefused("refusing the redirect from %s to %s: only http(s) is followed"
                                      % (redact_url(current), redact_url(target)))
            if cur_scheme == "https" and scheme == "http":
                raise RedirectRefused("refusing the redirect from https to http (%s -> %s): it would drop TLS. Point "
                                      "the URL at the final https location" % (redact_url(current), redact_url(target)))
            if origin(target) != first:
                send = {}
            current = target
        raise RedirectRefused("more than %d redirects from %s" % (max_redirects, redact_url(url)))

    return opener


def ansible_opener(open_url, headers=None, validate_certs=True, http_agent=None):
    """The opener the modules use: ansible-core's open_url (proxies, certificates) for each hop, with its own
    redirect following off, under redirect_opener's policy."""

    def raw_open(url, hop_headers, timeout):
        return open_url(url, headers=hop_headers, timeout=timeout, validate_certs=validate_certs,
                        follow_redirects="none", http_agent=http_agent)

    return redirect_opener(raw_open, headers)


@contextlib.contextmanager
def deadline(seconds):
    """Raise DeadlineExceeded in the block once `seconds` have passed, wherever it blocks (connect, TLS, a header
    line, a body read), using SIGALRM.

    Modules run single-threaded in their own process; in any other thread than the main one (where signals cannot
    be used) the block runs without this bound and the callers' own between-read checks still apply.
    """
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def expire(_signum, _frame):
        raise DeadlineExceeded("timed out: the whole request took longer than %ss" % seconds)

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(float(seconds), 0.001))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


DEFAULT_RETRIES = 3
RETRY_BACKOFF = 0.5  # seconds before the first retry, doubled for each next one
RETRY_BACKOFF_MAX = 8.0
TRANSIENT_CAUSES = ("connection_error", "timeout", "truncated")


def is_transient(cause, status=None):
    """Whether a failed request may succeed when tried again: the connection failed or was cut (reset, timeout, a
    truncated body), or the server answered 5xx. A 4xx answer (not found, forbidden, ...) is final, and so is every
    other cause (too large, a refused redirect, a bad source)."""
    if isinstance(status, int):
        return 500 <= status < 600
    return cause in TRANSIENT_CAUSES


def retrying(attempt, retries, transient, sleep=time.sleep, backoff=RETRY_BACKOFF):
    """attempt() up to 1 + `retries` times, while it raises an exception for which transient(exc) is true, sleeping
    `backoff` seconds before the first retry and twice as long before each next one (at most RETRY_BACKOFF_MAX).
    The last exception is raised with `.attempts` set to the number of attempts made; an exception that is not
    transient is raised at once."""
    if retries < 0:
        raise ValueError("retries must be 0 or more")
    delay = backoff
    for number in range(1, retries + 2):
        try:
            return attempt()
        except Exception as exc:  # pylint: disable=broad-exception-caught
            exc.attempts = number
            if number > retries or not transient(exc):
                raise
        sleep(min(delay, RETRY_BACKOFF_MAX))
        delay *= 2
    raise AssertionError("unreachable")  # pragma: no cover


def attempts_note(exc):
    """' (after N attempts)' for an exception retrying() gave up on after more than one attempt, else ''."""
    attempts = getattr(exc, "attempts", 1)
    return " (after %d attempts)" % attempts if attempts > 1 else ""
