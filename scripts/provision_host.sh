#!/usr/bin/env bash
# Provision this machine for mgpu, idempotently: the Debian packages the build needs
# (mmdebstrap, gcc and a static libc for guest programs, chromium for the browser
# view's tests) and the project's .venv.
# Works as root on a fresh Debian 12 or 13 machine; re-running skips what is there.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"

say() { printf '==> %s\n' "$*"; }

need=()
command -v mmdebstrap >/dev/null || need+=(mmdebstrap)
command -v gcc >/dev/null || need+=(gcc)
command -v fusermount3 >/dev/null || need+=(fuse3)
[ -e /usr/lib/x86_64-linux-gnu/libc.a ] || need+=(libc6-dev)
command -v chromium >/dev/null || need+=(chromium)  # the web page's tests (headless)
command -v python3 >/dev/null || need+=(python3)
python3 -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)
if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "missing packages: ${need[*]}; run as root or: sudo apt-get install ${need[*]}" >&2
        exit 1
    fi
    say "installing Debian packages: ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${need[@]}"
fi

if [ ! -x .venv/bin/python ]; then
    say "creating .venv"
    python3 -m venv .venv
fi
stamp=.venv/.mgpu-installed
if [ ! -e "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    say "installing mgpu and its test tools into .venv"
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e '.[test]'
    touch "$stamp"
fi
say "host provisioned"
