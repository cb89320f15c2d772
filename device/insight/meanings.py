"""What values mean in the driver's words: a register read (a status, an error code,
pending interrupt causes), a RES_COMMAND or DMA_CONTROL write with the arguments the
driver wrote before it, a command's opcode."""

from __future__ import annotations

from collections.abc import Callable

from device.gpu import abi
from device.gpu.abi import DmaCommand, DmaStatus, ErrorCode, IntBit, ResourceCommand, RingStatus
from device.gpu.engine.commands import COMMAND_SIZE, Opcode
from device.insight import names
from device.insight.state import CONTEXTS, REG, RING_OF, Instance, Record


def error_code(value: int) -> str:
    return "no error" if value == ErrorCode.NONE else names.enum_name(ErrorCode, value)


# What a value read from a register means, for the registers whose value has a name.
READ_MEANINGS: dict[int, Callable[[int], str]] = {
    REG["ID"]: lambda v: '"MGPU"' if v == abi.ID_VALUE else "not an mgpu ID",
    REG["VERSION"]: lambda v: f"{v >> 16}.{v & 0xFFFF}",
    REG["INT_STATUS"]: lambda v: f"pending {names.flags(IntBit, v)}",
    REG["INT_MASK"]: lambda v: f"masked {names.flags(IntBit, v)}",
    REG["ERROR_CODE"]: error_code,
    REG["RES_STATUS"]: error_code,
    REG["DMA_STATUS"]: lambda v: names.enum_name(DmaStatus, v),
    REG["DMA_ERROR"]: names.errno_name,
    REG["FAULT_OFFSET_LO"]: lambda v: f"page {v // names.PAGE:#x}",
    REG["ERROR_CONTEXT"]: lambda v: "a RES_COMMAND or DMA" if v == 0xFFFFFFFF else f"CTX{v}",
}


def read_meaning(state: Instance, offset: int, value: int) -> str:
    """What a value read from a register means, from the ABI's enums."""
    context = RING_OF.get(offset)
    if context is not None:
        offsets = CONTEXTS[context]
        if offset == offsets.status:
            return names.enum_name(RingStatus, value)
        if offset == offsets.head:
            tail = state.rings[context].tail
            if tail is not None:
                size = state.rings[context].size or 0
                pending = ((tail - value) % size if size else tail - value) // COMMAND_SIZE
                return f"{pending} command{'s' if pending != 1 else ''} pending"
        if offset == offsets.fence_lo:
            return f"fence {value}"
        return ""
    meaning = READ_MEANINGS.get(offset)
    return meaning(value) if meaning is not None else ""


def resource_command(state: Instance, value: int) -> str:
    name = names.enum_name(ResourceCommand, value)
    handle = state.values.get(REG["RES_HANDLE"], 0)
    aperture = state.value64("RES_APERTURE_LO")
    start, length = state.value64("RES_RANGE_OFFSET_LO"), state.value64("RES_RANGE_LENGTH_LO")
    span = "to the end" if length == 0 else names.size_text(length)
    if value == ResourceCommand.CREATE:
        return f"CREATE {names.size_text(state.value64('RES_SIZE_LO'))}"
    if value in (ResourceCommand.DESTROY, ResourceCommand.PLACE, ResourceCommand.REMOVE):
        return f"{name} resource {handle}"
    if value == ResourceCommand.MAP:
        return f"MAP resource {handle} +{start:#x} ({span}) at aperture {aperture:#x}"
    if value == ResourceCommand.MAP_ANY:
        return f"MAP_ANY resource {handle} +{start:#x} ({span})"
    if value == ResourceCommand.UNMAP:
        return f"UNMAP aperture {aperture:#x} ({names.size_text(length)})"
    return f"{name}: no such resource command"


def bring_up_dma(state: Instance, value: int) -> str:
    guest = state.value64("DMA_GUEST_ADDR_LO")
    offset = state.values.get(REG["DMA_APERTURE_OFFSET"], 0)
    length = names.size_text(state.values.get(REG["DMA_LENGTH"], 0))
    if value == DmaCommand.TO_APERTURE:
        return f"copy {length} guest {guest:#x} -> aperture {offset:#x}"
    if value == DmaCommand.FROM_APERTURE:
        return f"copy {length} aperture {offset:#x} -> guest {guest:#x}"
    return f"unknown DMA command {value:#x}"


def command_name(record: Record) -> str:
    """The opcode's name where the record has one, else "command"."""
    opcode = record.get("opcode")
    if isinstance(opcode, int) and not isinstance(opcode, bool):
        return names.enum_name(Opcode, opcode)
    return "command"
