"""fleetctl: build signed releases of the `cara` double, serve them, and lay out a local fleet of hosts.

Run from the repository root with the project venv:

    python tests/support/fleetctl.py releases --out DIR [--tags v0.7.0,v0.8.0,v0.9.0,v0.9.1] [--repo owner/name]
    python tests/support/fleetctl.py serve --root DIR --port P [--host 127.0.0.1]
    python tests/support/fleetctl.py llm --port P [--host 127.0.0.1]
    python tests/support/fleetctl.py fleet --hosts N --dir D [--install TAG --releases DIR] [--repo owner/name]
                                           [--llm-url URL] [--github-url URL]
    python tests/support/fleetctl.py start --dir D [--host NAME]...
    python tests/support/fleetctl.py stop --dir D [--host NAME]...

`releases` writes DIR/trusted_root.json (a fresh private test Sigstore), DIR/releases.json and the release
tree of every tag (see release_factory.py). `serve` serves DIR on 127.0.0.1 as GitHub lays releases out.
`llm` runs the fake Ollama-compatible LLM provider (fake_llm.py) until SIGTERM.
`fleet` creates N hosts under D/hosts/<name>/ (state dir with a JSON5 config and its own port, install root,
active-binary path, backup dir, run dir) and D/inventory.yml for ansible; with --install it installs that release
of the double on every host. Every host's config names an Ollama provider (cara refuses to start without one):
--llm-url (the fake LLM's URL), else Ollama's default http://localhost:11434. --github-url puts
CARA_DOUBLE_GITHUB_URL=<url> (where the double's auto-resume fetches releases) in the hosts'
`cara_service_environment`. `start`/`stop` run the hosts' daemons as background processes (the non-systemd way):
`start` records the pid in <run dir>/cara.pid (v0.8.0 writes no daemon.pid), `stop` signals that pid (else the one
in daemon.pid).
"""

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from release_factory import ASSET_NAMES, DEFAULT_REPO, DEFAULT_TAGS, build_releases, release_dir  # noqa: E402  pylint: disable=wrong-import-position
from release_server import ReleaseServer  # noqa: E402  pylint: disable=wrong-import-position
from sigstore_lab import PrivateSigstore  # noqa: E402  pylint: disable=wrong-import-position

HOST_CONFIG = """\
// carapace.fleet local test host {name}
{{
  gateway: {{
    port: {port},
    bind: "loopback",
    control: {{ enabled: true }},
    auth: {{ mode: "token", token: "{token}" }},
  }},
  providers: {{
    ollama: {{ {ollama} }},
  }},
}}
"""
PID_FILE = "cara.pid"  # in the host's run dir: the pid of the daemon `start` launched


def free_port():
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def host_paths(base, name):
    """The on-disk layout of one local host (mirrors /var/lib/carapace, /opt/carapace, /usr/local/bin/cara)."""
    root = os.path.join(base, "hosts", name)
    return {
        "root": root,
        "state_dir": os.path.join(root, "state"),
        "config_path": os.path.join(root, "state", "carapace.json5"),
        "install_root": os.path.join(root, "opt", "carapace"),
        "bin_path": os.path.join(root, "bin", "cara"),
        "backup_dir": os.path.join(root, "backups"),
        "run_dir": os.path.join(root, "run"),
    }


def make_fleet(base, count, *, install=None, releases=None, repo=DEFAULT_REPO, asset="cara-x86_64-linux",
               llm_url=None, github_url=None):
    """Create `count` hosts under base/hosts and base/inventory.yml; returns {name: host vars}.
    llm_url: the Ollama base URL in every host's config (None: Ollama's default, http://localhost:11434).
    github_url: CARA_DOUBLE_GITHUB_URL in every host's cara_service_environment."""
    hosts = {}
    for i in range(1, count + 1):
        name = "cara-%02d" % i
        paths = host_paths(base, name)
        for key in ("state_dir", "install_root", "backup_dir", "run_dir"):
            os.makedirs(paths[key], mode=0o700 if key == "state_dir" else 0o755, exist_ok=True)
        os.makedirs(os.path.dirname(paths["bin_path"]), exist_ok=True)
        # The OS may hand the same free port out twice over a large fleet: every host needs its own.
        port = free_port()
        while port in {h["port"] for h in hosts.values()}:
            port = free_port()
        with open(paths["config_path"], "w", encoding="utf-8") as f:
            f.write(HOST_CONFIG.format(name=name, port=port, token=secrets.token_hex(16),
                                       ollama='baseUrl: "%s"' % llm_url if llm_url else ""))
        os.chmod(paths["config_path"], 0o600)
        if install:
            install_release(paths, releases, repo, install, asset)
        hosts[name] = dict({k: v for k, v in paths.items() if k != "root"}, port=port, asset=asset,
                           environment={"CARA_DOUBLE_GITHUB_URL": github_url} if github_url else None)
    write_inventory(base, hosts)
    return hosts


