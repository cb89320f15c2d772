"""``python -m device.conformance --socket PATH``: run the suite, print the report.

Exit status: 0 when every check that applies passed, 1 when one failed or could not
run, 2 when the arguments are wrong.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import sys

from device.conformance import CHECKS, LaunchedTarget, SocketTarget, report, run
from device.conformance.suite import Check


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m device.conformance",
        description="Check a vfio-user server against the protocol, good and hostile "
        "requests alike, by its socket path. Only what the server says about its device "
        "is assumed. It reads config space and offset 0 of each readable region, rewrites "
        "the config COMMAND register with its own value, maps DMA memory of its own, fires "
        "an interrupt and resets the device if it offers reset; it writes to no BAR. Run it "
        "against a server no guest is using.",
    )
    parser.add_argument("--socket", required=True, metavar="PATH", help="the server's socket")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument(
        "--timeout", type=float, default=5.0, metavar="S",
        help="seconds to wait for any one reply (default 5)",
    )  # fmt: skip
    parser.add_argument(
        "--launch", metavar="CMD", default=None,
        help="start the server with CMD ({socket} is replaced by PATH), a fresh one for each "
        "check (for servers that serve one client and exit, like libvfio-user's samples; a "
        "server killed by a signal or exiting with an error is reported as a crash)",
    )  # fmt: skip
    parser.add_argument(
        "--check", action="append", default=None, metavar="GLOB",
        help="run only the checks (or messages) matching GLOB; repeatable",
    )  # fmt: skip
    parser.add_argument("--list", action="store_true", help="list the checks and exit")
    parser.add_argument("--verbose", action="store_true", help="show every check's rule")
    return parser


def chosen(patterns: list[str] | None) -> list[Check]:
    if not patterns:
        return list(CHECKS)
    return [
        c for c in CHECKS
        if any(fnmatch.fnmatch(c.name, p) or fnmatch.fnmatch(c.message, p) for p in patterns)
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    checks = chosen(args.check)
    if args.list:
        for c in checks:
            print(f"{c.message:<24} {c.name:<30} {c.kind.value:<8} {c.source.value:<5} {c.doc}")
        return 0
    if not checks:
        print(f"no check matches {', '.join(args.check)} (see --list)", file=sys.stderr)
        return 2
    if args.timeout <= 0:
        print("--timeout must be positive", file=sys.stderr)
        return 2
    target: SocketTarget | LaunchedTarget = (
        LaunchedTarget(args.launch, args.socket, args.timeout)
        if args.launch
        else SocketTarget(args.socket, args.timeout)
    )
    try:
        result = run(target, checks, args.timeout)
    finally:
        target.stop()
    if args.json:
        print(json.dumps(report.to_json(result), indent=2))
    else:
        print(report.text(result, args.verbose))
    return 0 if result.passed else 1


if __name__ == "__main__":
    sys.exit(main())
