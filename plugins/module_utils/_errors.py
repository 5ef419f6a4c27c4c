# -*- coding: utf-8 -*-
# Copyright: carapace.fleet maintainers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The base of every refusal and failure the module_utils raise.

Domain logic only (no Ansible imports). A module reports `cause` (a machine-readable word such as `bad_argument`,
`tampered` or `lock_held`) and `message` (what happened, and the operator's next step) in its failure result.
"""

from __future__ import annotations


class FleetError(Exception):
    """A refusal or failure: `cause` is machine-readable, `message` names the cause and the next step.

    str() of the error is its message as it was raised. Subclasses add their own facts (BackupError's `extra`,
    TransactionError's `retryable`, ReleaseError's `asset`, ...).
    """

    def __init__(self, cause, message):
        super().__init__(message)
        self.cause = cause
        self.message = message
