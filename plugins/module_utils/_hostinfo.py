# -*- coding: utf-8 -*-
# Copyright: carapace.fleet maintainers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Read-only facts about one Carapace host: its binary, config, daemon, update markers, releases and backups.

Domain logic only (no Ansible imports). Nothing here writes, and nothing here raises for a host without cara, a
missing state dir or a corrupt file: every problem becomes an `*_error` string next to the fact it concerns.
Secrets never leave: the config is redacted (_cara.redact, plus every value under `env`, plus any string that
holds a secret found anywhere in the config).
"""

from __future__ import annotations

import os
import re
import stat

from ansible_collections.carapace.fleet.plugins.module_utils import _backup_index, _cara, _safejson, _version
from ansible_collections.carapace.fleet.plugins.module_utils._backup_archive import BackupError
from ansible_collections.carapace.fleet.plugins.module_utils._digest import sha256_file
from ansible_collections.carapace.fleet.plugins.module_utils._http import redact_url

SWITCH_STATE = "state.json"  # written by cara_switch in install_root
MARKER_MAX_BYTES = 64 * 1024  # cara reads its update markers capped at 64 KiB


def read_json_marker(path):
    """(value, error) of a JSON file cara keeps under updates/: (None, None) when absent. Read like cara does:
    O_NOFOLLOW, non-blocking, capped at 64 KiB."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        return None, None
    except OSError as exc:
        return None, "cannot read %s: %s" % (path, exc.strerror or exc)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None, "%s is not a regular file" % path
        with os.fdopen(fd, "rb") as handle:
            fd = None
            data = handle.read(MARKER_MAX_BYTES + 1)
    finally:
        if fd is not None:
            os.close(fd)
    if len(data) > MARKER_MAX_BYTES:
        return None, "%s is larger than %d bytes (cara refuses it too)" % (path, MARKER_MAX_BYTES)
    try:
        value = _safejson.loads(data.decode("utf-8"))
    except ValueError as exc:
        return None, "%s is corrupt: not JSON (%s)" % (path, exc)
    if not isinstance(value, dict):
        return None, "%s is corrupt: not a JSON object" % path
    return value, None


# Keys whose whole value (a string, or a whole object or list) is a secret. Broader than _cara.SECRET_KEY_RE:
# `auth`, `authorization`, `cookie`, `key` and any name ending in `key`/`keys` (apiKey, accessKey, keys) too.
SECRET_NAME_RE = re.compile(r"(token|passw|secret|apikey|api[_-]?key|passphrase|credential|private|auth|cookie|"
                            r"signature|bearer|session[_-]?key)", re.I)
_PEM_RE = re.compile(r"-----BEGIN [A-Z0-9 ]*-----")


def is_secret_key(key):
    name = str(key).lower()
    return bool(SECRET_NAME_RE.search(name)) or name.endswith(("key", "keys")) or "_key" in name or "-key" in name


def _secret_strings(value, found, inside=False, direct=False):
    """Collect the strings kept under secret-looking keys: the value of such a key itself (4 characters or more),
    and deeper in its subtree, strings of 8 or more (shorter ones there are words like a mode, not secrets)."""
    if isinstance(value, dict):
        for key, item in value.items():
            secret = is_secret_key(key)
            _secret_strings(item, found, inside or secret, secret)
    elif isinstance(value, list):
        for item in value:
            _secret_strings(item, found, inside, direct)
    elif isinstance(value, str) and inside and len(value) >= (4 if direct else 8):
        found.add(value)
    return found


