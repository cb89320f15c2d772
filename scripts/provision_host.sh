#!/usr/bin/env bash
# Provision this machine for mgpu, idempotently: the Debian packages the build needs
# (mmdebstrap, gcc and a static libc for guest programs, gdb for run_qemu.sh --gdb,
# chromium for the browser view's tests), the project's .venv, and the tools the
# README names (mgpu, qmp-shell) on PATH.
# Works as root on a fresh Debian 12 or 13 machine; re-running skips what is there.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"

say() { printf '==> %s\n' "$*"; }

need=()
command -v mmdebstrap >/dev/null || need+=(mmdebstrap)
command -v gcc >/dev/null || need+=(gcc)
command -v fusermount3 >/dev/null || need+=(fuse3)
command -v gdb >/dev/null || need+=(gdb)
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
# mgpu and qmp-shell on PATH: two-line wrappers that run this checkout's .venv, in
# /usr/local/bin as root (else ~/.local/bin).  A wrapper another checkout wrote is
# replaced; a file that is not one of ours is left alone.  A venv of its own (the
# examples/ flow) puts its own bin first on PATH, so it keeps its own mgpu.
bindir=/usr/local/bin
[ "$(id -u)" = 0 ] || bindir=$HOME/.local/bin
mkdir -p "$bindir"
for tool in mgpu qmp-shell; do
    target=$bindir/$tool
    if [ -e "$target" ] && ! grep -q '^# mgpu-wrapper' "$target" 2>/dev/null; then
        echo "note: $target is not mgpu's wrapper; leaving it (this checkout's is $here/.venv/bin/$tool)" >&2
        continue
    fi
    wrapper="#!/bin/sh
# mgpu-wrapper: written by scripts/provision_host.sh of $here
[ -x '$here/.venv/bin/$tool' ] || { echo '$tool: $here is gone; run scripts/provision_host.sh of your checkout' >&2; exit 127; }
exec '$here/.venv/bin/$tool' \"\$@\""
    if [ "$(cat "$target" 2>/dev/null)" != "$wrapper" ]; then
        printf '%s\n' "$wrapper" > "$target.tmp.$$"
        chmod 755 "$target.tmp.$$"
        mv "$target.tmp.$$" "$target"
        say "$tool on PATH: $target (runs $here/.venv/bin/$tool)"
    fi
done
case ":$PATH:" in
    *":$bindir:"*) ;;
    *) echo "note: $bindir is not on your PATH; add it to run mgpu and qmp-shell by name" >&2 ;;
esac
say "host provisioned"
