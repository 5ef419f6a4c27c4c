#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: carapace.fleet maintainers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: cara_release_notes
short_description: Gate a Carapace upgrade on the release's notes (seven sections, breaking changes acknowledged)
version_added: 0.1.0
description:
  - Reads the release notes of a Carapace tag (markdown, as published in C(docs/releases/<tag>.md)) from a local path,
    a C(file://) URL or an http(s) URL, splits them into their C(## ) sections, and applies the release-notes gate of
    Carapace's release policy.
  - Passes only when every section of O(required_sections) is present and filled in (V(None.) counts as filled in;
    an empty section or one holding only an HTML comment does not).
  - A section headed C(Migration) is accepted as C(Migration Steps), because Carapace's own v0.9.0 notes use that
    heading for the migration steps the policy asks for; RV(aliases) reports it. Extra sections (v0.9.0 adds
    C(Platform Hardening)) are returned and never required. Section order is not checked.
  - A C(Breaking Changes) section with anything other than V(None), V(None.), V(N/A) or nothing fails the gate unless
    O(ack_breaking) names this very O(tag). The failure quotes the breaking changes and names the variable to set,
    C(cara_upgrade_ack_breaking) (the cara_upgrade role passes it as O(ack_breaking)).
  - Read-only. Runs on the controller (C(delegate_to) C(localhost), C(run_once)), like M(carapace.fleet.cara_release).
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
  src:
    description:
      - The release notes. A local path, a C(file:///path) URL, or an C(http://) or C(https://) URL (for example the
        raw C(docs/releases/<tag>.md) of the tag, or a mirror of it).
      - Files larger than 1 MiB are refused.
    type: str
    required: true
  tag:
    description: The release the notes are for, for example V(v0.9.0) (the C(v) is optional).
    type: str
    required: true
  ack_breaking:
    description:
      - The tag whose breaking changes the operator has read and accepts. The gate passes a release with breaking
        changes only when this equals O(tag), so an acknowledgement never carries over to the next release.
    type: str
  required_sections:
    description:
      - Sections that must be present and filled in, compared case-insensitively.
      - Defaults to the seven sections of the policy's release notes template.
    type: list
    elements: str
    default: [Summary, Breaking Changes, Migration Steps, Rollback Steps, Security, Verification, Known Caveats]
  timeout:
    description: Seconds to wait for an http(s) server.
    type: int
    default: 30
  retries:
    description:
      - How many more times a transient failure of fetching the notes is tried (connection refused or reset, a timeout, a
        truncated body, HTTP 5xx), after 0.5, 1, 2, 4... seconds (at most 8); each attempt gets its own O(timeout).
      - An HTTP 4xx answer, a local file and notes that fail the gate are never retried. V(0) tries once.
    type: int
    default: 3
  validate_certs:
    description: Validate TLS certificates of https sources.
    type: bool
    default: true
notes:
  - Notes exist for Carapace v0.3.0 and later; v0.1.0, v0.2.0 and previews have none, so the gate cannot pass for them
    with the default O(required_sections).
seealso:
  - module: carapace.fleet.cara_release
  - name: Carapace release policy
    description: Release notes template (docs/release.md in the Carapace repository).
    link: https://github.com/puremachinery/carapace/blob/master/docs/release.md
"""

EXAMPLES = r"""
- name: Gate the upgrade on the notes of the target release
  carapace.fleet.cara_release_notes:
    src: https://raw.githubusercontent.com/puremachinery/carapace/{{ cara_upgrade_target }}/docs/releases/{{ cara_upgrade_target }}.md
    tag: "{{ cara_upgrade_target }}"
    ack_breaking: "{{ cara_upgrade_ack_breaking | default(omit) }}"
  delegate_to: localhost
  run_once: true
  register: notes

- name: Notes copied next to an air-gapped mirror
  carapace.fleet.cara_release_notes:
    src: /srv/mirror/carapace/v0.9.0/notes.md
    tag: v0.9.0
    ack_breaking: v0.9.0

- name: Show the rollback steps of the release
  ansible.builtin.debug:
    var: notes.sections['Rollback Steps']
"""

RETURN = r"""
sections:
  description: Every C(## ) section of the notes, heading as written to its text (title and preamble excluded).
  returned: success and gate failures
  type: dict
  sample:
    Summary: Carapace v0.9.0.
    Breaking Changes: "- Non-interactive `cara setup` requires `--model`."
    Migration: Run `cara backup --output ./carapace-backup-v0.8.x.tar.gz` before upgrading.
breaking:
  description: The text of C(Breaking Changes), or V(null) when it says there are none.
  returned: success and gate failures
  type: str
acknowledged:
  description: Whether O(ack_breaking) names O(tag). The gate needs it only when RV(breaking) is set.
  returned: success and gate failures
  type: bool
missing:
  description: Required sections that are absent. Always V([]) on success.
  returned: success and gate failures
  type: list
  elements: str
empty:
  description: Required sections that are present with nothing in them. Always V([]) on success.
  returned: success and gate failures
  type: list
  elements: str
aliases:
  description: Required sections found under another heading, required name to heading as written.
  returned: success and gate failures
  type: dict
  sample:
    Migration Steps: Migration
tag:
  description: The tag, canonical (with its C(v)).
  returned: success and gate failures
  type: str
  sample: v0.9.0
src:
  description: Where the notes were read from.
  returned: always
  type: str
cause:
  description:
    - On failure, a machine-readable cause, one of C(missing_sections), C(breaking_unacknowledged), C(not_found),
      C(http_error), C(timeout), C(connection_error), C(too_large), C(not_text), C(bad_source), C(bad_argument).
  returned: failure
  type: str
"""

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.urls import open_url

from ansible_collections.carapace.fleet.plugins.module_utils import _http, _notes
from ansible_collections.carapace.fleet.plugins.module_utils._version import normalize_tag


def main():
    module = AnsibleModule(
        argument_spec=dict(
            src=dict(type="str", required=True),
            tag=dict(type="str", required=True),
            ack_breaking=dict(type="str"),
            required_sections=dict(type="list", elements="str", default=list(_notes.DEFAULT_SECTIONS)),
            retries=dict(type="int", default=_http.DEFAULT_RETRIES),
            timeout=dict(type="int", default=30),
            validate_certs=dict(type="bool", default=True),
        ),
        supports_check_mode=True,
    )
    p = module.params
    # credentials in a src URL are masked in everything the module returns
    module.no_log_values.update(_http.url_credentials(p["src"]))
    try:
        tag = normalize_tag(p["tag"])
        if p["timeout"] <= 0:
            raise ValueError("timeout must be a positive number of seconds")
        if p["retries"] < 0:
            raise ValueError("retries must be 0 or more")
        if not p["required_sections"] or any(not (s or "").strip() for s in p["required_sections"]):
            raise ValueError("required_sections must be a non-empty list of section names, e.g. [Summary, Breaking "
                             "Changes, Migration Steps, Rollback Steps, Security, Verification, Known Caveats]")
    except ValueError as exc:
        module.fail_json(msg=str(exc), cause="bad_argument", src=p["src"])

    # redirects followed by _http (https -> http refused); the timeout bounds the whole request
    opener = _http.ansible_opener(open_url, validate_certs=p["validate_certs"],
                                  http_agent="carapace.fleet cara_release_notes")

    try:
        text = _notes.read_notes(p["src"], opener, p["timeout"], retries=p["retries"])
        facts = _notes.check_notes(text, tag, p["ack_breaking"], p["required_sections"], src=p["src"])
    except _notes.NotesError as exc:
        extra = {k: v for k, v in exc.facts.items() if k != "warnings"}
        for warning in exc.facts.get("warnings", []):
            module.warn(warning)
        module.fail_json(msg=exc.message, cause=exc.cause, src=p["src"], **extra)
    for warning in facts.pop("warnings"):
        module.warn(warning)
    module.exit_json(changed=False, src=p["src"], **facts)


if __name__ == "__main__":
    main()
