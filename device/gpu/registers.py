"""BAR0 register map: the single source of truth for the guest-visible registers.

``docs/registers.md`` is generated from this table (``python -m device.docs``), and a
test fails when the two disagree.  Registers are 32 bits wide, little endian; any
access width is accepted and split into the registers it covers.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

BAR0_SIZE = 64 * 1024

ID_VALUE = 0x4D475055  # "MGPU" read as a big-endian ASCII string
VERSION_MAJOR = 0
VERSION_MINOR = 1


class Access(enum.Enum):
    RO = "RO"  # read only; writes are ignored
    RW = "RW"  # read/write
    WO = "WO"  # write only: a command; reads return 0


@dataclass(frozen=True)
class Register:
    name: str
    offset: int
    access: Access
    reset: int
    doc: str


REGISTERS: tuple[Register, ...] = (
    Register("ID", 0x000, Access.RO, ID_VALUE,
             "Identification: 0x4D475055 (\"MGPU\"). A driver checks it before anything else."),
    Register("VERSION", 0x004, Access.RO, (VERSION_MAJOR << 16) | VERSION_MINOR,
             "Device model version: major in bits 31:16, minor in bits 15:0."),
    Register("SCRATCH", 0x008, Access.RW, 0,
             "Free for software. Reads return the last value written; reset clears it."),
    Register("APERTURE_SIZE_LO", 0x010, Access.RO, 0,
             "Size of the BAR2 aperture in bytes, bits 31:0."),
    Register("APERTURE_SIZE_HI", 0x014, Access.RO, 0,
             "Size of the BAR2 aperture in bytes, bits 63:32."),
    # The bring-up DMA engine: one copy at a time between guest memory and the aperture.
    Register("DMA_GUEST_ADDR_LO", 0x100, Access.RW, 0,
             "Bring-up DMA: guest physical (bus) address, bits 31:0."),
    Register("DMA_GUEST_ADDR_HI", 0x104, Access.RW, 0,
             "Bring-up DMA: guest physical (bus) address, bits 63:32."),
    Register("DMA_APERTURE_OFFSET", 0x108, Access.RW, 0,
             "Bring-up DMA: byte offset in the BAR2 aperture."),
    Register("DMA_LENGTH", 0x10C, Access.RW, 0,
             "Bring-up DMA: bytes to copy, at most 16 MiB."),
    Register("DMA_CONTROL", 0x110, Access.WO, 0,
             "Bring-up DMA: write 1 to copy guest memory to the aperture, 2 to copy the "
             "aperture to guest memory. Ignored while DMA_STATUS is BUSY."),
    Register("DMA_STATUS", 0x114, Access.RO, 0,
             "Bring-up DMA: 0 idle, 1 busy, 2 done, 3 error. On DONE or ERROR the device "
             "raises MSI-X vector 0."),
    Register("DMA_ERROR", 0x118, Access.RO, 0,
             "Bring-up DMA: errno of the last failed copy (14 EFAULT: unmapped guest "
             "address, 22 EINVAL: bad length or aperture range), 0 after a success."),
)

DMA_MAX_LENGTH = 16 * 1024 * 1024


class DmaStatus(enum.IntEnum):
    IDLE = 0
    BUSY = 1
    DONE = 2
    ERROR = 3


class DmaCommand(enum.IntEnum):
    TO_APERTURE = 1
    FROM_APERTURE = 2

BY_OFFSET: dict[int, Register] = {r.offset: r for r in REGISTERS}
BY_NAME: dict[str, Register] = {r.name: r for r in REGISTERS}
