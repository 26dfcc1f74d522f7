#!/usr/bin/env bash
# Set up cema_ray on a fresh Debian machine with Python 3.11 (as root, or a user with sudo):
#   1. the Fashion-MNIST Debian package, unless /usr/share/datasets/fashion-mnist is there, and Debian's
#      `prometheus` (for "Watch the fleet" and the metrics test), unless a prometheus binary is on PATH;
#   2. a virtual environment in .venv (python3.11, or python3 when it is 3.11 or newer);
#   3. `pip install -e .` into it (torch and torchvision are pinned in pyproject.toml).
# Idempotent: a second run only checks. Quiet, but says what it does; stops at the first failure.
set -euo pipefail
cd "$(dirname "$0")"

say() { printf '[setup] %s\n' "$*"; }
fail() { printf '[setup] error: %s\n' "$*" >&2; exit 1; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@";
    elif command -v sudo >/dev/null 2>&1; then sudo "$@";
    else fail "need root or sudo to run: $*"; fi
}

apt_updated=0
apt_install() {
    if [ "$apt_updated" -eq 0 ]; then as_root apt-get update -qq || fail "apt-get update failed"; apt_updated=1; fi
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null || fail "apt-get install $* failed"
}

FMNIST=/usr/share/datasets/fashion-mnist
if [ -d "$FMNIST" ]; then
    say "Fashion-MNIST present at $FMNIST"
else
    say "installing dataset-fashion-mnist (apt)"
    apt_install dataset-fashion-mnist
    [ -d "$FMNIST" ] || fail "dataset-fashion-mnist installed but $FMNIST is missing"
fi

if command -v prometheus >/dev/null 2>&1; then
    say "prometheus present ($(command -v prometheus))"
else
    say "installing prometheus (apt, without recommends)"
    apt_install --no-install-recommends prometheus
    command -v prometheus >/dev/null 2>&1 || fail "prometheus installed but not on PATH"
fi

pick_python() {
    if command -v python3.11 >/dev/null 2>&1; then echo python3.11; return; fi
    if command -v python3 >/dev/null 2>&1 \
        && python3 -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)'; then
        echo python3; return
    fi
    fail "Python 3.11 or newer not found (install python3.11 and python3.11-venv)"
}

if [ -x .venv/bin/python ]; then
    say "virtual environment .venv present ($(.venv/bin/python --version))"
else
    PY=$(pick_python)
    say "creating .venv with $PY ($($PY --version))"
    if ! "$PY" -m venv .venv >/dev/null 2>&1; then
        rm -rf .venv
        say "installing python3-venv (apt)"
        apt_install python3-venv
        "$PY" -m venv .venv || fail "$PY -m venv failed"
    fi
fi

# Reinstall only when pyproject.toml changed since the last successful install (or the install is broken).
STAMP=.venv/.cema_ray-installed
WANT=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$STAMP" 2>/dev/null)" = "$WANT" ] && [ -x .venv/bin/cema-ray ] \
    && .venv/bin/python -c 'import cema_ray, torch, ray, timm, yaml, safetensors, pyarrow, matplotlib' >/dev/null 2>&1; then
    say "cema_ray and its dependencies already installed"
else
    say "pip install -e . (torch==2.14.1 pinned; the first time takes a few minutes)"
    .venv/bin/python -m pip install -q --progress-bar off -e . || fail "pip install -e . failed"
    echo "$WANT" > "$STAMP"
fi
.venv/bin/python -c 'import torch, cema_ray; print("[setup] ready: torch", torch.__version__, "| cema_ray", cema_ray.__version__)'
