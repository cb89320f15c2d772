"""Tracing: structured records of what the device does, off by default.

Theory of operation.  ``ENABLED`` is a module-level boolean.  Every hook in the hot
paths is ``if trace.ENABLED: trace.emit(...)``: when tracing is off that is one
global lookup and a branch, which ``bench/trace.py`` measures against a build with
the hooks stubbed out.  ``start()`` sets the filter (instances, kinds) and the sinks
(an in-memory buffer of the last ``BUFFER_RECORDS`` records, and optionally a JSON
lines file), then sets ``ENABLED``; ``stop()`` clears it and closes the file.  A
record that does not pass the filter costs a set lookup.

A record is a flat dict: ``seq``, ``ts`` (seconds, ``time.monotonic()``), ``instance``,
``kind`` (one of ``KINDS``), ``ph`` (``"B"`` a span begins, ``"E"`` it ends, ``"i"`` an
instant) and the kind's own fields.  ``chrome_trace()`` turns records into the Chrome
trace-event JSON that ui.perfetto.dev opens as a timeline: one process per instance,
one thread (track) per engine and per kind of activity.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any

# kind -> (track, what it records).  The single source of truth for the kinds: the
# filter, the control schema (docs/control.md) and the Perfetto tracks come from it.
KINDS: dict[str, tuple[str, str]] = {
    "register": ("registers", "a trapped BAR0/config access: region, offset, size, value"),
    "fault": ("faults", "an aperture page fault: served, denied, dummy or reported"),
    "revoke": ("faults", "aperture pages revoked (unmapped in every process)"),
    "writeback": ("faults", "dirty aperture pages written back, or a write dropped"),
    "page_in": ("faults", "device memory paged in"),
    "evict": ("faults", "device memory evicted"),
    "dma": ("dma", "a guest-memory transfer: engine command or bring-up DMA"),
    "irq": ("interrupts", "an interrupt vector signalled, dropped or delayed"),
    "command": ("engine", "a ring command, start (B) and end (E)"),
    "control": ("control", "a control-plane action: reset, injection, client"),
}
BUFFER_RECORDS = 100_000

ENABLED = False

Record = dict[str, Any]
Listener = Callable[[Record], None]


class _State:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.seq = itertools.count(1)
        self.buffer: deque[Record] = deque(maxlen=BUFFER_RECORDS)
        self.kinds: frozenset[str] | None = None
        self.instances: frozenset[str] | None = None
        self.file: IO[str] | None = None
        self.path: Path | None = None
        self.listeners: list[Listener] = []


_state = _State()


def check_kinds(kinds: Iterable[str]) -> frozenset[str]:
    chosen = frozenset(kinds)
    unknown = sorted(chosen - KINDS.keys())
    if unknown:
        raise ValueError(f"unknown trace kind {unknown[0]!r} (known: {', '.join(KINDS)})")
    return chosen


def start(
    kinds: Iterable[str] | None = None,
    instances: Iterable[str] | None = None,
    jsonl: Path | None = None,
) -> None:
    """Start (or restart with a new filter) tracing; ``None`` means all."""
    global ENABLED
    chosen = check_kinds(kinds) if kinds is not None else None
    handle = open(jsonl, "a") if jsonl is not None else None  # closed by stop()
    with _state.lock:
        if _state.file is not None:
            _state.file.close()
        _state.kinds = chosen
        _state.instances = frozenset(instances) if instances is not None else None
        _state.file, _state.path = handle, jsonl
    ENABLED = True


def stop() -> None:
    global ENABLED
    ENABLED = False
    with _state.lock:
        if _state.file is not None:
            _state.file.close()
        _state.file = _state.path = None


def status() -> dict[str, Any]:
    with _state.lock:
        return {
            "enabled": ENABLED,
            "kinds": sorted(_state.kinds) if _state.kinds is not None else None,
            "instances": sorted(_state.instances) if _state.instances is not None else None,
            "jsonl": str(_state.path) if _state.path is not None else None,
            "buffered": len(_state.buffer),
        }


def emit(instance: str, kind: str, ph: str = "i", **fields: Any) -> None:
    """Record one event (call only under ``if trace.ENABLED``)."""
    if (_state.kinds is not None and kind not in _state.kinds) or (
        _state.instances is not None and instance not in _state.instances
    ):
        return
    record: Record = {"ts": time.monotonic(), "instance": instance, "kind": kind, "ph": ph}
    record.update(fields)
    with _state.lock:
        record["seq"] = next(_state.seq)
        _state.buffer.append(record)
        if _state.file is not None:
            _state.file.write(json.dumps(record) + "\n")
        listeners = list(_state.listeners)
    for listener in listeners:
        listener(record)


def records(since: int = 0, kinds: Iterable[str] | None = None) -> list[Record]:
    """The buffered records after sequence number ``since``, optionally of some kinds."""
    wanted = check_kinds(kinds) if kinds is not None else None
    with _state.lock:
        return [
            r for r in _state.buffer if r["seq"] > since and (wanted is None or r["kind"] in wanted)
        ]


def clear() -> None:
    with _state.lock:
        _state.buffer.clear()


def add_listener(listener: Listener) -> None:
    with _state.lock:
        _state.listeners.append(listener)


def remove_listener(listener: Listener) -> None:
    with _state.lock:
        if listener in _state.listeners:
            _state.listeners.remove(listener)


# ---------------------------------------------------------------------- Perfetto


def _track(record: Record) -> str:
    track = KINDS[record["kind"]][0]
    if record["kind"] == "dma" and "context" in record:
        return "engine"  # a command's DMA is drawn inside the command's span
    if record["kind"] == "dma":
        return "bring-up dma"
    return str(track)


def chrome_trace(items: Iterable[Record]) -> dict[str, Any]:
    """Chrome trace-event JSON (``{"traceEvents": [...]}``) for ui.perfetto.dev."""
    pids: dict[str, int] = {}
    tids: dict[tuple[int, str], int] = {}
    events: list[dict[str, Any]] = []
    for record in items:
        instance = str(record["instance"])
        pid = pids.setdefault(instance, len(pids) + 1)
        track = _track(record)
        tid = tids.setdefault((pid, track), len(tids) + 1)
        args = {
            k: v for k, v in record.items() if k not in ("ts", "instance", "kind", "ph", "name")
        }
        event: dict[str, Any] = {
            "name": str(record.get("name", record["kind"])),
            "cat": record["kind"],
            "ph": record["ph"],
            "ts": record["ts"] * 1e6,
            "pid": pid,
            "tid": tid,
            "args": args,
        }
        if record["ph"] == "i":
            event["s"] = "t"
        events.append(event)
    meta: list[dict[str, Any]] = [
        {"name": "process_name", "ph": "M", "pid": pid, "tid": 0, "args": {"name": name}}
        for name, pid in pids.items()
    ]
    meta += [
        {"name": "thread_name", "ph": "M", "pid": pid, "tid": tid, "args": {"name": track}}
        for (pid, track), tid in tids.items()
    ]
    return {"traceEvents": meta + events, "displayTimeUnit": "ns"}


def write_chrome_trace(path: Path, items: Iterable[Record] | None = None) -> int:
    """Write the buffered records (or ``items``) as a Perfetto-readable file; the count."""
    chosen = list(items) if items is not None else records()
    path.write_text(json.dumps(chrome_trace(chosen)))
    return len(chosen)
