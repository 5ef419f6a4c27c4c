# -*- coding: utf-8 -*-
# Copyright: carapace.fleet maintainers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Driving the `cara` CLI and reading what it leaves on disk (its commands, state dir and config, as Carapace's
contract describes them).

Domain logic only (no Ansible imports): commands run through a `runner(argv, env)` the caller passes
(modules pass a wrapper of AnsibleModule.run_command), so this file is testable on its own. Tolerant of the
differences between released v0.8.0 and HEAD: `status --json` exists only at HEAD, and
v0.8.0's backup/restore have no daemon-running guard (callers enforce it with `daemon_running()`).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import subprocess

from ansible_collections.carapace.fleet.plugins.module_utils._errors import FleetError
from ansible_collections.carapace.fleet.plugins.module_utils._version import version_from_output

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
_CHECK_RE = re.compile(r"\[(PASS|FAIL|SKIP)\] ([^:]+): ?(.*)")


class CaraError(FleetError):
    """A `cara` command or file that did not answer as the contract says (cause `cara` unless given)."""

    def __init__(self, message, cause="cara"):
        super().__init__(cause, message)


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
    """cara's config file resolution for a known state dir: explicit path, else carapace.json5, else .json."""
    if explicit:
        return explicit
    json5_path = os.path.join(state_dir, "carapace.json5")
    return json5_path if os.path.exists(json5_path) else os.path.join(state_dir, "carapace.json")


class Json5Missing(CaraError):
    """The config is JSON5 (not plain JSON) and this Python has no json5 module to read it."""


MAX_CONFIG_BYTES = 4 * 1024 * 1024
MAX_INCLUDE_DEPTH = 10
# Variables that steer the loader itself: a config's `env` section cannot set them.
LOADER_CONTROL_ENV = ("CARAPACE_STATE_DIR", "CARAPACE_CONFIG_PATH", "CARAPACE_CONFIG_PASSWORD",
                      "CARAPACE_DISABLE_CONFIG_CACHE", "CARAPACE_CONFIG_CACHE_MS")
_ENV_REF_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _parse_config_text(text, path):
    if json5 is not None:
        try:
            return json5.loads(text)
        except Exception as exc:  # json5 raises ValueError and friends; any failure means "does not parse"
            raise CaraError("config %s does not parse as JSON5: %s" % (path, exc)) from exc
    try:
        return json.loads(text)
    except ValueError as exc:
        raise Json5Missing("config %s is not plain JSON (%s) and this host's Python has no json5 module to read it "
                           "as JSON5" % (path, exc)) from exc


def _read_config_file(path, depth):
    if depth > MAX_INCLUDE_DEPTH:
        raise CaraError("config %s: $include nests deeper than %d" % (path, MAX_INCLUDE_DEPTH))
    if os.path.getsize(path) > MAX_CONFIG_BYTES:
        raise CaraError("config %s is larger than 4 MiB" % path)
    with open(path, "r", encoding="utf-8") as f:
        data = _parse_config_text(f.read(), path)
    return _resolve_includes(data, os.path.dirname(path), depth)


def _resolve_includes(value, base, depth):
    """`$include` (a file or a list of files, relative to the including file): included objects first, local keys win."""
    if isinstance(value, list):
        return [_resolve_includes(v, base, depth) for v in value]
    if not isinstance(value, dict):
        return value
    merged = {}
    includes = value.get("$include", [])
    for name in [includes] if isinstance(includes, str) else includes:
        included = _read_config_file(os.path.join(base, str(name)), depth + 1)
        if not isinstance(included, dict):
            raise CaraError("config $include %s is not a JSON5 object" % name)
        merged = _deep_merge(merged, included)
    return _deep_merge(merged, {k: _resolve_includes(v, base, depth) for k, v in value.items() if k != "$include"})


def _deep_merge(base, over):
    out = dict(base)
    for key, value in over.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _substitute(value, environ):
    if isinstance(value, dict):
        return {k: _substitute(v, environ) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, environ) for v in value]
    if not isinstance(value, str):
        return value

    def repl(match):
        if match.group(1) not in environ:
            raise CaraError("config references ${%s}, which is not set in the environment cara runs with "
                            "(cara refuses to load such a config)" % match.group(1))
        return environ[match.group(1)]
    return _ENV_REF_RE.sub(repl, value)


