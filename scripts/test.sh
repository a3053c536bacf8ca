#!/usr/bin/env bash
# Installs everything the test suite needs (Debian packages too, when run as root), then runs
# lint, type checks and the whole suite on each variant. CI runs exactly this (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."

DEBIAN_PACKAGES=(python3-venv nftables tcpdump iproute2 redis-server prometheus tmux socat valgrind)

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    missing=()
    for p in "${DEBIAN_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "== installing Debian packages: ${missing[*]}"
        apt-get update -qq
        # Package scripts must not start system services: tests start their own on loopback.
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
        rm -f /usr/sbin/policy-rc.d
    fi
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e '.[test,bench]'  # bench: tests/bench draw the chart

echo "== ruff"
.venv/bin/ruff check src tests bench
echo "== mypy --strict"
.venv/bin/mypy
# The whole suite three times: as written (portable data path, one worker), then with every
# daemon on splice and with `workers: 2` where a test leaves that to the default (tests/variant.py).
# Every pass runs even after one fails, so one CI run shows all of them.
failed=()
for variant in portable splice workers2; do
    echo "== pytest (CW_TEST_VARIANT=$variant)"
    CW_TEST_VARIANT=$variant .venv/bin/python -m pytest "$@" || failed+=("$variant")
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "== pytest failed on: ${failed[*]}"
    exit 1
fi
