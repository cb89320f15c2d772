"""One GPU instance as a vfio-user PCI device: config space, BARs, registers, and the
resources and command rings a driver programs through them.

Region layout (vfio PCI region indexes):
  BAR0  64 KiB, 32-bit MMIO, trapped: every access is a REGION message answered by the
        register file (registers.py).
  BAR2  the aperture, 64-bit prefetchable: the instance's partition of device memory.
        How the guest reaches it is the instance's mapping mode (aperture.py): static
        (QEMU maps the partition of the physical GPU's memfd), fault (QEMU maps a FUSE
        file and each first touch asks us) or trap (every access is a message).
  BAR4  16 KiB, 32-bit MMIO: the MSI-X table (QEMU emulates it) and PBA; only with
        MSI-X interrupts.
  CONFIG 4 KiB PCI Express config space.

Interrupts are MSI-X (8 vectors, the default, as on real GPUs) or MSI (4 vectors).
QEMU 11.1.3 aborts when it hot-unplugs a vfio-user device that has MSI-X (an
assertion in memory_region_del_subregion while it finalizes the device's PBA
region), so an instance meant to be hot-unplugged must use MSI.

Locking: ``_lock`` guards registers, resources and ring state.  The socket thread
(register accesses), the engine thread and the bring-up DMA worker take it only for
short bookkeeping, never while they move data or wait for the client.
"""

from __future__ import annotations

import errno
import logging
import queue
import struct
import threading
from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from device.errors import DeviceError, VfioUserError
from device.gpu import registers as regs
from device.gpu.aperture import Aperture, DeniedPolicy, MappingMode
from device.gpu.commands import COMMAND_SIZE
from device.gpu.engine import Engine
from device.gpu.physical import PhysicalGpu
from device.gpu.registers import ErrorCode, IntBit, RingStatus
from device.gpu.resources import ResourceTable
from device.gpu.types import MAX_CONTEXTS_PER_INSTANCE, InstanceType
from device.pci.config import Bar, BarKind, CapabilityId, ConfigSpace
from device.vfio_user.dma import DmaTable
from device.vfio_user.irq import IrqLines
from device.vfio_user.protocol.constants import (
    PCI_NUM_REGIONS,
    DeviceFlags,
    IrqInfoFlags,
    PciIrq,
    PciRegion,
    RegionFlags,
)
from device.vfio_user.protocol.messages import DeviceInfo, IrqInfo, RegionInfo, SparseArea

log = logging.getLogger(__name__)

VENDOR_ID = 0x1234
DEVICE_ID = 0x4D47
SUBSYSTEM_VENDOR_ID = 0x1234
SUBSYSTEM_ID = 0x0001
CLASS_CODE = 0x030200  # display controller, 3D controller, prog-if 0
REVISION = 0x01

MSIX_VECTORS = 8
MSIX_BAR = 4
MSIX_BAR_SIZE = 16 * 1024
MSIX_TABLE_OFFSET = 0x0000
MSIX_PBA_OFFSET = 0x2000
MSI_VECTORS = 4
INTERRUPT_MODES = ("msix", "msi")
DEFAULT_APERTURE_SIZE = 256 * 1024 * 1024

# PCI Express capability (version 2, endpoint) register offsets inside the capability.
PCIE_DEVCAP = 0x04
PCIE_DEVCTL = 0x08
PCIE_DEVSTA = 0x0A
PCIE_DEVCAP_FLR = 1 << 28
PCIE_DEVCTL_FLR = 1 << 15

NO_CONTEXT = 0xFFFFFFFF
RESET_WAIT_SECONDS = 2.0


def _reg(name: str) -> int:
    return regs.BY_NAME[name].offset


