"""Names for what a driver touches, from the device's own tables: BAR0 offsets by the
register table (and, for an offset it does not define, the block it falls in and the
offset into it), config space by the PCI header's fields, values by the ABI's enums.

The decoder uses these to write traces in the driver's words; device-side coverage
(docs/insight.md) will name unmodeled offsets the same way.
"""

from __future__ import annotations

import bisect
import enum
import errno

from device.gpu import abi
from device.gpu.regs import table as regs
from device.pci import config as pci

PAGE = 4096
REGISTER_SIZE = 4

_OFFSETS = sorted(regs.BY_OFFSET)
NEAR = 0x100  # an offset further than this past every register is named from BAR0


def _blocks() -> dict[int, tuple[str, int]]:
    """Register offset -> (its block, the block's first offset).  A block is a run of
    registers whose names share the part before the first ``_`` (``RES``, ``DMA``,
    ``CTX0``): the table's own grouping, so a new register needs nothing here."""
    found: dict[int, tuple[str, int]] = {}
    block, start = "", 0
    for offset in _OFFSETS:
        prefix = regs.BY_OFFSET[offset].name.split("_")[0]
        if prefix != block:
            block, start = prefix, offset
        found[offset] = (block, start)
    return found


_BLOCK_OF = _blocks()

CONFIG_FIELDS = {
    pci.VENDOR_ID: "VENDOR_ID",
    pci.DEVICE_ID: "DEVICE_ID",
    pci.COMMAND: "COMMAND",
    pci.STATUS: "STATUS",
    pci.REVISION: "REVISION",
    pci.CLASS_PROG: "CLASS",
    pci.CACHE_LINE_SIZE: "CACHE_LINE_SIZE",
    pci.LATENCY_TIMER: "LATENCY_TIMER",
    pci.HEADER_TYPE: "HEADER_TYPE",
    **{pci.BAR0 + 4 * n: f"BAR{n}" for n in range(6)},
    pci.SUBSYSTEM_VENDOR_ID: "SUBSYSTEM_VENDOR_ID",
    pci.SUBSYSTEM_ID: "SUBSYSTEM_ID",
    pci.ROM_ADDRESS: "ROM_ADDRESS",
    pci.CAPABILITIES_POINTER: "CAP_POINTER",
    pci.INTERRUPT_LINE: "INTERRUPT_LINE",
    pci.INTERRUPT_PIN: "INTERRUPT_PIN",
}
PCI_HEADER_SIZE = 0x40


def register_at(offset: int) -> regs.Register | None:
    """The register an access at ``offset`` falls in (any byte of its 4), if any."""
    return regs.BY_OFFSET.get(offset - offset % REGISTER_SIZE)


def unmodeled_name(offset: int) -> str:
    """An offset no register defines, by the block before it: ``RES+0x38``."""
    index = bisect.bisect_right(_OFFSETS, offset) - 1
    if index < 0 or offset - _OFFSETS[index] >= NEAR:
        return f"BAR0+{offset:#x}"
    block, start = _BLOCK_OF[_OFFSETS[index]]
    return f"{block}+{offset - start:#x}"


def bar0_name(offset: int, size: int = REGISTER_SIZE) -> str:
    """``CTX0_RING_TAIL``; ``SCRATCH+1`` for a byte inside a register; ``RES+0x38
    (unmodeled)`` where no register is; ``[8]`` suffixed for an access wider than one."""
    register = register_at(offset)
    if register is None:
        name = f"{unmodeled_name(offset)} (unmodeled)"
    elif offset == register.offset:
        name = register.name
    else:
        name = f"{register.name}+{offset - register.offset}"
    return name if size == REGISTER_SIZE else f"{name}[{size}]"


def config_name(offset: int) -> str:
    if offset in CONFIG_FIELDS:
        return CONFIG_FIELDS[offset]
    if offset < PCI_HEADER_SIZE:
        below = max(o for o in CONFIG_FIELDS if o <= offset)
        return f"{CONFIG_FIELDS[below]}+{offset - below}"
    return f"+{offset:#x}" + (" (capabilities)" if offset < 0x100 else " (extended)")


# ---------------------------------------------------------------------- values


def flags(kind: type[enum.IntFlag], value: int) -> str:
    """``FENCE|DMA``; unknown bits as hex; ``none`` for 0."""
    names = [m.name for m in kind if m.value & value and m.name]
    rest = value & ~sum(m.value for m in kind)
    if rest:
        names.append(f"{rest:#x}")
    return "|".join(names) or "none"


def enum_name(kind: type[enum.IntEnum], value: int) -> str:
    try:
        return kind(value).name
    except ValueError:
        return f"unknown {value:#x}"


def errno_name(value: int) -> str:
    return "none" if value == 0 else errno.errorcode.get(value, str(value))


def size_text(length: int) -> str:
    for unit, shift in (("MiB", 20), ("KiB", 10)):
        if length >= 1 << shift and not length % (1 << shift):
            return f"{length >> shift} {unit}"
    return f"{length} bytes"


def vector_causes(vectors: list[int]) -> str:
    """``vector 0 (FENCE)``: what each interrupt vector is raised for."""
    causes = {vector: bit.name for bit, vector in abi.INT_VECTORS.items()}
    return ", ".join(f"vector {v} ({causes.get(v, 'unused')})" for v in vectors)
