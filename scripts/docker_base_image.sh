#!/usr/bin/env bash
# Build a local stand-in for python:3.11-slim, for machines that reach Debian's and PyPI's
# package mirrors but no image registry. The image test builds the Dockerfile on it with
# --build-arg PYTHON_IMAGE=<this tag>.
#
# Idempotent: does nothing when the tag exists (BNFOLD_BASE_IMAGE, default below).
# The stand-in matches what the Dockerfile relies on in the official image:
#   - Debian 12 (bookworm) minbase with Debian's python3.11, from the mirror apt already uses;
#   - a virtual environment at /usr/local, so `python` and `pip` are /usr/local/bin/* and
#     packages land in /usr/local/lib/python3.11/site-packages (the serve stage copies those);
#   - useradd (Debian's passwd package, part of minbase).
# pip inside the build must reach PyPI the way pip on this host does: the host's CA bundle
# (which may hold a proxy's CA) is copied in, and the host's http(s) index settings are written
# to the stand-in's /etc/pip.conf. Host settings that point at local folders (file:// indexes,
# find-links) are left out: a build cannot see the host's disk.
set -euo pipefail

TAG=${BNFOLD_BASE_IMAGE:-bnfold-base/python:3.11-slim}
SUITE=bookworm

say() { echo "docker_base_image: $*"; }
die() { echo "docker_base_image: $*" >&2; exit 1; }

command -v docker >/dev/null 2>&1 || die "no docker CLI: run scripts/docker_engine.sh first"
docker info >/dev/null 2>&1 || die "the Docker engine does not answer: run scripts/docker_engine.sh"
if docker image inspect "$TAG" >/dev/null 2>&1; then
    say "$TAG already built"
    exit 0
fi
[ "$(id -u)" -eq 0 ] || die "debootstrap needs root: run as root"

if ! command -v debootstrap >/dev/null 2>&1; then
    say "installing debootstrap with apt-get"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends debootstrap
fi

# The first mirror apt is configured with for $SUITE (deb822 .sources, then one-line lists).
debian_mirror() {
    local uri
    uri=$(awk -v suite="$SUITE" '
        /^URIs:/ { uris = $2 }
        /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == suite) hit = 1 }
        /^$/ { if (hit && uris != "") { print uris; exit } hit = 0; uris = "" }
        END { if (hit && uris != "") print uris }
    ' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n 1)
    if [ -z "$uri" ] && [ -f /etc/apt/sources.list ]; then
        uri=$(awk -v suite="$SUITE" '$1 == "deb" && $3 == suite { print $2; exit }' \
            /etc/apt/sources.list)
    fi
    echo "${uri:-http://deb.debian.org/debian}"
}

# The CA bundle pip on this host uses: PIP_CERT, pip's `cert` setting, else the system bundle.
host_ca_bundle() {
    local cert=${PIP_CERT:-}
    if [ -z "$cert" ] && command -v python3 >/dev/null 2>&1; then
        cert=$(python3 -m pip config get global.cert 2>/dev/null || true)
    fi
    [ -f "$cert" ] || cert=/etc/ssl/certs/ca-certificates.crt
    [ -f "$cert" ] || die "no CA bundle found (PIP_CERT, pip config global.cert, $cert)"
    echo "$cert"
}

# One host pip setting, with file:// entries and local paths dropped (the build cannot see them).
host_pip_urls() {
    local env_name=$1 key=$2 value
    value=${!env_name:-}
    if [ -z "$value" ] && command -v python3 >/dev/null 2>&1; then
        value=$(python3 -m pip config get "global.$key" 2>/dev/null || true)
    fi
    local out=() v
    for v in $value; do
        case "$v" in
        http://* | https://*) out+=("$v") ;;
        *) say "leaving out host pip $key $v (a local path the build cannot reach)" >&2 ;;
        esac
    done
    echo "${out[*]:-}"
}

write_pip_conf() {
    local root=$1 index extra
    index=$(host_pip_urls PIP_INDEX_URL index-url)
    extra=$(host_pip_urls PIP_EXTRA_INDEX_URL extra-index-url)
    {
        echo "[global]"
        echo "cert = /etc/ssl/certs/ca-certificates.crt"
        [ -z "$index" ] || echo "index-url = $index"
        [ -z "$extra" ] || echo "extra-index-url = $extra"
    } >"$root/etc/pip.conf"
}

MIRROR=$(debian_mirror)
CA=$(host_ca_bundle)
WORK=$(mktemp -d /var/tmp/bnfold-base.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
ROOT=$WORK/rootfs

# python3-distutils by name: python3.11-venv depends on python3.11-distutils, a virtual package
# that python3-distutils provides, and debootstrap does not resolve virtual packages.
say "debootstrap $SUITE (minbase + python3.11) from $MIRROR"
debootstrap --variant=minbase --include=python3.11,python3.11-venv,python3-distutils "$SUITE" "$ROOT" "$MIRROR" \
    >"$WORK/debootstrap.log" 2>&1 || {
    tail -n 20 "$WORK/debootstrap.log" "$ROOT/debootstrap/debootstrap.log" >&2 || true
    die "debootstrap failed"
}

say "virtual environment at /usr/local (pip layout of the official image)"
chroot "$ROOT" /usr/bin/python3.11 -m venv /usr/local
mkdir -p "$ROOT/etc/ssl/certs"
cp "$CA" "$ROOT/etc/ssl/certs/ca-certificates.crt"
write_pip_conf "$ROOT"
rm -rf "$ROOT"/var/cache/apt/archives/*.deb "$ROOT"/var/lib/apt/lists/* "$ROOT"/var/log/*.log

say "importing as $TAG"
tar -C "$ROOT" --numeric-owner -c . | docker import \
    --change 'ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' \
    --change 'CMD ["python3"]' \
    - "$TAG" >/dev/null
say "$TAG: $(docker run --rm --network none "$TAG" python -c 'import sys; print(sys.version.split()[0], sys.prefix)')," \
    "$(docker image inspect --format '{{.Size}}' "$TAG" | awk '{ printf "%.0f MB", $1 / 1e6 }')"
