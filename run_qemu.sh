#!/usr/bin/env bash
# Boot a Linux guest with mgpu GPU instances attached (see --help). Sets everything up
# on first use: Debian packages, the .venv, and the cached guest runtime.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
case "${1:-}" in
    -h|--help) ;;
    *) bash "$here/scripts/provision_host.sh" >&2 ;;
esac
[ -x "$here/.venv/bin/python" ] || bash "$here/scripts/provision_host.sh" >&2
# This checkout's code, whichever directory we are run from.
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
exec "$here/.venv/bin/python" -m device.harness.launch "$@"
