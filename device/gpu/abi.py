"""The device's ABI as the guest sees it: identification, error codes, interrupt bits,
resource commands, ring and bring-up DMA status values and limits.

These are the numbers a guest driver hard-codes.  The register table (offsets, access,
reset values: ``regs/table.py``) and the ring commands (opcodes and argument layouts:
``engine/commands.py``) are the other two tables of the ABI; ``python -m device.docs``
generates ``docs/registers.md`` and the guest C headers from all three, and a test
checks that they are current.
"""

from __future__ import annotations

import enum

BAR0_SIZE = 64 * 1024

ID_VALUE = 0x4D475055  # "MGPU" read as a big-endian ASCII string
VERSION_MAJOR = 0
VERSION_MINOR = 2
MAX_CONTEXTS = 4
CONTEXT_BLOCK = 0x400
CONTEXT_STRIDE = 0x40


class ErrorCode(enum.IntEnum):
    """Values of ERROR_CODE and RES_STATUS."""

    NONE = 0
    INVALID_COMMAND = 1  # unknown opcode, non-zero reserved fields
    INVALID_HANDLE = 2  # no such resource in this instance
    OUT_OF_BOUNDS = 3  # offset/length outside the resource or the aperture
    DMA_FAULT = 4  # guest address not mapped for DMA (or not readable/writable)
    NO_MEMORY = 5  # the quota has room, but no contiguous run is large enough
    QUOTA_EXCEEDED = 6  # more memory than the instance's quota
    INVALID_ARGUMENT = 7  # bad size, alignment, dimension or ring configuration
    ENGINE_FAULT = 8  # the device itself failed (a bug: see the server log)
    APERTURE_BUSY = 9  # MAP: part of the aperture range is mapped already
    ALREADY_MAPPED = 10  # MAP: part of the resource range is mapped elsewhere already
    NO_APERTURE_SPACE = 11  # MAP_ANY, PLACE: no free aperture run is large enough


class IntBit(enum.IntFlag):
    """Bits of INT_STATUS, INT_MASK and INT_ACK, and the MSI-X vector each raises."""

    FENCE = 1 << 0  # MSI-X vector 0
    ERROR = 1 << 1  # MSI-X vector 1
    DMA = 1 << 2  # MSI-X vector 2
    FAULT = 1 << 3  # MSI-X vector 3: a denied aperture access (report policy)


INT_VECTORS = {IntBit.FENCE: 0, IntBit.ERROR: 1, IntBit.DMA: 2, IntBit.FAULT: 3}

NO_CONTEXT = 0xFFFFFFFF  # ERROR_CONTEXT of an error outside the rings (RES_COMMAND, DMA)


class FaultFlag(enum.IntFlag):
    """Bits of FAULT_FLAGS: how the last reported denied access was made."""

    WRITE = 1 << 0


class ResourceCommand(enum.IntEnum):
    CREATE = 1
    DESTROY = 2
    PLACE = 3
    REMOVE = 4
    MAP = 5
    MAP_ANY = 6
    UNMAP = 7


RESOURCE_COMMAND_DOCS = {
    ResourceCommand.CREATE: "Allocate RES_SIZE bytes of device memory from the physical GPU's "
    "pool (within the instance's quota); the new handle is in RES_HANDLE.",
    ResourceCommand.DESTROY: "Free resource RES_HANDLE: its aperture mappings go, its memory "
    "is zeroed and returned to the pool (after any command still using it).",
    ResourceCommand.PLACE: "Map all of RES_HANDLE at an aperture offset the device chooses; "
    "the offset is in RES_OFFSET.",
    ResourceCommand.REMOVE: "Unmap every aperture page that maps RES_HANDLE.",
    ResourceCommand.MAP: "Map RES_RANGE_LENGTH bytes of RES_HANDLE from RES_RANGE_OFFSET at "
    "aperture offset RES_APERTURE (all page aligned; length 0: to the end of the resource). "
    "The aperture range must be unmapped and the resource pages mapped nowhere else.",
    ResourceCommand.MAP_ANY: "As MAP, at an aperture offset the device chooses; the offset "
    "is in RES_OFFSET.",
    ResourceCommand.UNMAP: "Unmap RES_RANGE_LENGTH bytes of the aperture at RES_APERTURE "
    "(unmapped pages in the range are skipped).",
}


class RingStatus(enum.IntEnum):
    STOPPED = 0
    IDLE = 1
    BUSY = 2
    ERROR = 3


RING_CONTROL_ENABLE = 1 << 0
RING_MIN_SIZE = 4096
RING_MAX_SIZE = 1024 * 1024
DMA_MAX_LENGTH = 16 * 1024 * 1024


class DmaStatus(enum.IntEnum):
    IDLE = 0
    BUSY = 1
    DONE = 2
    ERROR = 3


class DmaCommand(enum.IntEnum):
    TO_APERTURE = 1
    FROM_APERTURE = 2
