"""Run the benchmarks: every row of the performance table, against the reference.

    python -m bench --quick      the rows that need no guest, in under a minute
    python -m bench              every row, guest-observed ones included (boots QEMU)

Each row prints its median, p99, the baseline measured in the same run and the ratio
to it, its target (``!`` after it: not met), and its change against
``bench/reference.json`` (the figures of the last accepted change: ratios are
compared where a row has a baseline, medians otherwise); a row more than 30 % worse
is flagged WORSE.  The results go to ``bench/results/bench.json``;
``--update-reference`` makes them the new reference.

The trapped-path rows compare our server with libvfio-user's C gpio sample server
when its path is given: ``--c-server PATH`` or the environment variable
MGPU_BENCH_C_SERVER (build it outside this repository); without it their baseline
is a raw Python echo peer.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench import common
from bench.common import Row

Group = Callable[[argparse.Namespace], list[Row]]


def _trapped(args: argparse.Namespace) -> list[Row]:
    from bench import region_read

    return region_read.rows(args.quick, args.c_server)


def _fault(args: argparse.Namespace) -> list[Row]:
    from bench import fault

    return fault.rows(args.quick)


def _fence(args: argparse.Namespace) -> list[Row]:
    from bench import engine

    return engine.rows(args.quick)


def _scale(args: argparse.Namespace) -> list[Row]:
    from bench import scale

    return scale.rows(args.quick)


def _mmu(args: argparse.Namespace) -> list[Row]:
    from bench import mmu

    return mmu.rows(args.quick)


def _trace(args: argparse.Namespace) -> list[Row]:
    from bench import trace

    return trace.rows(args.quick)


def _guest(args: argparse.Namespace) -> list[Row]:
    from bench import guest

    return guest.rows(args.quick, args.c_server)


# name -> (runs in the quick run too, the group)
GROUPS: dict[str, tuple[bool, Group]] = {
    "trapped": (True, _trapped),
    "fault": (True, _fault),
    "engine": (True, _fence),
    "scale": (True, _scale),
    "mmu": (False, _mmu),
    "trace": (False, _trace),
    "guest": (False, _guest),
}


def parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="only the rows that need no guest")
    parser.add_argument(
        "--only", action="append", choices=sorted(GROUPS), help="run only this group (repeatable)"
    )
    parser.add_argument(
        "--c-server",
        default=os.environ.get("MGPU_BENCH_C_SERVER"),
        help="libvfio-user's gpio sample server binary (default: $MGPU_BENCH_C_SERVER)",
    )
    parser.add_argument("--json", type=Path, default=common.RESULTS / "bench.json")
    parser.add_argument("--reference", type=Path, default=common.REFERENCE)
    parser.add_argument(
        "--update-reference", action="store_true", help="write these figures to the reference"
    )
    return parser.parse_args(argv)


def load_reference(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    rows = data.get("rows", {})
    return rows if isinstance(rows, dict) else {}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    names = args.only or [name for name, (quick, _) in GROUPS.items() if quick or not args.quick]
    reference = load_reference(args.reference)
    rows: list[Row] = []
    failed: list[str] = []
    started = time.monotonic()
    for name in names:
        t = time.monotonic()
        print(f"[bench] {name}...", file=sys.stderr, flush=True)
        try:
            rows += GROUPS[name][1](args)
        except Exception as exc:
            traceback.print_exc()
            failed.append(f"{name}: {type(exc).__name__}: {exc}")
        print(f"[bench] {name}: {time.monotonic() - t:.1f} s", file=sys.stderr, flush=True)
    lines, worse = common.table(rows, reference)
    print("\n".join(lines))
    missed = [row.key for row in rows if row.met() is False]
    results = {
        "quick": args.quick,
        "seconds": round(time.monotonic() - started, 1),
        "c_server": bool(args.c_server),
        "rows": {row.key: row.as_json() for row in rows},
        "failed": failed,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    if args.update_reference:
        merged = dict(reference)
        merged.update(results["rows"])
        args.reference.write_text(json.dumps({"rows": merged}, indent=2, sort_keys=True) + "\n")
    print(
        f"{len(rows)} rows in {results['seconds']} s; targets missed ({len(missed)}): "
        f"{' '.join(missed) or 'none'}"
    )
    print(f"vs ref: + worse, - better; >30% worse ({len(worse)}): {' '.join(worse) or 'none'}")
    for failure in failed:
        print(f"FAILED {failure}")
    print(f"JSON: {args.json}" + ("; reference updated" if args.update_reference else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
