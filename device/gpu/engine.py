"""The command engine of one GPU instance: executes its rings' commands.

Theory of operation.  Each instance has one engine thread.  A DOORBELL write only
sets an event; the thread then takes, round robin over the contexts, one command at
a time from every ring whose HEAD differs from its TAIL.  ``EngineHost`` (the
instance) hands out the next command under its lock and takes the result back under
it, so register accesses are answered while a long command runs.  Every guest value
is checked before use: a bad one fails the command, halts that ring in the ERROR
state and raises the ERROR interrupt; it never raises out of the engine.  Commands
that read or write guest memory go through the session's DMA table, directly for
fd-backed RAM or by DMA_READ/DMA_WRITE messages otherwise, which is why the engine
must never run on the socket thread.
"""

from __future__ import annotations

import contextlib
import logging
import struct
import threading
from collections.abc import Iterator
from typing import Protocol

import numpy as np
import numpy.typing as npt
from numpy.lib.stride_tricks import as_strided

from device.errors import DeviceError, VfioUserError
from device.gpu.commands import COMMAND_SIZE, MAX_MATRIX_DIM, MAX_TRANSFER, Command, Opcode
from device.gpu.registers import ErrorCode
from device.vfio_user.dma import DmaTable

log = logging.getLogger(__name__)


class EngineHost(Protocol):
    memory: npt.NDArray[np.uint8]

    def next_command(self, context: int) -> tuple[int, int, int] | None:
        """(generation, guest address of the command, ring offset), marking the ring BUSY."""

    def command_done(self, context: int, generation: int) -> None: ...
    def command_failed(self, context: int, generation: int, code: ErrorCode) -> None: ...
    def fence(self, context: int, generation: int, value: int) -> None: ...
    def resource_range(self, handle: int, offset: int, length: int) -> tuple[int, int]: ...
    def sync_device_memory(self, start: int, end: int) -> None: ...
    def guest_memory(self) -> DmaTable: ...