def scrub_value(value, secrets=()):
    """A copy of value (any JSON-like structure) with, in every string: a PEM block, or one of `secrets`, redacted
    whole; the credentials of URLs (userinfo) redacted."""
    if isinstance(value, dict):
        return {k: scrub_value(v, secrets) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [scrub_value(v, secrets) for v in value]
    if isinstance(value, str):
        if _PEM_RE.search(value) or any(secret in value for secret in secrets):
            return _cara.REDACTED
        return redact_url(value)
    return value


def _redact_subtrees(value):
    if isinstance(value, dict):
        return {k: (_cara.REDACTED if is_secret_key(k) and v not in (None, "", {}, [])
                    else _redact_subtrees(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact_subtrees(v) for v in value]
    return value


def config_secrets(cfg):
    """The strings of a config that are secrets: under secret-looking keys, and every value of the top-level env."""
    secrets = _secret_strings(cfg, set())
    if isinstance(cfg, dict) and isinstance(cfg.get("env"), dict):
        secrets.update(v for v in cfg["env"].values() if isinstance(v, str) and len(v) >= 4)
    return secrets


def redact_config(cfg):
    """The config safe to return: the whole value under every secret-looking key redacted (objects and lists too),
    every value of the top-level `env` map redacted (it carries provider keys under any name), PEM blocks and any
    other string containing a secret redacted, and credentials removed from URLs."""
    safe = _redact_subtrees(cfg)
    if isinstance(safe.get("env"), dict):
        safe["env"] = {k: _cara.REDACTED for k in safe["env"]}
    return scrub_value(safe, config_secrets(cfg))


def binary_facts(bin_path):
    facts = {"bin_path": bin_path, "bin_exists": os.path.lexists(bin_path), "bin_is_symlink": os.path.islink(bin_path),
             "symlink_target": None, "real_path": None, "sha256": None, "size": None}
    if facts["bin_is_symlink"]:
        facts["symlink_target"] = os.readlink(bin_path)
    if os.path.isfile(bin_path):
        facts["real_path"] = os.path.realpath(bin_path)
        try:
            facts["sha256"], facts["size"] = sha256_file(facts["real_path"])
        except OSError as exc:
            facts["bin_error"] = "cannot read %s: %s" % (facts["real_path"], exc.strerror or exc)
    return facts


def kept_releases(install_root, bin_path):
    """install_root/releases/<tag>/cara, oldest first (_version.sort_key: SemVer order, a release after its
    pre-releases; names that are no version last): tag, path, sha256, size, active (the bin resolves to it)."""
    base = os.path.join(install_root, "releases")
    active = os.path.realpath(bin_path) if os.path.exists(bin_path) else None
    releases = []
    try:
        tags = os.listdir(base)
    except OSError:
        return releases
    for tag in sorted(tags, key=_version.sort_key):
        path = os.path.join(base, tag, "cara")
        if not os.path.isfile(path):
            continue
        item = {"tag": tag, "path": path, "sha256": None, "size": None,
                "active": active is not None and os.path.realpath(path) == active}
        try:
            item["sha256"], item["size"] = sha256_file(path)
        except OSError as exc:
            item["error"] = "cannot read %s: %s" % (path, exc.strerror or exc)
        releases.append(item)
    return releases


def backup_facts(backup_dir):
    """(entries, error): the backup index with an `exists` flag per archive (not re-hashed here)."""
    try:
        index = _backup_index.read_index(backup_dir) if os.path.isdir(backup_dir) else {"backups": []}
    except BackupError as exc:
        return [], exc.message
    entries = []
    for entry in index["backups"]:
        item = dict(entry)
        item["exists"] = os.path.isfile(entry["path"]) and not os.path.islink(entry["path"])
        if item.get("snapshot"):
            item["snapshot"] = dict(item["snapshot"])
            snap_path = item["snapshot"].get("path") or ""
            item["snapshot"]["exists"] = os.path.isfile(snap_path) and not os.path.islink(snap_path)
        entries.append(item)
    return entries, None


def disk_free_mb(path):
    """Free MiB (for this user) on the filesystem that holds path, or its nearest existing parent; None if unknown."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    try:
        st = os.statvfs(probe)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize // (1024 * 1024)


def tree_size_mb(path):
    """Size of the regular files under path in MiB, rounded up (0 when it does not exist); symlinks not followed."""
    total = 0
    for dirpath, _dirnames, filenames in os.walk(path, followlinks=False):
        for name in filenames:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                total += st.st_size
    return -(-total // (1024 * 1024))


def gather(bin_path, state_dir, config_path=None, install_root="/opt/carapace", backup_dir="/var/backups/carapace",
           runner=_cara.subprocess_runner):
    """Every fact cara_info returns (see its RETURN documentation)."""
    facts = binary_facts(bin_path)
    executable = os.path.isfile(bin_path) and os.access(bin_path, os.X_OK)
    cli = _cara.CaraCLI(bin_path, state_dir, config_path, runner=runner)
    facts["installed"] = executable
    facts["version"] = None
    if executable:
        res = cli.run("--version", timeout=30)
        facts["version"] = _version.version_from_output(res["stdout"]) if res["rc"] == 0 else None
        if facts["version"] is None:
            facts["version_error"] = "`%s --version` answered rc %s: %s" % (
                bin_path, res["rc"], ((res["stdout"] or "") + (res["stderr"] or "")).strip()[:500])
    facts["tag"] = _version.tag_for_version(facts["version"]) if facts["version"] else None

    facts["config_path"] = cli.config_path
    facts["config_exists"] = os.path.isfile(cli.config_path)
    facts["config"], facts["config_error"], facts["gateway"] = None, None, None
    secrets = set()
    try:
        cfg = _cara.read_config(cli, cli.env())
    except _cara.CaraError as exc:
        facts["config_error"] = str(exc)
    else:
        secrets = config_secrets(cfg)
        facts["config"] = redact_config(cfg)
        facts["gateway"] = _cara.gateway_facts(cfg)

    facts["state_dir"] = state_dir
    facts["state_dir_exists"] = os.path.isdir(state_dir)
    try:
        facts["daemon"] = _cara.find_daemon(state_dir, (facts["gateway"] or {}).get("port", _cara.DEFAULT_PORT))
    except OSError as exc:
        facts["daemon"] = {"running": None, "pid": None, "how": None, "detail": "cannot tell: %s" % exc}

    updates = os.path.join(state_dir, "updates")
    for key, name in (("transaction", "transaction.json"), ("rollback_marker", "rollback.json"),
                      ("startup_health_failure", "startup_health_failure.json")):
        facts[key], facts[key + "_error"] = read_json_marker(os.path.join(updates, name))

    facts["install_root"] = install_root
    facts["releases"] = kept_releases(install_root, bin_path)
    facts["active_release"] = next((r["tag"] for r in facts["releases"] if r["active"]), None)
    # cara_switch's record of the active and previous release (`<install_root>/state.json`)
    facts["switch"], facts["switch_error"] = read_json_marker(os.path.join(install_root, SWITCH_STATE))
    facts["backup_dir"] = backup_dir
    facts["disk_free_mb"] = disk_free_mb(backup_dir)
    facts["state_size_mb"] = tree_size_mb(state_dir)
    facts["backups"], facts["backups_error"] = backup_facts(backup_dir)
    facts["platform_asset"] = _cara.platform_asset()
    # Errors and markers may quote a config line, a URL or a secret: nothing leaves with one.
    return scrub_value(facts, secrets)
