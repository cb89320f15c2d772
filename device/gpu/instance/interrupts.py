"""Interrupt causes of one instance: INT_STATUS, INT_MASK, and the vectors they raise.

A cause becomes pending in INT_STATUS under the instance lock, and its vector is only
*queued* there; the owner signals the queued vectors after releasing the lock
(``take_queued`` then ``signal``), because a client's eventfd is untrusted and a
register reply must never wait behind it.
"""

from __future__ import annotations

from device import trace
from device.gpu import abi
from device.gpu.abi import IntBit
from device.gpu.inject import Faults
from device.gpu.modes import InterruptMode
from device.gpu.regs.file import RegisterFile
from device.vfio_user.irq import IrqLines
from device.vfio_user.protocol.constants import PciIrq

MSIX_VECTORS = 8
MSI_VECTORS = 4


class Interrupts:
    def __init__(
        self,
        registers: RegisterFile,
        mode: InterruptMode,
        name: str = "",
        faults: Faults | None = None,
    ) -> None:
        self.name = name
        self.faults = faults  # injected drops and delays (inject.py)
        self.registers = registers
        self.mode = mode
        self.index = PciIrq.MSIX if mode is InterruptMode.MSIX else PciIrq.MSI
        self.vectors = MSIX_VECTORS if mode is InterruptMode.MSIX else MSI_VECTORS
        self.lines: IrqLines | None = None  # the connected client's eventfds
        self._queued: list[int] = []

    def raise_cause(self, cause: IntBit) -> None:
        """Make a cause pending and queue its vector unless masked (lock held)."""
        self.registers.set("INT_STATUS", self.registers.get("INT_STATUS") | cause)
        if not self.registers.get("INT_MASK") & cause:
            self._queued.append(abi.INT_VECTORS[cause])

    def ack(self, causes: int) -> None:
        """INT_ACK: clear pending causes (lock held)."""
        self.registers.set("INT_STATUS", self.registers.get("INT_STATUS") & ~causes)

    def take_queued(self) -> list[int]:
        """The vectors to signal once the lock is released (lock held)."""
        queued, self._queued = self._queued, []
        return queued

    def signal(self, vectors: list[int]) -> None:
        """Signal vectors on the client's eventfds (lock not held; never blocks)."""
        if self.faults is not None and self.faults.irq_armed and vectors:
            if trace.ENABLED:
                trace.emit(self.name, "irq", vectors=vectors, injected="drop or delay")
            vectors = self.faults.filter_vectors(vectors, self.signal_now)
        self.signal_now(vectors)

    def signal_now(self, vectors: list[int]) -> None:
        """``signal`` without injected faults (a delayed or a spurious interrupt)."""
        if trace.ENABLED and vectors:
            trace.emit(self.name, "irq", vectors=vectors)
        lines = self.lines
        if lines is None:
            return
        for vector in vectors:
            lines.raise_irq(self.index, vector)
