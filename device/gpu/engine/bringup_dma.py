"""The bring-up DMA engine: one copy at a time between guest memory and the aperture,
programmed through the DMA_* registers (for drivers that do not run rings yet).

Theory of operation.  A DMA_CONTROL write (under the instance lock) latches the
addresses, sets DMA_STATUS to BUSY and queues a job; while BUSY, further writes are
ignored.  The worker thread copies, then (under the lock) sets DMA_ERROR and
DMA_STATUS DONE or ERROR and raises the DMA interrupt, unless a reset bumped the
generation meanwhile (its result is then dropped).  ``fenced()`` and ``stop()``
work as the engine's do; nothing a job does ends the thread.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from device import trace
from device.errors import VfioUserError
from device.gpu import abi
from device.gpu.regs.file import RegisterFile
from device.vfio_user.dma import DmaTable

log = logging.getLogger(__name__)


class BringUpHost(Protocol):
    aperture_size: int

    def aperture_read(self, offset: int, length: int) -> bytes:
        """Read the aperture as the device (coherent with the guest; EFAULT if unmapped)."""

    def aperture_write(self, offset: int, data: bytes) -> None: ...
    def guest_memory(self) -> DmaTable: ...
    def bring_up_done(self, generation: int, error: int) -> None:
        """Publish a job's result (takes the instance lock)."""


@dataclass(frozen=True)
class _Job:
    generation: int
    command: int
    guest: int
    aperture_offset: int
    length: int


class BringUpDma:
    def __init__(self, name: str, registers: RegisterFile, host: BringUpHost) -> None:
        self.name = name
        self.registers = registers
        self.host = host
        self.generation = 0
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._running = threading.Lock()  # held while one job runs
        self._thread = threading.Thread(target=self._serve, name=f"{name}-dma", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- under the lock

    def start(self, command: int) -> None:
        """DMA_CONTROL was written."""
        if self.registers.get("DMA_STATUS") == abi.DmaStatus.BUSY or command not in (
            abi.DmaCommand.TO_APERTURE,
            abi.DmaCommand.FROM_APERTURE,
        ):
            return
        job = _Job(
            self.generation,
            command,
            self.registers.get64("DMA_GUEST_ADDR"),
            self.registers.get("DMA_APERTURE_OFFSET"),
            self.registers.get("DMA_LENGTH"),
        )
        self.registers.set("DMA_STATUS", abi.DmaStatus.BUSY)
        self._jobs.put(job)

    def reset(self) -> None:
        self.generation += 1

    # ---------------------------------------------------------------- lifecycle

    @contextlib.contextmanager
    def fenced(self) -> Iterator[None]:
        """No job runs inside this block; entering waits for the running one."""
        with self._running:
            yield

    def stop(self, timeout: float) -> bool:
        self._jobs.put(None)
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # ---------------------------------------------------------------- the worker

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            with self._running:
                if trace.ENABLED:
                    trace.emit(self.name, "dma", "B", name="bring-up", length=job.length)
                error = self._copy(job)
                if trace.ENABLED:
                    trace.emit(self.name, "dma", "E", name="bring-up", error=error)
                try:
                    self.host.bring_up_done(job.generation, error)
                except Exception:
                    log.exception("%s: bring-up DMA bug while finishing", self.name)

    def _copy(self, job: _Job) -> int:
        """Run one job; its errno (0 on success)."""
        try:
            if not 0 < job.length <= abi.DMA_MAX_LENGTH or (
                job.aperture_offset + job.length > self.host.aperture_size
            ):
                raise VfioUserError(errno.EINVAL, "bad DMA length or aperture range")
            dma = self.host.guest_memory()
            if job.command == abi.DmaCommand.TO_APERTURE:
                self.host.aperture_write(job.aperture_offset, dma.read(job.guest, job.length))
            else:
                dma.write(job.guest, self.host.aperture_read(job.aperture_offset, job.length))
        except VfioUserError as exc:
            log.info("%s: DMA %#x+%#x failed: %s", self.name, job.guest, job.length, exc)
            return exc.errno
        except Exception:
            log.exception("%s: DMA engine bug", self.name)
            return errno.EIO
        return 0
