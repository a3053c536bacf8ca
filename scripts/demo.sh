#!/usr/bin/env bash
# Installs connwatch into .venv and runs `connwatch demo`: a built-in upstream, connwatch in front
# of it and a traffic generator, all on 127.0.0.1, with the live connection table.
# Arguments go to the demo, e.g. `bash scripts/demo.sh --duration 30`. Ctrl-C ends it.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}

if ! command -v "$PY" >/dev/null; then
    echo "demo.sh: $PY not found; connwatch needs Python 3.11 or newer" >&2
    exit 1
fi
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "demo.sh: connwatch needs Python 3.11 or newer; $PY is $("$PY" -V 2>&1)" >&2
    exit 1
fi

# Debian and Ubuntu ship venv's pip bootstrap (ensurepip) in a separate package.
if [ ! -x .venv/bin/python ] && ! "$PY" -c 'import ensurepip, venv' 2>/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "== installing python3-venv"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
    else
        echo "demo.sh: '$PY -m venv' is not available; install python3-venv (as root:" \
            "apt-get install python3-venv) and run this again" >&2
        exit 1
    fi
fi

if [ ! -x .venv/bin/python ]; then
    echo "== creating .venv"
    "$PY" -m venv .venv
fi

# Install only when the sources changed since the last install (or none was done): a second run
# starts at once. An editable install (scripts/test.sh makes one) always runs the current sources.
# --no-compile: modules are compiled when first imported instead; the install is seconds faster.
stamp=.venv/.connwatch-demo-installed
sources=$(cat pyproject.toml $(find src -name '*.py' -o -name py.typed | sort) | cksum)
editable() {
    .venv/bin/python - <<'EOF' 2>/dev/null
import json
from importlib.metadata import PackageNotFoundError, distribution

try:
    direct = distribution("connwatch").read_text("direct_url.json")
except PackageNotFoundError:
    direct = None
raise SystemExit(0 if direct and json.loads(direct).get("dir_info", {}).get("editable") else 1)
EOF
}
if [ "$(cat "$stamp" 2>/dev/null)" != "$sources" ] && ! editable; then
    if ! .venv/bin/python -m pip --version >/dev/null 2>&1; then
        echo "== .venv has no pip (an interrupted creation?): creating it again"
        rm -rf .venv
        "$PY" -m venv .venv
    fi
    echo "== installing connwatch into .venv (first run only)"
    # uv resolves and installs in parallel: ~1 s here against ~20 s for pip. Fall back to pip.
    if .venv/bin/python -m pip install -q --disable-pip-version-check uv 2>/dev/null \
        && .venv/bin/uv pip install -q --python .venv/bin/python .; then
        :
    else
        .venv/bin/python -m pip install -q --no-compile --disable-pip-version-check .
    fi
    echo "$sources" > "$stamp"
fi

exec .venv/bin/connwatch demo "$@"
