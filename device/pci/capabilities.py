"""Builders for the PCI capabilities a function advertises, one per capability, in the
manner of libvfio-user's ``pci_caps.c``.  Each returns a ``Capability`` (its body from
byte 2 on, with write and write-1-to-clear masks) for ``ConfigSpace.add_capability``.
Register offsets are those of the PCI Local Bus and PCI Express Base specifications,
relative to the capability's start.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from device.pci.config import CapabilityId


@dataclass(frozen=True)
class Capability:
    cap_id: CapabilityId
    body: bytes  # capability bytes 2.. (the ID and next pointer are the builder's)
    wmask: bytes = b""
    w1cmask: bytes = b""


HEADER = 2  # ID and next pointer: bodies start at capability byte 2


class _Body:
    """A capability body addressed by spec offsets (which count the 2-byte header)."""

    def __init__(self, size: int) -> None:
        self.data = bytearray(size - HEADER)
        self.wmask = bytearray(size - HEADER)
        self.w1cmask = bytearray(size - HEADER)

    def set(self, offset: int, width: int, value: int, *, wmask: int = 0, w1c: int = 0) -> None:
        fmt = {2: "<H", 4: "<I"}[width]
        struct.pack_into(fmt, self.data, offset - HEADER, value)
        struct.pack_into(fmt, self.wmask, offset - HEADER, wmask)
        struct.pack_into(fmt, self.w1cmask, offset - HEADER, w1c)

    def build(self, cap_id: CapabilityId) -> Capability:
        return Capability(cap_id, bytes(self.data), bytes(self.wmask), bytes(self.w1cmask))


# ---------------------------------------------------------------- power management

PM_SIZE = 8
PM_PMC = 0x02  # capabilities: version in bits 2:0
PM_PMCSR = 0x04  # control/status: power state in bits 1:0
PM_VERSION_3 = 0x0003
PM_PMCSR_NO_SOFT_RESET = 1 << 3
PM_PMCSR_POWER_STATE = 0x0003


def power_management() -> Capability:
    """Power management v3, D0 only, No_Soft_Reset; the power-state bits are writable."""
    body = _Body(PM_SIZE)
    body.set(PM_PMC, 2, PM_VERSION_3)
    body.set(PM_PMCSR, 2, PM_PMCSR_NO_SOFT_RESET, wmask=PM_PMCSR_POWER_STATE)
    return body.build(CapabilityId.POWER_MANAGEMENT)


# ---------------------------------------------------------------- MSI-X

MSIX_SIZE = 12
MSIX_CONTROL = 0x02  # table size - 1 in bits 10:0, function mask bit 14, enable bit 15
MSIX_TABLE = 0x04  # BIR in bits 2:0, offset above
MSIX_PBA = 0x08
MSIX_CONTROL_ENABLE = 1 << 15
MSIX_CONTROL_FUNCTION_MASK = 1 << 14


def msix(vectors: int, bar: int, table_offset: int, pba_offset: int) -> Capability:
    """MSI-X with its table and PBA in ``bar``; enable and function mask writable."""
    body = _Body(MSIX_SIZE)
    body.set(MSIX_CONTROL, 2, vectors - 1, wmask=MSIX_CONTROL_ENABLE | MSIX_CONTROL_FUNCTION_MASK)
    body.set(MSIX_TABLE, 4, table_offset | bar)
    body.set(MSIX_PBA, 4, pba_offset | bar)
    return body.build(CapabilityId.MSIX)


# ---------------------------------------------------------------- MSI

MSI64_SIZE = 14  # without per-vector masking
MSI_CONTROL = 0x02
MSI_ADDRESS_LO = 0x04
MSI_ADDRESS_HI = 0x08
MSI_DATA = 0x0C
MSI_CONTROL_ENABLE = 1 << 0
MSI_CONTROL_MULTIPLE_ENABLE = 0x0070  # bits 6:4: log2 of the vectors enabled
MSI_CONTROL_64BIT = 1 << 7
MSI_MULTIPLE_CAPABLE_SHIFT = 1  # bits 3:1: log2 of the vectors the function can use


def msi(vectors: int) -> Capability:
    """MSI with 64-bit addresses and ``vectors`` (a power of two, 1..32) messages."""
    if vectors < 1 or vectors > 32 or vectors & (vectors - 1):
        raise ValueError(f"MSI vectors must be a power of two 1..32, not {vectors}")
    log2 = vectors.bit_length() - 1
    body = _Body(MSI64_SIZE)
    body.set(
        MSI_CONTROL,
        2,
        MSI_CONTROL_64BIT | log2 << MSI_MULTIPLE_CAPABLE_SHIFT,
        wmask=MSI_CONTROL_ENABLE | MSI_CONTROL_MULTIPLE_ENABLE,
    )
    body.set(MSI_ADDRESS_LO, 4, 0, wmask=0xFFFFFFFC)
    body.set(MSI_ADDRESS_HI, 4, 0, wmask=0xFFFFFFFF)
    body.set(MSI_DATA, 2, 0, wmask=0xFFFF)
    return body.build(CapabilityId.MSI)


# ---------------------------------------------------------------- PCI Express

PCIE_SIZE = 0x3C  # a v2 endpoint's capability structure
PCIE_CAPABILITIES = 0x02  # version in bits 3:0, device/port type in bits 7:4
PCIE_DEVCAP = 0x04
PCIE_DEVCTL = 0x08
PCIE_DEVSTA = 0x0A
PCIE_LINKCAP = 0x0C
PCIE_LINKSTA = 0x12
PCIE_VERSION_2_ENDPOINT = 0x0002  # version 2, type 0 (PCI Express endpoint)
PCIE_DEVCAP_FLR = 1 << 28
PCIE_DEVCTL_RELAXED_ORDERING = 1 << 4
PCIE_DEVCTL_NO_SNOOP = 1 << 11
PCIE_DEVCTL_MRRS_512 = 2 << 12
PCIE_DEVCTL_FLR = 1 << 15
PCIE_DEVSTA_ERRORS = 0x000F  # correctable, non-fatal, fatal, unsupported request (W1C)
PCIE_LINK_2_5GT_X1 = 0x0011  # speed 1 (2.5 GT/s) in bits 3:0, width 1 in bits 9:4


def pci_express_endpoint() -> Capability:
    """PCI Express v2 endpoint, function-level reset capable, link x1 at 2.5 GT/s."""
    body = _Body(PCIE_SIZE)
    body.set(PCIE_CAPABILITIES, 2, PCIE_VERSION_2_ENDPOINT)
    body.set(PCIE_DEVCAP, 4, PCIE_DEVCAP_FLR)
    devctl = PCIE_DEVCTL_RELAXED_ORDERING | PCIE_DEVCTL_NO_SNOOP | PCIE_DEVCTL_MRRS_512
    body.set(PCIE_DEVCTL, 2, devctl, wmask=0xFFFF)
    body.set(PCIE_DEVSTA, 2, 0, w1c=PCIE_DEVSTA_ERRORS)
    body.set(PCIE_LINKCAP, 4, PCIE_LINK_2_5GT_X1)
    body.set(PCIE_LINKSTA, 2, PCIE_LINK_2_5GT_X1)
    return body.build(CapabilityId.PCI_EXPRESS)
