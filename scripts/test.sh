#!/usr/bin/env bash
# The whole test suite on a fresh machine: provisions the host (apt packages, the
# .venv), builds the guest runtime (QEMU >= 10.1, guest kernel, initramfs; cached
# outside the repo), then runs the linters and every test, QEMU ones included.
# Then the examples/ driver project through the installed pytest plugin
# (scripts/test_examples.sh; MGPU_SKIP_EXAMPLES=1 leaves it out).
# Extra arguments go to pytest, e.g. scripts/test.sh -k codec
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"

bash scripts/provision_host.sh
py=.venv/bin/python

echo "==> building the guest runtime (cached; first build downloads ~500 MB)"
"$py" -m guest_images build

echo "==> ruff (lint and format)"
"$py" -m ruff check device guest_images tests bench examples
"$py" -m ruff format --check device guest_images tests bench examples
echo "==> mypy"
"$py" -m mypy  # strict, over device, guest_images, tests, bench and examples (pyproject.toml)
echo "==> docs/registers.md is current"
"$py" -m device.docs --check

echo "==> pytest"
"$py" -m pytest -ra "$@"

if [ "${MGPU_SKIP_EXAMPLES:-}" != 1 ]; then
    bash scripts/test_examples.sh
fi
