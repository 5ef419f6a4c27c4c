# -*- coding: utf-8 -*-
# Copyright: carapace.fleet maintainers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Driving the `cara` CLI and reading what it leaves on disk (cara-contract.md sections 1, 2, 7).

Domain logic only (no Ansible imports): commands run through a `runner(argv, env)` the caller passes
(modules pass a wrapper of AnsibleModule.run_command), so this file is testable on its own. Tolerant of the
differences between released v0.8.0 and HEAD (section 10): `status --json` exists only at HEAD, and
v0.8.0's backup/restore have no daemon-running guard (callers enforce it with `daemon_running()`).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import subprocess

try:
    import json5
except ImportError:  # config parsing then falls back to strict JSON, and says so
    json5 = None

DEFAULT_PORT = 18789
ASSET_NAMES = ("cara-x86_64-linux", "cara-aarch64-linux", "cara-x86_64-darwin", "cara-aarch64-darwin",
               "cara-x86_64-windows.exe")
DAEMON_LOCK = ".matrix-rekey.lock.lock"
PID_FILE = "daemon.pid"
SECRET_KEY_RE = re.compile(r"(token|password|secret|apikey|api_key|passphrase|credential|private)", re.I)
REDACTED = "********"
_VERSION_RE = re.compile(r"cara (\S+)\s*")
_CHECK_RE = re.compile(r"\[(PASS|FAIL|SKIP)\] ([^:]+): ?(.*)")


class CaraError(Exception):
    """A `cara` command or file that did not answer as the contract says."""


def platform_asset(system=None, machine=None):
    """The release asset for a platform, as cara's updater maps it (`cara-<arch>-<os>[.exe]`), or None."""
    system = (system or os.uname().sysname).lower()
    machine = (machine or os.uname().machine).lower()
    arch = {"amd64": "x86_64", "x86_64": "x86_64", "arm64": "aarch64", "aarch64": "aarch64"}.get(machine)
    osname = {"linux": "linux", "darwin": "darwin", "macos": "darwin", "windows": "windows"}.get(system)
    if not arch or not osname:
        return None
    name = "cara-%s-%s%s" % (arch, osname, ".exe" if osname == "windows" else "")
    return name if name in ASSET_NAMES else None


def config_path(state_dir, explicit=None):
    """Config file resolution of section 2.2 for a known state dir: explicit path, else carapace.json5, else .json."""
    if explicit:
        return explicit
    json5_path = os.path.join(state_dir, "carapace.json5")
    return json5_path if os.path.exists(json5_path) else os.path.join(state_dir, "carapace.json")


def load_config(path):
    """Parse the JSON5 config; returns {} when the file does not exist. Raises CaraError on a parse error."""
    if not os.path.exists(path):
        return {}
    with open(path, "r", encoding="utf-8") as f:
        text = f.read()
    try:
        data = json5.loads(text) if json5 is not None else json.loads(text)
    except Exception as exc:  # json5 raises ValueError and friends; any failure means "does not parse"
        raise CaraError("config %s does not parse as JSON5: %s" % (path, exc)) from exc
    if not isinstance(data, dict):
        raise CaraError("config %s is not a JSON5 object" % path)
    return data


def read_config(path):
    """load_config(path), with every way the file can fail to be read turned into a CaraError: a directory, a
    file that is not UTF-8, no permission, nesting too deep for the parser."""
    if os.path.isdir(path):
        raise CaraError("config %s is a directory, not a config file. Point config_path at the JSON5 file "
                        "(carapace.json5)" % path)
    try:
        return load_config(path)
    except UnicodeDecodeError as exc:
        raise CaraError("config %s is not UTF-8 text (%s). Re-save it as UTF-8" % (path, exc)) from None
    except (RecursionError, MemoryError) as exc:
        raise CaraError("config %s does not parse as JSON5: nested too deeply or too large (%s)"
                        % (path, type(exc).__name__)) from None
    except OSError as exc:
        raise CaraError("cannot read config %s: %s" % (path, exc.strerror or exc)) from None


