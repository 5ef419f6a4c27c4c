#!/usr/bin/env bash
# make demo: the collection's main job on an embedded local fleet, end to end, on this machine only.
#   1. signed releases of the cara test double (v0.7.0 .. faulty v0.9.1) and a private test Sigstore
#   2. a release server on 127.0.0.1, laid out as GitHub serves releases, and a fake Ollama-compatible LLM
#      provider (cara refuses to start without one; `cara verify --outcome auto` makes a model call through it)
#   3. five local hosts (own state dir, port, install root, service script), v0.8.0 installed and running
#   4. ansible-playbook carapace.fleet.upgrade to v0.9.0, canary first, in batches
#   5. ansible-playbook carapace.fleet.rollback_drill with the faulty v0.9.1 on one host: its gate fails, it is
#      rolled back to v0.9.0 with its state restored, and the drill proves it
#   6. ansible-playbook carapace.fleet.rollback on another host: back to v0.8.0 with its pre-upgrade backup
# Reports stay in build/demo/upgrade/, build/demo/drill/ and build/demo/rollback/ (report.html: the run as a picture).
# Every process started here is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
DEMO=build/demo
FLEETCTL="$PY tests/support/fleetctl.py"
export ANSIBLE_COLLECTIONS_PATH="$PWD/.collections" ANSIBLE_HOME="$PWD/$DEMO/.ansible" ANSIBLE_RETRY_FILES_ENABLED=0
export PATH="$PWD/.venv/bin:$PATH"

server_pid=""
llm_pid=""
cleanup() {
    if [ -f "$DEMO/fleet/inventory.yml" ]; then
        # the service scripts the roles installed first (they own their pid files), then fleetctl for the rest
        for script in "$DEMO"/fleet/hosts/*/run/cara-service; do [ -x "$script" ] && "$script" stop >/dev/null 2>&1; done
        $FLEETCTL stop --dir "$DEMO/fleet" >/dev/null 2>&1 || true
    fi
    for pid in "$server_pid" "$llm_pid"; do
        if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
    done
    # nothing the demo started may outlive it (daemons, servers, the provider)
    if left=$(pgrep -af -- "$PWD/$DEMO|tests/support/(fake_llm|fleetctl)\.py" | grep -v pgrep); then
        echo "make demo: processes left running:" >&2; echo "$left" >&2; exit 1
    fi
}
trap cleanup EXIT

step() { printf '\n=== %s\n' "$*"; }

rm -rf "$DEMO"
mkdir -p "$DEMO"
step "Building signed releases of the cara double (private test Sigstore)"
$FLEETCTL releases --out "$DEMO/releases"

port=$($PY -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()')
step "Serving them on http://127.0.0.1:$port"
$FLEETCTL serve --root "$DEMO/releases" --port "$port" > "$DEMO/server.log" 2>&1 &
server_pid=$!
for _ in $(seq 50); do grep -q serving "$DEMO/server.log" 2>/dev/null && break; sleep 0.1; done

llm_port=$($PY -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()')
step "A fake Ollama-compatible LLM provider on http://127.0.0.1:$llm_port"
$PY tests/support/fake_llm.py --port "$llm_port" > "$DEMO/llm.log" 2>&1 &
llm_pid=$!
for _ in $(seq 50); do grep -q "fake LLM" "$DEMO/llm.log" 2>/dev/null && break; sleep 0.1; done

step "Creating a local fleet of 5 hosts with v0.8.0 installed and running"
# --github-url is the double's stand-in for GitHub: a v0.8.0 that found an open update transaction at start would
# download and apply it from there by itself, as the real one does; the collection must never let that happen.
$FLEETCTL fleet --hosts 5 --dir "$DEMO/fleet" --install v0.8.0 --releases "$DEMO/releases" \
    --llm-url "http://127.0.0.1:$llm_port" --github-url "http://127.0.0.1:$port"
$FLEETCTL start --dir "$DEMO/fleet"

common=(-i "$DEMO/fleet/inventory.yml"
        -e "cara_release_base_url=http://127.0.0.1:$port/{repo}/releases/download/{tag}"
        -e "cara_trusted_root=$PWD/$DEMO/releases/trusted_root.json"
        -e "cara_release_cache_dir=$PWD/$DEMO/cache"
        -e "cara_fleet_lock_path=$PWD/$DEMO/run.lock")

step "Rolling upgrade to v0.9.0 (canary first: batches of 1, 25 %, 100 %)"
ansible-playbook "${common[@]}" carapace.fleet.upgrade \
    -e cara_upgrade_version=v0.9.0 \
    -e "cara_upgrade_release_notes=http://127.0.0.1:$port/puremachinery/carapace/docs/releases/v0.9.0.md" \
    -e cara_upgrade_ack_breaking=v0.9.0 \
    -e "cara_report_dir=$PWD/$DEMO/upgrade"
# link_latest puts the newest run's report.html at the top of the report dir
echo "The run as a picture: file://$PWD/$DEMO/upgrade/report.html"

step "Rollback drill: the faulty v0.9.1 on one host"
ansible-playbook "${common[@]}" carapace.fleet.rollback_drill \
    -e cara_drill_version=v0.9.1 -e cara_upgrade_health_timeout=20 \
    -e "cara_drill_report_dir=$PWD/$DEMO/drill"

step "Rollback of cara-05 to the release before its upgrade (v0.8.0), with its pre-upgrade backup"
ansible-playbook "${common[@]}" carapace.fleet.rollback -l cara-05 -e "cara_report_dir=$PWD/$DEMO/rollback"

step "Fleet report: upgrade ($DEMO/upgrade/report.md)"
cat "$DEMO/upgrade/report.md"
step "Fleet report: drill ($DEMO/drill/report.md)"
cat "$DEMO/drill/report.md"
step "Fleet report: rollback ($DEMO/rollback/report.md)"
cat "$DEMO/rollback/report.md"
step "Demo finished: reports in $DEMO/upgrade/, $DEMO/drill/ and $DEMO/rollback/"
