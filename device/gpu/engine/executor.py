"""The command engine of one GPU instance: executes its rings' commands.

Theory of operation.  Each instance has one engine thread.  A DOORBELL write only
sets an event; the thread then takes, round robin over the contexts, one command at
a time from every ring whose HEAD differs from its TAIL.  The host (the instance)
hands out the next ``Job`` under its lock and takes the outcome back under it, so
register accesses are answered while a long command runs.  A command is decoded,
looked up in the command table (``commands.SPECS``) and its handler called with
named arguments and an ``Execution`` that is the only way it reaches memory:
resources are checked and *pinned* for the command (a DESTROY meanwhile frees the
memory only after the command), and guest memory goes through the session's DMA
table, directly for sealed fd-backed RAM or by DMA_READ/DMA_WRITE messages
otherwise, which is why the engine never runs on the socket thread.

A bad guest value fails the command (ring ERROR, ERROR interrupt); nothing a command
does, a bug included, ends the thread.  ``fenced()`` is how resets and destruction
stop the engine for real: no command starts inside it, and it returns only once the
running one has finished (the caller first cancels any message DMA it waits on).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from typing import Protocol

import numpy as np
import numpy.typing as npt

from device import trace
from device.errors import DeviceError, VfioUserError
from device.gpu.abi import ErrorCode
from device.gpu.engine.commands import COMMAND_SIZE, Command
from device.gpu.engine.rings import Job
from device.gpu.inject import Faults
from device.gpu.memory.resources import Pin
from device.vfio_user.dma import DmaTable

log = logging.getLogger(__name__)


class EngineHost(Protocol):
    def take_job(self, context: int) -> Job | None:
        """The next command of a context, marking its ring BUSY; None if there is none."""

    def finish_job(self, job: Job, error: ErrorCode | None, fence: int | None) -> None: ...
    def pin_resource(self, handle: int, offset: int, length: int) -> Pin:
        """Check a resource range and hold it: resident, fenced from the guest."""

    def unpin_resources(self, pins: list[Pin]) -> None: ...
    def guest_memory(self) -> DmaTable: ...


class _dma_fault:  # lower case: used as a function, ``with _dma_fault(...)``
    """A guest-memory access that fails is the command's DMA_FAULT.  A class: a
    generator context manager costs 1 us, several times per command."""

    __slots__ = ("what",)

    def __init__(self, what: str) -> None:
        self.what = what

    def __enter__(self) -> None:
        pass

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, _: object
    ) -> None:
        if isinstance(exc, VfioUserError):
            raise DeviceError(ErrorCode.DMA_FAULT, f"{self.what}: {exc}") from None


class _Run:
    """The ``Execution`` of one command: what its handler may touch.

    A resource range whose pages are contiguous is handed out as a view of device
    memory; any other is gathered into a copy, and a written one has the bytes that
    changed scattered back before the command ends."""

    def __init__(self, host: EngineHost, name: str = "", context: int = 0) -> None:
        self.host = host
        self.pins: list[Pin] = []
        self.gathered: list[tuple[Pin, npt.NDArray[np.uint8], npt.NDArray[np.uint8]]] = []
        self.fence: int | None = None
        self.name = name
        self.context = context

    def _pin(self, handle: int, offset: int, length: int) -> Pin:
        pin = self.host.pin_resource(handle, offset, length)
        self.pins.append(pin)
        return pin

    def source(self, handle: int, offset: int, length: int) -> npt.NDArray[np.uint8]:
        pin = self._pin(handle, offset, length)
        view = pin.resource.view(pin.offset, pin.length)
        return view if view is not None else pin.resource.gather(pin.offset, pin.length)

    def target(self, handle: int, offset: int, length: int) -> npt.NDArray[np.uint8]:
        pin = self._pin(handle, offset, length)
        view = pin.resource.view(pin.offset, pin.length)
        if view is not None:
            return view
        copy = pin.resource.gather(pin.offset, pin.length)
        self.gathered.append((pin, copy, copy.copy()))
        return copy

    def scatter(self) -> None:
        """Store what the command wrote into gathered copies."""
        for pin, new, old in self.gathered:
            pin.resource.scatter_changes(pin.offset, new, old)

    def read_guest(self, address: int, length: int) -> bytes:
        if trace.ENABLED:
            trace.emit(
                self.name, "dma", context=self.context, op="read", address=address, length=length
            )
        with _dma_fault(f"reading guest {address:#x}"):
            return self.host.guest_memory().read(address, length)

    def read_guest_into(self, address: int, out: npt.NDArray[np.uint8]) -> None:
        if trace.ENABLED:
            trace.emit(
                self.name, "dma", context=self.context, op="read", address=address, length=out.size
            )
        with _dma_fault(f"reading guest {address:#x}"):
            self.host.guest_memory().read_into(address, out)

    def write_guest(self, address: int, data: bytes | memoryview) -> None:
        if trace.ENABLED:
            trace.emit(
                self.name,
                "dma",
                context=self.context,
                op="write",
                address=address,
                length=len(data),
            )
        with _dma_fault(f"writing guest {address:#x}"):
            self.host.guest_memory().write(address, data)

    def signal_fence(self, value: int) -> None:
        self.fence = value


class Engine:
    def __init__(
        self, host: EngineHost, contexts: int, name: str, faults: Faults | None = None
    ) -> None:
        self.host = host
        self.contexts = contexts
        self.name = name
        self.faults = faults  # injected hangs and ring errors (inject.py)
        self.commands_executed = 0
        self.busy_seconds = 0.0  # time spent running commands, for `mgpu top`
        self._kick = threading.Event()
        self._stopping = False
        self._paused = 0  # fences in progress; guarded by _pause_lock
        self._pause_lock = threading.Lock()
        self._running = threading.Lock()  # held while one command runs
        self._thread = threading.Thread(target=self._run, name=f"{name}-engine", daemon=True)
        self._thread.start()

    def kick(self) -> None:
        self._kick.set()

    @contextlib.contextmanager
    def fenced(self) -> Iterator[None]:
        """No command runs inside this block; entering waits for the running one."""
        with self._pause_lock:
            self._paused += 1
        try:
            with self._running:
                yield
        finally:
            with self._pause_lock:
                self._paused -= 1
            self._kick.set()

    def stop(self, timeout: float) -> bool:
        """Stop the thread; True once it has ended (False: a command is still running)."""
        self._stopping = True
        self._kick.set()
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # ---------------------------------------------------------------- scheduling

    def _run(self) -> None:
        while not self._stopping:
            self._kick.wait()
            self._kick.clear()
            while not self._stopping and self._run_round():
                pass

    def _run_round(self) -> bool:
        """One command from every ring that has one; False when all were idle."""
        busy = False
        for context in range(self.contexts):
            with self._running:
                if self._paused or self._stopping:
                    return False  # fenced(): kicked again when it ends
                try:
                    job = self.host.take_job(context)
                    if job is not None:
                        busy = True
                        self._execute(job)
                except Exception:  # a bug: keep serving the other rings and later doorbells
                    log.exception("%s: engine bug on context %d", self.name, context)
        return busy

    def _execute(self, job: Job) -> None:
        started = time.perf_counter()
        try:
            if trace.ENABLED:
                self._execute_traced(job)
            else:
                self._run_job(job)
        finally:
            self.busy_seconds += time.perf_counter() - started

    def _execute_traced(self, job: Job) -> None:
        where = {"context": job.context, "ring_offset": job.ring_offset}
        trace.emit(self.name, "command", "B", name=f"ctx{job.context}", **where)
        error = self._run_job(job)
        outcome = error.name if error is not None else "done"
        trace.emit(self.name, "command", "E", name=f"ctx{job.context}", result=outcome, **where)

    def _run_job(self, job: Job) -> ErrorCode | None:
        run = _Run(self.host, self.name, job.context)
        error: ErrorCode | None = None
        try:
            if self.faults is not None and self.faults.engine_armed:
                if not self.faults.before_command():
                    return None  # hung until a device reset, which owns the ring now
            command = Command.decode(run.read_guest(job.address, COMMAND_SIZE))
            spec = command.spec()
            spec.handler(run, **command.arguments())
            run.scatter()
            self.commands_executed += 1
        except DeviceError as exc:
            error = ErrorCode(exc.code)
            log.info(
                "%s: context %d command at ring offset %#x failed: %s (%s)",
                self.name, job.context, job.ring_offset, exc, error.name,
            )  # fmt: skip
        except Exception:
            log.exception(
                "%s: engine bug on context %d at ring offset %#x",
                self.name, job.context, job.ring_offset,
            )  # fmt: skip
            error = ErrorCode.ENGINE_FAULT
        finally:
            self.host.unpin_resources(run.pins)
        self.host.finish_job(job, error, None if error else run.fence)
        return error
