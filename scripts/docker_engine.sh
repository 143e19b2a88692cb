#!/usr/bin/env bash
# Make a Docker engine answer on this machine: the image test (tests/deploy/test_image.py) needs it.
#
# Idempotent; each step is skipped when its result is already there:
#   1. dockerd missing -> apt-get install Debian's docker.io (engine, containerd, runc).
#   2. no buildx plugin -> install Debian's docker-buildx. The image build must use BuildKit: the
#      legacy builder builds every stage before the target, including the train stage and its
#      torch download (several GB). Debian 12 has no docker-buildx package; Debian 13's (a static
#      Go binary needing only libc6 >= 2.34) installs on 12, so it is fetched with apt from a
#      private, temporary trixie source list that leaves the system's apt sources untouched.
#   3. `docker info` fails -> start dockerd without a bridge network (--bridge=none
#      --iptables=false): builds and containers use --network host, so nothing leaves loopback
#      and the host's firewall is not touched. Waits (bounded) until `docker info` answers.
# Runs as root on CI; elsewhere it uses sudo when it has to.
set -euo pipefail

LOG=${BNFOLD_DOCKERD_LOG:-/var/log/bnfold-dockerd.log}
WAIT_S=${BNFOLD_DOCKERD_WAIT_S:-60}
TRIXIE_MIRROR=${BNFOLD_TRIXIE_MIRROR:-http://deb.debian.org/debian}

say() { echo "docker_engine: $*"; }
die() { echo "docker_engine: $*" >&2; exit 1; }

SUDO=""
need_root() {
    [ "$(id -u)" -eq 0 ] && return 0
    command -v sudo >/dev/null 2>&1 || die "run as root (or install sudo) to $1"
    SUDO=sudo
}

install_engine() {
    if command -v dockerd >/dev/null 2>&1; then
        say "dockerd present ($(dockerd --version))"
        return
    fi
    command -v apt-get >/dev/null 2>&1 || die "no dockerd and no apt-get: install a Docker engine"
    need_root "apt-get install docker.io"
    say "installing Debian's docker.io with apt-get"
    $SUDO apt-get update -q
    $SUDO env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -q --no-install-recommends docker.io
    command -v dockerd >/dev/null 2>&1 || die "apt-get finished but dockerd is missing"
}

install_buildx() {
    if docker buildx version >/dev/null 2>&1; then
        say "buildx present ($(docker buildx version))"
        return
    fi
    command -v apt-get >/dev/null 2>&1 || die "no buildx plugin and no apt-get: install docker-buildx"
    need_root "install docker-buildx"
    local dir
    dir=$(mktemp -d)
    mkdir -p "$dir/parts" "$dir/lists/partial" "$dir/cache/archives/partial"
    chmod -R a+rwX "$dir" # apt's download sandbox user must be able to write here
    cat >"$dir/parts/trixie.sources" <<EOF
Types: deb
URIs: $TRIXIE_MIRROR
Suites: trixie
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    local apt_opts=(-o "Dir::Etc::SourceList=/dev/null" -o "Dir::Etc::SourceParts=$dir/parts"
        -o "Dir::State::Lists=$dir/lists" -o "Dir::Cache=$dir/cache"
        -o "Dir::State::status=/dev/null")
    say "installing docker-buildx from Debian trixie (Debian 12 has none)"
    (cd "$dir" && apt-get "${apt_opts[@]}" update -q && apt-get "${apt_opts[@]}" download docker-buildx)
    $SUDO dpkg -i "$dir"/docker-buildx_*.deb
    rm -rf "$dir"
    docker buildx version >/dev/null 2>&1 || die "docker-buildx installed but 'docker buildx' fails"
}

start_daemon() {
    if docker info >/dev/null 2>&1; then
        say "engine answers ($(docker version --format 'client {{.Client.Version}}, server {{.Server.Version}}'))"
        return
    fi
    need_root "start dockerd"
    say "starting dockerd --bridge=none --iptables=false (log: $LOG)"
    # setsid + nohup: the daemon outlives this script and the make that ran it.
    # shellcheck disable=SC2016 # $1 is expanded by the inner shell, which runs as root
    $SUDO sh -c 'exec setsid nohup dockerd --bridge=none --iptables=false >>"$1" 2>&1 </dev/null' \
        sh "$LOG" &
    local waited=0
    until docker info >/dev/null 2>&1; do
        if [ "$waited" -ge "$WAIT_S" ]; then
            echo "docker_engine: dockerd did not answer within ${WAIT_S}s; last lines of $LOG:" >&2
            tail -n 20 "$LOG" >&2 || true
            exit 1
        fi
        sleep 1
        waited=$((waited + 1))
    done
    say "engine answers after ${waited}s ($(docker version --format 'client {{.Client.Version}}, server {{.Server.Version}}'))"
}

install_engine
command -v docker >/dev/null 2>&1 || die "dockerd is installed but no docker CLI is on PATH"
install_buildx
start_daemon
