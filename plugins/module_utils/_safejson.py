# -*- coding: utf-8 -*-
# Copyright: carapace.fleet maintainers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""JSON parsing of files that someone else can write (transaction.json, index.json, state.json, the run lock, cara's
markers): hostile nesting is bad input, like any other malformed content.

Domain logic only (no Ansible imports). `loads` raises ValueError, which every caller already treats as "corrupt",
both for nesting deeper than the parser's recursion limit (RecursionError), for input too large to hold
(MemoryError), and for nesting deeper than MAX_DEPTH: no file of ours comes close, and a structure that deep would
fail later, in a copy or a diff, with a traceback instead of a message.
"""

from __future__ import annotations

import json

MAX_DEPTH = 64


def depth(value):
    """How deep lists and objects nest in `value` (a scalar is 0), computed without recursion."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, level)
        if level > MAX_DEPTH:
            break
        stack.extend((child, level + 1) for child in children)
    return deepest


def loads(data, **kwargs):
    """json.loads(data, **kwargs), raising ValueError for nesting deeper than MAX_DEPTH or beyond what parses."""
    try:
        value = json.loads(data, **kwargs)
    except (RecursionError, MemoryError) as exc:
        raise ValueError("nested too deeply or too large to parse (%s)" % type(exc).__name__) from None
    if depth(value) > MAX_DEPTH:
        raise ValueError("nested deeper than %d levels" % MAX_DEPTH)
    return value


def load(handle, **kwargs):
    """loads() of a file object's whole content."""
    return loads(handle.read(), **kwargs)
