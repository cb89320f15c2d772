"""BAR0 register map: the single source of truth for the guest-visible registers.

``docs/registers.md`` is generated from this module and ``engine/commands.py`` and ``abi.py``
(``python -m device.docs``), and a test fails when the two disagree.  Registers are
32 bits wide, little endian; any access width is accepted and split into the
registers it covers.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from device.gpu.abi import (
    CONTEXT_BLOCK,
    CONTEXT_STRIDE,
    ID_VALUE,
    MAX_CONTEXTS,
    VERSION_MAJOR,
    VERSION_MINOR,
)


class Access(enum.Enum):
    RO = "RO"  # read only; writes are ignored
    RW = "RW"  # read/write
    WO = "WO"  # write only: a command; reads return 0


class WriteAction(enum.Enum):
    """What a write to a register sets off, besides storing a RW register's value.  The
    register file maps each action to its handler; nothing is keyed on names."""

    NONE = "none"
    INT_ACK = "int_ack"  # clear INT_STATUS bits
    DEVICE_RESET = "device_reset"  # bit 0: reset the instance
    RES_COMMAND = "res_command"  # run a resource command
    DMA_CONTROL = "dma_control"  # start a bring-up DMA
    RING_CONFIG = "ring_config"  # base or size: read-only while the ring is enabled
    RING_CONTROL = "ring_control"  # enable or disable a ring
    DOORBELL = "doorbell"  # wake the engine for a context


class ReadAction(enum.Enum):
    """Registers whose value is computed when read instead of stored."""

    MEM_FREE = "mem_free"  # quota not used by resources (64 bits, LO/HI by ``shift``)
    RESOURCE_COUNT = "resource_count"


@dataclass(frozen=True)
class Register:
    name: str
    offset: int
    access: Access
    reset: int
    doc: str
    on_write: WriteAction = WriteAction.NONE
    on_read: ReadAction | None = None
    context: int | None = None  # the command context a per-context register belongs to
    shift: int = 0  # bit position of this word in a computed 64-bit value


def _context_registers(n: int) -> tuple[Register, ...]:
    base = CONTEXT_BLOCK + n * CONTEXT_STRIDE
    rows = (
        # (name, offset, access, on_write, doc)
        ("RING_BASE_LO", 0x00, Access.RW, WriteAction.RING_CONFIG,
         " ring: guest physical address, bits 31:0 (64-byte aligned). Read-only while "
         "the ring is enabled."),
        ("RING_BASE_HI", 0x04, Access.RW, WriteAction.RING_CONFIG,
         " ring: guest physical address, bits 63:32. Read-only while the ring is enabled."),
        ("RING_SIZE", 0x08, Access.RW, WriteAction.RING_CONFIG,
         " ring: size in bytes, a power of two from 4 KiB to 1 MiB. Read-only while the "
         "ring is enabled."),
        ("RING_HEAD", 0x0C, Access.RO, WriteAction.NONE,
         " ring: byte offset of the next command the device reads."),
        ("RING_TAIL", 0x10, Access.RW, WriteAction.NONE,
         " ring: byte offset after the last command written by the driver (a multiple "
         "of 64)."),
        ("DOORBELL", 0x14, Access.WO, WriteAction.DOORBELL,
         ": any write makes the device process commands up to RING_TAIL."),
        ("RING_CONTROL", 0x18, Access.RW, WriteAction.RING_CONTROL,
         ": bit 0 ENABLE. Setting it checks the ring configuration, latches base and size, "
         "and starts from HEAD = TAIL = 0; clearing it stops the ring."),
        ("RING_STATUS", 0x1C, Access.RO, WriteAction.NONE,
         ": 0 stopped, 1 idle, 2 busy, 3 error (halted until the ring is disabled and "
         "enabled again)."),
        ("FENCE_LO", 0x20, Access.RO, WriteAction.NONE,
         ": value of the last completed FENCE command, bits 31:0."),
        ("FENCE_HI", 0x24, Access.RO, WriteAction.NONE,
         ": value of the last completed FENCE command, bits 63:32."),
    )  # fmt: skip
    return tuple(
        Register(f"CTX{n}_{name}", base + offset, access, 0, f"Context {n}{doc}",
                 on_write, context=n)
        for name, offset, access, on_write, doc in rows
    )  # fmt: skip


REGISTERS: tuple[Register, ...] = (
    Register(
        "ID",
        0x000,
        Access.RO,
        ID_VALUE,
        'Identification: 0x4D475055 ("MGPU"). A driver checks it before anything else.',
    ),
    Register(
        "VERSION",
        0x004,
        Access.RO,
        (VERSION_MAJOR << 16) | VERSION_MINOR,
        "Device model version: major in bits 31:16, minor in bits 15:0.",
    ),
    Register(
        "SCRATCH",
        0x008,
        Access.RW,
        0,
        "Free for software. Reads return the last value written; reset clears it.",
    ),
    Register(
        "APERTURE_SIZE_LO", 0x010, Access.RO, 0, "Size of the BAR2 aperture in bytes, bits 31:0."
    ),
    Register(
        "APERTURE_SIZE_HI", 0x014, Access.RO, 0, "Size of the BAR2 aperture in bytes, bits 63:32."
    ),
    Register(
        "MEM_QUOTA_LO",
        0x020,
        Access.RO,
        0,
        "Device memory this instance may allocate, in bytes, bits 31:0.",
    ),
    Register("MEM_QUOTA_HI", 0x024, Access.RO, 0, "Device memory quota in bytes, bits 63:32."),
    Register(
        "MEM_FREE_LO",
        0x028,
        Access.RO,
        0,
        "Quota not used by resources, in bytes, bits 31:0.",
        on_read=ReadAction.MEM_FREE,
    ),
    Register(
        "MEM_FREE_HI",
        0x02C,
        Access.RO,
        0,
        "Quota not used by resources, in bytes, bits 63:32.",
        on_read=ReadAction.MEM_FREE,
        shift=32,
    ),
    Register(
        "CONTEXT_QUOTA",
        0x030,
        Access.RO,
        0,
        "Number of usable contexts (command rings); the others ignore writes.",
    ),
    Register(
        "RESOURCE_COUNT",
        0x034,
        Access.RO,
        0,
        "Number of live resources.",
        on_read=ReadAction.RESOURCE_COUNT,
    ),
    Register(
        "INT_STATUS",
        0x040,
        Access.RO,
        0,
        "Pending interrupt causes: bit 0 FENCE, bit 1 ERROR, bit 2 DMA (bring-up DMA "
        "done), bit 3 FAULT (denied aperture access). A cause that becomes pending "
        "raises its vector (0, 1, 2, 3) unless masked.",
    ),
    Register(
        "INT_MASK",
        0x044,
        Access.RW,
        0,
        "Interrupt mask: a set bit stops that cause from raising its vector (it still "
        "becomes pending in INT_STATUS).",
    ),
    Register(
        "INT_ACK",
        0x048,
        Access.WO,
        0,
        "Write 1s to clear the matching INT_STATUS bits.",
        on_write=WriteAction.INT_ACK,
    ),
    Register(
        "ERROR_CODE",
        0x080,
        Access.RO,
        0,
        "Last error (see error codes below); also raises the ERROR interrupt.",
    ),
    Register(
        "ERROR_CONTEXT",
        0x084,
        Access.RO,
        0,
        "Context whose command failed, or 0xFFFFFFFF for a RES_COMMAND or DMA error.",
    ),
    Register("ERROR_RING_OFFSET", 0x088, Access.RO, 0, "Ring offset of the failed command."),
    Register("ERROR_COUNT", 0x08C, Access.RO, 0, "Errors since the last reset."),
    Register(
        "FAULT_OFFSET_LO",
        0x0A0,
        Access.RO,
        0,
        "Aperture offset of the last denied access (report policy), bits 31:0.",
    ),
    Register(
        "FAULT_OFFSET_HI",
        0x0A4,
        Access.RO,
        0,
        "Aperture offset of the last denied access, bits 63:32.",
    ),
    Register(
        "FAULT_COUNT",
        0x0A8,
        Access.RO,
        0,
        "Denied aperture accesses reported since the last reset.",
    ),
    Register(
        "FAULT_FLAGS",
        0x0AC,
        Access.RO,
        0,
        "Bit 0: the last reported access was a write (trap mode; a first touch in "
        "fault mode is reported as a read).",
    ),
    Register(
        "DEVICE_RESET",
        0x0F0,
        Access.WO,
        0,
        "Write 1 to reset the instance: stops every ring, destroys every resource (its "
        "memory is zeroed), restores all registers.",
        on_write=WriteAction.DEVICE_RESET,
    ),
    Register(
        "RES_SIZE_LO",
        0x100,
        Access.RW,
        0,
        "Resource commands: size in bytes for CREATE, bits 31:0.",
    ),
    Register("RES_SIZE_HI", 0x104, Access.RW, 0, "Resource commands: size in bytes, bits 63:32."),
    Register(
        "RES_HANDLE",
        0x108,
        Access.RW,
        0,
        "Resource commands: the handle (written by CREATE, read by the others). "
        "Handles are never reused while the instance lives.",
    ),
    Register(
        "RES_OFFSET_LO",
        0x10C,
        Access.RO,
        0,
        "Resource commands: aperture offset returned by PLACE and MAP/MAP_ANY, bits 31:0.",
    ),
    Register(
        "RES_OFFSET_HI",
        0x110,
        Access.RO,
        0,
        "Resource commands: aperture offset returned by PLACE and MAP/MAP_ANY, bits 63:32.",
    ),
    Register(
        "RES_COMMAND",
        0x114,
        Access.WO,
        0,
        "Write a resource command (table below). Runs at once; the result is in RES_STATUS.",
        on_write=WriteAction.RES_COMMAND,
    ),
    Register(
        "RES_STATUS",
        0x118,
        Access.RO,
        0,
        "Result of the last RES_COMMAND: 0 on success, else an error code.",
    ),
    Register(
        "RES_APERTURE_LO",
        0x11C,
        Access.RW,
        0,
        "GPU MMU: aperture offset for MAP and UNMAP, bits 31:0 (page aligned).",
    ),
    Register("RES_APERTURE_HI", 0x120, Access.RW, 0, "GPU MMU: aperture offset, bits 63:32."),
    Register(
        "RES_RANGE_OFFSET_LO",
        0x124,
        Access.RW,
        0,
        "GPU MMU: offset in the resource for MAP, bits 31:0 (page aligned).",
    ),
    Register(
        "RES_RANGE_OFFSET_HI", 0x128, Access.RW, 0, "GPU MMU: offset in the resource, bits 63:32."
    ),
    Register(
        "RES_RANGE_LENGTH_LO",
        0x12C,
        Access.RW,
        0,
        "GPU MMU: bytes to MAP or UNMAP, bits 31:0 (page aligned; 0 for MAP: to the end).",
    ),
    Register(
        "RES_RANGE_LENGTH_HI", 0x130, Access.RW, 0, "GPU MMU: bytes to MAP or UNMAP, bits 63:32."
    ),
    Register(
        "DMA_GUEST_ADDR_LO",
        0x200,
        Access.RW,
        0,
        "Bring-up DMA: guest physical (bus) address, bits 31:0.",
    ),
    Register(
        "DMA_GUEST_ADDR_HI",
        0x204,
        Access.RW,
        0,
        "Bring-up DMA: guest physical (bus) address, bits 63:32.",
    ),
    Register(
        "DMA_APERTURE_OFFSET",
        0x208,
        Access.RW,
        0,
        "Bring-up DMA: byte offset in the BAR2 aperture.",
    ),
    Register("DMA_LENGTH", 0x20C, Access.RW, 0, "Bring-up DMA: bytes to copy, at most 16 MiB."),
    Register(
        "DMA_CONTROL",
        0x210,
        Access.WO,
        0,
        "Bring-up DMA: write 1 to copy guest memory to the aperture, 2 to copy the "
        "aperture to guest memory. Ignored while DMA_STATUS is BUSY.",
        on_write=WriteAction.DMA_CONTROL,
    ),
    Register(
        "DMA_STATUS",
        0x214,
        Access.RO,
        0,
        "Bring-up DMA: 0 idle, 1 busy, 2 done, 3 error. DONE or ERROR sets the DMA "
        "interrupt cause.",
    ),
    Register(
        "DMA_ERROR",
        0x218,
        Access.RO,
        0,
        "Bring-up DMA: errno of the last failed copy (14 EFAULT: unmapped guest "
        "address, 22 EINVAL: bad length or aperture range), 0 after a success.",
    ),
    *(r for n in range(MAX_CONTEXTS) for r in _context_registers(n)),
)

BY_OFFSET: dict[int, Register] = {r.offset: r for r in REGISTERS}
BY_NAME: dict[str, Register] = {r.name: r for r in REGISTERS}
assert len(BY_OFFSET) == len(REGISTERS), "two registers share an offset"


def context_register(context: int, name: str) -> Register:
    return BY_NAME[f"CTX{context}_{name}"]


@dataclass(frozen=True)
class ContextRegisters:
    """The offsets of one context's registers, for the code that owns the ring."""

    base_lo: int
    base_hi: int
    size: int
    head: int
    tail: int
    control: int
    status: int
    fence_lo: int
    fence_hi: int

    @classmethod
    def of(cls, context: int) -> ContextRegisters:
        def at(name: str) -> int:
            return context_register(context, name).offset

        return cls(
            at("RING_BASE_LO"), at("RING_BASE_HI"), at("RING_SIZE"), at("RING_HEAD"),
            at("RING_TAIL"), at("RING_CONTROL"), at("RING_STATUS"), at("FENCE_LO"),
            at("FENCE_HI"),
        )  # fmt: skip
