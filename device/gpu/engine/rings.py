"""The command rings of one instance: one ``Ring`` per context.

Theory of operation.  A ring is STOPPED until the driver sets RING_CONTROL.ENABLE.
Enabling checks the base and size the driver wrote and *latches* them: while the
ring is enabled, writes to RING_BASE and RING_SIZE are ignored, so the geometry the
engine works with can never change under a running command (a size of 0 or a
non-power of two written mid-command once divided by zero and spun a worker).
An enabled ring is IDLE, BUSY while the engine runs one of its commands, or ERROR
(halted until disabled and enabled again).  HEAD and TAIL start at 0; the engine
``take``s the command at HEAD and, when it ``complete``s, HEAD advances by one
command.  Every enable, disable and reset bumps the ring's generation; a command
taken under an older generation finishes without touching the ring again.
All methods run under the instance lock.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from device.gpu import abi
from device.gpu.abi import ErrorCode, RingStatus
from device.gpu.engine.commands import COMMAND_SIZE
from device.gpu.regs.file import RegisterFile
from device.gpu.regs.table import ContextRegisters

# (code, context, ring offset) -> ERROR_* registers and the ERROR interrupt
ErrorReporter = Callable[[ErrorCode, int, int], None]


@dataclass(frozen=True)
class Job:
    """One command taken from a ring."""

    context: int
    generation: int
    address: int  # guest physical address of the 64-byte command
    ring_offset: int


_IDLE, _BUSY = int(RingStatus.IDLE), int(RingStatus.BUSY)


class Ring:
    def __init__(self, context: int, registers: RegisterFile, report: ErrorReporter) -> None:
        self.context = context
        self.registers = registers
        self.offsets = ContextRegisters.of(context)
        self.report = report
        self.generation = 0
        self.base = 0  # latched at enable
        self.size = 0

    def _get(self, offset: int) -> int:
        return self.registers.values[offset]

    def _set(self, offset: int, value: int) -> None:
        self.registers.values[offset] = value & 0xFFFFFFFF

    @property
    def enabled(self) -> bool:
        return bool(self._get(self.offsets.control) & abi.RING_CONTROL_ENABLE)

    @property
    def status(self) -> RingStatus:
        return RingStatus(self._get(self.offsets.status))

    # ---------------------------------------------------------------- driver writes

    def write_config(self, offset: int, value: int) -> None:
        """RING_BASE_LO/HI or RING_SIZE: ignored while the ring is enabled."""
        if not self.enabled:
            self._set(offset, value)

    def write_control(self, value: int) -> None:
        was_enabled = self.enabled
        self._set(self.offsets.control, value)
        enable = bool(value & abi.RING_CONTROL_ENABLE)
        if enable and not was_enabled:
            self._enable()
        elif not enable:
            self.generation += 1
            self._set(self.offsets.status, RingStatus.STOPPED)

    def _enable(self) -> None:
        base = self._get(self.offsets.base_lo) | self._get(self.offsets.base_hi) << 32
        size = self._get(self.offsets.size)
        self.generation += 1
        self._set(self.offsets.head, 0)
        self._set(self.offsets.tail, 0)
        if (
            base % COMMAND_SIZE
            or size & (size - 1)
            or not (abi.RING_MIN_SIZE <= size <= abi.RING_MAX_SIZE)
        ):
            self._set(self.offsets.status, RingStatus.ERROR)
            self.report(ErrorCode.INVALID_ARGUMENT, self.context, 0)
            return
        self.base, self.size = base, size
        self._set(self.offsets.status, RingStatus.IDLE)

    def reset(self) -> None:
        """The registers were restored: forget the latched geometry."""
        self.generation += 1
        self.base = self.size = 0

    # ---------------------------------------------------------------- the engine

    def take(self) -> Job | None:
        """The command at HEAD, marking the ring BUSY; None when there is none."""
        status = self._get(self.offsets.status)  # an int: an enum is built per call
        if status != _IDLE and status != _BUSY:
            return None
        head, tail = self._get(self.offsets.head), self._get(self.offsets.tail)
        if tail >= self.size or tail % COMMAND_SIZE:
            self._set(self.offsets.status, RingStatus.ERROR)
            self.report(ErrorCode.INVALID_ARGUMENT, self.context, tail)
            return None
        if head == tail:
            self._set(self.offsets.status, RingStatus.IDLE)
            return None
        self._set(self.offsets.status, RingStatus.BUSY)
        return Job(self.context, self.generation, self.base + head, head)

    def current(self, job: Job) -> bool:
        """Is the ring still the one the job was taken from?"""
        return job.generation == self.generation

    def fence(self, job: Job, value: int) -> bool:
        """A FENCE completed: publish its value.  False for a stale job."""
        if not self.current(job):
            return False
        self._set(self.offsets.fence_lo, value)
        self._set(self.offsets.fence_hi, value >> 32)
        return True

    def complete(self, job: Job) -> None:
        if self.current(job):
            self._set(self.offsets.head, (job.ring_offset + COMMAND_SIZE) % self.size)

    def fail(self, job: Job, code: ErrorCode) -> None:
        if self.current(job):
            self._set(self.offsets.status, RingStatus.ERROR)
            self.report(code, self.context, job.ring_offset)
