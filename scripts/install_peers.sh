#!/usr/bin/env bash
# Install the peer model servers that `make bench` measures beside bnfold, idempotently, each
# into its OWN virtualenv under bench/.peers/<name>/ (ignored by git): their pins (protobuf,
# grpcio, uvloop, fastapi) conflict with the project's and with each other's. Never part of
# `make test` or the serve install.
#   triton   nvidia-pytriton (Triton Inference Server's C++ front end and dynamic batcher;
#            the model runs in its Python backend), onnxruntime
#   kserve   kserve (kserve.Model + ModelServer), onnxruntime
#   mlserver mlserver (custom runtime), onnxruntime; uvloop < 0.22 (its parallel workers fail
#            to start with 0.22)
# Plus the system load generators: wrk (REST) and h2load from nghttp2-client (gRPC).
# A peer that fails to install is reported and left out; the bench prints the reason.
# PEERS="kserve mlserver" limits the set.
set -uo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
ROOT="bench/.peers"
PEERS="${PEERS:-triton kserve mlserver}"
# The peers' interpreter is the project's: the same Python for every server measured.
BASE_PYTHON="$("$VENV/bin/python" -c 'import sys; print(sys.executable)')"
ORT="onnxruntime>=1.20,<2"

status=0
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
if ! command -v wrk >/dev/null 2>&1 || ! command -v h2load >/dev/null 2>&1; then
    echo "install_peers: installing wrk and nghttp2-client (apt)"
    { $SUDO apt-get update -q \
        && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q wrk nghttp2-client; } \
        || { echo "install_peers: apt-get failed: no wrk/h2load" >&2; status=1; }
fi

# name, import check, pip requirements
spec() {
    case "$1" in
        triton) echo "pytriton|nvidia-pytriton==0.7.0 $ORT numpy<3" ;;
        kserve) echo "kserve|kserve==0.21.0 $ORT" ;;
        mlserver) echo "mlserver|mlserver==1.7.1 $ORT uvloop<0.22" ;;
        *) return 1 ;;
    esac
}

mkdir -p "$ROOT"
for name in $PEERS; do
    line="$(spec "$name")" || { echo "install_peers: unknown peer $name" >&2; status=1; continue; }
    module="${line%%|*}"
    read -r -a reqs <<<"${line#*|}"
    dir="$ROOT/$name"
    stamp="$dir/.installed"
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "${reqs[*]}" ] \
        && "$dir/bin/python" -c "import $module" >/dev/null 2>&1; then
        echo "install_peers: $name present ($dir)"
        continue
    fi
    if [ "$name" = triton ]; then
        # Triton's server binary inside the wheel is built against glibc 2.35.
        glibc="$(ldd --version 2>/dev/null | head -1 | grep -oE '[0-9]+\.[0-9]+$')"
        if [ -n "$glibc" ] && [ "$(printf '%s\n2.35\n' "$glibc" | sort -V | head -1)" != 2.35 ]; then
            echo "install_peers: skipping triton: glibc $glibc < 2.35 (tritonserver needs 2.35)" >&2
            echo "this machine has glibc $glibc; the tritonserver binary in nvidia-pytriton needs >= 2.35" \
                >"$ROOT/triton.skipped"
            continue
        fi
        rm -f "$ROOT/triton.skipped"
    fi
    echo "install_peers: installing $name into $dir: ${reqs[*]}"
    [ -x "$dir/bin/python" ] || "$BASE_PYTHON" -m venv "$dir"
    if "$dir/bin/python" -m pip install --disable-pip-version-check -q "${reqs[@]}" \
        >"$dir.install.log" 2>&1; then
        echo "${reqs[*]}" >"$stamp"
    else
        echo "install_peers: $name failed to install; see $dir.install.log" >&2
        tail -5 "$dir.install.log" >&2
        status=1
    fi
done
exit $status
