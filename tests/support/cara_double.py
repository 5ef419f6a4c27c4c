"""A test double of `cara`, the Carapace gateway binary (shared/spec/cara-contract.md).

The runnable program is this one file. A "release" is a copy of it whose release header (VERSION,
FLAVOR, FAULTS, ...) was rewritten by `build_release()`. Flavor "head" follows Carapace master,
flavor "v0.8.0" the v0.8.0 tag (spec section 10). Needs Python 3.9+ and `json5` (for the config).
"""
import argparse
import datetime
import errno
import fcntl
import hashlib
import hmac
import io
import json
import os
import platform
import re
import shutil
import signal
import socket
import sys
import tarfile
import tempfile
import threading
import time
import uuid
from pathlib import Path

# >>> release header (rewritten by build_release; keep these lines simple assignments)
VERSION = "0.8.0"
FLAVOR = "head"
FAULTS = {}
BUILD_DATE = "unknown"
GIT_COMMIT = "unknown"
# <<< release header

FLAVORS = ("head", "v0.8.0")
# Fault switch name -> accepted value types (bool is excluded from the numeric ones below).
FAULT_TYPES = {
    "start_fail_ms": int,            # exits 1 this many ms into startup, before binding
    "ready_never": bool,             # /health/ready answers 503 for ever
    "verify_autonomy_fail": bool,    # every control task ends in state "failed"
    "health_version": str,           # /health reports this version instead of VERSION
    "slow_start_s": (int, float),    # sleeps this long (pid written, lock held) before binding
    "migrate_state": int,            # state schema this release writes on first start (> 1)
}
STATE_SCHEMA = 1                     # schemaVersion of tasks/queue.json a normal release reads/writes
DEFAULT_PORT = 18789
STATE_SUBDIRS = ("sessions", "cron", "tasks", "activity", "plugins", "credentials", "matrix", "agents", "updates")
BACKUP_SECTIONS = ("sessions", "config", "memory", "cron", "tasks", "usage")
BACKUP_MARKER = ".carapace-backup"
VERIFY_OUTCOMES_HEAD = ("auto", "local-chat", "discord", "telegram", "matrix", "hooks", "autonomy")
KNOWN_SUBCOMMANDS = ("start", "config", "status", "logs", "plugins", "version", "backup", "restore", "reset", "setup",
                     "pair", "update", "task", "matrix", "chat", "verify", "import", "tls")
HELP_URL = "https://github.com/puremachinery/carapace/blob/master/docs/site/first-run.md"
VERIFY_PROMPT = "Reply with exactly: verification-ok"


# ----------------------------------------------------------------------------------------------------------------
# Release building (used by the test suite and the release factory; not part of the CLI)

def default_flavor(version):
    """v0.9.0 and later behave like HEAD, v0.8.0 and earlier like v0.8.0 (issue 3)."""
    match = re.match(r"^v?(\d+)\.(\d+)\.(\d+)", version)
    if not match:
        raise ValueError("version %r is not of the form X.Y.Z" % version)
    return "head" if tuple(int(p) for p in match.groups()) >= (0, 9, 0) else "v0.8.0"


def validate_faults(faults):
    """Reject unknown switches and wrong types early: a typo must not build a healthy release."""
    for key, value in faults.items():
        if key not in FAULT_TYPES:
            raise ValueError("unknown fault switch %r (known: %s)" % (key, ", ".join(sorted(FAULT_TYPES))))
        if isinstance(value, bool) and FAULT_TYPES[key] is not bool or not isinstance(value, FAULT_TYPES[key]):
            raise ValueError("fault switch %r needs a value of type %s, got %r" % (key, FAULT_TYPES[key], value))
    if faults.get("migrate_state", 2) <= STATE_SCHEMA:
        raise ValueError("migrate_state must be a schema version above %d" % STATE_SCHEMA)


def build_release(version, out_path, *, flavor=None, faults=None, build_date="unknown", git_commit=None):
    """Write a release of the double: this program with VERSION/FLAVOR/FAULTS baked in, mode 0755."""
    version = version[1:] if version.startswith("v") else version
    flavor = flavor or default_flavor(version)
    if flavor not in FLAVORS:
        raise ValueError("flavor must be one of %s, got %r" % (", ".join(FLAVORS), flavor))
    faults = dict(faults or {})
    validate_faults(faults)
    if git_commit is None:
        git_commit = hashlib.sha256(("%s/%s" % (version, flavor)).encode()).hexdigest()[:8]
    header = "\n".join([
        "VERSION = %r" % version,
        "FLAVOR = %r" % flavor,
        "FAULTS = %r" % (faults,),
        "BUILD_DATE = %r" % build_date,
        "GIT_COMMIT = %r" % git_commit,
    ])
    source = Path(__file__).read_text(encoding="utf-8")
    pattern = re.compile(r"(# >>> release header[^\n]*\n).*?(\n# <<< release header)", re.S)
    source, count = pattern.subn(lambda m: m.group(1) + header + m.group(2), source, count=1)
    if count != 1:
        raise RuntimeError("release header markers not found in %s" % __file__)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    # The source has no shebang (it is a support module too); a release is an executable program.
    out.write_text("#!/usr/bin/env python3\n" + source, encoding="utf-8")
    out.chmod(0o755)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Errors and output conventions (spec 1.0)

class CaraError(Exception):
    """A handler error: printed as `Error: "<Debug>"` on stderr, exit 1 (Rust `main` returning Err)."""


class UsageError(Exception):
    """A clap usage error: printed clap-style on stderr, exit 2."""

    def __init__(self, message, usage):
        super().__init__(message)
        self.usage = usage


class Exit(Exception):
    """A handler that printed its own text and calls `std::process::exit(code)`."""

    def __init__(self, code):
        super().__init__(code)
        self.code = code


