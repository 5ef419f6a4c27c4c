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
    "slow_start_s": (int, float),    # sleeps this long (HEAD: pid written, lock held) before binding
    "migrate_state": (bool, int),    # this release migrates tasks/queue.json to a shape older releases cannot read
    "stop_delay_s": (int, float),    # after SIGTERM/SIGINT, shutdown takes this long (bounded to STOP_DELAY_MAX_S)
}
STOP_DELAY_MAX_S = 12.0              # ~5 s audit drain + 5 s server wait + 2 s before self-SIGKILL (spec 1.2, 10)
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
        types = FAULT_TYPES[key] if isinstance(FAULT_TYPES[key], tuple) else (FAULT_TYPES[key],)
        if isinstance(value, bool) and bool not in types or not isinstance(value, types):
            raise ValueError("fault switch %r needs a value of type %s, got %r" % (key, FAULT_TYPES[key], value))
    migrate = faults.get("migrate_state", True)
    if migrate is not True and (migrate is False or migrate <= 1):
        raise ValueError("migrate_state must be true (or, for compatibility, a schema number above 1)")
    delay = faults.get("stop_delay_s", 0)
    if not 0 <= delay <= STOP_DELAY_MAX_S:
        raise ValueError("stop_delay_s must be between 0 and %s" % STOP_DELAY_MAX_S)


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
    """A handler error: printed as `Error: "<Debug>"` on stderr, exit 1 (Rust `main` returning Err).
    `variant` names the Rust error enum variant whose Debug wraps the message (`Runtime("…")`)."""

    def __init__(self, message, variant=None):
        super().__init__(message)
        self.variant = variant

    def render(self):
        text = rust_debug(str(self))
        return "%s(%s)" % (self.variant, text) if self.variant else text


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
    write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


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

EMPTY_USAGE = {"version": 1, "totals": {"requests": 0, "inputTokens": 0, "outputTokens": 0}, "sessions": {}}
TASK_STATES = ("queued", "running", "blocked", "retry_wait", "done", "failed", "cancelled")
TASK_BLOCKED_REASONS = ("approval_required", "config_missing", "delivery_failure", "external_dependency",
                        "operator_action_required", "unknown")
# DurableTask field -> serde type (v0.8.0 src/tasks/mod.rs); "?" = Option, missing read as None.
TASK_FIELDS = (("id", "string"), ("state", "TaskState"), ("attempts", "u32"), ("nextRunAtMs", "u64?"),
               ("lastError", "string?"), ("payload", "value"), ("createdAtMs", "u64"), ("updatedAtMs", "u64"),
               ("runIds", "strings"), ("policy", "TaskPolicy"), ("blockedReason", "TaskBlockedReason?"),
               ("policyExplicit", "bool"))
TASK_POLICY_FIELDS = (("maxAttempts", "u32"), ("maxTotalRuntimeMs", "u64"), ("maxTurns", "u32"),
                      ("maxRunTimeoutSeconds", "u32"))
DEFAULT_TASK_POLICY = {"maxAttempts": 100, "maxTotalRuntimeMs": 7 * 24 * 60 * 60 * 1000, "maxTurns": 25,
                       "maxRunTimeoutSeconds": 600}
SERDE_ENUMS = {"TaskState": TASK_STATES, "TaskBlockedReason": TASK_BLOCKED_REASONS,
               "UpdateTransactionState": ("in_progress", "applied", "failed"),
               "UpdatePhase": ("created", "downloading", "downloaded", "verified", "applying", "applied", "failed")}