def install_release(paths, releases, repo, tag, asset):
    """Install one verified-by-construction release as the active binary (what an operator's first install does)."""
    if not releases:
        raise SystemExit("fleetctl: --install needs --releases DIR (built by `fleetctl releases`)")
    src = os.path.join(release_dir(releases, repo, tag), asset)
    if not os.path.isfile(src):
        raise SystemExit("fleetctl: %s not found; build it with `fleetctl releases --out %s`" % (src, releases))
    target = os.path.join(paths["install_root"], "releases", tag, "cara")
    os.makedirs(os.path.dirname(target), exist_ok=True)
    shutil.copyfile(src, target)
    os.chmod(target, 0o755)
    tmp = paths["bin_path"] + ".fleetctl-tmp"
    if os.path.lexists(tmp):
        os.unlink(tmp)
    os.symlink(target, tmp)
    os.replace(tmp, paths["bin_path"])


def write_inventory(base, hosts):
    """An inventory of local hosts (ansible_connection: local), group cara_fleet. JSON is valid YAML."""
    inventory = {"all": {"children": {"cara_fleet": {"hosts": {
        name: {
            "ansible_connection": "local",
            "ansible_python_interpreter": sys.executable,
            "cara_state_dir": h["state_dir"],
            "cara_config_path": h["config_path"],
            "cara_install_root": h["install_root"],
            "cara_bin_path": h["bin_path"],
            "cara_backup_dir": h["backup_dir"],
            "cara_run_dir": h["run_dir"],
            "cara_port": h["port"],
            "cara_asset": h["asset"],
            "cara_service_manager": "process",
            **({"cara_service_environment": h["environment"]} if h.get("environment") else {}),
        } for name, h in hosts.items()}}}}}
    with open(os.path.join(base, "inventory.yml"), "w", encoding="utf-8") as f:
        f.write("# Local test fleet written by tests/support/fleetctl.py\n")
        json.dump(inventory, f, indent=2, sort_keys=True)
        f.write("\n")


def load_hosts(base):
    with open(os.path.join(base, "inventory.yml"), encoding="utf-8") as f:
        text = "".join(line for line in f if not line.startswith("#"))
    return json.loads(text)["all"]["children"]["cara_fleet"]["hosts"]


def start_host(hv, timeout=30.0):
    """Start one host's daemon in the background, record its pid in <run dir>/cara.pid, wait until it listens."""
    env = dict(os.environ, CARAPACE_STATE_DIR=hv["cara_state_dir"], CARAPACE_CONFIG_PATH=hv["cara_config_path"],
               **(hv.get("cara_service_environment") or {}))
    with open(os.path.join(hv["cara_run_dir"], "cara.log"), "ab") as log:
        proc = subprocess.Popen([hv["cara_bin_path"], "start"], env=env, stdout=log, stderr=log,  # pylint: disable=consider-using-with
                                stdin=subprocess.DEVNULL, start_new_session=True)
    pid_file = os.path.join(hv["cara_run_dir"], PID_FILE)
    with open(pid_file + ".tmp", "w", encoding="utf-8") as f:
        f.write("%d\n" % proc.pid)
    os.replace(pid_file + ".tmp", pid_file)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            os.unlink(pid_file)
            raise SystemExit("fleetctl: %s exited with %s; see %s/cara.log"
                             % (hv["cara_bin_path"], proc.returncode, hv["cara_run_dir"]))
        try:
            with socket.create_connection(("127.0.0.1", hv["cara_port"]), timeout=0.5):
                return proc.pid
        except OSError:
            time.sleep(0.1)
    raise SystemExit("fleetctl: %s did not listen on port %s within %ss" % (hv["cara_bin_path"], hv["cara_port"], timeout))


def _read_pid(path):
    try:
        with open(path, encoding="utf-8") as f:
            pid = int(f.read().strip())
    except (OSError, ValueError):
        return None
    return pid if pid > 1 else None


