"""kill_at: SIGKILL this ansible-playbook the moment one task has returned ok on one host (tests only).

Enabled for the runs a test wants interrupted (ANSIBLE_CALLBACKS_ENABLED=kill_at, ANSIBLE_CALLBACK_PLUGINS=<this
dir>), with CARAPACE_KILL_AT="<host>:<task name>" or "<host>:<task name>#<n>" (the n-th time that task returns ok
on that host; a task that runs twice in a run, such as the service's stop in an upgrade and in its rollback), or
"<host>:<task name>@poll<n>": at the n-th look of the controller at that async task while it runs (the downtime
window, which then goes on without its controller). It
kills from inside, right after the result is in and before the next task starts, so the run dies exactly where the
test wants it: as an operator's `kill -9` (or a lost controller) would leave it, with nothing cleaned up. Used by
tests/integration/test_fleet_kill_points.py and the Molecule `resume` scenario.
"""

from __future__ import annotations

import os
import signal

from ansible.plugins.callback import CallbackBase

DOCUMENTATION = """
    name: kill_at
    type: aggregate
    short_description: SIGKILL the run after a given task returned ok on a given host (test only)
    description: Reads CARAPACE_KILL_AT=<host>:<task name>[#<n>].
"""


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "aggregate"
    CALLBACK_NAME = "kill_at"
    CALLBACK_NEEDS_ENABLED = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        host, _sep, task = os.environ.get("CARAPACE_KILL_AT", "").partition(":")
        task, at_poll, polls = task.rpartition("@poll") if "@poll" in task else (task, "", "")
        task, _sep, nth = task.rpartition("#") if "#" in task else (task, "", "1")
        self._at = (host, task) if host and task else None
        self._on_poll = bool(at_poll)
        self._left = int(polls or nth)

    def v2_playbook_on_task_start(self, task, is_conditional):
        self._current = task.name

    def v2_runner_on_async_poll(self, result):
        # the poll's result carries ansible's own async_status pseudo-task: the task polled is the one running
        if self._on_poll and self._at and (result._host.get_name(), getattr(self, "_current", None)) == self._at:  # pylint: disable=protected-access
            self._left -= 1
            if self._left == 0:
                self._kill("at an async poll of")

    def v2_runner_on_ok(self, result):
        if not self._on_poll:
            self._count(result, "after")

    def _count(self, result, when):
        if self._at and (result._host.get_name(), result._task.name) == self._at:  # pylint: disable=protected-access
            self._left -= 1
            if self._left == 0:
                self._kill(when)

    def _kill(self, when):
        print("kill_at: SIGKILL %s %r on %s" % (when, self._at[1], self._at[0]), flush=True)
        # Started as the leader of its own process group (the integration tests): the whole run, with its workers
        # and the modules they run; cara and an async window run in sessions of their own and survive. Otherwise (a
        # run started by another run's task, as in Molecule): this process only.
        if os.getpgid(0) == os.getpid():
            os.killpg(os.getpid(), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)
