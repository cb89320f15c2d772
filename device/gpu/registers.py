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
)

BY_OFFSET: dict[int, Register] = {r.offset: r for r in REGISTERS}
BY_NAME: dict[str, Register] = {r.name: r for r in REGISTERS}
