"""The vfio-user view of an instance: its device info, regions and IRQ indexes, as
QEMU's client needs them (PCI and RESET flags, at least 8 regions with config space
as region 7, ERR and REQ reported with count 1)."""

from __future__ import annotations

import errno

from device.errors import VfioUserError
from device.gpu import abi
from device.gpu.instance.identity import MSIX_BAR_SIZE
from device.gpu.instance.interrupts import MSI_VECTORS, MSIX_VECTORS
from device.gpu.modes import InterruptMode
from device.vfio_user.protocol.constants import (
    PCI_NUM_REGIONS,
    DeviceFlags,
    IrqInfoFlags,
    PciIrq,
    PciRegion,
    RegionFlags,
)
from device.vfio_user.protocol.messages import DeviceInfo, IrqInfo, RegionInfo, SparseArea

READ_WRITE = RegionFlags.READ | RegionFlags.WRITE


def device_info() -> DeviceInfo:
    return DeviceInfo(DeviceFlags.PCI | DeviceFlags.RESET, PCI_NUM_REGIONS, len(PciIrq))


def region_info(index: int, interrupts: InterruptMode, config_size: int) -> tuple[RegionInfo, None]:
    """Every region but the aperture (BAR2), which depends on the mapping mode."""
    if index == PciRegion.BAR0:
        return RegionInfo(index, READ_WRITE, abi.BAR0_SIZE), None
    if index == PciRegion.BAR4 and interrupts is InterruptMode.MSIX:
        return RegionInfo(index, READ_WRITE, MSIX_BAR_SIZE), None
    if index == PciRegion.CONFIG:
        return RegionInfo(index, READ_WRITE, config_size), None
    if 0 <= index < PCI_NUM_REGIONS and index != PciRegion.BAR2:
        return RegionInfo(index, 0, 0), None
    raise VfioUserError(errno.EINVAL, f"no region {index}")


def trapped_aperture(size: int) -> RegionInfo:
    """BAR2 without mmap: every access is a REGION message."""
    return RegionInfo(PciRegion.BAR2, READ_WRITE, size)


def mapped_aperture(size: int, file_offset: int, mapped: int) -> RegionInfo:
    """BAR2 as one sparse-mmap area of ``mapped`` bytes at ``file_offset`` of the fd."""
    flags = READ_WRITE | RegionFlags.MMAP | RegionFlags.CAPS
    return RegionInfo(PciRegion.BAR2, flags, size, file_offset, (SparseArea(0, mapped),))


def irq_infos(interrupts: InterruptMode) -> list[IrqInfo]:
    eventfd = IrqInfoFlags.EVENTFD
    msi = interrupts is InterruptMode.MSI
    return [
        IrqInfo(PciIrq.INTX, eventfd | IrqInfoFlags.MASKABLE, 0),
        IrqInfo(PciIrq.MSI, eventfd | IrqInfoFlags.NORESIZE, MSI_VECTORS if msi else 0),
        IrqInfo(PciIrq.MSIX, eventfd | IrqInfoFlags.NORESIZE, 0 if msi else MSIX_VECTORS),
        IrqInfo(PciIrq.ERR, eventfd, 1),
        IrqInfo(PciIrq.REQ, eventfd, 1),
    ]
