"""``python -m guest_images build`` / ``info --json`` / ``kbuild DIR [TARGET ...]`` /
``debug-symbols``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from guest_images.build import BuildError, cache_dir, ensure_runtime
from guest_images.debug import ensure_vmlinux
from guest_images.kbuild import kbuild


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m guest_images", description="Build or show the cached guest runtime."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("build", help="build what is missing (progress on stderr)")
    info = sub.add_parser("info", help="where the runtime is (builds it if needed)")
    info.add_argument("--json", action="store_true", help="print JSON")
    kb = sub.add_parser(
        "kbuild",
        help="build an out-of-tree kernel module in DIR against the guest kernel's headers",
        description="Run 'make -C <guest kernel headers> M=DIR TARGET...' inside the runtime "
        "root (the guest kernel's headers and compiler, as for our own mgpu.ko). DIR needs a "
        "Kbuild or Makefile (obj-m := name.o); the .ko files land in DIR and their paths are "
        "printed. Load one in the guest with run_qemu.sh --share DIR: insmod /mnt/share/NAME.ko",
    )
    kb.add_argument("directory", type=Path, metavar="DIR", help="the module's source directory")
    kb.add_argument(
        "targets", nargs="*", default=["modules"], metavar="TARGET", help="make targets "
        "(default: modules; e.g. clean)"
    )  # fmt: skip
    sub.add_parser(
        "debug-symbols",
        help="fetch the guest kernel's vmlinux with symbols (for gdb; ~1.2 GB download "
        "once, 410 MB kept) and print its path",
    )
    args = parser.parse_args(argv)

    def progress(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    try:
        if args.command == "kbuild":
            for module in kbuild(args.directory, progress, args.targets):
                print(module)
            return 0
        if args.command == "debug-symbols":
            print(ensure_vmlinux(progress))
            return 0
        runtime = ensure_runtime(progress)
    except BuildError as exc:
        what = {"kbuild": "kbuild", "debug-symbols": "fetching the debug symbols"}.get(
            args.command, "guest runtime build"
        )
        print(f"{what} failed: {exc}", file=sys.stderr)
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
