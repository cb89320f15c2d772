"""One GPU instance as a vfio-user PCI device: config space, BARs and their accesses.

Region layout (vfio PCI region indexes):
  BAR0  64 KiB, 32-bit MMIO, trapped: every access is a REGION message to ``registers``.
  BAR2  the aperture, 64-bit prefetchable, one sparse-mmap area backed by a memfd that
        QEMU maps once at realize, so guest accesses never reach this process.
  BAR4  16 KiB, 32-bit MMIO: the MSI-X table (QEMU emulates it) and PBA.
  CONFIG 4 KiB PCI Express config space.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import queue
import struct
import threading

from ..dma import DmaTable
from ..irq import IrqLines
from ..pci.config import Bar, BarKind, CapabilityId, ConfigSpace
from ..protocol.constants import (
    PCI_NUM_REGIONS,
    DeviceFlags,
    IrqInfoFlags,
    PciIrq,
    PciRegion,
    RegionFlags,
)
from ..protocol.errors import VfioUserError
from ..protocol.messages import DeviceInfo, IrqInfo, RegionInfo, SparseArea
from . import registers as regs

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
DEFAULT_APERTURE_SIZE = 256 * 1024 * 1024

# PCI Express capability (version 2, endpoint) register offsets inside the capability.
PCIE_DEVCAP = 0x04
PCIE_DEVCTL = 0x08
PCIE_DEVSTA = 0x0A
PCIE_DEVCAP_FLR = 1 << 28
PCIE_DEVCTL_FLR = 1 << 15


class GpuInstance:
    """The device model behind one vfio-user socket."""

    def __init__(self, name: str = "gpu0", aperture_size: int = DEFAULT_APERTURE_SIZE) -> None:
        if aperture_size < mmap.PAGESIZE or aperture_size & (aperture_size - 1):
            raise ValueError("aperture size must be a power of two of at least one page")
        self.name = name
        self.aperture_size = aperture_size
        self._lock = threading.Lock()
        self.aperture_fd = os.memfd_create(f"mgpu-{name}-aperture", os.MFD_CLOEXEC)
        os.ftruncate(self.aperture_fd, aperture_size)
        self.aperture = mmap.mmap(self.aperture_fd, aperture_size, mmap.MAP_SHARED)
        self.config = self._build_config_space()
        self._region_sizes = {i: self.region_info(i)[0].size for i in range(PCI_NUM_REGIONS)}
        self.register_values: dict[int, int] = {}
        self.region_access_count: dict[int, int] = {}
        self.dma: DmaTable | None = None
        self.irqs: IrqLines | None = None
        self.resets = 0
        self._reset_registers()
        # Device work that may need DMA messages runs here, never on the socket thread.
        self._jobs: queue.Queue[tuple[int, int, int, int, int] | None] = queue.Queue()
        self._generation = 0  # bumped by reset: a copy started before it reports nothing
        self._worker = threading.Thread(target=self._work, name=f"{name}-dma", daemon=True)
        self._worker.start()

    # ------------------------------------------------------------------ build

    def _build_config_space(self) -> ConfigSpace:
        cfg = ConfigSpace()
        cfg.init_header(
            vendor=VENDOR_ID, device=DEVICE_ID, class_code=CLASS_CODE, revision=REVISION,
            subsystem_vendor=SUBSYSTEM_VENDOR_ID, subsystem=SUBSYSTEM_ID,
        )
        cfg.add_bar(Bar(0, regs.BAR0_SIZE))
        cfg.add_bar(Bar(2, self.aperture_size, BarKind.MEM64, prefetchable=True))
        cfg.add_bar(Bar(MSIX_BAR, MSIX_BAR_SIZE))
        # Power management v3, D0 only, NoSoftReset; PMCSR power state bits writable.
        cfg.add_capability(
            CapabilityId.POWER_MANAGEMENT,
            struct.pack("<HHBB", 0x0003, 0x0008, 0, 0),
            wmask=struct.pack("<HH", 0, 0x0003),
        )
        # MSI-X: table and PBA in BAR4; enable and function-mask bits writable.
        cfg.add_capability(
            CapabilityId.MSIX,
            struct.pack(
                "<HII", MSIX_VECTORS - 1, MSIX_TABLE_OFFSET | MSIX_BAR, MSIX_PBA_OFFSET | MSIX_BAR
            ),
            wmask=struct.pack("<H", 0xC000),
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
        cfg.write_hooks.append(self._on_config_write)
        return cfg

    def _reset_registers(self) -> None:
        self._generation = getattr(self, "_generation", 0) + 1
        values = {r.offset: r.reset for r in regs.REGISTERS}
        values[regs.BY_NAME["APERTURE_SIZE_LO"].offset] = self.aperture_size & 0xFFFFFFFF
        values[regs.BY_NAME["APERTURE_SIZE_HI"].offset] = self.aperture_size >> 32
        self.register_values = values

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
            flags = rw | RegionFlags.MMAP | RegionFlags.CAPS
            area = SparseArea(0, self.aperture_size)
            return RegionInfo(index, flags, self.aperture_size, 0, (area,)), self.aperture_fd
        if index == PciRegion.BAR4:
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
            IrqInfo(PciIrq.MSI, eventfd | IrqInfoFlags.NORESIZE, 0),
            IrqInfo(PciIrq.MSIX, eventfd | IrqInfoFlags.NORESIZE, MSIX_VECTORS),
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
            return self.aperture[offset : offset + count]
        if index == PciRegion.BAR4:
            return bytes(count)  # PBA: nothing pending; the table never reaches us
        with self._lock:
            return self.config.read(offset, count)

    def region_write(self, index: int, offset: int, data: bytes) -> None:
        self._check_access(index, offset, len(data))
        if index == PciRegion.BAR0:
            self._write_registers(offset, data)
        elif index == PciRegion.BAR2:
            self.aperture[offset : offset + len(data)] = data
        elif index == PciRegion.CONFIG:
            with self._lock:
                self.config.write(offset, data)

    def reset(self) -> None:
        """Device reset (DEVICE_RESET or function-level reset): registers back to power-on."""
        with self._lock:
            self._reset_registers()
            self.resets += 1
        log.info("%s: device reset", self.name)

    def close(self) -> None:
        self._jobs.put(None)
        self._worker.join(5)
        self.aperture.close()
        os.close(self.aperture_fd)

    # ------------------------------------------------------------------ registers

    def _read_registers(self, offset: int, count: int) -> bytes:
        if count == 4 and not offset & 3:  # the common, aligned case
            return self.register_values.get(offset, 0).to_bytes(4, "little")
        first, last = offset & ~3, (offset + count + 3) & ~3
        with self._lock:
            words = b"".join(
                self.register_values.get(o, 0).to_bytes(4, "little") for o in range(first, last, 4)
            )
        start = offset - first
        return words[start : start + count]

    def _write_registers(self, offset: int, data: bytes) -> None:
        first, last = offset & ~3, (offset + len(data) + 3) & ~3
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
                    self._command(register, value)
                else:
                    self.register_values[word_offset] = value

    def _reg(self, name: str) -> int:
        return self.register_values[regs.BY_NAME[name].offset]

    def _set_reg(self, name: str, value: int) -> None:
        self.register_values[regs.BY_NAME[name].offset] = value & 0xFFFFFFFF

    def _command(self, register: regs.Register, value: int) -> None:
        """A write to a command register (lock held)."""
        if register.name == "DMA_CONTROL":
            if self._reg("DMA_STATUS") == regs.DmaStatus.BUSY or value not in (
                regs.DmaCommand.TO_APERTURE, regs.DmaCommand.FROM_APERTURE
            ):
                return
            guest = self._reg("DMA_GUEST_ADDR_LO") | self._reg("DMA_GUEST_ADDR_HI") << 32
            self._set_reg("DMA_STATUS", regs.DmaStatus.BUSY)
            offset, length = self._reg("DMA_APERTURE_OFFSET"), self._reg("DMA_LENGTH")
            self._jobs.put((self._generation, value, guest, offset, length))

    # ------------------------------------------------------------------ bring-up DMA engine

    def _work(self) -> None:
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
                if command == regs.DmaCommand.TO_APERTURE:
                    data = dma.read(guest, length)
                    self.aperture[aperture_offset : aperture_offset + length] = data
                else:
                    dma.write(guest, self.aperture[aperture_offset : aperture_offset + length])
            except VfioUserError as exc:
                error = exc.errno
                log.info("%s: DMA %#x+%#x failed: %s", self.name, guest, length, exc)
            except Exception:
                log.exception("%s: DMA engine bug", self.name)
                error = errno.EIO
            with self._lock:
                if generation != self._generation:
                    continue
                self._set_reg("DMA_ERROR", error)
                self._set_reg("DMA_STATUS", regs.DmaStatus.ERROR if error else regs.DmaStatus.DONE)
                irqs = self.irqs
            if irqs is not None:
                irqs.raise_irq(PciIrq.MSIX, 0)

    # ------------------------------------------------------------------ config side effects

    def _on_config_write(self, offset: int, length: int) -> None:
        devctl = self._pcie_offset + PCIE_DEVCTL
        if offset <= devctl + 1 and devctl < offset + length:
            if self.config.get16(devctl) & PCIE_DEVCTL_FLR:
                self.config.set16(devctl, self.config.get16(devctl) & ~PCIE_DEVCTL_FLR)
                log.info("%s: function-level reset requested", self.name)
                self._reset_registers()
                self.resets += 1