def rust_debug(text):
    """Render a string the way Rust's Debug does (quoted, escaped)."""
    escapes = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\0": "\\0"}
    out = []
    for ch in text:
        if ch in escapes:
            out.append(escapes[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append("\\u{%x}" % ord(ch))
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def err(line=""):
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def out(line=""):
    sys.stdout.write(line + "\n")


def platform_pair():
    """(os, arch) as Rust's std::env::consts spells them."""
    os_name = {"darwin": "macos", "win32": "windows"}.get(sys.platform, sys.platform)
    os_name = "linux" if os_name.startswith("linux") else os_name
    arch = platform.machine().lower()
    arch = {"amd64": "x86_64", "arm64": "aarch64"}.get(arch, arch)
    return os_name, arch


def utc_stamp():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def now_ms():
    return int(time.time() * 1000)


class Logger:
    """Daemon logs on stdout: JSON lines (production) or plaintext when CARAPACE_DEV=1 (spec 1.2)."""

    def __init__(self, enabled=True):
        self.enabled = enabled
        self.plain = os.environ.get("CARAPACE_DEV") == "1"
        self.lock = threading.Lock()

    def log(self, level, message, **fields):
        if not self.enabled:
            return
        stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")
        if self.plain:
            extra = "".join(" %s=%s" % kv for kv in fields.items())
            line = "%s %5s carapace: %s%s" % (stamp, level, message, extra)
        else:
            line = json.dumps({"timestamp": stamp, "level": level, "fields": dict(fields, message=message),
                               "target": "carapace"})
        with self.lock:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()

    def info(self, message, **fields):
        self.log("INFO", message, **fields)

    def warn(self, message, **fields):
        self.log("WARN", message, **fields)

    def error(self, message, **fields):
        self.log("ERROR", message, **fields)


# ----------------------------------------------------------------------------------------------------------------
# Paths and config (spec 2.1, 2.2, 7)

def config_base_dir():
    """dirs::config_dir() semantics."""
    home = Path(os.environ.get("HOME") or os.path.expanduser("~"))
    if sys.platform == "darwin":
        return home / "Library" / "Application Support"
    xdg = os.environ.get("XDG_CONFIG_HOME", "")
    return Path(xdg) if os.path.isabs(xdg) else home / ".config"


def state_dir():
    env = os.environ.get("CARAPACE_STATE_DIR")
    return Path(env) if env else config_base_dir() / "carapace"


def config_path():
    env = os.environ.get("CARAPACE_CONFIG_PATH")
    if env:
        return Path(env)
    base = Path(os.environ["CARAPACE_STATE_DIR"]) if os.environ.get("CARAPACE_STATE_DIR") else config_base_dir() / "carapace"
    json5_path = base / "carapace.json5"
    return json5_path if json5_path.exists() else base / "carapace.json"


def memory_dir():
    """Agent memory is always under $HOME/.config/carapace/memory (spec 2.1 exception)."""
    return Path(os.environ.get("HOME") or os.path.expanduser("~")) / ".config" / "carapace" / "memory"


def parse_json5(text, origin):
    try:
        import json5
    except ImportError:
        raise CaraError("the cara double needs the python module json5 to read %s" % origin)
    try:
        return json5.loads(text)
    except ValueError as exc:
        raise CaraError("failed to parse %s: %s" % (origin, exc))


def read_config_file(path, depth=0):
    """Read one JSON5 file and resolve its `$include`s (depth <= 10)."""
    if depth > 10:
        raise CaraError("$include depth exceeds 10 at %s" % path)
    if path.stat().st_size > 4 * 1024 * 1024:
        raise CaraError("config file %s exceeds 4 MiB" % path)
    data = parse_json5(path.read_text(encoding="utf-8"), path)
    return resolve_includes(data, path.parent, depth)


def resolve_includes(value, base, depth):
    if isinstance(value, list):
        return [resolve_includes(v, base, depth) for v in value]
    if not isinstance(value, dict):
        return value
    merged = {}
    includes = value.get("$include", [])
    for name in [includes] if isinstance(includes, str) else includes:
        included = read_config_file((base / name), depth + 1)
        if not isinstance(included, dict):
            raise CaraError("$include %s is not an object" % name)
        merged = deep_merge(merged, included)
    local = {k: resolve_includes(v, base, depth) for k, v in value.items() if k != "$include"}
    return deep_merge(merged, local)


def deep_merge(base, over):
    result = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = deep_merge(result[key], value)
        else:
            result[key] = value
    return result


def substitute_env(value):
    """`${VAR}` substitution in strings; a missing variable is a load error (spec 2.2)."""
    if isinstance(value, dict):
        return {k: substitute_env(v) for k, v in value.items()}
    if isinstance(value, list):
        return [substitute_env(v) for v in value]
    if not isinstance(value, str):
        return value

    def repl(match):
        name = match.group(1)
        if name not in os.environ:
            raise CaraError("environment variable %s referenced in config is not set" % name)
        return os.environ[name]
    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", repl, value)


LOADER_CONTROL_ENV = ("CARAPACE_STATE_DIR", "CARAPACE_CONFIG_PATH", "CARAPACE_CONFIG_PASSWORD",
                      "CARAPACE_DISABLE_CONFIG_CACHE", "CARAPACE_CONFIG_CACHE_MS")


def load_config():
    """Load the resolved config; a missing file is an empty config. Raises CaraError on load failures."""
    path = config_path()
    if not path.exists():
        return {}
    cfg = read_config_file(path)
    if not isinstance(cfg, dict):
        raise CaraError("config root in %s must be an object" % path)
    env = cfg.get("env") or {}
    for key, value in env.items() if isinstance(env, dict) else ():
        if key not in LOADER_CONTROL_ENV and key not in os.environ:
            os.environ[key] = str(value)
    return substitute_env(cfg)


def cfg_get(cfg, dotted, default=None):
    node = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def validate_config(cfg):
    """The schema errors that abort startup (spec 1.2 step 1, 7)."""
    errors = []
    port = cfg_get(cfg, "gateway.port")
    if port is not None and (isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535):
        errors.append("gateway.port: must be an integer between 1 and 65535")
    if cfg_get(cfg, "gateway.bind") is not None and not isinstance(cfg_get(cfg, "gateway.bind"), str):
        errors.append("gateway.bind: must be a string")
    mode = cfg_get(cfg, "gateway.auth.mode")
    if mode is not None and mode not in ("none", "local", "token", "password"):
        errors.append("gateway.auth.mode: must be one of none, local, token, password")
    for key in ("gateway.control.enabled", "gateway.hooks.enabled"):
        if cfg_get(cfg, key) is not None and not isinstance(cfg_get(cfg, key), bool):
            errors.append("%s: must be a boolean" % key)
    if "gateway" in cfg and not isinstance(cfg["gateway"], dict):
        errors.append("gateway: must be an object")
    return errors


def configured_port(cfg):
    port = cfg_get(cfg, "gateway.port")
    return port if isinstance(port, int) and not isinstance(port, bool) and 1 <= port <= 65535 else DEFAULT_PORT


def gateway_credentials(cfg):
    """(mode, token, password): env takes precedence over config (spec 7)."""
    token = os.environ.get("CARAPACE_GATEWAY_TOKEN") or cfg_get(cfg, "gateway.auth.token")
    password = os.environ.get("CARAPACE_GATEWAY_PASSWORD") or cfg_get(cfg, "gateway.auth.password")
    mode = cfg_get(cfg, "gateway.auth.mode") or ("password" if password else "token")
    return mode, token, password


def hooks_token(cfg):
    return os.environ.get("CARAPACE_HOOKS_TOKEN") or cfg_get(cfg, "gateway.hooks.token")


def resolve_bind(cfg, port):
    """gateway.bind -> (host, port) (spec 7)."""
    bind = str(cfg_get(cfg, "gateway.bind", "loopback"))
    if bind in ("loopback", "localhost", "local"):
        return "127.0.0.1", port
    if bind in ("auto", "all", "0.0.0.0"):
        return "0.0.0.0", port
    if bind in ("lan", "local-network"):
        return lan_address(), port
    if bind in ("tailnet", "tailscale", "ts"):
        raise CaraError("bind mode %s: no Tailscale address found on this host" % bind)
    host, sep, literal_port = bind.rpartition(":")
    if sep and literal_port.isdigit() and host and ":" not in host:
        return host, int(literal_port)
    return bind, port


def lan_address():
    """The address of the interface that routes off-host (no packet is sent)."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("10.255.255.255", 1))
        return probe.getsockname()[0]
    except OSError:
        return "127.0.0.1"
    finally:
        probe.close()


# ----------------------------------------------------------------------------------------------------------------
# Files: atomic JSON writes and the daemon-running contract (spec 2.3)

def write_json_atomic(path, data):
    """tmp + fsync + rename, 0600, pretty JSON + newline (how Carapace persists its state files)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=str(path.parent), prefix=".%s." % path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def lock_path(sdir):
    return Path(sdir) / ".matrix-rekey.lock.lock"


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def daemon_running_detail(sdir):
    """None when no daemon runs on sdir; else why we think one does (flock held, else live daemon.pid)."""
    lock = lock_path(sdir)
    if lock.exists():
        fd = os.open(str(lock), os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
        except BlockingIOError:
            return "daemon lock %s is held by another process" % lock
        finally:
            os.close(fd)
    pid_file = Path(sdir) / "daemon.pid"
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return None
    if pid > 1 and pid_alive(pid):
        return "daemon.pid at %s names live process %d" % (pid_file, pid)
    return None


def ensure_no_daemon(sdir, action):
    """HEAD guard of backup/restore/reset (spec 1.4 step 1, 1.5 step 4); absent in v0.8.0."""
    if FLAVOR != "head":
        return
    detail = daemon_running_detail(sdir)
    if detail:
        raise CaraError("refusing to %s state while daemon is running: %s" % (action, detail))


# ----------------------------------------------------------------------------------------------------------------
# Persistent state the double reads and writes

EMPTY_QUEUE = {"schemaVersion": STATE_SCHEMA, "tasks": []}
EMPTY_CRON = {"version": 1, "jobs": []}
EMPTY_USAGE = {"version": 1, "totals": {"requests": 0, "inputTokens": 0, "outputTokens": 0}, "sessions": {}}


def supported_schema():
    return FAULTS.get("migrate_state", STATE_SCHEMA)


def read_state_json(path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except ValueError as exc:
        raise CaraError("failed to read %s: %s; restore it from a backup (cara restore <backup> --force)" % (path, exc))


class StateStore:
    """tasks/queue.json, cron/jobs.json, usage.json and sessions/: created when missing, never rewritten idly."""

    def __init__(self, sdir, logger):
        self.dir = Path(sdir)
        self.log = logger
        self.lock = threading.Lock()
        self.queue_path = self.dir / "tasks" / "queue.json"
        self.usage_path = self.dir / "usage.json"

    def open(self):
        for path, empty in ((self.queue_path, EMPTY_QUEUE), (self.dir / "cron" / "jobs.json", EMPTY_CRON),
                            (self.usage_path, EMPTY_USAGE)):
            if not path.exists():
                write_json_atomic(path, empty)
            read_state_json(path)
        self.queue = read_state_json(self.queue_path)
        self.check_schema()
        self.usage = read_state_json(self.usage_path)

    def check_schema(self):
        """Fail closed on state written by a newer release; migrate older state forward (fault migrate_state)."""
        found = self.queue.get("schemaVersion", 1) if isinstance(self.queue, dict) else None
        if not isinstance(found, int) or not isinstance(self.queue.get("tasks"), list):
            raise CaraError("task queue %s is not in a format this release understands" % self.queue_path)
        if found > supported_schema():
            details = (self.queue_path, found, VERSION, supported_schema())
            raise CaraError("task queue %s has schemaVersion %d, newer than this release (v%s) supports (%d); state "
                            "was migrated by a newer release: restore the backup taken before the upgrade with "
                            "`cara restore <backup> --force` or run the newer release" % details)
        if found < supported_schema():
            self.queue = dict(self.queue, schemaVersion=supported_schema(), migratedFrom=found)
            write_json_atomic(self.queue_path, self.queue)
            self.log.info("migrated state schema", fromVersion=found, toVersion=supported_schema())

    def tasks(self):
        with self.lock:
            return [dict(t) for t in self.queue["tasks"]]

    def task(self, task_id):
        with self.lock:
            return next((dict(t) for t in self.queue["tasks"] if t.get("id") == task_id), None)

    def put_task(self, task):
        with self.lock:
            tasks = [t for t in self.queue["tasks"] if t.get("id") != task["id"]]
            index = next((i for i, t in enumerate(self.queue["tasks"]) if t.get("id") == task["id"]), len(tasks))
            tasks.insert(index, task)
            self.queue = dict(self.queue, tasks=tasks)
            write_json_atomic(self.queue_path, self.queue)

    def record_chat(self, message, reply):
        """One chat turn: sessions/<id>.json + <id>.jsonl, and the usage counters."""
        session_id = str(uuid.uuid4())
        stamp = now_ms()
        with self.lock:
            sessions = self.dir / "sessions"
            write_json_atomic(sessions / ("%s.json" % session_id),
                              {"id": session_id, "createdAtMs": stamp, "updatedAtMs": stamp, "messageCount": 2})
            lines = [{"role": "user", "content": message, "ts": stamp},
                     {"role": "assistant", "content": reply, "ts": stamp}]
            history = sessions / ("%s.jsonl" % session_id)
            history.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
            history.chmod(0o600)
            tokens_in, tokens_out = len(message.split()), len(reply.split())
            totals = self.usage.setdefault("totals", {})
            for key, amount in (("requests", 1), ("inputTokens", tokens_in), ("outputTokens", tokens_out)):
                totals[key] = totals.get(key, 0) + amount
            self.usage.setdefault("sessions", {})[session_id] = {"inputTokens": tokens_in, "outputTokens": tokens_out}
            write_json_atomic(self.usage_path, self.usage)
        return session_id


# ----------------------------------------------------------------------------------------------------------------
# Update markers at startup (spec 3.7, HEAD only); transaction.json is never touched by the double

def exe_path():
    return Path(os.path.realpath(sys.argv[0]))


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 16), b""):
            digest.update(chunk)
    return digest.hexdigest()


class UpdateMarkers:
    """rollback.json state machine: pending -> started (before bind) -> deleted (after bind);
    started at start -> restore .bak -> rolled_back."""

    def __init__(self, sdir, logger):
        self.path = Path(sdir) / "updates" / "rollback.json"
        self.log = logger
        self.protected = None

    def read(self):
        if FLAVOR != "head" or not self.path.is_file() or self.path.is_symlink():
            return None
        try:
            marker = json.loads(self.path.read_bytes()[:65536])
        except ValueError:
            self.log.warn("ignoring unreadable rollback marker", path=str(self.path))
            return None
        if not isinstance(marker, dict):
            return None
        if marker.get("startupState") not in ("pending", "started", "rolled_back"):
            self.log.warn("unknown rollback startupState, treating as rolled_back", tag="update_rollback_startup_state")
            marker["startupState"] = "rolled_back"
        return marker

    def before_bind(self):
        marker = self.read()
        if marker is not None and self.matches_exe(marker):
            self.protected = Path(marker["backupPath"])
            if marker["startupState"] == "pending":
                marker.update(startupState="started", startedAtMs=now_ms())
                write_json_atomic(self.path, marker)
            elif marker["startupState"] == "started":
                self.roll_back(marker)
        self.reap_old_binaries()

    def matches_exe(self, marker):
        binary = str(exe_path())
        if marker.get("binaryPath") != binary or marker.get("backupPath") != binary + ".bak":
            self.log.warn("refusing rollback marker that does not match this executable (tampered?)",
                          path=str(self.path))
            return False
        return True

    def roll_back(self, marker):
        backup = Path(marker["backupPath"])
        expected = marker.get("backupSha256")
        if not backup.is_file() or (expected and file_sha256(backup) != expected):
            self.log.error("rollback backup missing or does not match backupSha256", path=str(backup))
            return
        tmp = backup.with_name(".%s.%d.rollback.tmp" % (backup.name, os.getpid()))
        shutil.copyfile(backup, tmp)
        os.chmod(tmp, 0o755)
        os.replace(tmp, marker["binaryPath"])
        marker.update(startupState="rolled_back", rolledBackAtMs=now_ms())
        write_json_atomic(self.path, marker)
        self.log.warn("previous updated binary did not reach healthy startup; restored rollback backup on disk")

    def reap_old_binaries(self):
        """At every HEAD start, <exe>.bak/.old siblings are deleted except a protected backup (spec 3.7 step 2)."""
        if FLAVOR != "head":
            return
        exe = exe_path()
        names = {exe.name.lower(), exe.stem.lower()}
        for sibling in exe.parent.iterdir():
            base, _unused, ext = sibling.name.lower().rpartition(".")
            if ext in ("bak", "old") and base in names and sibling != self.protected and sibling.is_file():
                self.log.info("update_rollback_backup_reaped", path=str(sibling))
                sibling.unlink()

    def after_bind(self):
        marker = self.read()
        if marker is not None and marker["startupState"] == "started" and self.matches_exe(marker):
            backup = Path(marker["backupPath"])
            if backup.exists():
                backup.unlink()
            self.path.unlink()
            failure = self.path.with_name("startup_health_failure.json")
            if failure.exists():
                failure.unlink()
            self.log.info("update marked healthy")


# ----------------------------------------------------------------------------------------------------------------
# The gateway: startup sequence, HTTP routes, task worker (spec 1.2, 1.10)

def prepare_state_dir(sdir):
    """Create the state dir and its subdirectories 0700; refuse a foreign owner or a symlinked subdir."""
    sdir.mkdir(parents=True, exist_ok=True, mode=0o700)
    owner = sdir.stat().st_uid
    if owner != os.geteuid():
        raise CaraError("state directory %s is owned by uid %d, not by the current user (uid %d); refusing to "
                        "start" % (sdir, owner, os.geteuid()))
    os.chmod(sdir, 0o700)
    for name in STATE_SUBDIRS:
        sub = sdir / name
        if sub.is_symlink():
            raise CaraError("state subdirectory %s is a symlink; refusing to start" % sub)
        sub.mkdir(exist_ok=True, mode=0o700)
        os.chmod(sub, 0o700)
    audit = sdir / "audit.jsonl"
    with open(os.open(str(audit), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"event": "gateway_start", "version": VERSION, "timestampMs": now_ms()}) + "\n")


class Gateway:
    """One running gateway: daemon (`cara start`) or embedded (`cara verify`)."""

    def __init__(self, cfg, logger, stop_event, host_port=None):
        self.cfg = cfg
        self.log = logger
        self.stop_event = stop_event
        self.sdir = state_dir()
        self.host_port = host_port
        self.started = time.monotonic()
        self.started_at = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        self.lock_fd = None
        self.pid_written = False
        self.server = None
        self.auth = gateway_credentials(cfg)
        self.hooks_token = hooks_token(cfg)
        self.requests = {}
        self.worker_cv = threading.Condition()

    # -- startup ---------------------------------------------------------------------------------------------
    def start(self):
        """Startup sequence of spec 1.2; returns False when a stop signal arrived before bind."""
        host, port = self.host_port or resolve_bind(self.cfg, configured_port(self.cfg))
        prepare_state_dir(self.sdir)
        markers = UpdateMarkers(self.sdir, self.log)
        markers.before_bind()
        if "start_fail_ms" in FAULTS:
            if self.stop_event.wait(FAULTS["start_fail_ms"] / 1000.0):
                return False
            raise CaraError("failed to build LLM provider: injected start failure (fault start_fail_ms)")
        self.acquire_daemon_lock()
        self.write_pid()
        self.state = StateStore(self.sdir, self.log)
        self.state.open()
        if "slow_start_s" in FAULTS:
            self.log.info("slow start: delaying bind", seconds=FAULTS["slow_start_s"])
            if self.stop_event.wait(FAULTS["slow_start_s"]):
                return False
        self.bind(host, port)
        markers.after_bind()
        self.banner(host)
        return True

    def acquire_daemon_lock(self):
        path = lock_path(self.sdir)
        fd = os.open(str(path), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise CaraError("Matrix rekey lock at %s is already held — another carapace daemon is running against "
                            "this state directory; stop it first" % path)
        self.lock_fd = fd

    def write_pid(self):
        pid_file = self.sdir / "daemon.pid"
        tmp = pid_file.with_name(".daemon.pid.%d.tmp" % os.getpid())
        tmp.write_text("%d\n" % os.getpid())
        os.replace(tmp, pid_file)
        self.pid_written = True

    def bind(self, host, port):
        try:
            server_class, handler_class = http_server_classes()
            self.server = server_class((host, port), handler_class)
        except OSError as exc:
            raise CaraError("failed to bind %s:%d: %s" % (host, port, exc.strerror or exc))
        self.server.gateway = self
        self.address = "%s:%d" % (host, self.server.server_address[1])
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        threading.Thread(target=self.task_worker, daemon=True).start()

    def banner(self, host):
        self.log.info("Carapace gateway v%s" % VERSION)
        self.log.info("Bind mode: %s" % cfg_get(self.cfg, "gateway.bind", "loopback"))
        self.log.info("Listening on %s" % self.address)
        self.log.info("State directory: %s" % self.sdir)
        self.log.info("LLM: disabled")

    # -- shutdown --------------------------------------------------------------------------------------------
    def stop(self):
        self.stop_event.set()
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
        with self.worker_cv:
            self.worker_cv.notify_all()
        self.release()

    def release(self):
        """Remove daemon.pid (only if it is still ours) and drop the daemon lock."""
        pid_file = self.sdir / "daemon.pid"
        if self.pid_written and pid_file.exists() and pid_file.read_text().strip() == str(os.getpid()):
            pid_file.unlink()
        self.pid_written = False
        if self.lock_fd is not None:
            os.close(self.lock_fd)
            self.lock_fd = None

    # -- state the routes report -----------------------------------------------------------------------------
    def uptime(self):
        return int(time.monotonic() - self.started)

    def storage_writable(self):
        try:
            fd, probe = tempfile.mkstemp(dir=str(self.sdir), prefix=".ready-probe-")
        except OSError:
            return False
        os.close(fd)
        os.unlink(probe)
        return True

    def health(self):
        return {"status": "ok", "version": FAULTS.get("health_version", VERSION), "uptimeSeconds": self.uptime()}

    def ready(self):
        writable = self.storage_writable()
        ok = writable and not FAULTS.get("ready_never")
        body = dict(self.health(), status="ready" if ok else "not_ready",
                    checks={"storageWritable": writable, "llmReachable": True, "channels": "ok"})
        return ok, body

    def control_status(self):
        os_name, arch = platform_pair()
        disk = os.statvfs(str(self.sdir)) if self.sdir.exists() else None
        return {
            "ok": True, "version": VERSION, "startedAt": self.started_at, "uptimeSeconds": self.uptime(),
            "connectedChannels": 0, "totalChannels": 0,
            "runtime": {"name": "carapace", "version": VERSION, "platform": os_name, "arch": arch},
            "diagnostics": {"storageWritable": self.storage_writable(),
                            "diskFreeBytes": disk.f_bavail * disk.f_frsize if disk else 0,
                            "memoryRssBytes": rss_bytes(), "openFds": open_fds()},
        }

    def metrics(self):
        ok, _unused = self.ready()
        lines = ["# HELP carapace_build_info Build information.", "# TYPE carapace_build_info gauge",
                 'carapace_build_info{version="%s"} 1' % VERSION,
                 "# HELP carapace_uptime_seconds Seconds since the gateway started.",
                 "# TYPE carapace_uptime_seconds gauge", "carapace_uptime_seconds %d" % self.uptime(),
                 "# HELP carapace_ready Whether /health/ready reports ready.", "# TYPE carapace_ready gauge",
                 "carapace_ready %d" % int(ok),
                 "# HELP carapace_http_requests_total HTTP requests served by path.",
                 "# TYPE carapace_http_requests_total counter"]
        lines += ['carapace_http_requests_total{path="%s"} %d' % kv for kv in sorted(self.requests.items())]
        return "\n".join(lines) + "\n"

    # -- auth ------------------------------------------------------------------------------------------------
    def authorized(self, headers, client_ip):
        """Bearer rule of spec 1.10: token or password by auth mode; mode none/local only for loopback callers."""
        mode, token, password = self.auth
        if mode in ("none", "local"):
            return client_ip.startswith("127.") or client_ip == "::1"
        secret = token if mode == "token" else password
        given = headers.get("Authorization", "")
        return bool(secret) and given.startswith("Bearer ") and hmac.compare_digest(given[7:], str(secret))

    # -- tasks -----------------------------------------------------------------------------------------------
    def create_task(self, body):
        stamp = now_ms()
        task = {"id": str(uuid.uuid4()), "state": "queued", "attempts": 0,
                "payload": body.get("payload", {}), "policy": body.get("policy", {}),
                "createdAtMs": stamp, "updatedAtMs": stamp, "lastError": None, "result": None}
        self.state.put_task(task)
        with self.worker_cv:
            self.worker_cv.notify_all()
        return task

    def task_worker(self):
        """Runs queued/running tasks one by one: attempts += 1, running, then done (or failed under the fault)."""
        while not self.stop_event.is_set() and self.server is not None:
            pending = [t for t in self.state.tasks() if t.get("state") in ("queued", "running")]
            if not pending:
                with self.worker_cv:
                    self.worker_cv.wait(0.5)
                continue
            self.run_task(pending[0])

    def run_task(self, task):
        task.update(state="running", attempts=task.get("attempts", 0) + 1, updatedAtMs=now_ms())
        self.state.put_task(task)
        if FAULTS.get("verify_autonomy_fail"):
            task.update(state="failed", lastError="agent turn failed (fault verify_autonomy_fail)")
        else:
            task.update(state="done", result={"text": "verification-ok"})
        task["updatedAtMs"] = now_ms()
        self.state.put_task(task)


def rss_bytes():
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def open_fds():
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 0


def http_server_classes():
    """(server class, handler class); http.server is imported on demand since most CLI calls never serve."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    server = type("DoubleHTTPServer", (ThreadingHTTPServer,), {"daemon_threads": True, "allow_reuse_address": True})
    return server, type("DoubleHandler", (Routes, BaseHTTPRequestHandler), {})


class Routes:
    """The gateway's HTTP routes, mixed into BaseHTTPRequestHandler by http_server_classes()."""

    protocol_version = "HTTP/1.1"

    def version_string(self):
        return "carapace"

    def log_message(self, fmt, *args):
        """Requests are not logged (axum's default)."""

    @property
    def gateway(self):
        return self.server.gateway

    def send_json(self, status, body, headers=()):
        self.send_body(status, json.dumps(body, sort_keys=True).encode(), "application/json", headers)

    def send_body(self, status, data, content_type, headers=()):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def not_found(self):
        self.send_body(404, b"", "text/plain")

    def read_body(self):
        """Always drain the request body so a kept-alive connection stays in sync."""
        length = int(self.headers.get("Content-Length") or 0)
        self.body = self.rfile.read(length) if length else b""

    def read_json(self):
        try:
            body = json.loads(self.body or b"{}")
        except ValueError:
            return None
        return body if isinstance(body, dict) else None

    def route_enabled(self, key):
        return cfg_get(self.gateway.cfg, key) is True

    def check_auth(self):
        if self.gateway.authorized(self.headers, self.client_address[0]):
            return True
        self.send_json(401, {"error": {"code": "unauthorized", "message": "missing or invalid gateway credentials"}},
                       [("WWW-Authenticate", "Bearer")])
        return False

    def do_GET(self):
        path = self.path.split("?", 1)[0]
        gw = self.gateway
        gw.requests[path] = gw.requests.get(path, 0) + 1
        if path in ("/health", "/health/live"):
            return self.send_json(200, gw.health())
        if path == "/health/ready":
            ok, body = gw.ready()
            return self.send_json(200 if ok else 503, body, () if ok else [("Retry-After", "5")])
        if path == "/metrics":
            return self.send_body(200, gw.metrics().encode(), "text/plain; version=0.0.4")
        if path.startswith("/control/") and self.route_enabled("gateway.control.enabled"):
            return self.control_get(path)
        self.not_found()

    def control_get(self, path):
        if not self.check_auth():
            return
        if path == "/control/status":
            return self.send_json(200, self.gateway.control_status())
        if path == "/control/tasks":
            return self.send_json(200, {"tasks": self.gateway.state.tasks()})
        match = re.match(r"^/control/tasks/([^/]+)$", path)
        task = self.gateway.state.task(match.group(1)) if match else None
        if task is None:
            return self.send_json(404, {"error": {"code": "not_found", "message": "no such task"}})
        self.send_json(200, task)

    def do_POST(self):
        self.read_body()
        path = self.path.split("?", 1)[0]
        hooks_base = str(cfg_get(self.gateway.cfg, "gateway.hooks.path", "/hooks")).rstrip("/")
        if path == "/control/tasks" and self.route_enabled("gateway.control.enabled"):
            return self.post_task()
        if path == hooks_base + "/wake" and self.route_enabled("gateway.hooks.enabled"):
            return self.post_wake()
        if path == "/__double/chat":
            return self.post_chat()
        self.not_found()

    def post_task(self):
        if not self.check_auth():
            return
        body = self.read_json()
        if body is None:
            return self.send_json(400, {"error": {"code": "invalid_request", "message": "body must be a JSON object"}})
        self.send_json(201, self.gateway.create_task(body))

    def post_wake(self):
        expected = self.gateway.hooks_token
        given = self.headers.get("Authorization", "")
        if not expected or not given.startswith("Bearer ") or not hmac.compare_digest(given[7:], str(expected)):
            return self.send_json(401, {"error": {"code": "unauthorized", "message": "invalid hooks token"}})
        if self.read_json() is None:
            return self.send_json(400, {"error": {"code": "invalid_request", "message": "body must be a JSON object"}})
        self.send_json(200, {"ok": True})

    def post_chat(self):
        """Stand-in for the WS `chat.send` roundtrip: a canned local reply, recorded as a session."""
        if not self.check_auth():
            return
        body = self.read_json() or {}
        message = str(body.get("message", ""))
        reply = "verification-ok" if message == VERIFY_PROMPT else "ok"
        session_id = self.gateway.state.record_chat(message, reply)
        self.send_json(200, {"ok": True, "reply": reply, "sessionId": session_id})


# ----------------------------------------------------------------------------------------------------------------
# HTTP client used by status / verify (always plain HTTP, spec 1.3, 1.7)

def http_request(method, host, port, path, timeout, body=None, token=None):
    """Returns (status, reason, bytes); raises OSError on connection problems."""
    import http.client
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    headers = {"Content-Type": "application/json"} if body is not None else {}
    if token:
        headers["Authorization"] = "Bearer %s" % token
    try:
        conn.request(method, path, body=None if body is None else json.dumps(body).encode(), headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.reason, resp.read()
    except http.client.HTTPException as exc:
        raise OSError(str(exc) or type(exc).__name__)
    finally:
        conn.close()


def describe_os_error(exc):
    if isinstance(exc, socket.timeout):
        return "error sending request: operation timed out"
    if getattr(exc, "errno", None):
        return "error sending request: %s (os error %d)" % (os.strerror(exc.errno), exc.errno)
    return "error sending request: %s" % exc


# ----------------------------------------------------------------------------------------------------------------
# CLI parsing (clap-like: exit 2 and clap's wording on usage errors)

class ClapParser(argparse.ArgumentParser):
    def __init__(self, usage, **kwargs):
        super().__init__(prog="cara", usage=usage, allow_abbrev=False, add_help=True, **kwargs)
        self.clap_usage = usage

    def error(self, message):
        match = re.search(r"unrecognized arguments: (\S+)", message)
        if match:
            message = "unexpected argument '%s' found" % match.group(1)
        match = re.search(r"the following arguments are required: (.+)", message)
        if match:
            wanted = "\n".join("  <%s>" % name.strip().upper() for name in match.group(1).split(","))
            message = "the following required arguments were not provided:\n" + wanted
        raise UsageError(message, self.clap_usage)


def parse(parser, argv):
    args, extra = parser.parse_known_args(argv)
    if extra:
        parser.error("unrecognized arguments: %s" % extra[0])
    return args


def port_arg(text):
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError("invalid value '%s' for '--port <PORT>': %s is not in 0..=65535" %
                                         (text, text))
    return int(text)


# ----------------------------------------------------------------------------------------------------------------
# Subcommands

def cmd_version(argv):
    parse(ClapParser("cara version"), argv)
    os_name, arch = platform_pair()
    out("cara %s" % VERSION)
    out("  Build date: %s" % BUILD_DATE)
    out("  Git commit: %s" % GIT_COMMIT)
    out("  Platform:   %s (%s)" % (os_name, arch))
    return 0


def cmd_start(argv, *, via_subcommand=True):
    if via_subcommand:
        parse(ClapParser("cara start"), argv)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    log = Logger()
    cfg = load_config_for_start(log)
    gateway = Gateway(cfg, log, stop)
    try:
        if gateway.start():
            while not stop.wait(3600):  # a signal handler sets stop; the wait is interruptible
                continue
            log.info("shutdown signal received, stopping gateway")
    except CaraError:
        gateway.release()
        raise
    gateway.stop()
    log.info("gateway stopped")
    return 0


def load_config_for_start(log):
    """Load failures fall back to {} with a warning; schema errors abort startup (spec 1.2 step 1)."""
    try:
        cfg = load_config()
    except CaraError as exc:
        log.warn("failed to load config, using defaults: %s" % exc)
        return {}
    problems = validate_config(cfg)
    if problems:
        for problem in problems:
            log.error("config error: %s" % problem)
        raise CaraError("Configuration contains errors — aborting startup")
    return cfg


def format_uptime(seconds):
    days, rem = divmod(int(seconds), 86400)
    hours, rem = divmod(rem, 3600)
    minutes, secs = divmod(rem, 60)
    if days:
        return "%dd %dh %dm %ds" % (days, hours, minutes, secs)
    if hours:
        return "%dh %dm %ds" % (hours, minutes, secs)
    if minutes:
        return "%dm %ds" % (minutes, secs)
    return "%ds" % secs


def strip_unsafe(value):
    """Remove terminal-unsafe control characters from every string in a JSON value."""
    if isinstance(value, dict):
        return {k: strip_unsafe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [strip_unsafe(v) for v in value]
    if isinstance(value, str):
        return "".join(ch for ch in value if not (ord(ch) < 0x20 or 0x7F <= ord(ch) < 0xA0))
    return value


def cmd_status(argv):
    parser = ClapParser("cara status [OPTIONS]")
    parser.add_argument("-p", "--port", type=port_arg)
    parser.add_argument("--host", default="127.0.0.1")
    if FLAVOR == "head":
        parser.add_argument("--json", action="store_true")
    args = parse(parser, argv)
    port = args.port if args.port is not None else configured_port(config_or_empty())
    try:
        status, reason, body = http_request("GET", args.host, port, "/health", 5)
    except OSError as exc:
        err("Could not connect to carapace at %s:%d" % (args.host, port))
        err("  Error: %s" % describe_os_error(exc))
        err()
        err("Is the server running? Start it with: cara start")
        raise Exit(1)
    if not 200 <= status < 300:
        err("Health endpoint returned HTTP %d %s: %s" % (status, reason, body.decode("utf-8", "replace")))
        raise Exit(1)
    try:
        health = json.loads(body)
    except ValueError as exc:
        raise CaraError("error decoding response body: %s" % exc)
    control = fetch_control_status(args.host, port)
    if getattr(args, "json", False):
        report = {"health": health}
        if control is not None:
            report["controlStatus"] = control
        out(json.dumps(strip_unsafe(report), indent=2, sort_keys=True, ensure_ascii=False))
        return 0
    print_status(health, control, args.host, port)
    return 0


def config_or_empty():
    try:
        return load_config()
    except CaraError:
        return {}


def fetch_control_status(host, port):
    """GET /control/status without credentials; any failure just means "not available" (spec 1.3 step 5)."""
    try:
        status, _unused, body = http_request("GET", host, port, "/control/status", 5)
        data = json.loads(body) if 200 <= status < 300 else None
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def print_status(health, control, host, port):
    out("Carapace gateway status")
    out("=======================")
    out("  Version:  %s" % strip_unsafe(str(health.get("version", "unknown"))))
    out("  Uptime:   %s" % format_uptime(health.get("uptimeSeconds", 0) or 0))
    out("  Address:  %s:%d" % (host, port))
    out("  Status:   %s" % strip_unsafe(str(health.get("status", "unknown"))))
    if control is not None:
        runtime = control.get("runtime") or {}
        out("  Channels: %s/%s connected" % (control.get("connectedChannels", 0), control.get("totalChannels", 0)))
        out("  Platform: %s (%s)" % (strip_unsafe(str(runtime.get("platform"))), strip_unsafe(str(runtime.get("arch")))))


# -- backup / restore (spec 1.4, 1.5) ---------------------------------------------------------------------------

def human_size(size):
    if size < 1024:
        return "%d B" % size
    if size < 1024 ** 2:
        return "%.1f KB" % (size / 1024)
    if size < 1024 ** 3:
        return "%.1f MB" % (size / 1024 ** 2)
    return "%.2f GB" % (size / 1024 ** 3)


def backup_sources(sdir):
    """(section, archive name, source path) in archive order, only for sources that exist."""
    cfg_file = config_path()
    candidates = [("sessions", "sessions", sdir / "sessions"), ("config", "config/" + cfg_file.name, cfg_file),
                  ("memory", "memory", memory_dir()), ("cron", "cron", sdir / "cron"),
                  ("tasks", "tasks", sdir / "tasks"), ("usage", "usage/usage.json", sdir / "usage.json")]
    return [(section, name, path) for section, name, path in candidates
            if (path.is_dir() if name == section else path.is_file())]


def open_backup_output(path, force):
    """HEAD: O_NOFOLLOW and create-new unless --force; v0.8.0 silently truncates."""
    if FLAVOR != "head":
        return open(path, "wb")
    if os.path.islink(path):
        raise CaraError("refusing to follow symlink at output path %s" % path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | (os.O_TRUNC if force else os.O_EXCL)
    try:
        return os.fdopen(os.open(path, flags, 0o644), "wb")
    except FileExistsError:
        raise CaraError("refusing to overwrite existing file %s (pass --force to overwrite)" % path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise CaraError("refusing to follow symlink at output path %s" % path)
        raise CaraError("failed to create %s: %s" % (path, exc.strerror))


def skip_special(info):
    """Only directories and regular files go into a backup."""
    return info if info.isdir() or info.isfile() else None


def write_backup(handle, sources, stamp):
    with tarfile.open(fileobj=handle, mode="w:gz", format=tarfile.GNU_FORMAT, compresslevel=6) as tar:
        marker = ("carapace-backup v1\ncreated=%s\n" % stamp).encode()
        info = tarfile.TarInfo(BACKUP_MARKER)
        info.size, info.mode, info.mtime = len(marker), 0o644, int(time.time())
        tar.addfile(info, io.BytesIO(marker))
        for _unused, name, path in sources:
            tar.add(str(path), arcname=name, recursive=True, filter=skip_special)


def cmd_backup(argv):
    parser = ClapParser("cara backup [OPTIONS]")
    parser.add_argument("-o", "--output")
    if FLAVOR == "head":
        parser.add_argument("--force", action="store_true")
    args = parse(parser, argv)
    sdir = state_dir()
    ensure_no_daemon(sdir, "back up")
    stamp = utc_stamp()
    output = args.output or "./carapace-backup-%s.tar.gz" % stamp
    sources = backup_sources(sdir)
    with open_backup_output(output, getattr(args, "force", False)) as handle:
        write_backup(handle, sources, stamp)
    size = os.stat(output).st_size
    out("Backup created successfully")
    out("  Path: %s" % output)
    out("  Size: %s (%d)" % (human_size(size), size))
    out("  Included: %s" % (", ".join(section for section, _unused, _unused in sources) or "(empty)"))
    return 0


def normalize_member(name):
    parts = [p for p in name.split("/") if p not in ("", ".")]
    return "/".join(parts)


def is_safe_archive_path(name):
    return bool(name) and not name.startswith("/") and ".." not in name.split("/") and not re.match(r"^[A-Za-z]:", name)


def read_backup_members(path):
    """Validation pass (spec 1.5 step 2): safe paths and the marker; returns (tar, members, sections)."""
    try:
        tar = tarfile.open(path, "r:gz")
        members = tar.getmembers()
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise CaraError("failed to read backup archive %s: %s" % (path, exc))
    sections, has_marker = [], False
    for member in members:
        if not is_safe_archive_path(member.name):
            raise CaraError("invalid path in backup: %s" % member.name)
        name = normalize_member(member.name)
        has_marker = has_marker or name == BACKUP_MARKER
        section = name.split("/", 1)[0]
        if "/" in name and section in BACKUP_SECTIONS and section not in sections:
            sections.append(section)
    if not has_marker:
        err("Invalid backup: archive does not contain a carapace backup marker.")
        err("The file may be corrupt or was not created by `cara backup`.")
        raise Exit(1)
    return tar, members, sections


def restore_target(sdir, name):
    """Archive path -> destination (spec 1.5 step 6); None for entries restore ignores."""
    section, _unused, rest = name.partition("/")
    if not rest:
        return None
    if section in ("sessions", "cron", "tasks"):
        return sdir / section / rest
    if section == "memory":
        return memory_dir() / rest
    if section == "config":
        return config_path().parent / rest
    if section == "usage" and rest == "usage.json":
        return sdir / "usage.json"
    return None


def refuse_symlinked_roots(sdir):
    """HEAD: no section root may be a symlink (spec 1.5 step 5)."""
    for root in (sdir / "sessions", config_path().parent, memory_dir(), sdir / "cron", sdir / "tasks"):
        if root.is_symlink():
            raise CaraError("refusing to restore into symlinked directory %s" % root)


def write_restored_file(target, data):
    """Truncate + rewrite; HEAD does not follow a symlink in the final component."""
    target.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (os.O_NOFOLLOW if FLAVOR == "head" else 0)
    try:
        fd = os.open(str(target), flags, 0o666)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise CaraError("refusing to follow symlink at %s" % target)
        raise CaraError("failed to write %s: %s" % (target, exc.strerror))
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def cmd_restore(argv):
    parser = ClapParser("cara restore [OPTIONS] <PATH>")
    parser.add_argument("path")
    parser.add_argument("--force", action="store_true")
    args = parse(parser, argv)
    if not os.path.exists(args.path):
        err("Backup file not found: %s" % args.path)
        raise Exit(1)
    tar, members, sections = read_backup_members(args.path)
    if not args.force:
        err("This will overwrite existing data with the contents of: %s" % args.path)
        err("Sections to restore: %s" % (", ".join(sections) or "(none)"))
        err("Pass --force to proceed without this prompt.")
        raise Exit(1)
    sdir = state_dir()
    ensure_no_daemon(sdir, "restore")
    if FLAVOR == "head":
        refuse_symlinked_roots(sdir)
    restored, sessions = extract_members(tar, members, sdir)
    out("Restore completed successfully")
    out("  Restored: %s" % (", ".join(restored) or "(nothing)"))
    if sessions:
        out("  Sessions: %d" % sessions)
    return 0


def extract_members(tar, members, sdir):
    restored, sessions = [], 0
    for member in members:
        name = normalize_member(member.name)
        target = restore_target(sdir, name)
        if target is None or not (member.isfile() or member.isdir()):
            continue
        if member.isdir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        write_restored_file(target, tar.extractfile(member).read())
        section = name.split("/", 1)[0]
        if section not in restored:
            restored.append(section)
        sessions += bool(re.match(r"^sessions/[^/]+\.json$", name))
    tar.close()
    return restored, sessions


# -- verify (spec 1.7) ------------------------------------------------------------------------------------------

class Checks:
    def __init__(self):
        self.items = []

    def add(self, verdict, name, detail, hint=None):
        self.items.append((verdict, name, detail, hint))
        return verdict == "PASS"

    def count(self, verdict):
        return sum(1 for item in self.items if item[0] == verdict)


def resolve_outcome(cfg):
    """auto -> discord, telegram, matrix, hooks or local-chat (spec 1.7)."""
    if cfg_get(cfg, "discord.botToken") or os.environ.get("DISCORD_BOT_TOKEN"):
        return "discord"
    if cfg_get(cfg, "telegram.botToken") or os.environ.get("TELEGRAM_BOT_TOKEN"):
        return "telegram"
    if FLAVOR == "head" and isinstance(cfg.get("matrix"), dict):
        return "matrix"
    return "hooks" if cfg_get(cfg, "gateway.hooks.enabled") is True else "local-chat"


def cmd_verify(argv):
    outcomes = VERIFY_OUTCOMES_HEAD if FLAVOR == "head" else tuple(o for o in VERIFY_OUTCOMES_HEAD if o != "matrix")
    parser = ClapParser("cara verify [OPTIONS]")
    parser.add_argument("--outcome", default="auto")
    parser.add_argument("-p", "--port", type=port_arg)
    parser.add_argument("--discord-to")
    parser.add_argument("--telegram-to")
    if FLAVOR == "head":
        parser.add_argument("--matrix-to")
    args = parse(parser, argv)
    if args.outcome not in outcomes:
        raise UsageError("invalid value '%s' for '--outcome <OUTCOME>'\n  [possible values: %s]" %
                         (args.outcome, ", ".join(outcomes)), parser.clap_usage)
    try:
        cfg = load_config()
    except CaraError as exc:
        raise CaraError("failed to load config: %s. Run `cara setup` first." % exc)
    port = args.port if args.port is not None else configured_port(cfg)
    outcome = resolve_outcome(cfg) if args.outcome == "auto" else args.outcome
    checks = Checks()
    run_outcome(outcome, cfg, port, args, checks)
    return print_verify_summary(outcome, port, checks)


def run_outcome(outcome, cfg, port, args, checks):
    if outcome in ("discord", "telegram"):
        return verify_bot(outcome, cfg, args, checks)
    embedded = None
    try:
        embedded = ensure_gateway(cfg, port, checks)
        if embedded is False:
            return
        {"local-chat": verify_local_chat, "hooks": verify_hooks, "autonomy": verify_autonomy,
         "matrix": verify_matrix}[outcome](cfg, port, checks)
    finally:
        if embedded:
            embedded.stop()


def ensure_gateway(cfg, port, checks):
    """Health-check 127.0.0.1:<port>; when down, start an embedded gateway in-process (spec 1.7).
    Returns the embedded Gateway, None when a gateway already ran, False when none could be reached."""
    reachable = health_version(port, 2)
    if reachable:
        checks.add("PASS", "Gateway reachability", "gateway healthy at 127.0.0.1:%d (v%s)" % (port, reachable))
        return None
    err("Starting embedded gateway on port %d..." % port)
    gateway = Gateway(cfg, Logger(enabled=False), threading.Event(), host_port=("127.0.0.1", port))
    try:
        if not gateway.start():
            raise CaraError("embedded gateway stopped before binding")
    except CaraError as exc:
        gateway.release()
        checks.add("FAIL", "Gateway reachability", "embedded gateway on 127.0.0.1:%d failed to start: %s" % (port, exc),
                   "start the gateway with `cara start --port %d`" % port)
        return False
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not health_version(port, 2):
        time.sleep(0.05)
    version = health_version(port, 2)
    if not version:
        gateway.stop()
        checks.add("FAIL", "Gateway reachability", "embedded gateway did not become healthy within 10s",
                   "start the gateway with `cara start --port %d`" % port)
        return False
    checks.add("PASS", "Gateway reachability", "embedded gateway healthy at 127.0.0.1:%d (v%s)" % (port, version))
    return gateway


def health_version(port, timeout):
    try:
        status, _unused, body = http_request("GET", "127.0.0.1", port, "/health", timeout)
        return json.loads(body).get("version", "unknown") if 200 <= status < 300 else None
    except (OSError, ValueError, AttributeError):
        return None


def verify_local_chat(cfg, port, checks):
    mode, token, password = gateway_credentials(cfg)
    secret = token if mode == "token" else password
    try:
        status, _unused, body = http_request("POST", "127.0.0.1", port, "/__double/chat", 45,
                                             body={"message": VERIFY_PROMPT}, token=secret)
        reply = json.loads(body).get("reply") if status == 200 else None
    except (OSError, ValueError):
        status, reply = None, None
    if reply == "verification-ok":
        checks.add("PASS", "Local chat roundtrip", "received verification-ok")
    else:
        checks.add("FAIL", "Local chat roundtrip", "chat.send roundtrip failed (HTTP %s)" % status,
                   "check gateway auth (CARAPACE_GATEWAY_TOKEN or gateway.auth.token) and the LLM provider")


def verify_hooks(cfg, port, checks):
    if cfg_get(cfg, "gateway.hooks.enabled") is not True:
        return checks.add("FAIL", "Hooks enabled", "gateway.hooks.enabled is not true",
                          "set gateway.hooks.enabled: true and restart the gateway")
    checks.add("PASS", "Hooks enabled", "gateway.hooks.enabled is true")
    token = hooks_token(cfg)
    if not token:
        return checks.add("FAIL", "Hooks token", "no hooks token configured",
                          "set CARAPACE_HOOKS_TOKEN or gateway.hooks.token")
    checks.add("PASS", "Hooks token", "hooks token configured")
    try:
        status = http_request("POST", "127.0.0.1", port, "/hooks/wake", 10, body={"text": "verify-hook"},
                              token=token)[0]
    except OSError as exc:
        status = describe_os_error(exc)
    if isinstance(status, int) and 200 <= status < 300:
        checks.add("PASS", "Signed /hooks/wake", "POST /hooks/wake returned HTTP %d" % status)
    else:
        checks.add("FAIL", "Signed /hooks/wake", "POST /hooks/wake returned %s" % status,
                   "check the hooks token and that gateway.hooks.path is /hooks")


def verify_autonomy(cfg, port, checks):
    mode, token, password = gateway_credentials(cfg)
    secret = token or password
    request = {"payload": {"kind": "agentTurn", "message": "verify-autonomy"},
               "policy": {"maxAttempts": 1, "maxTotalRuntimeMs": 60000, "maxTurns": 1, "maxRunTimeoutSeconds": 30}}
    try:
        status, _unused, body = http_request("POST", "127.0.0.1", port, "/control/tasks", 10, body=request, token=secret)
        task = json.loads(body) if 200 <= status < 300 else None
    except (OSError, ValueError):
        status, task = "unreachable", None
    if not isinstance(task, dict) or "id" not in task:
        return checks.add("FAIL", "Task creation", "POST /control/tasks returned HTTP %s" % status,
                          "set gateway.control.enabled: true and gateway auth (CARAPACE_GATEWAY_TOKEN)")
    task = poll_task(port, task, secret)
    attempts = task.get("attempts", 0)
    if not checks.add("PASS" if attempts > 0 else "FAIL", "Task start proof", "task %s attempts=%d" % (task["id"], attempts),
                      None if attempts > 0 else "check the gateway task worker"):
        return
    state = task.get("state")
    if state in ("done", "blocked"):
        checks.add("PASS", "Task terminal proof", "task %s reached state %s" % (task["id"], state))
    else:
        detail = "task %s ended in state %s" % (task["id"], state)
        checks.add("FAIL", "Task terminal proof", detail + (": %s" % task["lastError"] if task.get("lastError") else ""),
                   "inspect the task with GET /control/tasks/%s" % task["id"])


def poll_task(port, task, secret):
    """GET /control/tasks/<id> every 250 ms for up to 70 s until a terminal state."""
    deadline = time.monotonic() + 70
    while time.monotonic() < deadline:
        task = fetch_task(port, task, secret)
        if task.get("state") in ("done", "blocked", "failed", "cancelled"):
            return task
        time.sleep(0.25)
    return dict(task, state="timeout")


def fetch_task(port, task, secret):
    """The task's current record; the last known one when this poll fails (retried until the deadline)."""
    try:
        status, _unused, body = http_request("GET", "127.0.0.1", port, "/control/tasks/%s" % task["id"], 10, token=secret)
        fresh = json.loads(body) if status == 200 else None
    except (OSError, ValueError):
        fresh = None
    return fresh if isinstance(fresh, dict) else task


def verify_matrix(cfg, port, checks):
    checks.add("FAIL", "Matrix config", "no matrix channel is configured",
               "configure the matrix channel (the cara double has no Matrix support)")


def verify_bot(outcome, cfg, args, checks):
    """No provider API is reachable from the double: token presence is checked, the rest is SKIP."""
    key = "%s.botToken" % outcome
    if not (cfg_get(cfg, key) or os.environ.get("%s_BOT_TOKEN" % outcome.upper())):
        return checks.add("FAIL", "Bot token", "%s is not configured" % key, "set %s" % key)
    checks.add("PASS", "Bot token", "%s is configured" % key)
    checks.add("SKIP", "Token validation", "provider API not contacted by the cara double",
               "run against the real cara to validate the token")
    destination = getattr(args, "%s_to" % outcome)
    checks.add("SKIP", "Send path", "no --%s-to destination given" % outcome if not destination else
               "sending is not supported by the cara double", "pass --%s-to <id> to test sending" % outcome)


def print_verify_summary(outcome, port, checks):
    out()
    out("Outcome verification summary")
    out("----------------------------")
    out("Outcome: %s" % outcome)
    out("Gateway port: %d" % port)
    out()
    for verdict, name, detail, hint in checks.items:
        out("[%s] %s: %s" % (verdict, name, detail))
        if hint and verdict != "PASS":
            out("      next step: %s" % hint)
    if checks.count("FAIL"):
        out()
        out("Next help path: %s" % HELP_URL)
        sys.stdout.flush()
        raise CaraError("outcome verification failed")
    if not checks.count("PASS"):
        sys.stdout.flush()
        raise CaraError("outcome verification incomplete (no checks passed)")
    out()
    out("Outcome verification passed with skipped checks." if checks.count("SKIP") else "Outcome verification passed.")
    return 0


# -- config (spec 1.9; read-only subset) --------------------------------------------------------------------------

def cmd_config(argv):
    parser = ClapParser("cara config <COMMAND>")
    parser.add_argument("action", choices=("show", "get", "set", "path"))
    parser.add_argument("key", nargs="?")
    args, _unused = parser.parse_known_args(argv)
    if args.action == "path":
        out(str(config_path()))
        return 0
    if args.action == "get":
        return config_get(args.key)
    if args.action == "show":
        out(json.dumps(redact(load_config()), indent=2, sort_keys=True, ensure_ascii=False))
        return 0
    raise CaraError("`cara config set` is not implemented by the cara double")


def config_get(key):
    if not key:
        raise UsageError("the following required arguments were not provided:\n  <KEY>", "cara config get <KEY>")
    path = config_path()
    raw = parse_json5(path.read_text(encoding="utf-8"), path) if path.exists() else {}
    value = cfg_get(raw, key, default=KeyError)
    if value is KeyError:
        err("Key not found: %s" % key)
        raise Exit(1)
    out(json.dumps(value, indent=2, ensure_ascii=False))
    return 0


def redact(value, key=""):
    if isinstance(value, dict):
        return {k: redact(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v, key) for v in value]
    secret = re.search(r"(token|password|secret|apikey|api_key)$", key, re.I)
    return "[REDACTED]" if secret and isinstance(value, str) else value


def cmd_update(argv):
    raise CaraError("`cara update` is not implemented by the carapace.fleet cara double; the collection installs "
                    "releases itself")


# ----------------------------------------------------------------------------------------------------------------
# Entry point

COMMANDS = {"start": cmd_start, "version": cmd_version, "status": cmd_status, "backup": cmd_backup,
            "restore": cmd_restore, "verify": cmd_verify, "config": cmd_config, "update": cmd_update}


def dispatch(argv):
    if not argv:
        return cmd_start([], via_subcommand=False)
    first = argv[0]
    if first in ("--version", "-V"):
        out("cara %s" % VERSION)
        return 0
    if first in ("-h", "--help"):
        out("Carapace gateway (test double)\n\nUsage: cara [COMMAND]\n\nCommands: %s" % ", ".join(KNOWN_SUBCOMMANDS))
        return 0
    known = KNOWN_SUBCOMMANDS if FLAVOR == "head" else tuple(c for c in KNOWN_SUBCOMMANDS if c != "matrix")
    if first.startswith("-"):
        raise UsageError("unexpected argument '%s' found" % first, "cara [COMMAND]")
    if first not in known:
        raise UsageError("unrecognized subcommand '%s'" % first, "cara [COMMAND]")
    if first not in COMMANDS:
        raise CaraError("`cara %s` is not implemented by the carapace.fleet cara double" % first)
    return COMMANDS[first](argv[1:])


def main(argv):
    try:
        return dispatch(argv)
    except UsageError as exc:
        err("error: %s" % exc)
        err()
        err("Usage: %s" % exc.usage)
        err()
        err("For more information, try '--help'.")
        return 2
    except Exit as exc:
        return exc.code
    except (CaraError, OSError) as exc:
        sys.stdout.flush()  # an unexpected I/O error reads like any other handler error, not a traceback
        err("Error: %s" % rust_debug(str(exc)))
        return 1
    finally:
        sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
