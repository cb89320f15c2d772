"""What the trace decoder remembers of each instance: the values the driver last wrote
to BAR0, and each ring as the device has it (the size and base latched when it was
enabled, the last tail, the submissions whose commands have not all run)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from device.gpu import abi
from device.gpu.engine.commands import COMMAND_SIZE
from device.gpu.regs import table as regs
from device.gpu.regs.table import ContextRegisters

CONTEXTS = [ContextRegisters.of(n) for n in range(abi.MAX_CONTEXTS)]
RING_OF = {r.offset: r.context for r in regs.REGISTERS if r.context is not None}
Record = Mapping[str, Any]  # a trace record, as device/trace.py writes it
REG = {name: r.offset for name, r in regs.BY_NAME.items()}


@dataclass
class Submission:
    ident: int
    start: int  # ring offset of its first command
    count: int  # commands it queued
    done: int = 0


@dataclass
class Ring:
    size: int | None = None  # latched at enable; None until the decoder sees it
    base: int | None = None
    tail: int | None = None
    enabled: bool | None = None  # None until the decoder sees it enabled or disabled
    submissions: list[Submission] = field(default_factory=list)

    def owner(self, offset: int) -> Submission | None:
        for submission in self.submissions:
            span = submission.count * COMMAND_SIZE
            distance = offset - submission.start
            if self.size:
                distance %= self.size
            if 0 <= distance < span:
                return submission
        return None


@dataclass
class Instance:
    values: dict[int, int] = field(default_factory=dict)  # last value per BAR0 offset
    rings: list[Ring] = field(default_factory=lambda: [Ring() for _ in CONTEXTS])
    submissions: int = 0
    running: Submission | None = None  # the submission of the command now running
    last: Submission | None = None  # the submission of the last command that ran

    def reset(self) -> None:
        """A device reset: registers at their reset values, every ring disabled."""
        self.values.clear()
        self.rings = [Ring(tail=0, enabled=False) for _ in CONTEXTS]
        self.running = self.last = None

    def value64(self, low: str) -> int:
        base = REG[low]
        return self.values.get(base, 0) | self.values.get(base + 4, 0) << 32
