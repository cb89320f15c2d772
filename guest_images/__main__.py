"""``python -m guest_images build`` / ``info --json``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from guest_images.build import BuildError, cache_dir, ensure_runtime


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m guest_images", description="Build or show the cached guest runtime."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("build", help="build what is missing (progress on stderr)")
    info = sub.add_parser("info", help="where the runtime is (builds it if needed)")
    info.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args()

    def progress(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    try:
        runtime = ensure_runtime(progress)
    except BuildError as exc:
        print(f"guest runtime build failed: {exc}", file=sys.stderr)
        return 1
    # Runtime's own fields (paths as strings), plus where the cache is.
    summary = {
        field: str(value) if isinstance(value, Path) else value
        for field, value in dataclasses.asdict(runtime).items()
    }
    summary["cache_dir"] = str(cache_dir())
    if args.command == "info" and args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(
            f"guest runtime ready in {summary['cache_dir']}: QEMU {runtime.qemu_version}, "
            f"kernel {runtime.kernel.name}, initramfs {runtime.initrd.name}",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