def load_config(path, environ=None):
    """The config as cara resolves it: JSON5, `$include` (depth <= 10), the `env` section, then `${VAR}`.

    Returns {} when the file does not exist. Raises CaraError when it does not load (Json5Missing when only the
    missing json5 module stands in the way: `config_from_cara` can then ask cara itself).
    """
    if not os.path.exists(path):
        return {}
    if os.path.isdir(path):
        raise CaraError("config %s is a directory, not a config file. Point config_path at the JSON5 file "
                        "(carapace.json5)" % path)
    try:
        data = _read_config_file(path, 0)
    except UnicodeDecodeError as exc:
        raise CaraError("config %s is not UTF-8 text (%s). Re-save it as UTF-8" % (path, exc)) from None
    except (RecursionError, MemoryError) as exc:
        raise CaraError("config %s does not parse as JSON5: nested too deeply or too large (%s)"
                        % (path, type(exc).__name__)) from None
    except OSError as exc:
        raise CaraError("cannot read config %s: %s" % (path, exc.strerror or exc)) from None
    if not isinstance(data, dict):
        raise CaraError("config %s is not a JSON5 object" % path)
    env = dict(os.environ if environ is None else environ)
    section = data.get("env")
    for key, value in section.items() if isinstance(section, dict) else ():
        if key not in LOADER_CONTROL_ENV and key not in env:
            env[key] = str(value)
    return _substitute(data, env)


def config_from_cara(cli):
    """The loaded config as `cara config show` prints it (includes and `${VAR}` resolved, secrets redacted by cara).

    For hosts whose Python cannot read JSON5; raises CaraError when cara cannot show it either.
    """
    res = cli.run("config", "show", timeout=30)
    if res["rc"] == 0:
        try:
            data = json.loads(res["stdout"])
        except ValueError:
            data = None
        if isinstance(data, dict):
            return data
    said = ((res["stderr"] or "") + (res["stdout"] or "")).strip().splitlines()[:3]
    raise CaraError("`%s config show` did not print the config (rc %s: %s)" % (cli.binary, res["rc"], " | ".join(said)))


def read_config(cli, environ=None):
    """The host's config for `cli`: read here when this Python can, else asked of cara (`cara config show`).

    Raises CaraError naming which way failed and what to install when neither works.
    """
    try:
        return load_config(cli.config_path, environ)
    except Json5Missing as exc:
        if not (os.path.isfile(cli.binary) and os.access(cli.binary, os.X_OK)):
            raise CaraError("%s; and cara is not installed at %s to read it for us. Install json5 for this Python "
                            "(Debian: apt-get install python3-json5; or pip install json5)" % (exc, cli.binary)) from exc
        try:
            return config_from_cara(cli)
        except CaraError as asked:
            raise CaraError("%s; asking cara instead failed too: %s. Install json5 for this Python (Debian: apt-get "
                            "install python3-json5; or pip install json5), or fix the config" % (exc, asked)) from exc


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
    """The ops-relevant gateway keys of the config (cara's defaults where unset), secrets left out."""
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
    """The credential `cara verify --outcome autonomy` would use: env first, then config."""
    environ = os.environ if environ is None else environ
    return (environ.get("CARAPACE_GATEWAY_TOKEN") or environ.get("CARAPACE_GATEWAY_PASSWORD")
            or config_get(cfg, "gateway.auth.token") or config_get(cfg, "gateway.auth.password"))


