#!/usr/bin/env bash
# Install what the browser test (tests/e2e/test_browser.py) needs: Debian's chromium.
#
# Idempotent: does nothing when /usr/bin/chromium is already there. Playwright (from PyPI, in the
# venv) drives this system browser; it never downloads its own, which fails on these machines.
# Runs as root on CI; elsewhere it uses sudo when it has to.
set -euo pipefail

CHROMIUM=/usr/bin/chromium

if [ -x "$CHROMIUM" ]; then
    echo "install_browser: $CHROMIUM already installed ($("$CHROMIUM" --version 2>/dev/null || echo 'version unknown'))"
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_browser: no apt-get here; install Chromium so that $CHROMIUM exists" >&2
    exit 1
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if ! command -v sudo >/dev/null 2>&1; then
        echo "install_browser: run as root (or install sudo) to apt-get install chromium" >&2
        exit 1
    fi
    SUDO=sudo
fi

echo "install_browser: installing Debian chromium with apt-get"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends chromium fonts-dejavu-core

if [ ! -x "$CHROMIUM" ]; then
    echo "install_browser: apt-get finished but $CHROMIUM is missing" >&2
    exit 1
fi
echo "install_browser: $("$CHROMIUM" --version)"
