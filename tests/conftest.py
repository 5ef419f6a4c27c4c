"""Shared pytest setup: the collection and tests/support importable, and the common fixtures."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUPPORT = os.path.join(ROOT, "tests", "support")
COLLECTIONS = os.path.join(ROOT, ".collections")

# `make setup` links the working tree as .collections/ansible_collections/carapace/fleet.
if not os.path.isdir(os.path.join(COLLECTIONS, "ansible_collections", "carapace", "fleet")):
    raise RuntimeError("run `make setup` first: .collections/ansible_collections/carapace/fleet is missing")
# Releases of the `cara` double run as `#!/usr/bin/env python3` and need json5: the test interpreter's.
os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
for path in (COLLECTIONS, SUPPORT):
    if path not in sys.path:
        sys.path.insert(0, path)

from fixtures import lab, lab_root, release_server  # noqa: E402,F401  pylint: disable=wrong-import-position,unused-import
