"""Per-instance record of what happened to aperture pages: faults served, denied,
dummy and reported accesses, revocations, writebacks, page-ins and evictions.

Each record has a sequence number (so a reader asks for what came after the last one
it saw), and listeners (tracing, the control plane's events) are told of each record
as it is added, outside the log's lock.  Counters are kept for every kind.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import NamedTuple

RECORDS_KEPT = 4096


class FaultRecord(NamedTuple):  # a NamedTuple: one is made per fault, on the hot path
    seq: int
    time: float  # time.monotonic()
    instance: str
    # served, denied, dummy, reported, revoked, written_back, write_dropped,
    # paged_in, evicted; mounted (length: the page-cache granularity in bytes) and
    # pinned_4k (length: the larger granularity the kernel gave before 4 KiB was pinned)
    kind: str
    offset: int  # aperture offset
    length: int
    write: bool = False  # the access was a write (trapped writes; writebacks)
    device_page: int | None = None  # the first device page involved, if any
    handle: int | None = None  # the resource, if any
    policy: str | None = None  # the denied-access policy that decided, if it did


Listener = Callable[[FaultRecord], None]


class FaultLog:
    def __init__(self, instance: str) -> None:
        self.instance = instance
        self.counters: dict[str, int] = {}
        self.records: deque[FaultRecord] = deque(maxlen=RECORDS_KEPT)
        self.lock = threading.Lock()
        self.listeners: list[Listener] = []
        self._seq = itertools.count(1)

    def add(
        self,
        kind: str,
        offset: int,
        length: int,
        *,
        write: bool = False,
        device_page: int | None = None,
        handle: int | None = None,
        policy: str | None = None,
    ) -> FaultRecord:
        with self.lock:
            record = FaultRecord(
                next(self._seq), time.monotonic(), self.instance, kind, offset, length,
                write, device_page, handle, policy,
            )  # fmt: skip
            self.counters[kind] = self.counters.get(kind, 0) + 1
            self.records.append(record)
        for listener in list(self.listeners):
            listener(record)
        return record

    def count(self, kind: str) -> int:
        return self.counters.get(kind, 0)

    def of(self, kind: str) -> list[FaultRecord]:
        with self.lock:
            return [r for r in self.records if r.kind == kind]

    def since(self, seq: int) -> list[FaultRecord]:
        """The records kept whose sequence number is above ``seq``."""
        with self.lock:
            return [r for r in self.records if r.seq > seq]

    def clear(self) -> None:
        with self.lock:
            self.counters.clear()
            self.records.clear()
