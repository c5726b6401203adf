#!/usr/bin/env bash
# Prepares a machine for the tests (`python -m pytest -q tests/`), installing only what is missing:
#   - a C++ compiler: the CPU decode kernels (qwen3_jax/csrc) are compiled on first use (tests/test_cpu_kernels.py);
#   - a headless Chromium: tests/test_routing.py opens the routing report's HTML with every image loaded;
#   - node >= 18 and npm, then the npm packages pinned by tests/node/package-lock.json (`ai`,
#     `@ai-sdk/openai-compatible`): tests/test_server.py drives the server with them.
# System packages come from apt-get (as root, or through sudo). The Python packages are the test extra:
#   pip install -e ".[test]"
# Exits 1, naming what is still missing, when something could not be installed.
set -uo pipefail
cd "$(dirname "$0")/.."

say() { echo "setup-test-machine: $*"; }
have() { command -v "$1" >/dev/null 2>&1; }

if [ "$(id -u)" -eq 0 ]; then
  SUDO=()
elif have sudo; then
  SUDO=(sudo)
else
  SUDO=(false)  # not root and no sudo: apt-get cannot run; what is missing is reported below
fi

APT_UPDATED=0
apt_install() {  # apt_install PACKAGE...: the first package that installs wins
  have apt-get || return 1
  if [ "$APT_UPDATED" -eq 0 ]; then
    "${SUDO[@]}" apt-get update -qq >/dev/null 2>&1 || return 1
    APT_UPDATED=1
  fi
  local pkg
  for pkg in "$@"; do
    say "apt-get install $pkg"
    if DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -qq "$pkg" >/dev/null 2>&1; then
      return 0
    fi
  done
  return 1
}

have_chromium() {
  have chromium-headless-shell || have chromium || have chromium-browser || have google-chrome
}

node_major() { node -e 'console.log(process.versions.node.split(".")[0])' 2>/dev/null || echo 0; }

have c++ || have g++ || apt_install g++
have_chromium || apt_install chromium-headless-shell chromium
{ have node && have npm && [ "$(node_major)" -ge 18 ]; } || apt_install nodejs npm

missing=()
have c++ || have g++ || missing+=("a C++ compiler (g++)")
have_chromium || missing+=("a headless Chromium (chromium-headless-shell or chromium)")
if ! have node || ! have npm; then
  missing+=("node and npm")
elif [ "$(node_major)" -lt 18 ]; then
  missing+=("node >= 18 (found $(node --version))")
else
  say "npm ci in tests/node"
  npm ci --prefix tests/node --no-audit --no-fund --loglevel=error >/dev/null \
    || missing+=("the npm packages of tests/node (npm ci failed)")
fi

if [ "${#missing[@]}" -gt 0 ]; then
  for m in "${missing[@]}"; do say "missing: $m"; done
  exit 1
fi
say "ready: $(c++ --version 2>/dev/null | head -1 || g++ --version | head -1); node $(node --version);" \
  "$(command -v chromium-headless-shell || command -v chromium || command -v chromium-browser || command -v google-chrome)"
