"""kill_at: SIGKILL this ansible-playbook the moment one task has returned ok on one host (resume scenario only).

Enabled for the runs molecule/resume/converge.yml wants interrupted (ANSIBLE_CALLBACKS_ENABLED=kill_at,
ANSIBLE_CALLBACK_PLUGINS=<this dir>), with MOLECULE_KILL_AT="<host>:<task name>". It kills from inside, right
after the result is in and before the next task starts, so the run dies exactly where the test wants it: as an
operator's `kill -9` (or a lost controller) would leave it, with nothing cleaned up.
"""

from __future__ import annotations

import os
import signal

from ansible.plugins.callback import CallbackBase

DOCUMENTATION = """
    name: kill_at
    type: aggregate
    short_description: SIGKILL the run after a given task returned ok on a given host (test only)
    description: Reads MOLECULE_KILL_AT=<host>:<task name>.
"""


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "aggregate"
    CALLBACK_NAME = "kill_at"
    CALLBACK_NEEDS_ENABLED = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        host, _sep, task = os.environ.get("MOLECULE_KILL_AT", "").partition(":")
        self._at = (host, task) if host and task else None

    def v2_runner_on_ok(self, result):
        if self._at and (result._host.get_name(), result._task.name) == self._at:  # pylint: disable=protected-access
            print("kill_at: SIGKILL after %r on %s" % (self._at[1], self._at[0]), flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
