#!/usr/bin/env bash
# Install what `make bench` needs beyond the dev extras, idempotently:
#   - wrk, the compiled HTTP load generator (Debian package), when it is missing;
#   - litserve, the peer server, into the project venv, with torch held at the local CPU build
#     by constraints.txt (litserve itself needs only fastapi, uvicorn and pyzmq).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
LITSERVE_VERSION="${LITSERVE_VERSION:-0.2.19}"

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

if ! command -v wrk >/dev/null 2>&1; then
    echo "install_bench_deps: installing wrk (apt)"
    $SUDO apt-get update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q wrk
fi

if ! "$VENV/bin/python" -c "import litserve" >/dev/null 2>&1; then
    echo "install_bench_deps: installing litserve==$LITSERVE_VERSION into $VENV"
    "$VENV/bin/python" -m pip install --disable-pip-version-check -q \
        -c constraints.txt "litserve==$LITSERVE_VERSION"
fi

version_of() { "$VENV/bin/python" -c "import importlib.metadata as m; print(m.version('$1'))"; }
torch_version="$(version_of torch)"
case "$torch_version" in
    2.13.0*) ;;
    *) echo "install_bench_deps: torch is $torch_version, expected 2.13.0 (constraints.txt)" >&2
       exit 1 ;;
esac
echo "install_bench_deps: wrk $(command -v wrk), litserve $(version_of litserve), torch $torch_version"
