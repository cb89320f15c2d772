#!/usr/bin/env bash
# The examples/ driver project, run exactly as a user runs it: mgpu installed from this
# checkout (not editable: a wheel, so its package data and its pytest11 entry point are
# what is tested) with the project's requirements into a fresh venv, then pytest from
# the project's own directory, so nothing is imported from the checkout itself.
# scripts/test.sh runs this; MGPU_EXAMPLES_VENV says where the venv goes.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
venv=${MGPU_EXAMPLES_VENV:-$here/build/examples-venv}  # build/ is gitignored
project=$here/examples/hello-driver

echo "==> examples: a fresh venv in $venv with mgpu (a wheel of this checkout)"
rm -rf "$venv"
python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q "$here" -r "$project/requirements.txt"
echo "==> examples: pytest in examples/hello-driver (the installed plugin, 2 workers)"
cd "$project"
"$venv/bin/python" -m pytest -n 2 -ra "$@"
