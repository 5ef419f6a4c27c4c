#!/usr/bin/env bash
# The baseline of B3 and B4: the release policy's runbook as bare commands on one local host, no Ansible.
#   bare_runbook.sh upgrade   stop, `cara backup`, swap the active symlink to $NEW_BINARY, start, the gate's checks
#   bare_runbook.sh rollback  stop, swap back to the previous binary, `cara restore <backup> --force`, start, checks
# The same checks as cara_health: /health answers with the expected version, /health/ready is 200, `cara status`,
# `cara verify --outcome auto`, `cara verify --outcome autonomy`. Prints one JSON object of step timestamps
# (EPOCHREALTIME) on stdout; the benchmark computes the durations.
#
# Environment (from the fleet's inventory): CARA_BIN (active symlink), CARA_STATE_DIR, CARA_CONFIG, CARA_PORT,
# CARA_SERVICE (the service script the role installed), BARE_DIR (this script's backups and notes),
# and for `upgrade`: NEW_BINARY (an installed, verified release binary), NEW_VERSION (e.g. 0.9.0).
set -euo pipefail

export CARAPACE_STATE_DIR="$CARA_STATE_DIR" CARAPACE_CONFIG_PATH="$CARA_CONFIG"
URL="http://127.0.0.1:$CARA_PORT"
mkdir -p "$BARE_DIR"
marks=()
mark() { marks+=("\"$1\": $EPOCHREALTIME"); }

swap() {  # atomic: a new symlink renamed over the active one
    ln -sfn "$1" "$CARA_BIN.bare-tmp"
    mv -T "$CARA_BIN.bare-tmp" "$CARA_BIN"
}

wait_for() {  # bounded poll (30 s at 0.1 s) of a URL whose body must match a pattern
    local url=$1 pattern=$2 i
    for ((i = 0; i < 300; i++)); do
        if curl -sf --max-time 2 "$url" 2>/dev/null | grep -q "$pattern"; then return 0; fi
        sleep 0.1
    done
    echo "bare_runbook: $url never matched $pattern" >&2
    return 1
}

checks() {
    local version=$1
    wait_for "$URL/health" "\"version\": *\"$version\""
    wait_for "$URL/health/ready" '"ready"'
    "$CARA_BIN" status -p "$CARA_PORT" >/dev/null
    "$CARA_BIN" verify --outcome auto -p "$CARA_PORT" >/dev/null
    "$CARA_BIN" verify --outcome autonomy -p "$CARA_PORT" >/dev/null
}

case "${1:-}" in
upgrade)
    readlink "$CARA_BIN" >"$BARE_DIR/previous"
    "$CARA_BIN" --version | awk '{print $2}' >"$BARE_DIR/previous-version"
    backup="$BARE_DIR/backup-$(date -u +%Y%m%dT%H%M%S%N).tar.gz"
    echo "$backup" >"$BARE_DIR/backup"
    mark start
    "$CARA_SERVICE" stop >/dev/null;  mark stopped
    "$CARA_BIN" backup -o "$backup" >/dev/null; mark backed_up
    swap "$NEW_BINARY";               mark switched
    "$CARA_SERVICE" start >/dev/null; mark started
    checks "$NEW_VERSION";            mark gated
    ;;
rollback)
    mark start
    "$CARA_SERVICE" stop >/dev/null;  mark stopped
    swap "$(cat "$BARE_DIR/previous")"; mark switched
    "$CARA_BIN" restore "$(cat "$BARE_DIR/backup")" --force >/dev/null; mark restored
    "$CARA_SERVICE" start >/dev/null; mark started
    checks "$(cat "$BARE_DIR/previous-version")"; mark gated
    ;;
*)
    echo "usage: $0 upgrade|rollback" >&2
    exit 2
    ;;
esac
(IFS=,; echo "{${marks[*]}}")