class GpuInstance:
    """The device model behind one vfio-user socket.

    Made by ``PhysicalGpu``'s owner with ``physical`` and ``instance_type``; without
    them it gets a private physical GPU the size of its aperture (tests, one-off use).
    ``aperture`` is a memoryview of the device memory behind BAR2 (the partition);
    ``window`` is how the guest reaches it (mapping mode, page permissions, fault log).
    """

    def __init__(
        self,
        name: str = "gpu0",
        aperture_size: int = DEFAULT_APERTURE_SIZE,
        *,
        physical: PhysicalGpu | None = None,
        instance_type: str | None = None,
        interrupts: str = "msix",
        mapping: str = "static",
        denied: str = "sigbus",
    ) -> None:
        if interrupts not in INTERRUPT_MODES:
            raise ValueError(f"interrupts must be one of {INTERRUPT_MODES}, not {interrupts!r}")
        self.name = name
        self.interrupts = interrupts
        self.irq_index = PciIrq.MSIX if interrupts == "msix" else PciIrq.MSI
        self._owns_physical = physical is None
        if physical is None:
            private = InstanceType(
                "private",
                aperture_size,
                MAX_CONTEXTS_PER_INSTANCE,
                "a private GPU the size of its aperture",
            )
            physical = PhysicalGpu(
                aperture_size, MAX_CONTEXTS_PER_INSTANCE, (private,), name=f"{name}-private"
            )
            instance_type = "private"
        if instance_type is None:
            raise ValueError("an instance on a shared physical GPU needs an instance type")
        self.physical = physical
        self.partition, self.instance_type = physical.reserve(name, instance_type)
        self.aperture_size = self.instance_type.memory
        self.contexts = self.instance_type.contexts
        self.aperture = physical.view(self.partition.offset, self.partition.size)
        self.memory: npt.NDArray[np.uint8] = physical.memory
        self.resources = ResourceTable(self.partition)
        self._after_unlock: list[Callable[[], None]] = []
        try:
            self.window = Aperture(
                name,
                physical,
                self.partition,
                self.aperture_size,
                MappingMode(mapping),
                DeniedPolicy(denied),
                self._report_fault,
            )
        except BaseException:
            self.aperture.release()
            physical.release(name)
            if self._owns_physical:
                physical.close()
            raise
        self._lock = threading.Lock()
        self._command_lock = threading.Lock()  # held by the engine while a command runs
        self._generations = [0] * regs.MAX_CONTEXTS
        self._dma_generation = 0
        self.register_values: dict[int, int] = {}
        self.region_access_count: dict[int, int] = {}
        self.dma: DmaTable | None = None
        self.irqs: IrqLines | None = None
        self.resets = 0
        self.config = self._build_config_space()
        self._region_sizes = {i: self.region_info(i)[0].size for i in range(PCI_NUM_REGIONS)}
        self._reset_registers()
        self.engine = Engine(self, self.contexts, name)
        self._jobs: queue.Queue[tuple[int, int, int, int, int] | None] = queue.Queue()
        self._worker = threading.Thread(target=self._bring_up_dma, name=f"{name}-dma", daemon=True)
        self._worker.start()
        self._closed = False

    # ------------------------------------------------------------------ build

    def _build_config_space(self) -> ConfigSpace:
        cfg = ConfigSpace()
        cfg.init_header(
            vendor=VENDOR_ID,
            device=DEVICE_ID,
            class_code=CLASS_CODE,
            revision=REVISION,
            subsystem_vendor=SUBSYSTEM_VENDOR_ID,
            subsystem=SUBSYSTEM_ID,
        )
        cfg.add_bar(Bar(0, regs.BAR0_SIZE))
        cfg.add_bar(Bar(2, self.aperture_size, BarKind.MEM64, prefetchable=True))
        if self.interrupts == "msix":
            cfg.add_bar(Bar(MSIX_BAR, MSIX_BAR_SIZE))
        # Power management v3, D0 only, NoSoftReset; PMCSR power state bits writable.
        cfg.add_capability(
            CapabilityId.POWER_MANAGEMENT,
            struct.pack("<HHBB", 0x0003, 0x0008, 0, 0),
            wmask=struct.pack("<HH", 0, 0x0003),
        )
        if self.interrupts == "msix":
            # MSI-X: table and PBA in BAR4; enable and function-mask bits writable.
            cfg.add_capability(
                CapabilityId.MSIX,
                struct.pack(
                    "<HII",
                    MSIX_VECTORS - 1,
                    MSIX_TABLE_OFFSET | MSIX_BAR,
                    MSIX_PBA_OFFSET | MSIX_BAR,
                ),
                wmask=struct.pack("<H", 0xC000),
            )
        else:
            # MSI, 64-bit addresses, 4 vectors (multiple message capable = 2).
            cfg.add_capability(
                CapabilityId.MSI,
                struct.pack("<HIIH", 0x0084, 0, 0, 0),
                wmask=struct.pack("<HIIH", 0x0071, 0xFFFFFFFC, 0xFFFFFFFF, 0xFFFF),
            )
        # PCI Express v2 endpoint, FLR capable, link x1 at 2.5 GT/s.
        pcie = bytearray(0x3C - 2)
        struct.pack_into("<H", pcie, 0x02 - 2, 0x0002)  # capabilities: version 2, endpoint
        struct.pack_into("<I", pcie, PCIE_DEVCAP - 2, PCIE_DEVCAP_FLR)
        struct.pack_into("<H", pcie, PCIE_DEVCTL - 2, 0x2810)  # relaxed ordering, MRRS 512
        struct.pack_into("<I", pcie, 0x0C - 2, 0x00000011)  # link caps: 2.5 GT/s, x1
        struct.pack_into("<H", pcie, 0x12 - 2, 0x0011)  # link status: 2.5 GT/s, x1
        pcie_wmask = bytearray(len(pcie))
        struct.pack_into("<H", pcie_wmask, PCIE_DEVCTL - 2, 0xFFFF)
        pcie_w1c = bytearray(len(pcie))
        struct.pack_into("<H", pcie_w1c, PCIE_DEVSTA - 2, 0x000F)
        self._pcie_offset = cfg.add_capability(
            CapabilityId.PCI_EXPRESS, bytes(pcie), wmask=bytes(pcie_wmask), w1cmask=bytes(pcie_w1c)
        )
        cfg.seal()
        return cfg

    def _reset_registers(self) -> None:
        values = {r.offset: r.reset for r in regs.REGISTERS}
        values[_reg("APERTURE_SIZE_LO")] = self.aperture_size & 0xFFFFFFFF
        values[_reg("APERTURE_SIZE_HI")] = self.aperture_size >> 32
        values[_reg("MEM_QUOTA_LO")] = self.instance_type.memory & 0xFFFFFFFF
        values[_reg("MEM_QUOTA_HI")] = self.instance_type.memory >> 32
        values[_reg("CONTEXT_QUOTA")] = self.contexts
        self.register_values = values
        self._generations = [g + 1 for g in self._generations]
        self._dma_generation += 1

    # ------------------------------------------------------------------ vfio-user model

    def connect(self, dma: DmaTable, irqs: IrqLines) -> None:
        self.dma, self.irqs = dma, irqs

    def disconnect(self) -> None:
        self.dma, self.irqs = None, None

    def device_info(self) -> DeviceInfo:
        return DeviceInfo(DeviceFlags.PCI | DeviceFlags.RESET, PCI_NUM_REGIONS, len(PciIrq))

    def region_info(self, index: int) -> tuple[RegionInfo, int | None]:
        rw = RegionFlags.READ | RegionFlags.WRITE
        if index == PciRegion.BAR0:
            return RegionInfo(index, rw, regs.BAR0_SIZE), None
        if index == PciRegion.BAR2:
            mode = self.window.mode
            if mode is MappingMode.TRAP:
                return RegionInfo(index, rw, self.aperture_size), None
            flags = rw | RegionFlags.MMAP | RegionFlags.CAPS
            area = SparseArea(0, self.partition.size)
            if mode is MappingMode.FAULT:  # QEMU maps our FUSE file: faults come to us
                return (
                    RegionInfo(index, flags, self.aperture_size, 0, (area,)),
                    self.window.file_fd,
                )
            # static: QEMU maps the physical GPU's memfd at this partition's offset.
            info = RegionInfo(index, flags, self.aperture_size, self.partition.offset, (area,))
            return info, self.physical.memory_fd
        if index == PciRegion.BAR4 and self.interrupts == "msix":
            return RegionInfo(index, rw, MSIX_BAR_SIZE), None
        if index == PciRegion.CONFIG:
            return RegionInfo(index, rw, len(self.config.data)), None
        if 0 <= index < PCI_NUM_REGIONS:
            return RegionInfo(index, 0, 0), None
        raise VfioUserError(errno.EINVAL, f"no region {index}")

    def irq_infos(self) -> list[IrqInfo]:
        eventfd = IrqInfoFlags.EVENTFD
        return [
            IrqInfo(PciIrq.INTX, eventfd | IrqInfoFlags.MASKABLE, 0),
            IrqInfo(
                PciIrq.MSI,
                eventfd | IrqInfoFlags.NORESIZE,
                MSI_VECTORS if self.interrupts == "msi" else 0,
            ),
            IrqInfo(
                PciIrq.MSIX,
                eventfd | IrqInfoFlags.NORESIZE,
                MSIX_VECTORS if self.interrupts == "msix" else 0,
            ),
            IrqInfo(PciIrq.ERR, eventfd, 1),
            IrqInfo(PciIrq.REQ, eventfd, 1),
        ]

    def _check_access(self, index: int, offset: int, count: int) -> None:
        size = self._region_sizes.get(index, 0)
        if count <= 0 or offset < 0 or offset + count > size:
            raise VfioUserError(
                errno.EINVAL, f"access {offset:#x}+{count} outside region {index} ({size:#x})"
            )
        self.region_access_count[index] = self.region_access_count.get(index, 0) + 1

    def region_read(self, index: int, offset: int, count: int) -> bytes:
        self._check_access(index, offset, count)
        if index == PciRegion.BAR0:
            return self._read_registers(offset, count)
        if index == PciRegion.BAR2:
            return self.window.read(offset, count)
        if index == PciRegion.BAR4:
            return bytes(count)  # PBA: nothing pending; the table never reaches us
        with self._lock:
            return self.config.read(offset, count)

    def region_write(self, index: int, offset: int, data: bytes) -> None:
        self._check_access(index, offset, len(data))
        if index == PciRegion.BAR0:
            self._write_registers(offset, data)
        elif index == PciRegion.BAR2:
            self.window.write(offset, data)
        elif index == PciRegion.CONFIG:
            with self._lock:
                self.config.write(offset, data)
                flr = self._flr_requested(offset, len(data))
            if flr:
                self.reset()

    def reset(self) -> None:
        """Device reset (DEVICE_RESET, FLR or the DEVICE_RESET register): stop the rings,
        destroy every resource (memory zeroed), restore the registers."""
        # Let a running command finish first, but not forever: it may be waiting for a
        # DMA reply the client sends only after it has our answer to this reset.
        got_engine = self._command_lock.acquire(timeout=RESET_WAIT_SECONDS)
        try:
            self.window.deny_all()  # the guest's next touch of any page faults
            with self._lock:
                gone = self.resources.clear()
                self._reset_registers()
                self.resets += 1
            for resource in gone:
                self.physical.scrub(resource.extent.offset, resource.extent.size)
        finally:
            if got_engine:
                self._command_lock.release()
        log.info("%s: device reset (%d resources freed)", self.name, len(gone))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.engine.stop()
        self._jobs.put(None)
        self._worker.join(5)
        self.window.deny_all()  # unmap every page from a QEMU that may still be attached
        self.window.close()
        self.resources.clear()
        self.aperture.release()
        del self.memory
        self.physical.release(self.name)
        if self._owns_physical:
            self.physical.close()

    # ------------------------------------------------------------------ registers

    def _read_registers(self, offset: int, count: int) -> bytes:
        if count == 4 and not offset & 3 and offset not in _DYNAMIC:  # the common case
            return self.register_values.get(offset, 0).to_bytes(4, "little")
        first, last = offset & ~3, (offset + count + 3) & ~3
        with self._lock:
            words = b"".join(
                self._register_value(o).to_bytes(4, "little") for o in range(first, last, 4)
            )
        start = offset - first
        return words[start : start + count]

    def _register_value(self, offset: int) -> int:
        """A register's current value (lock held); some are computed when read."""
        if offset in _DYNAMIC:
            free = self.resources.free_bytes
            return {
                _reg("MEM_FREE_LO"): free & 0xFFFFFFFF,
                _reg("MEM_FREE_HI"): free >> 32,
                _reg("RESOURCE_COUNT"): len(self.resources.resources),
            }[offset]
        return self.register_values.get(offset, 0)

    def _write_registers(self, offset: int, data: bytes) -> None:
        first, last = offset & ~3, (offset + len(data) + 3) & ~3
        actions = []
        with self._lock:
            for word_offset in range(first, last, 4):
                register = regs.BY_OFFSET.get(word_offset)
                if register is None or register.access is regs.Access.RO:
                    continue  # writes to read-only or unassigned offsets are dropped
                current = bytearray(self.register_values[word_offset].to_bytes(4, "little"))
                lo, hi = max(offset, word_offset), min(offset + len(data), word_offset + 4)
                current[lo - word_offset : hi - word_offset] = data[lo - offset : hi - offset]
                value = int.from_bytes(current, "little")
                if register.access is regs.Access.WO:
                    actions.append((register, value))
                else:
                    self._store(register, value)
            for register, value in actions:
                if register.name != "DEVICE_RESET":
                    self._command(register, value)
            after, self._after_unlock = self._after_unlock, []
        # Revocations wait for writebacks that FUSE threads serve: never under the lock.
        for action in after:
            action()
        for register, value in actions:
            if register.name == "DEVICE_RESET" and value & 1:
                self.reset()

    def _set(self, name: str, value: int) -> None:
        self.register_values[_reg(name)] = value & 0xFFFFFFFF

    def _get(self, name: str) -> int:
        return self.register_values[_reg(name)]

    def _store(self, register: regs.Register, value: int) -> None:
        """A write to a read/write register (lock held)."""
        old = self.register_values[register.offset]
        self.register_values[register.offset] = value
        if register.name.endswith("_RING_CONTROL"):
            context = int(register.name[3])
            if context >= self.contexts:
                self.register_values[register.offset] = 0
                return
            enable = value & regs.RING_CONTROL_ENABLE
            if enable and not old & regs.RING_CONTROL_ENABLE:
                self._enable_ring(context)
            elif not enable:
                self._generations[context] += 1
                self._set_ctx(context, "RING_STATUS", RingStatus.STOPPED)

    def _command(self, register: regs.Register, value: int) -> None:
        """A write to a command register (lock held)."""
        name = register.name
        if name == "INT_ACK":
            self._set("INT_STATUS", self._get("INT_STATUS") & ~value)
        elif name == "RES_COMMAND":
            self._resource_command(value)
        elif name.endswith("_DOORBELL"):
            if int(name[3]) < self.contexts:
                self.engine.kick()
        elif name == "DMA_CONTROL":
            self._start_bring_up_dma(value)

    # ------------------------------------------------------------------ interrupts, errors

    def _raise(self, cause: IntBit) -> None:
        """Make an interrupt cause pending and signal its vector unless masked (lock held)."""
        self._set("INT_STATUS", self._get("INT_STATUS") | cause)
        irqs = self.irqs
        if irqs is not None and not self._get("INT_MASK") & cause:
            irqs.raise_irq(self.irq_index, regs.INT_VECTORS[cause])

    def _report_error(
        self, code: ErrorCode, context: int = NO_CONTEXT, ring_offset: int = 0
    ) -> None:
        self._set("ERROR_CODE", code)
        self._set("ERROR_CONTEXT", context)
        self._set("ERROR_RING_OFFSET", ring_offset)
        self._set("ERROR_COUNT", self._get("ERROR_COUNT") + 1)
        self._raise(IntBit.ERROR)

    # ------------------------------------------------------------------ resources

    def _resource_command(self, command: int) -> None:
        """RES_COMMAND (lock held).  Cheap bookkeeping, so it runs inline."""
        try:
            if command == regs.ResourceCommand.CREATE:
                size = self._get("RES_SIZE_LO") | self._get("RES_SIZE_HI") << 32
                resource = self.resources.create(size)
                self._set("RES_HANDLE", resource.handle)
            elif command == regs.ResourceCommand.DESTROY:
                resource = self.resources.destroy(self._get("RES_HANDLE"))
                offset, size = self.resources.aperture_offset(resource), resource.extent.size

                def destroyed() -> None:  # write back, unmap, then zero for the next user
                    self.window.deny(offset, size)
                    self.physical.scrub(resource.extent.offset, resource.extent.size)

                self._after_unlock.append(destroyed)
            elif command == regs.ResourceCommand.PLACE:
                resource = self.resources.get(self._get("RES_HANDLE"))
                resource.placed = True
                offset = self.resources.aperture_offset(resource)
                self._set("RES_OFFSET_LO", offset)
                self._set("RES_OFFSET_HI", offset >> 32)
                size = resource.extent.size
                self._after_unlock.append(lambda: self.window.allow(offset, size))
            elif command == regs.ResourceCommand.REMOVE:
                resource = self.resources.get(self._get("RES_HANDLE"))
                resource.placed = False
                offset, size = self.resources.aperture_offset(resource), resource.extent.size
                self._after_unlock.append(lambda: self.window.deny(offset, size))
            else:
                raise DeviceError(ErrorCode.INVALID_COMMAND, f"no resource command {command}")
        except DeviceError as exc:
            log.info("%s: resource command %d failed: %s", self.name, command, exc)
            self._set("RES_STATUS", exc.code)
            self._report_error(ErrorCode(exc.code))
            return
        self._set("RES_STATUS", ErrorCode.NONE)

    # ------------------------------------------------------------------ rings (EngineHost)

    def _ctx(self, context: int, name: str) -> int:
        return self.register_values[regs.context_register(context, name).offset]

    def _set_ctx(self, context: int, name: str, value: int) -> None:
        self.register_values[regs.context_register(context, name).offset] = value & 0xFFFFFFFF

    def _enable_ring(self, context: int) -> None:
        base = self._ctx(context, "RING_BASE_LO") | self._ctx(context, "RING_BASE_HI") << 32
        size = self._ctx(context, "RING_SIZE")
        self._generations[context] += 1
        self._set_ctx(context, "RING_HEAD", 0)
        self._set_ctx(context, "RING_TAIL", 0)
        if (
            base % COMMAND_SIZE
            or size & (size - 1)
            or not (regs.RING_MIN_SIZE <= size <= regs.RING_MAX_SIZE)
        ):
            self._set_ctx(context, "RING_STATUS", RingStatus.ERROR)
            self._report_error(ErrorCode.INVALID_ARGUMENT, context)
            return
        self._set_ctx(context, "RING_STATUS", RingStatus.IDLE)

    def next_command(self, context: int) -> tuple[int, int, int] | None:
        with self._lock:
            status = self._ctx(context, "RING_STATUS")
            if status not in (RingStatus.IDLE, RingStatus.BUSY):
                return None
            head, tail = self._ctx(context, "RING_HEAD"), self._ctx(context, "RING_TAIL")
            size = self._ctx(context, "RING_SIZE")
            if tail >= size or tail % COMMAND_SIZE:
                self._set_ctx(context, "RING_STATUS", RingStatus.ERROR)
                self._report_error(ErrorCode.INVALID_ARGUMENT, context, tail)
                return None
            if head == tail:
                self._set_ctx(context, "RING_STATUS", RingStatus.IDLE)
                return None
            self._set_ctx(context, "RING_STATUS", RingStatus.BUSY)
            base = self._ctx(context, "RING_BASE_LO") | self._ctx(context, "RING_BASE_HI") << 32
            generation = self._generations[context]
        self._command_lock.acquire()
        return generation, base + head, head

    def command_done(self, context: int, generation: int) -> None:
        try:
            with self._lock:
                if generation != self._generations[context]:
                    return
                size = self._ctx(context, "RING_SIZE")
                self._set_ctx(
                    context, "RING_HEAD", (self._ctx(context, "RING_HEAD") + COMMAND_SIZE) % size
                )
        finally:
            self._command_lock.release()

    def command_failed(self, context: int, generation: int, code: ErrorCode) -> None:
        try:
            with self._lock:
                if generation != self._generations[context]:
                    return
                self._set_ctx(context, "RING_STATUS", RingStatus.ERROR)
                self._report_error(code, context, self._ctx(context, "RING_HEAD"))
        finally:
            self._command_lock.release()

    def fence(self, context: int, generation: int, value: int) -> None:
        with self._lock:
            if generation != self._generations[context]:
                return
            self._set_ctx(context, "FENCE_LO", value)
            self._set_ctx(context, "FENCE_HI", value >> 32)
            self._raise(IntBit.FENCE)

    def resource_range(self, handle: int, offset: int, length: int) -> tuple[int, int]:
        with self._lock:
            resource = self.resources.get(handle)
            if offset < 0 or length < 0 or offset + length > resource.size:
                raise DeviceError(
                    ErrorCode.OUT_OF_BOUNDS,
                    f"{offset:#x}+{length:#x} outside resource {handle:#x} ({resource.size:#x})",
                )
            start = resource.extent.offset + offset
            return start, start + length

    def sync_device_memory(self, start: int, end: int) -> None:
        """Before and after the engine touches device memory [start, end)."""
        self.window.sync(start - self.partition.offset, end - start)

    def _report_fault(self, offset: int, write: bool) -> None:
        """A denied aperture access under the report policy: latch it, interrupt."""
        with self._lock:
            self._set("FAULT_OFFSET_LO", offset)
            self._set("FAULT_OFFSET_HI", offset >> 32)
            self._set("FAULT_COUNT", self._get("FAULT_COUNT") + 1)
            self._set("FAULT_FLAGS", 1 if write else 0)
            self._raise(IntBit.FAULT)

    def guest_memory(self) -> DmaTable:
        dma = self.dma
        if dma is None:
            raise DeviceError(ErrorCode.DMA_FAULT, "no client: guest memory is not mapped")
        return dma

    # ------------------------------------------------------------------ bring-up DMA engine

    def _start_bring_up_dma(self, value: int) -> None:
        if self._get("DMA_STATUS") == regs.DmaStatus.BUSY or value not in (
            regs.DmaCommand.TO_APERTURE,
            regs.DmaCommand.FROM_APERTURE,
        ):
            return
        guest = self._get("DMA_GUEST_ADDR_LO") | self._get("DMA_GUEST_ADDR_HI") << 32
        self._set("DMA_STATUS", regs.DmaStatus.BUSY)
        offset, length = self._get("DMA_APERTURE_OFFSET"), self._get("DMA_LENGTH")
        self._jobs.put((self._dma_generation, value, guest, offset, length))

    def _bring_up_dma(self) -> None:
        while (job := self._jobs.get()) is not None:
            generation, command, guest, aperture_offset, length = job
            error = 0
            try:
                if not 0 < length <= regs.DMA_MAX_LENGTH or aperture_offset + length > (
                    self.aperture_size
                ):
                    raise VfioUserError(errno.EINVAL, "bad DMA length or aperture range")
                dma = self.dma
                if dma is None:
                    raise VfioUserError(errno.EFAULT, "no client: guest memory is not mapped")
                window = self.aperture[aperture_offset : aperture_offset + length]
                self.window.sync(aperture_offset, length)
                if command == regs.DmaCommand.TO_APERTURE:
                    window[:] = dma.read(guest, length)
                    self.window.sync(aperture_offset, length)
                else:
                    dma.write(guest, window)
            except VfioUserError as exc:
                error = exc.errno
                log.info("%s: DMA %#x+%#x failed: %s", self.name, guest, length, exc)
            except Exception:
                log.exception("%s: DMA engine bug", self.name)
                error = errno.EIO
            with self._lock:
                if generation != self._dma_generation:
                    continue
                self._set("DMA_ERROR", error)
                self._set("DMA_STATUS", regs.DmaStatus.ERROR if error else regs.DmaStatus.DONE)
                self._raise(IntBit.DMA)

    # ------------------------------------------------------------------ config side effects

    def _flr_requested(self, offset: int, length: int) -> bool:
        """After a config write (lock held): did it start a function-level reset?"""
        devctl = self._pcie_offset + PCIE_DEVCTL
        if offset <= devctl + 1 and devctl < offset + length:
            value = self.config.get16(devctl)
            if value & PCIE_DEVCTL_FLR:
                self.config.set16(devctl, value & ~PCIE_DEVCTL_FLR)
                log.info("%s: function-level reset requested", self.name)
                return True
        return False


_DYNAMIC = frozenset(_reg(n) for n in ("MEM_FREE_LO", "MEM_FREE_HI", "RESOURCE_COUNT"))
