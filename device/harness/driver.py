"""A reference driver for the mgpu device, in Python, over the vfio-user client.

It programs the device exactly as a guest kernel driver would (registers, a command
ring in "guest" memory, fences, interrupts), with the client standing in for QEMU and
a memfd standing in for guest RAM.  Tests, benchmarks and tools use it; guest-driver
developers can read it as executable documentation of the register interface.
"""

from __future__ import annotations

import contextlib
import os
import select
import time

from device.gpu import abi
from device.gpu.engine.commands import COMMAND_SIZE, Opcode, encode
from device.gpu.regs import table as regs
from device.vfio_user.client import VfioUserClient, create_guest_ram
from device.vfio_user.protocol.constants import PciIrq, PciRegion


class DriverError(Exception):
    """The device reported an error (``code`` is its ErrorCode)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"{message}: {abi.ErrorCode(code).name}")
        self.code = code


class GuestRam:
    """A sealed memfd the client maps as fd-backed guest RAM at ``base``, with a bump allocator."""

    def __init__(
        self, client: VfioUserClient, base: int = 0x1000_0000, size: int = 64 << 20
    ) -> None:
        self.base, self.size = base, size
        # Sealed: the server maps only guest RAM that cannot shrink under it.
        self.fd = create_guest_ram("mgpu-driver-ram", size)
        client.dma_map(base, size, fd=self.fd)
        self._next = base

    def alloc(self, size: int, align: int = 4096) -> int:
        address = (self._next + align - 1) // align * align
        if address + size > self.base + self.size:
            raise MemoryError("driver guest RAM exhausted")
        self._next = address + size
        return address

    def read(self, address: int, length: int) -> bytes:
        return os.pread(self.fd, length, address - self.base)

    def write(self, address: int, data: bytes) -> None:
        os.pwrite(self.fd, data, address - self.base)

    def close(self) -> None:
        os.close(self.fd)


class MgpuDriver:
    def __init__(
        self,
        client: VfioUserClient,
        ram: GuestRam | None = None,
        ring_size: int = 64 * 1024,
        context: int = 0,
    ) -> None:
        self.client = client
        self.ram = ram or GuestRam(client)
        self.context = context
        if client.read32(PciRegion.BAR0, regs.BY_NAME["ID"].offset) != abi.ID_VALUE:
            raise DriverError(0, "not an mgpu device")
        # One eventfd per vector we use: FENCE, ERROR, DMA, FAULT; MSI-X, or MSI if that is all.
        self.irq_index = PciIrq.MSIX if client.irq_info(PciIrq.MSIX).count else PciIrq.MSI
        self.vectors = tuple(
            os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(len(abi.INT_VECTORS))
        )
        client.set_irq_eventfds(self.irq_index, self.vectors)
        self.interrupts_seen = [0] * len(self.vectors)  # per vector, counted by drain
        self.ring_size = ring_size
        self.ring = self.ram.alloc(ring_size)
        self.fence_slot = self.ram.alloc(8)
        self.tail = 0
        self.fence_value = 0
        self.setup_ring()

    # ------------------------------------------------------------------ registers

    def read(self, name: str) -> int:
        return self.client.read32(PciRegion.BAR0, regs.BY_NAME[name].offset)

    def write(self, name: str, value: int) -> None:
        self.client.write32(PciRegion.BAR0, regs.BY_NAME[name].offset, value)

    def ctx(self, name: str) -> str:
        return f"CTX{self.context}_{name}"

    # ------------------------------------------------------------------ resources

    def _resource_command(self, command: abi.ResourceCommand) -> None:
        self.write("RES_COMMAND", command)
        status = self.read("RES_STATUS")
        if status:
            raise DriverError(status, f"{command.name} failed")

    def create(self, size: int) -> int:
        self.write("RES_SIZE_LO", size & 0xFFFFFFFF)
        self.write("RES_SIZE_HI", size >> 32)
        self._resource_command(abi.ResourceCommand.CREATE)
        return self.read("RES_HANDLE")

    def destroy(self, handle: int) -> None:
        self.write("RES_HANDLE", handle)
        self._resource_command(abi.ResourceCommand.DESTROY)

    def place(self, handle: int) -> int:
        self.write("RES_HANDLE", handle)
        self._resource_command(abi.ResourceCommand.PLACE)
        return self.read("RES_OFFSET_LO") | self.read("RES_OFFSET_HI") << 32

    def remove(self, handle: int) -> None:
        self.write("RES_HANDLE", handle)
        self._resource_command(abi.ResourceCommand.REMOVE)

    def _write64(self, name: str, value: int) -> None:
        self.write(f"{name}_LO", value & 0xFFFFFFFF)
        self.write(f"{name}_HI", value >> 32)

    def map(
        self, handle: int, aperture: int | None = None, offset: int = 0, length: int = 0
    ) -> int:
        """GPU MMU: map ``length`` bytes (0: to the end) of a resource from ``offset`` at
        aperture offset ``aperture`` (None: the device chooses); returns the offset."""
        self.write("RES_HANDLE", handle)
        self._write64("RES_APERTURE", aperture or 0)
        self._write64("RES_RANGE_OFFSET", offset)
        self._write64("RES_RANGE_LENGTH", length)
        command = abi.ResourceCommand.MAP_ANY if aperture is None else abi.ResourceCommand.MAP
        self._resource_command(command)
        return self.read("RES_OFFSET_LO") | self.read("RES_OFFSET_HI") << 32

    def unmap(self, aperture: int, length: int) -> None:
        """GPU MMU: unmap ``length`` bytes of the aperture at ``aperture``."""
        self._write64("RES_APERTURE", aperture)
        self._write64("RES_RANGE_LENGTH", length)
        self._resource_command(abi.ResourceCommand.UNMAP)

    # ------------------------------------------------------------------ ring

    def setup_ring(self) -> None:
        self.write(self.ctx("RING_CONTROL"), 0)
        self.write(self.ctx("RING_BASE_LO"), self.ring & 0xFFFFFFFF)
        self.write(self.ctx("RING_BASE_HI"), self.ring >> 32)
        self.write(self.ctx("RING_SIZE"), self.ring_size)
        self.write(self.ctx("RING_CONTROL"), abi.RING_CONTROL_ENABLE)
        self.tail = 0
        if self.read(self.ctx("RING_STATUS")) != abi.RingStatus.IDLE:
            raise DriverError(self.read("ERROR_CODE"), "ring did not start")

    def submit(self, *commands: bytes) -> None:
        """Write commands at the tail and ring the doorbell."""
        for command in commands:
            self.ram.write(self.ring + self.tail, command)
            self.tail = (self.tail + COMMAND_SIZE) % self.ring_size
        self.write(self.ctx("RING_TAIL"), self.tail)
        self.write(self.ctx("DOORBELL"), 1)

    def fence(self) -> bytes:
        self.fence_value += 1
        return encode(Opcode.FENCE, guest_addr=self.fence_slot, value=self.fence_value)

    def run(self, *commands: bytes, timeout: float = 30.0) -> None:
        """Submit commands plus a fence and wait for the fence interrupt."""
        self.submit(*commands, self.fence())
        self.wait_fence(self.fence_value, timeout)

    def wait_fence(self, value: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        fence_fd, error_fd = self.vectors[0], self.vectors[1]
        while True:
            done = int.from_bytes(self.ram.read(self.fence_slot, 8), "little")
            if done >= value:
                self.write("INT_ACK", abi.IntBit.FENCE)
                return
            if self.read(self.ctx("RING_STATUS")) == abi.RingStatus.ERROR:
                raise DriverError(self.read("ERROR_CODE"), "command failed")
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"fence {value} not signalled in {timeout}s")
            # Wait for the fence or error interrupt (register reads above answer any
            # DMA request the device sent meanwhile).
            select.select([fence_fd, error_fd], [], [], min(left, 0.05))
            self.drain_interrupts()

    def drain_interrupts(self) -> list[int]:
        """Count (and clear) the interrupts signalled so far; returns the totals."""
        for vector, fd in enumerate(self.vectors):
            with contextlib.suppress(BlockingIOError):
                self.interrupts_seen[vector] += os.eventfd_read(fd)
        return self.interrupts_seen

    def wait_interrupt(self, cause: abi.IntBit, timeout: float = 10.0) -> bool:
        """Wait until the vector of ``cause`` has fired at least once more."""
        vector = abi.INT_VECTORS[cause]
        seen = self.interrupts_seen[vector]
        deadline = time.monotonic() + timeout
        while self.drain_interrupts()[vector] == seen:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            select.select([self.vectors[vector]], [], [], left)
        return True

    def close(self) -> None:
        for fd in self.vectors:
            os.close(fd)
        self.ram.close()
