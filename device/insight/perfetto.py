"""Decoded trace records as a Perfetto timeline (Chrome trace-event JSON).

One process per instance; in it one named track (thread) per register the driver
touched (``reg CTX0_RING_TAIL``), per ring (``ring 0``: its submissions and the
commands they queued, each a slice), the engine (the DMA its commands do), the
bring-up DMA, interrupts, faults and control.  Every event is named by the decoder's
text, and keeps the record's fields as its args.

A command's begin and end records become one complete slice (``X``); so do a
submission's TAIL write and the FENCE interrupt, given a token width so a flow can
bind to them.  Flows (Perfetto's v2 ``bind_id`` with ``flow_in``/``flow_out``) run
from each submission through the commands it queued to the FENCE interrupt that
ended it, so clicking a submit shows where its work went.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from device.insight.decode import Decoder, Line
from device.insight.state import Record

TOKEN_US = 1.0  # the width, in microseconds, of a slice drawn for an instant
FLOW_IDS_PER_INSTANCE = 1_000_000
# A flow runs through a submission's TAIL write, its commands and its FENCE interrupt;
# the DMA each command does is drawn on the engine track, outside the flow.
FLOW_KINDS = ("command", "irq")


class Timeline:
    def __init__(self) -> None:
        self.pids: dict[str, int] = {}
        self.tids: dict[tuple[int, str], int] = {}
        self.events: list[dict[str, Any]] = []
        self.open: dict[tuple[str, str, Any], tuple[Line, dict[str, Any]]] = {}
        self.flows: dict[int, list[dict[str, Any]]] = {}  # flow id -> its slices, in order

    def where(self, line: Line) -> tuple[int, int]:
        instance = str(line.record["instance"])
        pid = self.pids.setdefault(instance, len(self.pids) + 1)
        tid = self.tids.setdefault((pid, line.track), len(self.tids) + 1)
        return pid, tid

    def add(self, line: Line) -> None:
        record = line.record
        pid, tid = self.where(line)
        event: dict[str, Any] = {
            "name": line.text,
            "cat": record["kind"],
            "ts": float(record["ts"]) * 1e6,
            "pid": pid,
            "tid": tid,
            "args": {k: v for k, v in record.items() if k not in ("ts", "instance", "kind", "ph")},
        }
        phase = record.get("ph", "i")
        key = span_key(record)
        if phase == "B":
            self.open[key] = (line, event)
            return
        if phase == "E" and key in self.open:
            self.finish(key, line, event)
            return
        event.update(ph="X", dur=TOKEN_US)
        self.events.append(event)
        if line.submission is not None and (line.submits or record["kind"] in FLOW_KINDS):
            self.link(pid, line.submission, event)

    def finish(self, key: tuple[str, str, Any], end: Line, end_event: dict[str, Any]) -> None:
        begin, event = self.open.pop(key)
        event.update(ph="X", dur=max(end_event["ts"] - event["ts"], TOKEN_US), name=end.text)
        event["args"] = {**event["args"], **end_event["args"]}
        self.events.append(event)
        submission = begin.submission if begin.submission is not None else end.submission
        if submission is not None:
            self.link(event["pid"], submission, event)

    def link(self, pid: int, submission: int, event: dict[str, Any]) -> None:
        self.flows.setdefault(pid * FLOW_IDS_PER_INSTANCE + submission, []).append(event)

    def document(self) -> dict[str, Any]:
        for _, event in self.open.values():  # begun, never ended: drawn to the end
            event["ph"] = "B"
            self.events.append(event)
        self.open.clear()
        for ident, chain in self.flows.items():
            if len(chain) < 2:
                continue
            chain.sort(key=lambda e: e["ts"])
            for index, event in enumerate(chain):
                event["bind_id"] = ident
                event["flow_out"] = index < len(chain) - 1
                event["flow_in"] = index > 0
        meta: list[dict[str, Any]] = [
            {"name": "process_name", "ph": "M", "pid": pid, "tid": 0, "args": {"name": name}}
            for name, pid in self.pids.items()
        ]
        meta += [
            {"name": "thread_name", "ph": "M", "pid": pid, "tid": tid, "args": {"name": track}}
            for (pid, track), tid in self.tids.items()
        ]
        meta += [
            {"name": "thread_sort_index", "ph": "M", "pid": pid, "tid": tid,
             "args": {"sort_index": sort_index(track)}}
            for (pid, track), tid in self.tids.items()
        ]  # fmt: skip
        return {"traceEvents": meta + self.events, "displayTimeUnit": "ns"}


def span_key(record: Record) -> tuple[str, str, Any]:
    """What pairs a begin record with its end: a command by its context and ring
    offset, the bring-up DMA by its instance."""
    where = (record.get("context"), record.get("ring_offset"))
    return str(record["instance"]), str(record["kind"]), where


def sort_index(track: str) -> int:
    """Rings and the engine first, then interrupts and faults, registers last."""
    for rank, prefix in enumerate(("ring", "engine", "bring-up", "interrupts", "faults")):
        if track.startswith(prefix):
            return rank
    return 10


def chrome_trace(records: Iterable[Record]) -> dict[str, Any]:
    """Decode ``records`` and lay them out as a Perfetto timeline."""
    timeline = Timeline()
    for line in Decoder().decode_all(records):
        timeline.add(line)
    return timeline.document()


def write(path: Path, records: Iterable[Record]) -> int:
    """Write the decoded timeline of ``records`` to ``path``; how many records."""
    chosen = list(records)
    path.write_text(json.dumps(chrome_trace(chosen)))
    return len(chosen)
