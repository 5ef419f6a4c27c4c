#!/usr/bin/env bash
# Run a Molecule command on scenarios with their release source up: the signed releases of the cara double and
# the broken ones of fail_closed (molecule/release_lab.py), served by a real HTTP server on 127.0.0.1 for the
# whole run and stopped on exit. Called by molecule/molecule.mk (make molecule, make molecule-destroy).
#
#   scripts/molecule_run.sh COMMAND SCENARIO...      e.g. test upgrade resume; converge rollback_drill
#
# Environment: BIN (venv bin), MOLECULE_DRIVER (podman | docker), and what molecule.mk exports (collections,
# CONTAINERS_CONF, ANSIBLE_HOME). Exports to the scenarios: MOLECULE_RELEASES (the release tree) and
# MOLECULE_RELEASE_URL (where it is served), used by molecule/base.yml; MOLECULE_VENV (the venv, symlinks resolved)
# and MOLECULE_PYTHON_HOME (the Python installation it was made from), which the schedule scenario mounts into its
# host at the same paths to run ansible-playbook there.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
BIN="${BIN:-.venv/bin}"
[[ "$BIN" = /* ]] || BIN="$ROOT/$BIN"
DRIVER="${MOLECULE_DRIVER:-podman}"
COMMAND="${1:?usage: molecule_run.sh COMMAND SCENARIO...}"
shift
STATE="$ROOT/build/molecule"
export MOLECULE_RELEASES="$STATE/releases"
MOLECULE_VENV="$(cd "$BIN/.." && pwd -P)"
python_home="$(sed -n 's/^home *= *//p' "$MOLECULE_VENV/pyvenv.cfg")"
MOLECULE_PYTHON_HOME="$(cd "$python_home/.." && pwd -P)"
# A venv of the system's Python needs no mount (the host image has the same Debian python3); never mount over /usr.
if [[ "$MOLECULE_PYTHON_HOME" == /usr || "$MOLECULE_PYTHON_HOME" == /usr/* ]]; then
    MOLECULE_PYTHON_HOME="$STATE/no-python-home" && mkdir -p "$MOLECULE_PYTHON_HOME"
fi
export MOLECULE_VENV MOLECULE_PYTHON_HOME

server_pid=""
stop_server() {
    if [[ -n "$server_pid" ]]; then kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; fi
}
trap stop_server EXIT

if [[ "$COMMAND" != destroy ]]; then
    "$BIN/python" molecule/release_lab.py --out "$MOLECULE_RELEASES"
    port="$("$BIN/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()')"
    "$BIN/python" tests/support/fleetctl.py serve --root "$MOLECULE_RELEASES" --port "$port" >"$STATE/release-server.log" 2>&1 &
    server_pid=$!
    for _ in $(seq 100); do grep -q serving "$STATE/release-server.log" 2>/dev/null && break; sleep 0.1; done
    grep -q serving "$STATE/release-server.log" || { cat "$STATE/release-server.log" >&2; exit 1; }
    export MOLECULE_RELEASE_URL="http://127.0.0.1:$port"
else
    export MOLECULE_RELEASE_URL=http://127.0.0.1:9
fi

start=$SECONDS
if [[ "$COMMAND" == destroy ]]; then
    for s in "$@"; do
        echo "== molecule destroy -s $s ($DRIVER)"
        "$BIN/molecule" --base-config molecule/base.yml --base-config "molecule/$DRIVER.yml" destroy -s "$s" || true
    done
    exit 0
fi

# Scenarios are independent (own containers, network, run dir) and mostly wait on their hosts (a scenario keeps about
# half a core busy), so MOLECULE_JOBS of them run at once (default 2); each one's output goes to its log, shown
# when it ends. After a failure no further scenario starts.
JOBS="${MOLECULE_JOBS:-2}"
LOGS="$STATE/logs"
mkdir -p "$LOGS"
one() {
    local s="$1" t=$SECONDS rc=0
    "$BIN/molecule" --base-config molecule/base.yml --base-config "molecule/$DRIVER.yml" "$COMMAND" -s "$s" \
        >"$LOGS/$s.log" 2>&1 || rc=$?
    { echo "== molecule $COMMAND -s $s ($DRIVER)"; cat "$LOGS/$s.log"
      if (( rc == 0 )); then echo "== molecule $COMMAND -s $s passed in $((SECONDS - t)) s"
      else echo "== molecule $COMMAND -s $s FAILED (rc $rc) after $((SECONDS - t)) s"; fi; } | flock "$LOGS/.print" cat
    return "$rc"
}
running=()
failed=""
reap() {  # wait for one of the running scenarios to end
    local done_pid="" p keep=()
    wait -n -p done_pid "${running[@]}" || failed=1
    for p in "${running[@]}"; do [[ "$p" == "$done_pid" ]] || keep+=("$p"); done
    running=("${keep[@]}")
}
for s in "$@"; do
    while (( ${#running[@]} >= JOBS )); do reap; done
    [[ -n "$failed" ]] && break
    one "$s" &
    running+=($!)
done
while (( ${#running[@]} > 0 )); do reap; done
if [[ -n "$failed" ]]; then echo "== molecule $COMMAND: a scenario failed" >&2; exit 1; fi
echo "== molecule $COMMAND: $# scenario(s) passed in $((SECONDS - start)) s"
