#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: carapace.fleet maintainers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: cara_report
short_description: Record hosts' outcomes in the fleet report (report.json, report.md and report.html)
version_added: 0.1.0
description:
  - Each run reports into its own directory, C(<dir>/<kind>/<id>/) (C(kind) and C(id) from O(run)), with one row per host
    under C(rows/), and C(report.json), C(report.md) and C(report.html) regenerated from all rows, under a lock and
    atomically, so the report is complete for every host a run reached even when the run stops half way.
  - C(report.html) is the run as a picture, a self-contained page (no scripts, nothing loaded from elsewhere) with a
    timeline of one row per host, grouped by batch (C(batch) of a row), and one bar per phase of the host's window
    (C(phases) of a row, as M(carapace.fleet.cara_apply) records them) coloured by its outcome.
  - After each write of a real run, C(<dir>/<kind>/latest) points at it, and C(<dir>/report.json), C(<dir>/report.md),
    C(<dir>/report.html) and C(<dir>/latest) point at the newest run of any kind. An upgrade, a rollback and a drill never replace each
    other's reports.
  - A dry run (O(dry_run), the playbooks pass C(ansible_check_mode)) is written to its own run directory, marked as a
    dry run, and moves none of these links, so it never hides the last real report.
  - Runs on the controller (C(delegate_to) C(localhost)); the roles of this collection call it as each host finishes.
author:
  - carapace.fleet maintainers (@carapace-fleet)
attributes:
  check_mode:
    support: full
    description: Reports what would be written; writes nothing.
  diff_mode:
    support: none
    description: Nothing to diff; the result carries the lock or report content.
  idempotent:
    support: full
    description: Writing the same rows again for the same run changes nothing.
options:
  dir:
    description: Report directory (created).
    type: path
    required: true
  run:
    description:
      - Facts of the run. C(id) is required and identifies the run; C(kind) (upgrade, rollback, drill),
        C(target), C(started), C(playbook) are shown in the report, and, when set, C(requested) (the version asked
        for, for example V(latest)), C(window) (the maintenance window) and C(stopped) (why the run stopped before
        every host, for example V(window_closed)).
    type: dict
    required: true
  row:
    description:
      - One host's row. Keys C(host), C(from), C(to), C(result) (V(upgraded), V(unchanged), V(rolled_back), V(failed),
        V(refused) (a refusal before the host was touched), V(in_progress) (the service was stopped and the run has not
        finished the host yet), V(pending)), C(phase), C(downtime_s), C(rto_s), C(sha256), C(log_index), C(backup); other keys are kept under
        C(details) (for example C(error); C(batch), the host's batch, 1-based; C(phases), the window's phases, each
        C(phase), C(start) and C(end) (epoch seconds, C(end) null while it runs), C(ok) and maybe C(error)).
    type: dict
  rows:
    description: Several rows at once (same keys as O(row)).
    type: list
    elements: dict
    default: []
  dry_run:
    description: The run changes nothing (check mode); its report is marked as such and moves no C(latest) link.
    type: bool
    default: false
"""

EXAMPLES = r"""
- name: Record this host's outcome
  carapace.fleet.cara_report:
    dir: "{{ cara_report_dir }}"
    run: "{{ cara_fleet_run }}"
    row:
      host: "{{ inventory_hostname }}"
      from: v0.8.0
      to: v0.9.0
      result: upgraded
      phase: applied
      downtime_s: 3.2
  delegate_to: localhost
"""

RETURN = r"""
report:
  description: The regenerated report (the content of report.json).
  returned: success
  type: dict
  contains:
    run:
      description: The run's facts.
      type: dict
    summary:
      description:
        - Counts per result, hosts, max downtime and RTO, C(dry_run), and C(ok) (no failed, refused, in progress
          or rolled back host, and no pending host but in a dry run).
        - C(incomplete) is true when the only hosts in the way of C(ok) are pending ones (not reached, untouched; the
          next run continues), and C(outcome) says it in one word, V(dry_run), V(ok), V(incomplete) or
          V(needs_attention).
      type: dict
    hosts:
      description: One row per host, sorted by host.
      type: list
      elements: dict
run_dir:
  description: This run's report directory, C(<dir>/<kind>/<id>).
  returned: success
  type: str
report_json:
  description: Path of this run's report.json.
  returned: success
  type: str
report_md:
  description: Path of this run's report.md.
  returned: success
  type: str
report_html:
  description: Path of this run's report.html, the run as a picture.
  returned: success
  type: str
  version_added: 0.3.0
"""

import os

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.carapace.fleet.plugins.module_utils._report import Report, link_latest, normalise_row, run_directory


def main():
    module = AnsibleModule(
        argument_spec=dict(
            dir=dict(type="path", required=True),
            run=dict(type="dict", required=True),
            row=dict(type="dict"),
            rows=dict(type="list", elements="dict", default=[]),
            dry_run=dict(type="bool", default=False),
        ),
        supports_check_mode=True,
    )
    p = module.params
    if not p["run"].get("id"):
        module.fail_json(msg="run.id is required: it tells this run's rows from an earlier run's")
    try:
        for item in ([p["row"]] if p["row"] else []) + p["rows"]:
            normalise_row(item)
    except ValueError as exc:
        module.fail_json(msg="bad report row: %s" % exc)
    run = dict(p["run"], dry_run=True) if p["dry_run"] else dict(p["run"])
    try:
        run_dir = run_directory(p["dir"], run)
    except ValueError as exc:
        module.fail_json(msg=str(exc))
    paths = dict(run_dir=run_dir, report_json=os.path.join(run_dir, "report.json"),
                 report_md=os.path.join(run_dir, "report.md"), report_html=os.path.join(run_dir, "report.html"))
    if module.check_mode:
        module.exit_json(changed=bool(p["row"] or p["rows"]), report=None, **paths)
    try:
        report, changed = Report(run_dir).write(run, row=p["row"], rows=p["rows"])
        if not p["dry_run"]:
            link_latest(p["dir"], run_dir)
    except (OSError, ValueError) as exc:
        module.fail_json(msg="cannot write the fleet report in %s: %s" % (run_dir, exc))
    module.exit_json(changed=changed, report=report, **paths)


if __name__ == "__main__":
    main()
