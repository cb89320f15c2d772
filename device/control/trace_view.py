"""``mgpu trace show --decode`` and ``mgpu trace decode FILE``: trace records in the
driver's words (``device/insight/decode.py``), from a running server or from a JSON
lines file that ``mgpu trace start --jsonl`` saved.

A saved file is input like any other: a line that is not a record (not JSON, not an
object, a field of the wrong type, longer than ``MAX_LINE``) is reported with its line
number on stderr and skipped, the rest is decoded, and the exit status is 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from device.insight import perfetto
from device.insight.decode import Decoder, Line, RecordError
from device.insight.state import Record

MAX_LINE = 1 << 20  # a record is well under 1 KiB; a longer line is not one
ERRORS_SHOWN = 10


def row(line: Line, start: float) -> str:
    record = line.record
    return (
        f"{record['seq']:>8}  +{float(record['ts']) - start:.6f}  {record['instance']}  {line.text}"
    )


def as_json(line: Line) -> dict[str, Any]:
    record = line.record
    return {
        "seq": record["seq"],
        "ts": record["ts"],
        "instance": record["instance"],
        "kind": record["kind"],
        "track": line.track,
        "submission": line.submission,
        "text": line.text,
    }


def decoded_table(records: Iterable[Record]) -> str:
    """The records as decoded lines, the time relative to the first."""
    lines = Decoder().decode_all(records)
    if not lines:
        return "(no records)"
    start = float(lines[0].record["ts"])
    return "\n".join(row(line, start) for line in lines)


def decoded_json(records: Iterable[Record]) -> list[dict[str, Any]]:
    return [as_json(line) for line in Decoder().decode_all(records)]


# ---------------------------------------------------------------------- a saved file


class BadLines:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.count = 0

    def report(self, number: int, reason: str) -> None:
        self.count += 1
        if self.count <= ERRORS_SHOWN:
            print(f"mgpu: {self.path}:{number}: not a trace record: {reason}", file=sys.stderr)


def read_lines(handle: IO[bytes], bad: BadLines) -> Iterator[tuple[int, Record]]:
    """(line number, record) for each line that parses as a JSON object."""
    number = 0
    while True:
        raw = handle.readline(MAX_LINE)
        if not raw:
            return
        number += 1
        if len(raw) == MAX_LINE and not raw.endswith(b"\n"):
            bad.report(number, f"longer than {MAX_LINE} bytes")
            while (rest := handle.readline(MAX_LINE)) and not rest.endswith(b"\n"):
                pass
            continue
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except (ValueError, RecursionError) as exc:
            bad.report(number, f"not JSON ({str(exc)[:80]})")
            continue
        if not isinstance(record, dict):
            bad.report(number, f"a JSON {type(record).__name__}, not an object")
            continue
        yield number, record


def decode_file(args: argparse.Namespace) -> int:
    """``mgpu trace decode FILE [--perfetto OUT] [--json]``."""
    if not args.file:
        print("mgpu: trace decode needs the JSON lines file to read", file=sys.stderr)
        return 2
    path = Path(args.file)
    bad = BadLines(path)
    decoder = Decoder()
    kept: list[Record] = []
    start: float | None = None
    try:
        with open(path, "rb") as handle:
            for number, record in read_lines(handle, bad):
                try:
                    line = decoder.decode(record)
                except RecordError as exc:
                    bad.report(number, str(exc))
                    continue
                if args.perfetto:
                    kept.append(record)
                if start is None:
                    start = float(record["ts"])
                print(json.dumps(as_json(line)) if args.json else row(line, start))
    except OSError as exc:
        print(f"mgpu: cannot read {path}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    if args.perfetto:
        written = perfetto.write(Path(args.perfetto), kept)
        print(f"mgpu: {written} records in {args.perfetto} (open it in ui.perfetto.dev)",
              file=sys.stderr)  # fmt: skip
    if bad.count:
        more = f" ({bad.count - ERRORS_SHOWN} more not shown)" if bad.count > ERRORS_SHOWN else ""
        print(f"mgpu: {bad.count} lines of {path} were skipped{more}", file=sys.stderr)
        return 1
    return 0
