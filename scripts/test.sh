#!/usr/bin/env bash
# The whole test suite on a fresh machine: provisions the host (apt packages, the
# .venv), builds the guest runtime (QEMU >= 10.1, guest kernel, initramfs; cached
# outside the repo), then runs the linters and every test, QEMU ones included.
# Extra arguments go to pytest, e.g. scripts/test.sh -k codec
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"

bash scripts/provision_host.sh
py=.venv/bin/python

echo "==> building the guest runtime (cached; first build downloads ~500 MB)"
"$py" -m guest_images build

echo "==> ruff (lint and format)"
"$py" -m ruff check device guest_images tests bench
"$py" -m ruff format --check device guest_images tests bench
echo "==> mypy"
"$py" -m mypy  # strict, over device, guest_images, tests and bench (pyproject.toml)
echo "==> docs/registers.md is current"
"$py" -m device.docs --check

echo "==> pytest"
exec "$py" -m pytest -ra "$@"