class Engine:
    def __init__(self, host: EngineHost, contexts: int, name: str) -> None:
        self.host = host
        self.contexts = contexts
        self.name = name
        self.commands_executed = 0
        self._touched: list[tuple[int, int]] = []  # device memory the current command used
        self._kick = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=f"{name}-engine", daemon=True)
        self._thread.start()

    def kick(self) -> None:
        self._kick.set()

    def stop(self) -> None:
        self._stopping = True
        self._kick.set()
        self._thread.join(10)

    # ------------------------------------------------------------------ scheduling

    def _run(self) -> None:
        while True:
            self._kick.wait()
            self._kick.clear()
            if self._stopping:
                return
            busy = True
            while busy and not self._stopping:
                busy = False
                for context in range(self.contexts):
                    job = self.host.next_command(context)
                    if job is None:
                        continue
                    busy = True
                    self._execute_one(context, *job)

    def _execute_one(self, context: int, generation: int, address: int, ring_offset: int) -> None:
        self._touched = []
        try:
            raw = self._read_guest(address, COMMAND_SIZE)
            command = Command.decode(raw)
            fence = self._execute(command)
            for start, end in self._touched:  # let the guest see what the command wrote
                self.host.sync_device_memory(start, end)
            if fence is not None:
                self.host.fence(context, generation, fence)
            self.commands_executed += 1
            self.host.command_done(context, generation)
        except DeviceError as exc:
            log.info(
                "%s: context %d command at ring offset %#x failed: %s (%s)",
                self.name,
                context,
                ring_offset,
                exc,
                ErrorCode(exc.code).name,
            )
            self.host.command_failed(context, generation, ErrorCode(exc.code))
        except Exception:
            log.exception(
                "%s: engine bug on context %d at ring offset %#x", self.name, context, ring_offset
            )
            self.host.command_failed(context, generation, ErrorCode.ENGINE_FAULT)

    # ------------------------------------------------------------------ guest memory

    @staticmethod
    @contextlib.contextmanager
    def _dma_fault(what: str) -> Iterator[None]:
        """A guest-memory access that fails is the command's DMA_FAULT."""
        try:
            yield
        except VfioUserError as exc:
            raise DeviceError(ErrorCode.DMA_FAULT, f"{what}: {exc}") from None

    def _read_guest(self, address: int, length: int) -> bytes:
        with self._dma_fault(f"reading guest {address:#x}"):
            return self.host.guest_memory().read(address, length)

    def _resource(self, handle: int, offset: int, length: int) -> npt.NDArray[np.uint8]:
        start, end = self.host.resource_range(handle, offset, length)
        self.host.sync_device_memory(start, end)  # the guest's writes first
        self._touched.append((start, end))
        return self.host.memory[start:end]

    @staticmethod
    def _check_length(length: int) -> None:
        if not 0 < length <= MAX_TRANSFER:
            raise DeviceError(
                ErrorCode.INVALID_ARGUMENT, f"length {length} outside 1..{MAX_TRANSFER}"
            )

    # ------------------------------------------------------------------ commands

    def _execute(self, command: Command) -> int | None:
        """Run one command; returns a fence value for FENCE."""
        if command.flags:
            raise DeviceError(ErrorCode.INVALID_COMMAND, f"flags {command.flags:#x} must be 0")
        op = command.opcode
        a = command.args
        if op == Opcode.NOP:
            return None
        if op == Opcode.WRITE_RESOURCE:
            guest, handle, offset, length = a[:4]
            self._check_length(length)
            target = self._resource(handle, offset, length)
            with self._dma_fault(f"reading guest {guest:#x}"):
                self.host.guest_memory().read_into(guest, target)
            return None
        if op == Opcode.READ_RESOURCE:
            handle, offset, guest, length = a[:4]
            self._check_length(length)
            source = self._resource(handle, offset, length)
            with self._dma_fault(f"writing guest {guest:#x}"):
                self.host.guest_memory().write(guest, source.data)
            return None
        if op == Opcode.COPY_RESOURCE:
            src_handle, src_offset, dst_handle, dst_offset, length = a[:5]
            self._check_length(length)
            source = self._resource(src_handle, src_offset, length)
            target = self._resource(dst_handle, dst_offset, length)
            np.copyto(target, source)  # numpy copes with overlap
            return None
        if op == Opcode.FILL:
            handle, offset, length, value = a[:4]
            self._check_length(length)
            if offset % 4 or length % 4 or value > 0xFFFFFFFF:
                raise DeviceError(ErrorCode.INVALID_ARGUMENT, "FILL needs 4-byte alignment")
            self._resource(handle, offset, length).view(np.uint32)[:] = value
            return None
        if op == Opcode.BLIT:
            self._blit(a)
            return None
        if op == Opcode.SAXPY:
            self._saxpy(a)
            return None
        if op == Opcode.MATMUL:
            self._matmul(a)
            return None
        if op == Opcode.FENCE:
            guest, value = a[:2]
            if guest:
                with self._dma_fault(f"fence at {guest:#x}"):
                    self.host.guest_memory().write(guest, value.to_bytes(8, "little"))
            return value
        raise DeviceError(ErrorCode.INVALID_COMMAND, f"unknown opcode {op:#x}")

    def _surface(
        self, handle: int, offset: int, pitch: int, width: int, height: int
    ) -> npt.NDArray[np.uint8]:
        if width <= 0 or height <= 0 or pitch < width or pitch * height > MAX_TRANSFER:
            raise DeviceError(
                ErrorCode.INVALID_ARGUMENT, f"bad surface: pitch {pitch}, {width} x {height}"
            )
        span = pitch * (height - 1) + width
        flat = self._resource(handle, offset, span)
        return as_strided(flat, shape=(height, width), strides=(pitch, 1), writeable=True)

    def _blit(self, a: tuple[int, ...]) -> None:
        src_handle, src_offset, src_pitch, dst_handle, dst_offset, dst_pitch, extent = a
        width, height = extent & 0xFFFFFFFF, extent >> 32
        source = self._surface(src_handle, src_offset, src_pitch, width, height)
        target = self._surface(dst_handle, dst_offset, dst_pitch, width, height)
        target[...] = source.copy() if np.shares_memory(source, target) else source

    def _floats(self, handle: int, offset: int, count: int) -> npt.NDArray[np.float32]:
        if offset % 4:
            raise DeviceError(ErrorCode.INVALID_ARGUMENT, "float32 data must be 4-byte aligned")
        return self._resource(handle, offset, count * 4).view(np.float32)

    def _saxpy(self, a: tuple[int, ...]) -> None:
        x_handle, x_offset, y_handle, y_offset, count, alpha_bits = a[:6]
        if not 0 < count <= MAX_TRANSFER // 4 or alpha_bits > 0xFFFFFFFF:
            raise DeviceError(ErrorCode.INVALID_ARGUMENT, f"bad SAXPY count {count}")
        alpha = np.float32(struct.unpack("<f", alpha_bits.to_bytes(4, "little"))[0])
        x = self._floats(x_handle, x_offset, count)
        y = self._floats(y_handle, y_offset, count)
        y[:] = alpha * x + y

    def _matmul(self, a: tuple[int, ...]) -> None:
        a_handle, b_handle, c_handle, m, n, k = a[:6]
        if not all(0 < d <= MAX_MATRIX_DIM for d in (m, n, k)):
            raise DeviceError(ErrorCode.INVALID_ARGUMENT, f"bad MATMUL dims {m}x{n}x{k}")
        matrix_a = self._floats(a_handle, 0, m * k).reshape(m, k)
        matrix_b = self._floats(b_handle, 0, k * n).reshape(k, n)
        matrix_c = self._floats(c_handle, 0, m * n).reshape(m, n)
        np.matmul(matrix_a, matrix_b, out=matrix_c)