def config_get(cfg, dotted, default=None):
    node = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def redact(value):
    """A copy of a config with every secret-looking key's value replaced (tokens, passwords, keys)."""
    if isinstance(value, dict):
        return {k: (REDACTED if SECRET_KEY_RE.search(str(k)) and v not in (None, "", {}) and not isinstance(v, dict)
                    else redact(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    return value


def gateway_facts(cfg):
    """The ops-relevant gateway keys of section 7, secrets left out."""
    port = config_get(cfg, "gateway.port", DEFAULT_PORT)
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        port = DEFAULT_PORT
    mode = config_get(cfg, "gateway.auth.mode")
    if not mode:
        mode = "password" if config_get(cfg, "gateway.auth.password") else "token"
    return {
        "port": port,
        "bind": config_get(cfg, "gateway.bind", "loopback"),
        "control_enabled": config_get(cfg, "gateway.control.enabled", False) is True,
        "auth_mode": mode,
        "hooks_enabled": config_get(cfg, "gateway.hooks.enabled", False) is True,
    }


def gateway_secret(cfg, environ=None):
    """The credential `cara verify --outcome autonomy` would use: env first, then config (section 1.7)."""
    environ = os.environ if environ is None else environ
    return (environ.get("CARAPACE_GATEWAY_TOKEN") or environ.get("CARAPACE_GATEWAY_PASSWORD")
            or config_get(cfg, "gateway.auth.token") or config_get(cfg, "gateway.auth.password"))


def daemon_running(state_dir):
    """Section 2.3: the daemon lock is held, or daemon.pid names a live process > 1. Returns (bool, detail)."""
    lock = os.path.join(state_dir, DAEMON_LOCK)
    if os.path.exists(lock):
        try:
            fd = os.open(lock, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError as exc:
            return True, "cannot open %s to check it (%s): assuming the daemon runs" % (lock, exc)
        try:
            # A shared, non-blocking probe: fails only while the daemon holds its exclusive lock.
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
                return True, "daemon lock %s is held" % lock
            raise
        finally:
            os.close(fd)
    pid = read_pid(state_dir)
    if pid and pid > 1 and pid_alive(pid):
        return True, "daemon.pid names live process %d" % pid
    return False, "no daemon lock held and no live daemon.pid"


def read_pid(state_dir):
    try:
        with open(os.path.join(state_dir, PID_FILE), "r", encoding="utf-8") as f:
            return int(f.read().strip() or 0)
    except (OSError, ValueError):
        return None


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def parse_version(text):
    """`cara 0.9.0` -> "0.9.0" (first line of `cara --version`), else None."""
    first = (text or "").strip().splitlines()[:1]
    match = _VERSION_RE.fullmatch(first[0]) if first else None
    return match.group(1) if match else None


def parse_status_text(text):
    """The text block of `cara status` -> {"version", "uptime", "address", "status", "channels", "platform"}."""
    fields = {}
    for line in (text or "").splitlines():
        key, sep, value = line.strip().partition(":")
        if sep and key in ("Version", "Uptime", "Address", "Status", "Channels", "Platform"):
            fields[key.lower()] = value.strip()
    return fields


def parse_verify(text):
    """`cara verify` stdout -> {"outcome", "port", "checks": [{result, name, detail, next_step}], "passed"}."""
    result = {"outcome": None, "port": None, "checks": [], "passed": False, "skipped": False}
    for line in (text or "").splitlines():
        stripped = line.strip()
        match = _CHECK_RE.fullmatch(stripped)
        if match:
            result["checks"].append({"result": match.group(1), "name": match.group(2).strip(),
                                     "detail": match.group(3).strip(), "next_step": None})
        elif stripped.startswith("next step:") and result["checks"]:
            result["checks"][-1]["next_step"] = stripped[len("next step:"):].strip()
        elif stripped.startswith("Outcome:"):
            result["outcome"] = stripped.split(":", 1)[1].strip()
        elif stripped.startswith("Gateway port:"):
            port = stripped.split(":", 1)[1].strip()
            result["port"] = int(port) if port.isdigit() else None
        elif stripped.startswith("Outcome verification passed"):
            result["passed"] = True
            result["skipped"] = "skipped" in stripped
    return result


def module_runner(module):
    """A runner on AnsibleModule.run_command (no timeout there: cara's own commands are bounded, section 1.7)."""
    def run(argv, env, timeout):  # pylint: disable=unused-argument
        return module.run_command(argv, environ_update=env, check_rc=False)
    return run


def subprocess_runner(argv, env, timeout):
    """A runner for tests and tools outside Ansible; modules pass one built on run_command."""
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    return proc.returncode, proc.stdout, proc.stderr


class CaraCLI:
    """One host's `cara`: binary, state dir and config, run through `runner(argv, env, timeout)`."""

    def __init__(self, binary, state_dir, config=None, runner=subprocess_runner, extra_env=None, timeout=120):
        self.binary = binary
        self.state_dir = state_dir
        self.config_path = config_path(state_dir, config)
        self.runner = runner
        self.extra_env = dict(extra_env or {})
        self.timeout = timeout

    def env(self):
        env = dict(os.environ)
        env.update(self.extra_env)
        env["CARAPACE_STATE_DIR"] = self.state_dir
        env["CARAPACE_CONFIG_PATH"] = self.config_path
        return env

    def run(self, *args, timeout=None):
        """Run `cara <args>`; returns {"argv", "rc", "stdout", "stderr"}."""
        argv = [self.binary] + [str(a) for a in args]
        rc, out, err = self.runner(argv, self.env(), timeout or self.timeout)
        return {"argv": argv, "rc": rc, "stdout": out, "stderr": err}

    def version(self):
        """The installed version from `cara --version`, or None when it does not answer as cara does."""
        res = self.run("--version", timeout=30)
        return parse_version(res["stdout"]) if res["rc"] == 0 else None

    def status(self, port=None, host=None):
        """`cara status`, with `--json` where the release has it (HEAD), else the v0.8.0 text block."""
        base = ["status"] + (["--port", port] if port else []) + (["--host", host] if host else [])
        res = self.run(*(base + ["--json"]))
        if res["rc"] == 2:  # clap usage error: this release predates --json (v0.8.0)
            res = self.run(*base)
            res["format"] = "text"
            res["health"] = parse_status_text(res["stdout"]) if res["rc"] == 0 else None
            return res
        res["format"] = "json"
        res["health"] = None
        if res["rc"] == 0:
            try:
                res["health"] = json.loads(res["stdout"]).get("health")
            except ValueError:
                res["health"] = None
        return res

    def verify(self, outcome, port=None):
        """`cara verify --outcome <outcome>`, with its summary parsed."""
        res = self.run(*(["verify", "--outcome", outcome] + (["--port", port] if port else [])))
        res.update(parse_verify(res["stdout"]))
        res["passed"] = res["passed"] and res["rc"] == 0
        return res


def parse_backup_output(text):
    """`cara backup` stdout (section 1.4 step 6) -> {"path", "size", "included": [sections]}; missing lines are None."""
    result = {"path": None, "size": None, "included": None}
    for line in (text or "").splitlines():
        key, sep, value = line.strip().partition(":")
        if not sep:
            continue
        value = value.strip()
        if key == "Path":
            result["path"] = value
        elif key == "Size":
            match = re.search(r"\((\d+)\)\s*$", value)
            result["size"] = int(match.group(1)) if match else None
        elif key == "Included":
            result["included"] = [] if value == "(empty)" else [s.strip() for s in value.split(",") if s.strip()]
    return result


def parse_restore_output(text):
    """`cara restore` stdout (section 1.5 step 7) -> {"restored": [sections] or None, "sessions": int}."""
    result = {"restored": None, "sessions": 0}
    for line in (text or "").splitlines():
        key, sep, value = line.strip().partition(":")
        if not sep:
            continue
        value = value.strip()
        if key == "Restored":
            result["restored"] = [] if value == "(nothing)" else [s.strip() for s in value.split(",") if s.strip()]
        elif key == "Sessions" and value.isdigit():
            result["sessions"] = int(value)
    return result


def tolerant_module_runner(module):
    """Like module_runner, but a binary that cannot be executed gives rc 127 and the OS error on stderr instead of
    ending the module with fail_json; arguments are passed verbatim (no ~ or $VAR expansion)."""
    def run(argv, env, timeout):  # pylint: disable=unused-argument
        try:
            return module.run_command(argv, environ_update=env, check_rc=False, expand_user_and_vars=False,
                                      handle_exceptions=False)
        except OSError as exc:
            return 127, "", "cannot execute %s: %s" % (argv[0], exc)
    return run