def _lock_held(state_dir):
    """HEAD's daemon lock: True while a daemon holds `.matrix-rekey.lock.lock`, None when there is no such file."""
    lock = os.path.join(state_dir, DAEMON_LOCK)
    if not os.path.exists(lock):
        return None, None
    try:
        fd = os.open(lock, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
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
    return False, None


def _proc_read(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def _proc_pids():
    try:
        return [int(n) for n in os.listdir("/proc") if n.isdigit() and int(n) != os.getpid()]
    except OSError:
        return []


def daemon_processes(state_dir, proc_pids=_proc_pids, read=_proc_read):
    """PIDs of `cara` daemons (`cara` or `cara start`) whose environment names this state dir (CARAPACE_STATE_DIR).

    v0.8.0 writes no daemon.pid: the process table is how a daemon that has not bound its port yet is found. Only
    processes whose environment this user may read are seen (its own, or all as root).
    """
    want = os.path.realpath(state_dir)
    found = []
    for pid in proc_pids():
        environ = read("/proc/%d/environ" % pid)
        if not environ or b"CARAPACE_STATE_DIR=" not in environ:
            continue
        argv = [a.decode("utf-8", "replace") for a in (read("/proc/%d/cmdline" % pid) or b"").split(b"\0") if a]
        # the daemon is `cara` or `cara start`; through an interpreter (the test double) `python3 .../cara start`
        if not argv or not (argv[-1] == "start" or os.path.basename(argv[-1]).startswith("cara")):
            continue
        for item in environ.split(b"\0"):
            if item.startswith(b"CARAPACE_STATE_DIR="):
                value = item.split(b"=", 1)[1].decode("utf-8", "replace")
                if value and os.path.realpath(value) == want and _alive(pid, read):
                    found.append(pid)
    return found


def _alive(pid, read=_proc_read):
    """A live process, not a zombie that only waits to be reaped."""
    stat = read("/proc/%d/stat" % pid)
    if stat is None:
        return pid_alive(pid)
    return stat.rsplit(b")", 1)[-1].split()[:1] != [b"Z"]


def port_listeners(port, proc_pids=_proc_pids, read=_proc_read):
    """(listening, [pids]) for TCP `port` on this host's network namespace, from /proc/net/tcp{,6} and /proc/*/fd.

    `listening` is True when any socket listens on the port; the PIDs are those whose file descriptors this user
    may read (the daemon's own user, or all as root).
    """
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in (read(table) or b"").decode("ascii", "replace").splitlines()[1:]:
            fields = line.split()
            if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[-1], 16) == int(port):
                inodes.add("socket:[%s]" % fields[9])
    if not inodes:
        return False, []
    pids = []
    for pid in proc_pids():
        fd_dir = "/proc/%d/fd" % pid
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(os.path.join(fd_dir, fd)) in inodes:
                    pids.append(pid)
                    break
            except OSError:
                continue
    return True, pids


def find_daemon(state_dir, port=None):
    """Whether a cara daemon runs on `state_dir`, and how that was found: {"running", "pid", "how", "detail"}.

    In order: HEAD's daemon lock and daemon.pid; then, since v0.8.0 has neither, the process table
    (a `cara start` whose CARAPACE_STATE_DIR is this state dir) and the gateway port (anything listening there,
    with its PID when this user can see it). The port test fails closed: whatever holds cara's port counts.
    """
    held, detail = _lock_held(state_dir)
    if held:
        return {"running": True, "pid": read_pid(state_dir), "how": "lock", "detail": detail}
    pid = read_pid(state_dir)
    if pid and pid > 1 and pid_alive(pid):
        return {"running": True, "pid": pid, "how": "pid_file", "detail": "daemon.pid names live process %d" % pid}
    procs = daemon_processes(state_dir)
    if procs:
        return {"running": True, "pid": procs[0], "how": "process",
                "detail": "process %d runs `cara start` with CARAPACE_STATE_DIR=%s" % (procs[0], state_dir)}
    if port:
        listening, pids = port_listeners(port)
        if listening:
            return {"running": True, "pid": pids[0] if pids else None, "how": "port",
                    "detail": "%s listens on the gateway port %d" % ("process %d" % pids[0] if pids else "a process",
                                                                     int(port))}
    return {"running": False, "pid": None, "how": None,
            "detail": "no daemon lock held, no live daemon.pid, no `cara start` on this state dir%s"
                      % (", nothing listening on port %d" % int(port) if port else "")}


def daemon_running(state_dir, port=None):
    """(running, detail) by `find_daemon`: the guard of backup and restore, for every release."""
    found = find_daemon(state_dir, port)
    return found["running"], found["detail"]


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

    def gateway_port(self):
        """The port cara would use (gateway.port of the resolved config, else 18789); the default when it cannot tell."""
        try:
            return gateway_facts(read_config(self, self.env()))["port"]
        except (CaraError, OSError):
            return DEFAULT_PORT

    def find_daemon(self):
        """`find_daemon` for this host's state dir and gateway port."""
        return find_daemon(self.state_dir, self.gateway_port())

    def daemon_running(self):
        found = self.find_daemon()
        return found["running"], found["detail"]

    def version(self):
        """The installed version from `cara --version`, or None when it does not answer as cara does."""
        res = self.run("--version", timeout=30)
        return version_from_output(res["stdout"]) if res["rc"] == 0 else None

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
    """`cara backup` stdout -> {"path", "size", "included": [sections]}; missing lines are None."""
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
    """`cara restore` stdout -> {"restored": [sections] or None, "sessions": int}."""
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
    """A runner on AnsibleModule.run_command (no timeout there: cara's own commands are bounded). A binary that
    cannot be executed gives rc 127 and the OS error on stderr instead of ending the module with fail_json;
    arguments are passed verbatim (no ~ or $VAR expansion)."""
    def run(argv, env, timeout):  # pylint: disable=unused-argument
        try:
            return module.run_command(argv, environ_update=env, check_rc=False, expand_user_and_vars=False,
                                      handle_exceptions=False)
        except OSError as exc:
            return 127, "", "cannot execute %s: %s" % (argv[0], exc)
    return run
