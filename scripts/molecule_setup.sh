#!/usr/bin/env bash
# Prepare this machine for the Molecule scenarios under molecule/ (issue #6; molecule/README.md).
# Idempotent: when everything is in place it only checks, in about a second.
#
#   1. Debian packages (podman driver, as root): rootful podman with runc, netavark + aardvark-dns (DNS on
#      the scenario networks), debootstrap, the ssh client.
#   2. build/molecule/containers.conf: this VM's two podman quirks (ulimits above its hard limits; crun
#      refuses its cgroup v1/v2 hybrid). molecule/molecule.mk exports CONTAINERS_CONF pointing at it.
#   3. Python tooling (molecule, its podman/docker drivers, pytest-testinfra) into the venv, if missing.
#   4. The drivers' collections (containers.podman, community.docker + its dependency, ansible.posix):
#      Galaxy is unreachable, so they are unpacked from the `ansible` package's wheel on PyPI (sha256
#      checked) into build/molecule/collections. Only those four; the venv stays lean.
#   5. build/molecule/ssh: the key Ansible and testinfra use to reach the hosts (mounted into them as
#      root's authorized_keys; never in the image, never committed).
#   6. The host image localhost/carapace-fleet-host:latest, systemd as PID 1 (molecule/image/):
#      podman driver: debootstrap from this machine's own Debian mirror, the rootfs tarball kept under
#      /var/tmp and keyed by the package list and tweaks, so a rebuilt image skips debootstrap; the image
#      is skipped when it exists with the same key. docker driver: `docker build` of molecule/Containerfile.
#
# Environment: MOLECULE_DRIVER (podman | docker, default podman), BIN (venv bin, default .venv/bin),
# MOLECULE_HOST_IMAGE (default localhost/carapace-fleet-host:latest), MOLECULE_IMAGE_CACHE (default
# /var/tmp/carapace-fleet-host), MOLECULE_DEBIAN_MIRROR (default: this machine's apt source),
# FORCE_IMAGE=1 re-imports the image, FORCE_ROOTFS=1 runs debootstrap again.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
DRIVER="${MOLECULE_DRIVER:-podman}"
BIN="${BIN:-.venv/bin}"
[[ "$BIN" = /* ]] || BIN="$ROOT/$BIN"
STATE="$ROOT/build/molecule"
IMAGE="${MOLECULE_HOST_IMAGE:-localhost/carapace-fleet-host:latest}"
CACHE="${MOLECULE_IMAGE_CACHE:-/var/tmp/carapace-fleet-host}"
SUITE=bookworm
IMAGE_DIR="$ROOT/molecule/image"
APT_PACKAGES=(podman runc netavark aardvark-dns iptables debootstrap openssh-client)

# The `ansible` community package for ansible-core 2.19 (requires ansible-core~=2.19.5), its wheel's sha256.
ANSIBLE_WHEEL_VERSION=12.3.0
ANSIBLE_WHEEL_SHA256=cd156f82fa87f7a899212b0efa9f7ca3a24d609212de9f78428a572eb01e5414
DRIVER_COLLECTIONS=(containers/podman community/docker community/library_inventory_filtering_v1 ansible/posix)

log() { printf 'molecule-setup: %s\n' "$*" >&2; }
pip_quiet() { grep -v "^WARNING: Location '" >&2 || true; }  # this machine's pip config names absent mirrors
t0=$SECONDS

case "$DRIVER" in
podman | docker) ;;
*) log "MOLECULE_DRIVER must be podman or docker, not '$DRIVER'"; exit 2 ;;
esac

# ---------------------------------------------------------------------------------------------- 1. packages
if [[ "$DRIVER" == podman ]]; then
    need_apt=()
    for p in "${APT_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || need_apt+=("$p")
    done
    if ((${#need_apt[@]})); then
        [[ $(id -u) == 0 ]] || { log "installing ${need_apt[*]} needs root (rootful podman does too)"; exit 1; }
        log "apt-get install ${need_apt[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq                         # an empty or stale package list finds nothing
        apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
    fi
else
    command -v docker >/dev/null || { log "the docker driver needs the docker CLI and a running engine"; exit 1; }
fi

# ------------------------------------------------------------------------------------------ 2. containers.conf
mkdir -p "$STATE"
conf_new="$STATE/containers.conf.new"
cat >"$conf_new" <<'EOF'
# Written by scripts/molecule_setup.sh; used through CONTAINERS_CONF (molecule/molecule.mk).
[containers]
# podman's default ulimits exceed this VM's hard limits (setrlimit: Operation not permitted).
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]

[engine]
# crun 1.8 refuses the cgroup v1/v2 hybrid host; runc + cgroupfs work.
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
if cmp -s "$conf_new" "$STATE/containers.conf"; then rm -f "$conf_new"; else mv "$conf_new" "$STATE/containers.conf"; fi
export CONTAINERS_CONF="$STATE/containers.conf"

# ------------------------------------------------------------------------------------------ 3. Python tooling
if ! "$BIN/python" -c 'import molecule, molecule_plugins.podman, testinfra' 2>/dev/null; then
    log "pip install -r molecule/requirements.txt"
    "$BIN/python" -m pip install --quiet --disable-pip-version-check -r molecule/requirements.txt \
        -c constraints.txt 2> >(pip_quiet)
fi

# ------------------------------------------------------------------------------------ 4. driver collections
COLL="$STATE/collections"
if [[ "$(cat "$COLL/.ansible-$ANSIBLE_WHEEL_VERSION" 2>/dev/null)" != "$ANSIBLE_WHEEL_SHA256" ]]; then
    log "unpacking ${DRIVER_COLLECTIONS[*]} from ansible==$ANSIBLE_WHEEL_VERSION"
    wheel_dir="$(mktemp -d)"
    trap 'rm -rf "$wheel_dir"' EXIT
    "$BIN/python" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
        -d "$wheel_dir" "ansible==$ANSIBLE_WHEEL_VERSION" 2> >(pip_quiet)
    wheel="$(ls "$wheel_dir"/ansible-"$ANSIBLE_WHEEL_VERSION"-*.whl)"
    echo "$ANSIBLE_WHEEL_SHA256  $wheel" | sha256sum --check --quiet -
    rm -rf "$COLL.tmp" && mkdir -p "$COLL.tmp"
    "$BIN/python" - "$wheel" "$COLL.tmp" "${DRIVER_COLLECTIONS[@]}" <<'EOF'
import sys, zipfile
wheel, dest, wanted = sys.argv[1], sys.argv[2], sys.argv[3:]
prefixes = tuple(f"ansible_collections/{c}/" for c in wanted)
with zipfile.ZipFile(wheel) as z:
    members = [n for n in z.namelist() if n.startswith(prefixes)]
    missing = [p for p in prefixes if not any(m.startswith(p) for m in members)]
    if missing:
        sys.exit(f"not in {wheel}: {missing}")
    z.extractall(dest, members)
EOF
    rm -rf "$COLL" && mv "$COLL.tmp" "$COLL"
    echo "$ANSIBLE_WHEEL_SHA256" >"$COLL/.ansible-$ANSIBLE_WHEEL_VERSION"
    rm -rf "$wheel_dir"
    trap - EXIT
fi

# ------------------------------------------------------------------------------------------------ 5. ssh key
SSH_DIR="$STATE/ssh"
if [[ ! -s "$SSH_DIR/id_ed25519" || ! -s "$SSH_DIR/authorized_keys" ]]; then
    rm -rf "$SSH_DIR" && install -d -m 0700 "$SSH_DIR"
    ssh-keygen -q -t ed25519 -N '' -C carapace-fleet-molecule -f "$SSH_DIR/id_ed25519"
    install -m 0600 "$SSH_DIR/id_ed25519.pub" "$SSH_DIR/authorized_keys"
fi

# -------------------------------------------------------------------------------------------- 6. host image
if [[ "$DRIVER" == docker ]]; then
    if [[ -n "${FORCE_IMAGE:-}" ]] || ! docker image inspect "$IMAGE" >/dev/null 2>&1; then
        log "docker build $IMAGE from molecule/Containerfile"
        docker build -t "$IMAGE" -f molecule/Containerfile molecule
    fi
    log "ready for the docker driver in $((SECONDS - t0)) s"
    exit 0
fi

mapfile -t HOST_PACKAGES < <(sed -e 's/#.*//' -e '/^[[:space:]]*$/d' "$IMAGE_DIR/packages.txt")
# The key changes whenever what goes into the image changes.
KEY="$(cat <(echo "$SUITE ${HOST_PACKAGES[*]}") "$IMAGE_DIR/tweak-rootfs.sh" | sha256sum | cut -c1-16)"
TARBALL="$CACHE/rootfs-$SUITE-$KEY.tar"

have_key="$(podman image inspect --format '{{ index .Labels "carapace.fleet.image-key" }}' "$IMAGE" 2>/dev/null || true)"
if [[ "$have_key" == "$KEY" && -z "${FORCE_IMAGE:-}${FORCE_ROOTFS:-}" ]]; then
    log "image $IMAGE is current (key $KEY); ready in $((SECONDS - t0)) s"
    exit 0
fi

if [[ ! -s "$TARBALL" || -n "${FORCE_ROOTFS:-}" ]]; then
    MIRROR="${MOLECULE_DEBIAN_MIRROR:-$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null \
        | grep -v -- -security | head -n1)}"
    MIRROR="${MIRROR:-$(awk '$1 == "deb" && $2 !~ /security/ { print $2; exit }' /etc/apt/sources.list 2>/dev/null)}"
    MIRROR="${MIRROR:-http://deb.debian.org/debian}"
    mkdir -p "$CACHE"
    rootfs="$(mktemp -d "$CACHE/rootfs.XXXXXX")"
    trap 'rm -rf "$rootfs"' EXIT
    log "debootstrap $SUITE minbase from $MIRROR (about a minute)"
    tb=$SECONDS
    if ! debootstrap --variant=minbase --include="$(IFS=,; echo "${HOST_PACKAGES[*]}")" "$SUITE" "$rootfs" \
        "$MIRROR" >"$CACHE/debootstrap.log" 2>&1; then
        tail -n 30 "$CACHE/debootstrap.log" >&2
        exit 1
    fi
    sh "$IMAGE_DIR/tweak-rootfs.sh" "$rootfs"
    tar --numeric-owner --xattrs -C "$rootfs" -cf "$TARBALL.tmp" .
    mv "$TARBALL.tmp" "$TARBALL"
    find "$CACHE" -maxdepth 1 -name 'rootfs-*.tar' ! -name "${TARBALL##*/}" -delete   # superseded ones
    rm -rf "$rootfs"
    trap - EXIT
    log "rootfs ready in $((SECONDS - tb)) s: $TARBALL ($(du -h "$TARBALL" | cut -f1))"
fi

log "podman import $TARBALL -> $IMAGE"
ti=$SECONDS
old_id="$(podman image inspect --format '{{ .Id }}' "$IMAGE" 2>/dev/null || true)"
podman import --quiet \
    --change 'CMD ["/sbin/init"]' \
    --change 'ENV container=podman' \
    --change 'STOPSIGNAL SIGRTMIN+3' \
    --change "LABEL carapace.fleet.image-key=$KEY" \
    "$TARBALL" "$IMAGE" >/dev/null
# The image this one replaces, now untagged, goes (only that one; a container still using it keeps it).
new_id="$(podman image inspect --format '{{ .Id }}' "$IMAGE")"
[[ -z "$old_id" || "$old_id" == "$new_id" ]] || podman rmi "$old_id" >/dev/null 2>&1 || true
log "image $IMAGE imported in $((SECONDS - ti)) s; ready in $((SECONDS - t0)) s"