def stop_host(hv, timeout=30.0):
    """SIGTERM the daemon recorded in <run dir>/cara.pid (else in daemon.pid) and wait for it to go; True if one
    was running. Shutdown may take a while (spec 10: up to ~12 s), hence the 30 s default."""
    pid_file = os.path.join(hv["cara_run_dir"], PID_FILE)
    pid = _read_pid(pid_file) or _read_pid(os.path.join(hv["cara_state_dir"], "daemon.pid"))
    try:
        if pid is None:
            return False
        try:
            os.kill(pid, signal.SIGTERM)
        except OSError:
            return False
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                # a daemon this process started is its child: reap it, or it lingers as a zombie that kill(0) sees
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    return True
            except ChildProcessError:
                pass
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return True
            time.sleep(0.05)
        os.kill(pid, signal.SIGKILL)
        return True
    finally:
        if os.path.exists(pid_file):
            os.unlink(pid_file)


def _selected(base, names):
    hosts = load_hosts(base)
    unknown = set(names or ()) - set(hosts)
    if unknown:
        raise SystemExit("fleetctl: unknown host(s): %s" % ", ".join(sorted(unknown)))
    return {n: h for n, h in hosts.items() if not names or n in names}


def cmd_releases(args):
    tags = [t.strip() for t in args.tags.split(",") if t.strip()]
    manifest = build_releases(PrivateSigstore(), os.path.abspath(args.out), repo=args.repo, tags=tags)
    print("built %d releases of %s in %s (trust root %s)" % (len(tags), args.repo, args.out, manifest["trusted_root"]))
    return 0


def _interrupt(*_args):
    raise KeyboardInterrupt


def cmd_serve(args):
    server = ReleaseServer(args.root, port=args.port, host=args.host)
    signal.signal(signal.SIGTERM, _interrupt)
    print("serving %s at %s" % (os.path.abspath(args.root), server.url), flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


def cmd_llm(args):
    from fake_llm import FakeLLM  # pylint: disable=import-outside-toplevel
    llm = FakeLLM(port=args.port, host=args.host)
    signal.signal(signal.SIGTERM, _interrupt)
    print("fake LLM (Ollama API) at %s" % llm.base_url, flush=True)
    try:
        llm.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


def cmd_fleet(args):
    hosts = make_fleet(os.path.abspath(args.dir), args.hosts, install=args.install, releases=args.releases,
                       repo=args.repo, asset=args.asset, llm_url=args.llm_url, github_url=args.github_url)
    print("created %d hosts in %s (inventory %s)" % (len(hosts), args.dir, os.path.join(args.dir, "inventory.yml")))
    return 0


def cmd_start(args):
    for name, hv in _selected(os.path.abspath(args.dir), args.host).items():
        print("%s: started pid %d on 127.0.0.1:%d" % (name, start_host(hv), hv["cara_port"]))
    return 0


def cmd_stop(args):
    for name, hv in _selected(os.path.abspath(args.dir), args.host).items():
        print("%s: %s" % (name, "stopped" if stop_host(hv) else "not running"))
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(prog="fleetctl", description=__doc__.split("\n", 1)[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("releases", help="build and sign releases of the cara double")
    p.add_argument("--out", required=True)
    p.add_argument("--tags", default=",".join(DEFAULT_TAGS))
    p.add_argument("--repo", default=DEFAULT_REPO)
    p.set_defaults(func=cmd_releases)
    p = sub.add_parser("serve", help="serve a release tree on 127.0.0.1")
    p.add_argument("--root", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser("llm", help="run the fake LLM provider (Ollama API) on 127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.set_defaults(func=cmd_llm)
    p = sub.add_parser("fleet", help="lay out N local hosts and an inventory")
    p.add_argument("--hosts", type=int, required=True)
    p.add_argument("--dir", required=True)
    p.add_argument("--install", help="tag of the release to install on every host")
    p.add_argument("--releases", help="release tree built by `fleetctl releases` (needed with --install)")
    p.add_argument("--repo", default=DEFAULT_REPO)
    p.add_argument("--asset", default="cara-x86_64-linux", choices=ASSET_NAMES)
    p.add_argument("--llm-url", help="Ollama base URL for every host's config (e.g. a `fleetctl llm` server)")
    p.add_argument("--github-url", help="release server URL the double's auto-resume fetches from "
                                        "(CARA_DOUBLE_GITHUB_URL in cara_service_environment)")
    p.set_defaults(func=cmd_fleet)
    for name, func in (("start", cmd_start), ("stop", cmd_stop)):
        p = sub.add_parser(name, help="%s the daemons of the fleet's hosts" % name)
        p.add_argument("--dir", required=True)
        p.add_argument("--host", action="append", help="only this host (repeatable)")
        p.set_defaults(func=func)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
