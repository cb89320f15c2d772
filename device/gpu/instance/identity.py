"""What an instance is on the PCI bus: its IDs, BARs and capabilities, and the config
space built from them.  ``docs/registers.md`` takes its PCI tables from here."""

from __future__ import annotations

import logging

from device.gpu import abi
from device.gpu.instance.interrupts import MSI_VECTORS, MSIX_VECTORS
from device.gpu.modes import InterruptMode
from device.pci import capabilities as caps
from device.pci.config import Bar, BarKind, ConfigSpace
from device.units import KiB

log = logging.getLogger(__name__)

VENDOR_ID = 0x1234  # the experimental vendor ID QEMU's own emulated devices use
DEVICE_ID = 0x4D47
SUBSYSTEM_VENDOR_ID = 0x1234
SUBSYSTEM_ID = 0x0001
CLASS_CODE = 0x030200  # display controller, 3D controller, prog-if 0
REVISION = 0x01

REGISTER_BAR = 0  # BAR0: trapped registers
APERTURE_BAR = 2  # BAR2: the device-memory aperture
MSIX_BAR = 4  # BAR4: MSI-X table and PBA (MSI-X instances only)
MSIX_BAR_SIZE = 16 * KiB
MSIX_TABLE_OFFSET = 0x0000
MSIX_PBA_OFFSET = 0x2000


class PciFunction:
    """The config space of one instance, and the FLR it may request."""

    def __init__(self, interrupts: InterruptMode, aperture_size: int) -> None:
        cfg = ConfigSpace()
        cfg.init_header(
            vendor=VENDOR_ID, device=DEVICE_ID, class_code=CLASS_CODE, revision=REVISION,
            subsystem_vendor=SUBSYSTEM_VENDOR_ID, subsystem=SUBSYSTEM_ID,
        )  # fmt: skip
        cfg.add_bar(Bar(REGISTER_BAR, abi.BAR0_SIZE))
        cfg.add_bar(Bar(APERTURE_BAR, aperture_size, BarKind.MEM64, prefetchable=True))
        if interrupts is InterruptMode.MSIX:
            cfg.add_bar(Bar(MSIX_BAR, MSIX_BAR_SIZE))
        cfg.add(caps.power_management())
        if interrupts is InterruptMode.MSIX:
            cfg.add(caps.msix(MSIX_VECTORS, MSIX_BAR, MSIX_TABLE_OFFSET, MSIX_PBA_OFFSET))
        else:
            cfg.add(caps.msi(MSI_VECTORS))
        self.pcie_offset = cfg.add(caps.pci_express_endpoint())
        cfg.seal()
        self.config = cfg

    @property
    def devctl(self) -> int:
        """Config-space offset of the PCI Express device control register."""
        return self.pcie_offset + caps.PCIE_DEVCTL

    def take_flr(self, offset: int, length: int) -> bool:
        """After a config write: did it start a function-level reset?  (Clears the bit.)"""
        devctl = self.devctl
        if offset <= devctl + 1 and devctl < offset + length:
            value = self.config.get16(devctl)
            if value & caps.PCIE_DEVCTL_FLR:
                self.config.set16(devctl, value & ~caps.PCIE_DEVCTL_FLR)
                return True
        return False
