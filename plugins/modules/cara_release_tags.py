#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: carapace.fleet maintainers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: cara_release_tags
short_description: List the release tags of a Carapace release source and find the newest stable one
version_added: 0.3.0
description:
  - Reads which releases a release source publishes, the same source M(carapace.fleet.cara_release) fetches from
    (O(base_url)), and returns every tag, the stable ones and the newest. The C(cara_upgrade) role uses it for
    C(cara_upgrade_version=latest) and to plan the N-1 contract against the releases that exist.
  - "Without O(base_url) (or with GitHub's own C(https://github.com/{repo}/releases/download/{tag})): the GitHub
    releases API, C(<api_url>/repos/<repo>/releases?per_page=100), every page (the C(Link: rel=next) header)."
  - "An http(s) mirror: the file C(releases.json) in the directory that holds the per-tag directories, that is the
    part of O(base_url) before C({tag}) (for C(https://mirror/{repo}/releases/download/{tag}):
    C(https://mirror/<repo>/releases/download/releases.json)). It has the GitHub releases API's shape, a JSON list of
    objects with C(tag_name), C(prerelease) and C(draft), so a mirror can save the API's answer there."
  - A local directory or a C(file://) URL is listed directly. The directory is the part of O(base_url) before
    C({tag}); its entries count when their name is a release tag and O(base_url) with that tag is a directory holding
    at least one file.
  - A O(base_url) without C({tag}) (the files of one release) cannot be listed and is refused (RV(cause=no_listing)).
    So is a C({tag}) that is not a whole directory name.
  - Drafts never count. Pre-releases (the C(prerelease) flag, or a tag with a pre-release part such as
    C(v1.0.0-preview1), ordered as SemVer orders them) are in RV(tags) but never in RV(stable); RV(latest) is the
    newest stable tag, or the newest tag of all with O(allow_preview=true). Names that are not release tags are left out.
  - Fails closed, never guesses. An HTTP error (after O(retries) for transient ones), a body that is not that JSON, an
    empty listing or one without a stable tag fails the task with a machine-readable RV(cause) and a message that names
    the source and the next step (pin a tag, or list the known tags for an air-gapped site).
  - Read-only. Runs on the controller (C(delegate_to) C(localhost), C(run_once)).
author:
  - carapace.fleet maintainers (@carapace-fleet)
attributes:
  check_mode:
    support: full
    description: Runs the same in check mode; it never changes anything.
  diff_mode:
    support: none
    description: Nothing changes, so there is no diff.
  idempotent:
    support: full
    description: Never changes anything; always reports C(changed=false).
options:
  repo:
    description: GitHub repository (C(owner/name)) that publishes the releases.
    type: str
    default: puremachinery/carapace
  base_url:
    description:
      - Where the release files are, as M(carapace.fleet.cara_release) takes it; C({repo}) and C({tag}) are replaced.
      - Empty (the default) or GitHub's own C(https://github.com/{repo}/releases/download/{tag}) lists the GitHub
        releases API at O(api_url). An http(s) mirror is listed by its C(releases.json), a local directory or
        C(file://) URL by its entries (see the description).
    type: str
  api_url:
    description:
      - The GitHub API (or a server that answers as it does), used when O(base_url) is empty or GitHub's.
    type: str
    default: https://api.github.com
  allow_preview:
    description:
      - Let RV(latest) be a pre-release when one is newer than every stable tag, and accept a source that lists
        only pre-releases. Previews are outside Carapace's N-1 upgrade contract.
    type: bool
    default: false
  validate_certs:
    description: Validate TLS certificates of https sources.
    type: bool
    default: true
  timeout:
    description: Seconds one request (one page of the listing) may take, connection and body included.
    type: int
    default: 30
  retries:
    description:
      - How many more times a transient failure of one request is tried (connection refused or reset, a timeout, a
        truncated body, HTTP 5xx), after 0.5, 1, 2, 4... seconds (at most 8); each attempt gets its own O(timeout).
      - An HTTP 4xx answer and a body that is not the expected JSON are never retried. V(0) tries once.
    type: int
    default: 3
  headers:
    description:
      - Extra HTTP headers, for example C(Authorization) with a token (the GitHub API's rate limit, a private mirror).
        Never logged. Without an C(Accept) header, C(application/vnd.github+json) is sent.
    type: dict
    default: {}
seealso:
  - module: carapace.fleet.cara_release
  - name: GitHub REST API, list releases
    description: The shape of the API's answer, which a mirror's C(releases.json) copies.
    link: https://docs.github.com/en/rest/releases/releases#list-releases
"""

EXAMPLES = r"""
- name: The newest stable release on GitHub
  carapace.fleet.cara_release_tags:
  delegate_to: localhost
  run_once: true
  register: cara_tags

- name: Upgrade to it
  ansible.builtin.debug:
    msg: "newest stable release: {{ cara_tags.latest }} (of {{ cara_tags.stable | join(', ') }})"

- name: The releases of a mirror (it serves /carapace/releases.json next to the tag directories)
  carapace.fleet.cara_release_tags:
    base_url: https://mirror.example.internal/carapace/{tag}
    headers:
      Authorization: "Bearer {{ mirror_token }}"

- name: The releases copied to an air-gapped directory (/srv/mirror/carapace/<tag>/...)
  carapace.fleet.cara_release_tags:
    base_url: /srv/mirror/carapace/{tag}
"""

RETURN = r"""
tags:
  description: Every release tag the source lists (drafts left out), previews included, oldest first in SemVer order.
  returned: success
  type: list
  elements: str
  sample: [v0.8.0, v0.9.0, v1.0.0-preview1]
stable:
  description: The stable tags of RV(tags) (no pre-release part, not flagged C(prerelease)), oldest first.
  returned: success
  type: list
  elements: str
  sample: [v0.8.0, v0.9.0]
latest:
  description: The newest stable tag; with O(allow_preview=true), the newest tag of all.
  returned: success
  type: str
  sample: v0.9.0
source:
  description: Where the tags were read (the API or C(releases.json) URL, or the directory), credentials redacted.
  returned: always
  type: str
  sample: https://api.github.com/repos/puremachinery/carapace/releases?per_page=100
kind:
  description: How the source was listed, one of V(api), V(mirror), V(directory).
  returned: success
  type: str
cause:
  description:
    - On failure, a machine-readable cause, one of C(not_found), C(http_error), C(timeout), C(connection_error),
      C(truncated), C(too_large), C(bad_listing) (not the expected JSON), C(empty) (no release tag),
      C(no_stable) (only pre-releases), C(no_listing) (a O(base_url) that cannot be listed), C(bad_source),
      C(bad_argument).
  returned: failure
  type: str
status:
  description: On an C(http_error) failure, the HTTP status.
  returned: failure
  type: int
"""

import traceback

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.urls import open_url

from ansible_collections.carapace.fleet.plugins.module_utils import _http, _release_tags


def main():
    module = AnsibleModule(
        argument_spec=dict(
            repo=dict(type="str", default="puremachinery/carapace"),
            base_url=dict(type="str"),
            api_url=dict(type="str", default=_release_tags.DEFAULT_API_URL),
            allow_preview=dict(type="bool", default=False),
            validate_certs=dict(type="bool", default=True),
            timeout=dict(type="int", default=30),
            retries=dict(type="int", default=_http.DEFAULT_RETRIES),
            headers=dict(type="dict", default={}, no_log=True),
        ),
        supports_check_mode=True,
    )
    p = module.params
    # credentials in base_url or api_url are masked in everything the module returns
    module.no_log_values.update(_http.url_credentials(p["base_url"]) | _http.url_credentials(p["api_url"]))
    source = None
    try:
        _release_tags.check_repo(p["repo"])
        if p["timeout"] <= 0:
            raise ValueError("timeout must be a positive number of seconds")
        if p["retries"] < 0:
            raise ValueError("retries must be 0 or more")
        listing = _release_tags.listing_for(p["base_url"], p["repo"], p["api_url"])
        source = listing.display
    except ValueError as exc:
        module.fail_json(msg=str(exc), cause="bad_argument", source=source)
    except _release_tags.ReleaseTagsError as exc:
        module.fail_json(msg=exc.message, cause=exc.cause, source=exc.source)

    headers = dict(p["headers"])
    if not any(name.lower() == "accept" for name in headers):
        headers["Accept"] = "application/vnd.github+json"
    opener = _http.ansible_opener(open_url, headers=headers, validate_certs=p["validate_certs"],
                                  http_agent="carapace.fleet cara_release_tags")
    try:
        entries = _release_tags.read_tags(listing, opener, p["timeout"], p["retries"])
        result = _release_tags.summarize(entries, source, p["allow_preview"])
    except _release_tags.ReleaseTagsError as exc:
        extra = {"status": exc.status} if exc.status is not None else {}
        module.fail_json(msg=exc.message, cause=exc.cause, source=exc.source or source, **extra)
    except Exception as exc:  # fail closed, but say what happened
        module.fail_json(msg="unexpected error while listing the releases at %s: %s: %s. %s."
                         % (source, type(exc).__name__, _http.redact_url(str(exc)), _release_tags.NEXT_STEP),
                         cause="bad_listing", source=source, exception=_http.redact_url(traceback.format_exc()))
    module.exit_json(changed=False, source=source, kind=listing.kind, **result)


if __name__ == "__main__":
    main()