def read_state_json(path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except ValueError as exc:
        raise CaraError("failed to read %s: %s; restore it from a backup (cara restore <backup> --force)" % (path, exc))


class SerdeError(ValueError):
    """A serde_json-style error text ("invalid type: map, expected u32 at line 5 column 17")."""


def serde_unexpected(value):
    """How serde names an unexpected JSON value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean `%s`" % ("true" if value else "false")
    if isinstance(value, int):
        return "integer `%d`" % value
    if isinstance(value, float):
        return "floating point `%r`" % value
    if isinstance(value, str):
        return "string %s" % json.dumps(value)
    return "sequence" if isinstance(value, list) else "map"


SERDE_SYNTAX = (("Expecting property name", "key must be a string"), ("Expecting value", "expected value"),
                ("Extra data", "trailing characters"), ("Unterminated string", "EOF while parsing a string"),
                ("Expecting ':'", "expected `:`"), ("Expecting ','", "expected `,` or `]`"))


def serde_json_loads(text):
    """json.loads with serde_json's wording of syntax errors (common cases; others keep Python's text)."""
    try:
        return json.loads(text)
    except ValueError as exc:
        msg = getattr(exc, "msg", str(exc))
        msg = next((serde for py, serde in SERDE_SYNTAX if msg.startswith(py)), msg)
        raise SerdeError("%s at line %d column %d" % (msg, getattr(exc, "lineno", 1), getattr(exc, "colno", 0)))


def line_col(text, offset):
    offset = max(0, min(offset, len(text)))
    line = text.count("\n", 0, offset) + 1
    return line, offset - (text.rfind("\n", 0, offset) + 1)


class QueueCodec:
    """tasks/queue.json as v0.8.0 serde reads and writes it: a bare array of DurableTask (camelCase).

    Errors carry serde's wording; their line/column is the double's best effort (the position of the offending
    key's value, or the end of the file for a missing field). Under fault `migrate_state` the release also reads
    and always writes `attempts` as `{"count": n}`, which serde's u32 of every other release cannot read."""

    def __init__(self, migrated=False):
        self.migrated = migrated

    def decode(self, text):
        data = serde_json_loads(text)
        self.text = text
        self.seen = {}
        if not isinstance(data, list):
            raise SerdeError("invalid type: %s, expected a sequence at line 1 column 1" % serde_unexpected(data))
        return [self.task(item) for item in data]

    def locate(self, key):
        """Remember the position just after the start of the value of the next occurrence of "key" (best effort)."""
        index = self.seen.get(key, 0)
        matches = list(re.finditer(r'"%s"\s*:\s*' % re.escape(key), self.text))
        self.seen[key] = index + 1
        offset = matches[index].end() + 1 if index < len(matches) else len(self.text)
        self.position = "at line %d column %d" % line_col(self.text, offset)

    def where(self, _key=None):
        return getattr(self, "position", "at line 1 column 1")

    def fail(self, key, value, expected):
        raise SerdeError("invalid type: %s, expected %s %s" % (serde_unexpected(value), expected, self.where(key)))

    def task(self, item):
        return self.struct(item, TASK_FIELDS, "DurableTask")

    def struct(self, item, fields, name="UpdateTransaction"):
        if not isinstance(item, dict):
            raise SerdeError("invalid type: %s, expected struct %s at line %d column %d"
                             % ((serde_unexpected(item), name) + line_col(self.text, len(self.text))))
        record = {}
        for key, kind in fields:
            if key not in item:
                if kind.endswith("?") or kind in ("strings",) or kind == "bool" and name == "DurableTask":
                    record[key] = None if kind.endswith("?") else ([] if kind == "strings" else False)
                    continue
                if kind == "TaskPolicy":
                    record[key] = dict(DEFAULT_TASK_POLICY)
                    continue
                raise SerdeError("missing field `%s` at line %d column %d" % ((key,) + line_col(self.text, len(self.text))))
            self.locate(key)
            record[key] = self.field(key, kind, item[key])
        return record

    def field(self, key, kind, value):
        if kind.endswith("?"):
            if value is None:
                return None
            kind = kind[:-1]
        if kind == "u32" and key == "attempts" and self.migrated and isinstance(value, dict):
            return self.field("count", "u32", value.get("count"))
        if kind in ("u32", "u64"):
            if isinstance(value, bool) or not isinstance(value, int):
                self.fail(key, value, kind)
            if not 0 <= value < (1 << (32 if kind == "u32" else 64)):
                raise SerdeError("invalid value: integer `%d`, expected %s %s" % (value, kind, self.where(key)))
            return value
        if kind == "string":
            if not isinstance(value, str):
                self.fail(key, value, "a string")
            return value
        if kind == "bool":
            if not isinstance(value, bool):
                self.fail(key, value, "a boolean")
            return value
        if kind == "strings":
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                self.fail(key, value, "a sequence")
            return value
        if kind in SERDE_ENUMS:
            variants = SERDE_ENUMS[kind]
            if not isinstance(value, str):
                self.fail(key, value, "enum %s" % kind)
            if value not in variants:
                raise SerdeError("unknown variant `%s`, expected one of %s %s"
                                 % (value, ", ".join("`%s`" % v for v in variants), self.where(key)))
            return value
        if kind == "TaskPolicy":
            if not isinstance(value, dict):
                self.fail(key, value, "struct TaskPolicy")
            policy = {}
            for name, sub in TASK_POLICY_FIELDS:
                if name not in value:
                    raise SerdeError("missing field `%s` at line %d column %d"
                                     % ((name,) + line_col(self.text, len(self.text))))
                self.locate(name)
                policy[name] = self.field(name, sub, value[name])
            return policy
        return value  # payload: any JSON value

    def encode(self, tasks):
        return json.dumps([self.serialize(t) for t in tasks], indent=2, ensure_ascii=False) + "\n"

    def serialize(self, task):
        """Field order and skip rules of DurableTask's Serialize; unknown keys are gone."""
        out_task = {}
        for key, _kind in TASK_FIELDS:
            value = task.get(key)
            if key == "runIds" and not value or key == "blockedReason" and value is None \
                    or key == "policyExplicit" and not value:
                continue
            if key == "attempts" and self.migrated:
                value = {"count": value}
            out_task[key] = value if key != "policy" else dict(value or DEFAULT_TASK_POLICY)
        return out_task


def write_text_atomic(path, text, mode=0o600):
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=str(path.parent), prefix=".%s." % path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class StateStore:
    """tasks/queue.json, cron/jobs.json, usage.json and sessions/. The queue and the cron jobs are bare JSON arrays,
    written only when something changes them (a missing file is an empty list, as in v0.8.0 src/tasks/mod.rs)."""

    def __init__(self, sdir, logger):
        self.dir = Path(sdir)
        self.log = logger
        self.lock = threading.Lock()
        self.queue_path = self.dir / "tasks" / "queue.json"
        self.cron_path = self.dir / "cron" / "jobs.json"
        self.usage_path = self.dir / "usage.json"
        self.codec = QueueCodec(migrated=bool(FAULTS.get("migrate_state")))
        self.queue = []

    def open(self):
        """Cron first (errors logged, empty), then the task queue (errors abort startup), then usage."""
        self.load_cron()
        self.load_queue()
        if not self.usage_path.exists():
            write_json_atomic(self.usage_path, EMPTY_USAGE)
        self.usage = read_state_json(self.usage_path)

    def load_cron(self):
        try:
            data = json.loads(self.cron_path.read_text(encoding="utf-8"))
            if not isinstance(data, list):
                raise ValueError("invalid type: %s, expected a sequence" % serde_unexpected(data))
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            self.log.error("failed to load cron jobs; starting with no jobs", path=str(self.cron_path), error=str(exc))

    def load_queue(self):
        try:
            raw = self.queue_path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as exc:
            raise CaraError("failed to read task queue file %s; persisted tasks were not loaded: %s. Remove or "
                            "repair the file before restarting" % (self.queue_path, exc), "Runtime")
        try:
            tasks = self.codec.decode(raw.decode("utf-8"))
        except (SerdeError, UnicodeDecodeError) as exc:
            try:
                note = " A copy was written to %s." % self.write_corrupt_copy(raw)
            except OSError as copy_err:
                note = " Failed to write corrupt queue backup: %s." % copy_err
            message = ("failed to parse current task queue file %s; persisted tasks were not loaded: %s.%s Remove or "
                       "repair the file before restarting" % (self.queue_path, exc, note))
            self.log.error(message, path=str(self.queue_path))
            raise CaraError(message, "Runtime")
        now = now_ms()
        recovered = False
        for task in tasks:
            if task["state"] == "running":
                task.update(state="retry_wait", nextRunAtMs=now, updatedAtMs=now)
                task["lastError"] = task["lastError"] or "recovered after restart"
                recovered = True
        self.queue = tasks
        if recovered or (self.codec.migrated and tasks and self.codec.encode(tasks) != raw.decode("utf-8")):
            if self.codec.migrated:
                self.log.info("migrated task queue to this release's format", path=str(self.queue_path),
                              tasks=len(tasks))
            self.flush()

    def write_corrupt_copy(self, raw):
        stamp = now_ms()
        for attempt in range(1024):
            candidate = Path("%s.corrupt.%d.%d" % (self.queue_path, stamp, attempt))
            try:
                fd = os.open(str(candidate), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                continue
            with os.fdopen(fd, "wb") as handle:
                handle.write(raw)
                handle.flush()
                os.fsync(handle.fileno())
            return candidate
        raise OSError("exhausted unique corrupt queue backup path attempts; prune old backups and retry")

    def flush(self):
        write_text_atomic(self.queue_path, self.codec.encode(self.queue))

    def tasks(self):
        with self.lock:
            return [dict(t) for t in self.queue]

    def task(self, task_id):
        with self.lock:
            return next((dict(t) for t in self.queue if t.get("id") == task_id), None)

    def put_task(self, task):
        with self.lock:
            index = next((i for i, t in enumerate(self.queue) if t.get("id") == task["id"]), None)
            if index is None:
                self.queue.append(dict(task))
            else:
                self.queue[index] = dict(task)
            self.flush()

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
        if FLAVOR != "head":
            return
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

def cleanup_old_binaries(sdir, logger):
    """v0.8.0 `cleanup_old_binaries` (WS state build at every start, and after an apply): EVERY file named *.bak or
    *.old in the executable's directory is deleted, whoever it belongs to; staged files in updates/ older than
    7 days too (not transaction.json)."""
    exe = exe_path()
    try:
        siblings = list(exe.parent.iterdir())
    except OSError:
        siblings = []
    for sibling in siblings:
        if sibling.suffix in (".bak", ".old") and sibling.name not in (".bak", ".old"):
            try:
                sibling.unlink()
                logger.info("removed old binary", path=str(sibling))
            except OSError as exc:
                logger.warn("failed to remove old binary", path=str(sibling), error=str(exc))
    updates = Path(sdir) / "updates"
    cutoff = time.time() - 7 * 24 * 3600
    for entry in (list(updates.iterdir()) if updates.is_dir() else []):
        try:
            if entry.name != "transaction.json" and entry.stat().st_mtime < cutoff:
                entry.unlink()
        except OSError:
            pass


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


def audit(sdir, event, **fields):
    """One line in {state_dir}/audit.jsonl (the double's own event names)."""
    try:
        fd = os.open(str(Path(sdir) / "audit.jsonl"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        with open(fd, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(dict(fields, event=event, version=VERSION, timestampMs=now_ms())) + "\n")
    except OSError:
        pass


# ----------------------------------------------------------------------------------------------------------------
# LLM providers (spec 10 "Start needs an LLM provider"; src/agent/factory.rs build_providers, src/agent/ollama.rs)

DEFAULT_OLLAMA_BASE_URL = "http://localhost:11434"
DEFAULT_OLLAMA_MODEL = "llama3.2"
NO_PROVIDER_MESSAGE = (
    "No LLM provider configured. Configure at least one supported provider before starting Carapace — examples "
    "include setting ANTHROPIC_API_KEY, OPENAI_API_KEY, GOOGLE_API_KEY, %sor VENICE_API_KEY; configuring Ollama; "
    "configuring an authProfile (anthropic.authProfile, google.authProfile, codex.authProfile); or configuring AWS "
    "Bedrock (AWS_REGION + credentials), Vertex AI (VERTEX_PROJECT_ID), or the Claude CLI provider. Other supported "
    "provider configurations may also be valid; see the project documentation for the full list.")


def env_value(name):
    value = (os.environ.get(name) or "").strip()
    return value or None


def cfg_str(cfg, dotted):
    value = cfg_get(cfg, dotted)
    return value.strip() if isinstance(value, str) and value.strip() else None


def configured_provider(cfg):
    """The provider the double routes model calls to: Ollama when configured (the only one it can call), else the
    first other configured provider (present, but unreachable from the double); None when none is configured."""
    ollama_cfg = cfg_get(cfg, "providers.ollama")
    ollama_url = env_value("OLLAMA_BASE_URL") or cfg_str(cfg, "providers.ollama.baseUrl")
    if ollama_url or ollama_cfg is not None:
        url = (ollama_url or DEFAULT_OLLAMA_BASE_URL).rstrip("/")
        if not re.match(r"^https?://", url):
            raise CaraError("invalid Ollama base URL %s: only http and https are supported" % url)
        model = cfg_str(cfg, "agents.defaults.model") or DEFAULT_OLLAMA_MODEL
        return {"name": "ollama", "baseUrl": url, "model": re.sub(r"^ollama[:/]", "", model),
                "apiKey": cfg_str(cfg, "providers.ollama.apiKey")}
    bedrock_on = cfg_get(cfg, "bedrock.enabled") is not False
    candidates = [
        ("anthropic", env_value("ANTHROPIC_API_KEY") or cfg_str(cfg, "anthropic.apiKey")
         or cfg_str(cfg, "anthropic.authProfile")),
        ("openai", env_value("OPENAI_API_KEY") or cfg_str(cfg, "openai.apiKey")),
        ("codex", cfg_str(cfg, "codex.authProfile")),
        ("gemini", env_value("GOOGLE_API_KEY") or cfg_str(cfg, "google.apiKey") or cfg_str(cfg, "google.authProfile")),
        ("venice", env_value("VENICE_API_KEY") or cfg_str(cfg, "venice.apiKey")),
        ("nearai", FLAVOR == "head" and env_value("NEARAI_API_KEY")),
        ("bedrock", bedrock_on and (env_value("AWS_REGION") or env_value("AWS_DEFAULT_REGION") or cfg_str(cfg, "bedrock.region"))
         and (env_value("AWS_ACCESS_KEY_ID") or cfg_str(cfg, "bedrock.accessKeyId"))
         and (env_value("AWS_SECRET_ACCESS_KEY") or cfg_str(cfg, "bedrock.secretAccessKey"))),
        ("vertex", env_value("VERTEX_PROJECT_ID") or cfg_str(cfg, "vertex.projectId")),
        ("claude-cli", cfg_get(cfg, "claudeCli.enabled") is True or env_value("CLAUDE_CLI_ENABLED") in ("1", "true")),
    ]
    for name, present in candidates:
        if present:
            return {"name": name}
    return None


def require_provider(cfg):
    provider = configured_provider(cfg)
    if provider is None:
        raise CaraError(NO_PROVIDER_MESSAGE % ("NEARAI_API_KEY, " if FLAVOR == "head" else ""))
    return provider


class LlmError(Exception):
    """A failed model call (provider down, HTTP error, timeout, unreadable stream)."""


def http_url_request(method, url, body=None, headers=None, timeout=30, head=False):
    """(status, reason, bytes) of one request to an http:// URL; raises OSError when nothing answers."""
    import http.client
    from urllib.parse import urlsplit
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise OSError("unsupported URL scheme in %s" % url)
    conn_class = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    conn = conn_class(parts.hostname, parts.port, timeout=timeout)
    path = (parts.path or "/") + ("?" + parts.query if parts.query else "")
    try:
        conn.request(method, path, body=body, headers=dict(headers or {}))
        resp = conn.getresponse()
        return resp.status, resp.reason, (b"" if head else resp.read())
    except http.client.HTTPException as exc:
        raise OSError(str(exc) or type(exc).__name__)
    finally:
        conn.close()


def chat_completion(provider, messages, timeout):
    """One model call the way cara's Ollama provider makes it: POST {base}/v1/chat/completions, stream: true,
    OpenAI SSE chunks. Returns (text, usage)."""
    if provider["name"] != "ollama":
        raise LlmError("the %s provider is configured, but the cara double can only call an Ollama-compatible "
                       "provider (providers.ollama.baseUrl / OLLAMA_BASE_URL)" % provider["name"])
    url = provider["baseUrl"] + "/v1/chat/completions"
    body = {"model": provider["model"], "messages": messages, "stream": True,
            "stream_options": {"include_usage": True}}
    headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
    if provider.get("apiKey"):
        headers["Authorization"] = "Bearer %s" % provider["apiKey"]
    try:
        status, reason, data = http_url_request("POST", url, json.dumps(body).encode(), headers, timeout)
    except socket.timeout:
        raise LlmError("Ollama request to %s timed out after %ss" % (url, timeout))
    except OSError as exc:
        raise LlmError("Ollama request to %s failed: %s" % (url, describe_os_error(exc)))
    if status != 200:
        raise LlmError("Ollama API returned HTTP %d %s: %s" % (status, reason, data.decode("utf-8", "replace")[:200]))
    text, usage = [], {}
    try:
        lines = data.decode("utf-8").splitlines()
        if not any(line.startswith("data:") for line in lines):  # a non-streaming JSON answer
            answer = json.loads(data)
            return answer["choices"][0]["message"]["content"], answer.get("usage") or {}
        for line in lines:
            if not line.startswith("data:"):
                continue
            payload = line[5:].strip()
            if payload == "[DONE]":
                break
            chunk = json.loads(payload)
            for choice in chunk.get("choices") or []:
                text.append((choice.get("delta") or {}).get("content") or "")
            usage = chunk.get("usage") or usage
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise LlmError("unreadable response from Ollama: %s" % exc)
    return "".join(text), usage


def ollama_connectivity_check(provider, logger):
    """Best-effort GET {base}/api/tags at startup, logged, never fatal (src/agent/factory.rs)."""
    try:
        status, _reason, data = http_url_request("GET", provider["baseUrl"] + "/api/tags", timeout=10)
        if status != 200:
            raise OSError("Ollama /api/tags returned %d" % status)
        models = [m.get("name") for m in json.loads(data).get("models") or []]
        logger.info("Ollama connected, available models: %s" % ", ".join(models) if models
                    else "Ollama connected (no models pulled yet)")
    except (OSError, ValueError, AttributeError) as exc:
        logger.warn("Ollama connectivity check failed: %s (provider will remain configured, requests may fail until "
                    "Ollama is reachable)" % exc)


# ----------------------------------------------------------------------------------------------------------------
# Startup auto-resume of updates/transaction.json (spec 3.3-3.6, 10)

TX_STATES = ("in_progress", "applied", "failed")
TX_PHASES = ("created", "downloading", "downloaded", "verified", "applying", "applied", "failed")
TX_FIELDS = (("id", "string"), ("version", "string"), ("assetName", "string"), ("state", "UpdateTransactionState"),
             ("attempt", "u32"), ("maxAttempts", "u32"), ("startedAtMs", "u64"), ("updatedAtMs", "u64"),
             ("stagedPath", "string?"), ("bundlePath", "string?"), ("sha256", "string?"), ("lastError", "string?"),
             ("phase", "UpdatePhase"), ("retryable", "bool"))
RESUME_BACKOFF_S = {0: 5, 1: 5, 2: 15}
RESUME_BACKOFF_LONG_S = 45
DEFAULT_GITHUB_REPO = "puremachinery/carapace"
SUMS_NAME = "SHA256SUMS.txt"


class UpdateError(Exception):
    def __init__(self, phase, message, retryable):
        super().__init__(message)
        self.phase = phase
        self.retryable = retryable


def retryable(phase, message):
    return UpdateError(phase, message, True)


def terminal(phase, message):
    return UpdateError(phase, message, False)


def expected_asset_name():
    os_name, arch = platform_pair()
    os_name = {"macos": "darwin"}.get(os_name, os_name)
    return "cara-%s-%s%s" % (arch, os_name, ".exe" if os_name == "windows" else "")


def sanitize_version(version):
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", version)
    return safe or "unknown"


class TransactionFile:
    """updates/transaction.json as each flavor reads and writes it.
    v0.8.0: strict serde (unknown state/phase or a missing field = the file does not parse), unknown keys dropped
    on every write, no validation. HEAD: unknown state/phase read as "failed", load-time validation, unknown keys
    and applyConfirmedUntilMs kept."""

    def __init__(self, sdir):
        self.sdir = Path(sdir)
        self.path = self.sdir / "updates" / "transaction.json"

    def load(self):
        if not self.path.exists():
            return None
        try:
            text = self.path.read_bytes()[:65536].decode("utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise retryable(None, "failed to read update transaction '%s': %s" % (self.path, exc))
        codec = QueueCodec()
        try:
            data = serde_json_loads(text)
            if not isinstance(data, dict):
                raise SerdeError("invalid type: %s, expected struct UpdateTransaction at line 1 column 1"
                                 % serde_unexpected(data))
            if FLAVOR == "head":
                data = dict(data)
                for key, variants in (("state", TX_STATES), ("phase", TX_PHASES)):
                    if isinstance(data.get(key), str) and data[key] not in variants:
                        data[key] = "failed"
            codec.text, codec.seen = text, {}
            tx = codec.struct(data, TX_FIELDS)
            if FLAVOR == "head":
                if data.get("applyConfirmedUntilMs") is not None:
                    codec.locate("applyConfirmedUntilMs")
                    tx["applyConfirmedUntilMs"] = codec.field("applyConfirmedUntilMs", "u64", data["applyConfirmedUntilMs"])
                tx["_extra"] = {k: v for k, v in data.items() if k not in tx and k != "applyConfirmedUntilMs"}
        except SerdeError as exc:
            raise terminal(None, "failed to parse update transaction '%s': %s" % (self.path, exc))
        if FLAVOR == "head":
            self.validate(tx)
        return tx

    def validate(self, tx):
        problems = []
        if not tx["version"] or sanitize_version(tx["version"]) != tx["version"]:
            problems.append("version %r is not path-safe" % tx["version"])
        if tx["assetName"] != expected_asset_name():
            problems.append("assetName %r does not match this platform (%s)" % (tx["assetName"], expected_asset_name()))
        for key, suffix in (("stagedPath", ""), ("bundlePath", ".bundle")):
            wanted = str(self.sdir / "updates" / ("cara-%s%s" % (sanitize_version(tx["version"]), suffix)))
            if tx[key] is not None and tx[key] != wanted:
                problems.append("%s must be %s" % (key, wanted))
        if tx["sha256"] is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", tx["sha256"]):
            problems.append("sha256 is not 64 hex characters")
        if tx["maxAttempts"] < 1 or tx["attempt"] > tx["maxAttempts"]:
            problems.append("attempt %d / maxAttempts %d out of range" % (tx["attempt"], tx["maxAttempts"]))
        if tx["updatedAtMs"] < tx["startedAtMs"]:
            problems.append("updatedAtMs is before startedAtMs")
        if problems:
            raise terminal(None, "invalid update transaction '%s': %s" % (self.path, "; ".join(problems)))

    def persist(self, tx):
        data = {key: tx[key] for key, _kind in TX_FIELDS}
        if FLAVOR == "head":
            if tx.get("applyConfirmedUntilMs") is not None:
                data["applyConfirmedUntilMs"] = tx["applyConfirmedUntilMs"]
            data.update(tx.get("_extra") or {})
            return write_text_atomic(self.path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")
        tmp = Path(str(self.path) + ".tmp")  # v0.8.0: File::create(<path>.tmp), sync, rename (umask mode)
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.path)
        return None

    def clear(self):
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


def resume_pending(tx):
    if tx["state"] == "in_progress":
        return True
    return tx["state"] == "failed" and tx["retryable"] and tx["attempt"] < tx["maxAttempts"]


class UpdateResumer:
    """`spawn_update_resume_task` + `auto_resume_with_backoff`: 1 s after start, once per start, resume a pending
    transaction with apply = true and automatic confirmation. "GitHub" is the base URL in the test-only variable
    CARA_DOUBLE_GITHUB_URL (the release server's layout); unset, every fetch fails like an unreachable GitHub."""

    def __init__(self, sdir, logger, stop_event):
        self.sdir = Path(sdir)
        self.log = logger
        self.stop_event = stop_event
        self.file = TransactionFile(sdir)
        self.lock_fd = None

    def start(self):
        threading.Thread(target=self.run, name="update-resume", daemon=True).start()

    def run(self):
        if self.stop_event.wait(1.0):
            return
        try:
            outcome = self.resume_with_backoff()
        except UpdateError as exc:
            self.log.warn("failed to resume pending update transaction", phase=exc.phase, retryable=exc.retryable,
                          error=str(exc))
            audit(self.sdir, "update_resume_failed", phase=exc.phase, retryable=exc.retryable, error=str(exc))
            return
        # a background task never takes the daemon down
        except Exception as exc:  # pylint: disable=broad-except
            self.log.error("update resume task crashed", error="%s: %s" % (type(exc).__name__, exc))
            return
        if outcome:
            self.log.info("resumed pending update transaction", version=outcome["version"],
                          staged_path=outcome["stagedPath"], applied=outcome["applied"])
            audit(self.sdir, "update_resume_applied", targetVersion=outcome["version"], attempt=outcome["attempt"])

    def resume_with_backoff(self):
        while not self.stop_event.is_set():
            tx = self.file.load()
            if tx is None or not resume_pending(tx):
                return None
            try:
                return self.install_or_resume(tx)
            except UpdateError as exc:
                if not exc.retryable:
                    raise
                tx = self.file.load()
                if tx is None:
                    return None
                if tx["state"] == "failed" and tx["attempt"] >= tx["maxAttempts"]:
                    raise terminal(exc.phase, "%s (retry budget exhausted at attempt %d/%d)"
                                   % (exc, tx["attempt"], tx["maxAttempts"]))
                if not resume_pending(tx):
                    return None
                backoff = RESUME_BACKOFF_S.get(tx["attempt"], RESUME_BACKOFF_LONG_S)
                self.log.info("update resume will retry", attempt=tx["attempt"], backoff_seconds=backoff, error=str(exc))
                if self.stop_event.wait(backoff):
                    return None
        return None

    # -- one install/resume run (install_with_existing_transaction + run_transaction_once) --------------------
    def install_or_resume(self, tx):
        self.acquire_update_lock()
        try:
            self.log.info("resuming existing update transaction", transaction_id=tx["id"], phase=tx["phase"],
                          state=tx["state"], attempt=tx["attempt"], max_attempts=tx["maxAttempts"])
            if FLAVOR == "head" and not self.confirmed(tx):
                error = self.stale(tx)
                self.record_failure(tx, error)
                raise error
            tx["updatedAtMs"] = now_ms()
            self.file.persist(tx)
            try:
                return self.run_once(tx)
            except UpdateError as exc:
                self.record_failure(tx, exc)
                raise
        finally:
            self.release_update_lock()

    def acquire_update_lock(self):
        """HEAD: flock on updates/update.lock.lock; v0.8.0: an in-process mutex only (nothing to do here)."""
        if FLAVOR != "head":
            return
        path = self.sdir / "updates" / "update.lock.lock"
        fd = os.open(str(path), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise retryable(None, "update transaction lock at '%s' is already held by another process" % path)
        self.lock_fd = fd

    def release_update_lock(self):
        if self.lock_fd is not None:
            os.close(self.lock_fd)
            self.lock_fd = None

    @staticmethod
    def confirmed(tx):
        deadline = tx.get("applyConfirmedUntilMs")
        return deadline is not None and deadline >= now_ms()

    @staticmethod
    def stale(tx):
        return terminal(tx["phase"], "stale update transaction %s requires fresh operator confirmation before applying; "
                                     "rerun `cara update` to resume intentionally" % tx["id"])

    def transition(self, tx, phase, state="in_progress", last_error=None, can_retry=True):
        tx.update(phase=phase, state=state, lastError=last_error, retryable=can_retry, updatedAtMs=now_ms())
        self.file.persist(tx)

    def record_failure(self, tx, error):
        self.transition(tx, "failed", "failed", str(error), error.retryable)

    def run_once(self, tx):
        if tx["attempt"] >= tx["maxAttempts"]:
            raise terminal("failed", "update transaction retry budget exhausted (%d/%d)" % (tx["attempt"], tx["maxAttempts"]))
        tx["attempt"] += 1
        tx["updatedAtMs"] = now_ms()
        self.file.persist(tx)
        base, found = self.fetch_release_info(tx)
        asset = tx["assetName"]
        self.transition(tx, "downloading")
        binary = self.download(base + "/" + asset)
        bundle = self.download(base + "/" + asset + ".bundle")
        version = sanitize_version(tx["version"])
        staged = self.sdir / "updates" / ("cara-%s" % version)
        bundle_path = self.sdir / "updates" / ("cara-%s.bundle" % version)
        try:
            if FLAVOR == "head" and os.path.lexists(staged):
                os.unlink(staged)
            with open(staged, "wb") as handle:
                handle.write(binary)
                handle.flush()
                os.fsync(handle.fileno())
            bundle_path.write_bytes(bundle)
            os.chmod(staged, 0o755)
        except OSError as exc:
            raise retryable("downloading", "failed to write staged file '%s': %s" % (staged, exc))
        tx.update(stagedPath=str(staged), bundlePath=str(bundle_path), sha256=hashlib.sha256(binary).hexdigest())
        self.transition(tx, "downloaded")
        self.verify(tx, base, binary, bundle, found)
        self.transition(tx, "verified")
        if FLAVOR == "head" and not self.confirmed(tx):
            raise self.stale(tx)
        self.transition(tx, "applying")
        if file_sha256(staged) != tx["sha256"]:
            raise terminal("applying", "staged artifact changed after verification")
        self.apply(staged, tx)
        self.transition(tx, "applied", "applied", None, False)
        self.file.clear()
        if FLAVOR != "head":
            cleanup_old_binaries(self.sdir, self.log)
        return {"version": tx["version"], "stagedPath": str(staged), "applied": True, "attempt": tx["attempt"]}

    def fetch_release_info(self, tx):
        """Stands in for GET api.github.com/repos/<repo>/releases/tags/v<version>: HEAD requests on the release's
        asset, bundle and SHA256SUMS.txt under CARA_DOUBLE_GITHUB_URL. Returns (download base URL, names found)."""
        repo = env_value("CARA_DOUBLE_GITHUB_REPO") or DEFAULT_GITHUB_REPO
        tag = "v" + tx["version"]
        api = "https://api.github.com/repos/%s/releases/tags/%s" % (repo, tag)
        github = env_value("CARA_DOUBLE_GITHUB_URL")
        if not github:
            raise retryable(None, "failed to fetch release info: error sending request for url (%s)" % api)
        base = "%s/%s/releases/download/%s" % (github.rstrip("/"), repo, tag)
        asset = tx["assetName"]
        names = (asset, asset + ".bundle", SUMS_NAME)
        found = {}
        for name in names:
            try:
                found[name] = http_url_request("HEAD", base + "/" + name, timeout=15, head=True)[0]
            except OSError as exc:
                raise retryable(None, "failed to fetch release info: error sending request for url (%s): %s"
                                % (api, describe_os_error(exc)))
        for status in found.values():
            if status == 429 or status >= 500:
                why = "rate limited" if status == 429 else "unexpected response"
                raise retryable(None, "GitHub API returned HTTP %d (%s)" % (status, why))
        present = [n for n in names if 200 <= found[n] < 300]
        if not present:
            raise terminal(None, "GitHub API returned HTTP 404 Not Found (release not found)")
        for name in names[:2]:
            if name not in present:
                raise terminal("downloading", "no matching asset '%s' in release %s (available: %s)"
                               % (name, tag, ", ".join(present)))
        return base, present

    def download(self, url):
        try:
            status, reason, data = http_url_request("GET", url, timeout=300)
        except OSError as exc:
            raise retryable("downloading", "failed to download artifact: %s" % describe_os_error(exc))
        if not 200 <= status < 300:
            raise retryable("downloading", "artifact download returned status %d %s" % (status, reason))
        if not data:
            raise terminal("downloading", "downloaded artifact is empty")
        return data

    def verify(self, tx, base, binary, bundle, found):
        """The double cannot verify Sigstore bundles: it only requires the bundle to be JSON. Then the optional
        SHA256SUMS.txt check, as cara does it."""
        try:
            json.loads(bundle)
        except ValueError as exc:
            raise terminal("verified", "bundle parse failed: %s" % exc)
        if SUMS_NAME not in found:
            return
        try:
            sums = self.download(base + "/" + SUMS_NAME).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise terminal("verified", "checksum file is not UTF-8 text: %s" % exc)
        actual = hashlib.sha256(binary).hexdigest()
        for line in sums.splitlines():
            parts = line.split()
            if len(parts) >= 2 and os.path.basename(parts[1].lstrip("*")) == tx["assetName"]:
                expected = parts[0].lower()
                if not re.fullmatch(r"[0-9a-f]{64}", expected):
                    raise terminal("verified", "checksum file does not contain a valid SHA-256 hash: '%s'" % parts[0])
                if expected != actual:
                    raise terminal("verified", "SHA-256 mismatch: expected %s, got %s" % (expected, actual))
                return
        self.log.warn("checksum file present but no matching entry for update asset", asset_name=tx["assetName"])

    def apply(self, staged, tx):
        """Unix apply (spec 3.5): rename the running exe to <exe>.bak, copy the staged bytes to <exe>, chmod 0755.
        v0.8.0 then deletes the .bak; HEAD keeps it and writes updates/rollback.json (startupState pending)."""
        try:
            meta = os.lstat(staged)
        except OSError as exc:
            raise terminal("applying", "staged binary not found at '%s': %s" % (staged, exc))
        if meta.st_size == 0:
            raise terminal("applying", "staged binary at '%s' is empty" % staged)
        current = exe_path()
        backup = Path(str(current) + ".bak")
        backup_sha = file_sha256(current) if current.is_file() else None
        try:
            os.rename(current, backup)
        except OSError as exc:
            raise terminal("applying", "failed to rename current binary to '%s': %s" % (backup, exc))
        try:
            shutil.copyfile(staged, current)
        except OSError as copy_err:
            try:
                os.rename(backup, current)
            except OSError as restore_err:
                raise terminal("applying", "CRITICAL: copy failed (%s) AND restore failed (%s). Backup path (if "
                                           "present): %s" % (copy_err, restore_err, backup))
            raise terminal("applying", "failed to copy staged binary to current path: %s" % copy_err)
        os.chmod(current, 0o755)
        if FLAVOR != "head":
            try:
                backup.unlink()
            except OSError as exc:
                self.log.warn("failed to remove backup file", path=str(backup), error=str(exc))
            return
        marker = {"binaryPath": str(current), "backupPath": str(backup), "sha256": tx["sha256"],
                  "backupSha256": backup_sha, "appliedAtMs": now_ms(), "startupState": "pending"}
        try:
            write_json_atomic(self.sdir / "updates" / "rollback.json", marker)
        except OSError as exc:
            raise terminal("applying", "failed to persist update rollback marker: %s" % exc)


def write_start_log(sdir, embedded):
    """Test-only observability: CARA_DOUBLE_START_LOG names a file that gets one JSON line per start, with the
    transaction.json seen before the resume task runs."""
    target = os.environ.get("CARA_DOUBLE_START_LOG")
    if not target:
        return
    path = Path(sdir) / "updates" / "transaction.json"
    try:
        transaction = json.loads(path.read_text(encoding="utf-8")) if path.exists() else None
    except (OSError, ValueError):
        transaction = {"unparseable": True}
    line = {"pid": os.getpid(), "version": VERSION, "flavor": FLAVOR, "atMs": now_ms(), "exe": str(exe_path()),
            "embedded": embedded, "transaction": transaction}
    with open(target, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(line, sort_keys=True) + "\n")


# ----------------------------------------------------------------------------------------------------------------
# The gateway

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
        self.provider = None
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
        markers.before_bind()                      # HEAD: rollback.json + marker-protected .bak/.old reaping
        self.state = StateStore(self.sdir, self.log)
        self.state.open()                          # cron, then the task queue (a parse failure aborts here)
        if FLAVOR != "head":
            cleanup_old_binaries(self.sdir, self.log)  # v0.8.0: every *.bak/*.old beside the exe, at every start
        self.provider = require_provider(self.cfg)
        if "start_fail_ms" in FAULTS:
            if sleep_unless(self.stop_event, FAULTS["start_fail_ms"] / 1000.0):
                return False
            raise CaraError("failed to build LLM provider: injected start failure (fault start_fail_ms)")
        if self.provider["name"] == "ollama":
            threading.Thread(target=ollama_connectivity_check, args=(self.provider, self.log), daemon=True).start()
        write_start_log(self.sdir, self.host_port is not None)
        UpdateResumer(self.sdir, self.log, self.stop_event).start()
        if FLAVOR == "head":                       # DaemonPidGuard: HEAD only (spec 10)
            self.acquire_daemon_lock()
            self.write_pid()
        if "slow_start_s" in FAULTS:
            self.log.info("slow start: delaying bind", seconds=FAULTS["slow_start_s"])
            if sleep_unless(self.stop_event, FAULTS["slow_start_s"]):
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
        self.log.info("LLM: enabled")

    # -- shutdown --------------------------------------------------------------------------------------------
    def stop(self, delay=0.0):
        """Stop background tasks and the listener, then (fault stop_delay_s) take `delay` seconds for the rest of
        the shutdown (audit drain, server wait) before the pid file and the lock go."""
        self.stop_event.set()
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
        with self.worker_cv:
            self.worker_cv.notify_all()
        if delay > 0:
            self.log.info("shutdown: draining", seconds=delay)
            time.sleep(delay)
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
                    checks={"storageWritable": writable, "llmConfigured": self.provider is not None, "channels": "ok"})
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

    # -- model calls -----------------------------------------------------------------------------------------
    def chat(self, message, timeout=600):
        """One agent reply from the configured provider (the Ollama provider's 600 s request timeout)."""
        text, _usage = chat_completion(self.provider, [{"role": "user", "content": message}], timeout)
        return text.strip()

    # -- tasks -----------------------------------------------------------------------------------------------
    def create_task(self, body):
        stamp = now_ms()
        policy = body.get("policy")
        task = {"id": str(uuid.uuid4()), "state": "queued", "attempts": 0, "nextRunAtMs": None, "lastError": None,
                "payload": body.get("payload", {}), "createdAtMs": stamp, "updatedAtMs": stamp,
                "policy": dict(DEFAULT_TASK_POLICY, **(policy if isinstance(policy, dict) else {})),
                "policyExplicit": isinstance(policy, dict)}
        self.state.put_task(task)
        with self.worker_cv:
            self.worker_cv.notify_all()
        return public_task(task)

    def due_tasks(self):
        now = now_ms()
        return [t for t in self.state.tasks()
                if t.get("state") == "queued" or t.get("state") == "retry_wait" and (t.get("nextRunAtMs") or 0) <= now]

    def task_worker(self):
        """Runs due tasks one by one: attempts += 1, running, then one model call for an agentTurn."""
        while not self.stop_event.is_set() and self.server is not None:
            due = self.due_tasks()
            if not due:
                with self.worker_cv:
                    self.worker_cv.wait(0.25)
                continue
            self.run_task(due[0])

    def run_task(self, task):
        task.update(state="running", attempts=task.get("attempts", 0) + 1, nextRunAtMs=None, updatedAtMs=now_ms())
        self.state.put_task(task)
        payload = task.get("payload") if isinstance(task.get("payload"), dict) else {}
        error = None
        if FAULTS.get("verify_autonomy_fail"):
            error = "agent turn failed (fault verify_autonomy_fail)"
        elif payload.get("kind") == "agentTurn":
            try:
                timeout = (task.get("policy") or {}).get("maxRunTimeoutSeconds") or 600
                self.chat(str(payload.get("message", "")), timeout=timeout)
            except LlmError as exc:
                error = "agent turn failed: %s" % exc
        if self.stop_event.is_set():
            return
        if error is None:
            task.update(state="done", lastError=None)
        elif task["attempts"] >= (task.get("policy") or {}).get("maxAttempts", 1):
            task.update(state="failed", lastError=error)
        else:
            task.update(state="retry_wait", lastError=error, nextRunAtMs=now_ms() + min(60000, 1000 * 2 ** task["attempts"]))
        task["updatedAtMs"] = now_ms()
        self.state.put_task(task)


def public_task(task):
    """A task as /control/tasks reports it: the DurableTask fields, `attempts` always a number."""
    return QueueCodec().serialize(task)


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
            return self.send_json(200, {"tasks": [public_task(t) for t in self.gateway.state.tasks()]})
        match = re.match(r"^/control/tasks/([^/]+)$", path)
        task = self.gateway.state.task(match.group(1)) if match else None
        if task is None:
            return self.send_json(404, {"error": {"code": "not_found", "message": "no such task"}})
        self.send_json(200, public_task(task))

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
        """Stand-in for the WS `chat.send` roundtrip (triggerAgent): one model call through the configured provider,
        recorded as a session and in usage.json. A provider failure answers 502 with the error."""
        if not self.check_auth():
            return
        body = self.read_json() or {}
        message = str(body.get("message", ""))
        try:
            reply = self.gateway.chat(message)
        except LlmError as exc:
            return self.send_json(502, {"ok": False, "error": {"code": "agent_error", "message": str(exc)}})
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


def sleep_unless(event, seconds):
    """Main-thread wait until `event` is set (by the SIGTERM/SIGINT handler) or `seconds` pass (None: for ever);
    True if it was set. Never Event.wait() here: a handler that sets the event while this thread holds the event's
    lock inside wait() deadlocks (a daemon that then ignores SIGTERM). Sleeping in slices and reading is_set(),
    which takes no lock, leaves the handler free to run."""
    deadline = None if seconds is None else time.monotonic() + seconds
    while not event.is_set():
        left = 0.05 if deadline is None else min(0.05, deadline - time.monotonic())
        if left <= 0:
            return False
        time.sleep(left)
    return True


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
            sleep_unless(stop, None)
            log.info("shutdown signal received, stopping gateway")
    except CaraError:
        gateway.stop_event.set()  # background tasks (the resume task) stop with the failed start
        gateway.release()
        raise
    gateway.stop(delay=min(float(FAULTS.get("stop_delay_s", 0)), STOP_DELAY_MAX_S))
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
    except CaraError as exc:  # reported as the error's text, like err.to_string() in cara
        gateway.stop_event.set()
        gateway.release()
        checks.add("FAIL", "Gateway reachability", str(exc),
                   "start the service (`cara start --port %d`) and retry `cara verify --port %d`" % (port, port))
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


LOCAL_CHAT_TIMEOUT_S = 45


def verify_local_chat(cfg, port, checks):
    """`chat.send` with the verify prompt through the gateway (the double's private route), waiting up to 45 s for
    the agent's reply from the configured provider (spec 1.7, 10)."""
    mode, token, password = gateway_credentials(cfg)
    secret = token if mode == "token" else password
    try:
        status, _unused, body = http_request("POST", "127.0.0.1", port, "/__double/chat", LOCAL_CHAT_TIMEOUT_S,
                                             body={"message": VERIFY_PROMPT}, token=secret)
        answer = json.loads(body) if body else {}
    except socket.timeout:
        return checks.add("FAIL", "Local chat roundtrip", "no reply within %ds" % LOCAL_CHAT_TIMEOUT_S,
                          "check that the LLM provider is reachable and answers in time")
    except (OSError, ValueError) as exc:
        return checks.add("FAIL", "Local chat roundtrip", "chat.send failed: %s" % exc,
                          "check that the gateway is running")
    answer = answer if isinstance(answer, dict) else {}
    reply = answer.get("reply") if status == 200 else None
    if reply == "verification-ok":
        return checks.add("PASS", "Local chat roundtrip", "received verification-ok")
    if status in (401, 403):
        detail = "chat.send was refused (HTTP %d)" % status
        hint = "check gateway auth (CARAPACE_GATEWAY_TOKEN or gateway.auth.token)"
    elif status == 200:
        detail = "unexpected reply %s (wanted verification-ok)" % json.dumps(reply)
        hint = "check the configured model"
    else:
        detail = "agent run failed: %s" % ((answer.get("error") or {}).get("message") or "HTTP %s" % status)
        hint = "check the LLM provider (providers.ollama.baseUrl, API keys)"
    checks.add("FAIL", "Local chat roundtrip", detail, hint)


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
        err("Error: %s" % (exc.render() if isinstance(exc, CaraError) else rust_debug(str(exc))))
        return 1
    finally:
        sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
