"""Trace records in the driver's words: ``CTX0_RING_TAIL <- 0x80: 2 commands queued``,
``FAULT page 0x1234: unmapped, policy report``.

Theory of operation.  The decoder reads records (``device/trace.py``'s flat dicts, live
or from a JSON-lines file); it never emits them.  A record alone rarely says what it
meant: a RING_TAIL write queues ``(new - old) / 64`` commands only if one knows the old
tail and the ring's size, a RES_COMMAND write creates ``RES_SIZE`` bytes only if one saw
RES_SIZE written.  So ``Decoder`` keeps, per instance, what the driver wrote to BAR0
(``values``) and each ring's state as the device has it: the size latched when the ring
was enabled, the last tail, and the *submissions* in flight (the ring offsets one TAIL
write queued).  Records must be fed in sequence order (``decode_all`` sorts them).

Each decoded record is a ``Line``: its text, the Perfetto track it belongs on, and the
submission it belongs to, which links a submit, the commands it queued and the FENCE
interrupt that ended it (the Perfetto flows of ``perfetto.py``).  A command record is
matched to a submission by its ring offset; a FENCE interrupt to the command that was
running when it came (the engine raises it before the command's end record), or the
last one that ran.

A record that is not what the trace module writes (a hand-edited or corrupt file) is a
``RecordError`` naming the field; nothing a record holds can make the decoder fail in
another way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

from device.gpu import abi
from device.gpu.abi import IntBit
from device.gpu.aperture.access_policy import denied_access
from device.gpu.engine.commands import COMMAND_SIZE
from device.gpu.modes import DeniedPolicy
from device.gpu.regs import table as regs
from device.gpu.regs.table import WriteAction
from device.insight import names
from device.insight.meanings import bring_up_dma, command_name, read_meaning, resource_command
from device.insight.state import CONTEXTS, REG, Instance, Record, Ring, Submission
from device.vfio_user.protocol.constants import PciRegion

BAR0, BAR2, BAR4, CONFIG = PciRegion.BAR0, PciRegion.BAR2, PciRegion.BAR4, PciRegion.CONFIG
# The fault log's kinds for a denied access, back to the policy that decided it.
POLICY_OF = {denied_access(p).record: p for p in DeniedPolicy}
POLICY_EFFECT = {
    DeniedPolicy.SIGBUS: "refused (SIGBUS in fault mode)",
    DeniedPolicy.DUMMY: "zero page, writes dropped",
    DeniedPolicy.REPORT: "all ones, FAULT registers and interrupt",
}
FENCE_VECTOR = abi.INT_VECTORS[IntBit.FENCE]


class RecordError(ValueError):
    """A record that is not what device/trace.py writes; the message names the field."""


class Line(NamedTuple):
    record: Record
    text: str
    track: str  # the Perfetto track (thread) within the instance's process
    submission: int | None = None  # links submit -> commands -> FENCE interrupt
    submits: int = 0  # commands this record queued (a RING_TAIL write)


# ---------------------------------------------------------------------- fields


def field_of(record: Record, name: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
    """A field of the record, of the type the trace module writes (a bool is no number)."""
    value = record.get(name, default)
    if value is ...:
        raise RecordError(f"no field {name!r}")
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise RecordError(f"field {name!r} is {value!r}, not {describe(kind)}")
    return value


def describe(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(k.__name__ for k in kinds)


def number(record: Record, name: str, default: Any = ...) -> int:
    return int(field_of(record, name, int, default))


# ---------------------------------------------------------------------- the decoder


class Decoder:
    def __init__(self) -> None:
        self.instances: dict[str, Instance] = {}
        self._kinds: dict[str, Callable[[Instance, Record], Line]] = {
            "register": self._register,
            "fault": self._fault,
            "revoke": self._fault,
            "writeback": self._fault,
            "page_in": self._fault,
            "evict": self._fault,
            "dma": self._dma,
            "irq": self._irq,
            "command": self._command,
            "control": self._control,
        }

    def decode(self, record: Record) -> Line:
        """One record, in the driver's words; ``RecordError`` if it is not a record."""
        if not isinstance(record, Mapping):
            raise RecordError(f"a record is a JSON object, not {type(record).__name__}")
        kind = field_of(record, "kind", str)
        handler = self._kinds.get(kind)
        if handler is None:
            raise RecordError(f"unknown kind {kind!r}")
        field_of(record, "seq", int)
        field_of(record, "ts", (int, float))
        name = field_of(record, "instance", str)
        if field_of(record, "ph", str, "i") not in ("B", "E", "i"):
            raise RecordError(f"phase {record['ph']!r} is not B, E or i")
        state = self.instances.get(name)
        if state is None:
            state = self.instances[name] = Instance()
        return handler(state, record)

    def decode_all(self, records: Iterable[Record]) -> list[Line]:
        return [self.decode(r) for r in sorted(records, key=sequence)]

    # ------------------------------------------------------------------ registers

    def _register(self, state: Instance, record: Record) -> Line:
        region = number(record, "region")
        offset, size = number(record, "offset"), number(record, "size")
        value = number(record, "value")
        write = bool(record.get("write", False))
        arrow = "<-" if write else "->"
        if region == BAR0:
            return self._bar0(state, record, offset, size, value, write)
        if region == CONFIG:
            where, track = f"config {names.config_name(offset)}", "config space"
        elif region == BAR2:
            where, track = f"aperture {offset:#x}[{size}] (trapped)", "aperture (trapped)"
        elif region == BAR4:
            where, track = f"MSI-X PBA +{offset:#x}", "MSI-X"
        else:
            where, track = f"region {region} +{offset:#x}", f"region {region}"
        return Line(record, f"{where} {arrow} {value:#x}{dropped(record)}", track)

    def _bar0(
        self, state: Instance, record: Record, offset: int, size: int, value: int, write: bool
    ) -> Line:
        name = names.bar0_name(offset, size)
        register = names.register_at(offset)
        whole = register is not None and offset == register.offset and size >= 4
        track = f"reg {register.name}" if register is not None else "reg (unmodeled)"
        if not write:
            meaning = read_meaning(state, offset, value) if whole else ""
            return Line(record, f"{name} -> {value:#x}{suffix(meaning)}", track)
        if record.get("dropped"):
            return Line(record, f"{name} <- {value:#x}{dropped(record)}", track)
        for index in range(0, min(size, 8), 4):  # what the register file will hold
            state.values[offset + index] = value >> (8 * index) & 0xFFFFFFFF
        if not whole or register is None:
            return Line(record, f"{name} <- {value:#x}", track)
        meaning, submission, queued = self._write_meaning(state, register, value)
        text = f"{name} <- {value:#x}{suffix(meaning)}"
        return Line(record, text, track, submission.ident if submission else None, queued)

    def _write_meaning(
        self, state: Instance, register: regs.Register, value: int
    ) -> tuple[str, Submission | None, int]:
        action, context = register.on_write, register.context
        if context is not None:
            return self._ring_write(state, context, register.offset, value)
        if action is WriteAction.RES_COMMAND:
            return resource_command(state, value), None, 0
        if action is WriteAction.DMA_CONTROL:
            return bring_up_dma(state, value), None, 0
        if action is WriteAction.INT_ACK:
            return f"acknowledge {names.flags(IntBit, value)}", None, 0
        if action is WriteAction.DEVICE_RESET:
            if not value & 1:
                return "no effect (bit 0 clear)", None, 0
            state.reset()
            return "reset the instance", None, 0
        if register.offset == REG["INT_MASK"]:
            return f"mask {names.flags(IntBit, value)}", None, 0
        return "", None, 0

    def _ring_write(
        self, state: Instance, context: int, offset: int, value: int
    ) -> tuple[str, Submission | None, int]:
        ring, offsets = state.rings[context], CONTEXTS[context]
        if offset == offsets.control:
            if not value & abi.RING_CONTROL_ENABLE:
                ring.submissions.clear()
                ring.enabled = False
                return "disable the ring", None, 0
            ring.enabled = True
            ring.size = state.values.get(offsets.size, 0)
            ring.base = state.values.get(offsets.base_lo, 0) | (
                state.values.get(offsets.base_hi, 0) << 32
            )
            ring.tail = 0
            ring.submissions.clear()
            size = ring.size
            valid = not ring.base % COMMAND_SIZE and not size & (size - 1)
            valid = valid and abi.RING_MIN_SIZE <= size <= abi.RING_MAX_SIZE
            note = "" if valid else " (not a valid ring: it goes to ERROR)"
            return f"enable the ring: base {ring.base:#x}, {names.size_text(size)}{note}", None, 0
        if offset == offsets.tail:
            return self._submit(state, ring, value)
        if offset == offsets.size:
            return names.size_text(value), None, 0
        if state.values.get(offsets.control, 0) & abi.RING_CONTROL_ENABLE and offset in (
            offsets.base_lo, offsets.base_hi,
        ):  # fmt: skip
            return "ignored: the ring is enabled", None, 0
        if offset == REG[f"CTX{context}_DOORBELL"]:
            tail = f"{ring.tail:#x}" if ring.tail is not None else "the tail"
            return f"run commands up to {tail}", None, 0
        return "", None, 0

    def _submit(self, state: Instance, ring: Ring, tail: int) -> tuple[str, Submission | None, int]:
        old, ring.tail = ring.tail, tail
        if ring.enabled is False:
            return "the ring is disabled: nothing runs", None, 0
        if old is None:
            return "the tail before is unknown (tracing began later)", None, 0
        span = tail - old
        if ring.size:
            span %= ring.size
        if span < 0 or span % COMMAND_SIZE:
            return f"not a whole number of commands past {old:#x}", None, 0
        count = span // COMMAND_SIZE
        if count == 0:
            return "nothing new queued", None, 0
        state.submissions += 1
        submission = Submission(state.submissions, old, count)
        ring.submissions.append(submission)
        plural = "s" if count != 1 else ""
        return f"{count} command{plural} queued", submission, count

    # ------------------------------------------------------------------ the engine

    def _command(self, state: Instance, record: Record) -> Line:
        context, offset = number(record, "context"), number(record, "ring_offset")
        if not 0 <= context < len(state.rings):
            raise RecordError(f"context {context} does not exist")
        ring = state.rings[context]
        submission = ring.owner(offset)
        what = command_name(record)
        phase = record.get("ph", "i")
        if phase == "B":
            state.running = submission
            text = f"CTX{context} {what} @{offset:#x} starts"
        else:
            result = field_of(record, "result", str, "done")
            state.running, state.last = None, submission or state.last
            text = f"CTX{context} {what} @{offset:#x} " + (
                "done" if result == "done" else f"failed: {result}"
            )
            if submission is not None:
                submission.done += 1
                if submission.done >= submission.count:
                    ring.submissions.remove(submission)
        ident = submission.ident if submission is not None else None
        return Line(record, text, f"ring {context}", ident)

    def _dma(self, state: Instance, record: Record) -> Line:
        if "context" not in record:  # the bring-up DMA engine
            phase = record.get("ph", "i")
            if phase == "B":
                text = f"bring-up DMA starts: {names.size_text(number(record, 'length'))}"
            else:
                error = number(record, "error", 0)
                text = "bring-up DMA " + (
                    "done" if not error else f"failed: {names.errno_name(error)}"
                )
            return Line(record, text, "bring-up DMA")
        context = number(record, "context")
        op = field_of(record, "op", str)
        address, length = number(record, "address"), number(record, "length")
        ring = state.rings[context] if 0 <= context < len(state.rings) else Ring()
        if op == "read" and length == COMMAND_SIZE and ring.base is not None and ring.size:
            if 0 <= address - ring.base < ring.size:
                text = f"CTX{context} fetch the command @{address - ring.base:#x}"
                return Line(record, text, "engine", ident_of(state.running))
        direction = "from" if op == "read" else "to"
        text = f"CTX{context} DMA {op} {names.size_text(length)} {direction} guest {address:#x}"
        return Line(record, text, "engine", ident_of(state.running))

    def _irq(self, state: Instance, record: Record) -> Line:
        vectors = field_of(record, "vectors", list)
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in vectors):
            raise RecordError(f"vectors {vectors!r} are not integers")
        injected = " (an injected drop or delay applies)" if record.get("injected") else ""
        submission = None
        if FENCE_VECTOR in vectors and not injected:
            submission = ident_of(state.running or state.last)
        text = f"IRQ {names.vector_causes(vectors)}{injected}"
        return Line(record, text, "interrupts", submission)

    # ------------------------------------------------------------------ faults, control

    def _fault(self, state: Instance, record: Record) -> Line:
        kind = field_of(record, "name", str, record["kind"])
        offset, length = number(record, "offset"), number(record, "length", names.PAGE)
        handle = record.get("handle")
        page = f"page {offset // names.PAGE:#x}"
        pages = length // names.PAGE
        many = f" ({pages} pages)" if pages > 1 else ""
        access = " (write)" if record.get("write") else ""
        of = f" of resource {handle}" if isinstance(handle, int) else ""
        if kind in POLICY_OF:
            policy = POLICY_OF[kind]
            effect = POLICY_EFFECT[policy]
            text = f"FAULT {page}{access}: unmapped, policy {policy.value} ({effect})"
        else:
            text = {
                "served": f"FAULT {page}{many}{access}: served{of}",
                "revoked": f"REVOKE {page}{many}",
                "written_back": f"WRITEBACK {page}{many}{of}",
                "write_dropped": f"WRITE DROPPED {page}{many}: unmapped",
                "paged_in": f"PAGE-IN {page}{many}{of}",
                "evicted": f"EVICT {page}{many}{of}",
            }.get(kind, f"{kind} {page}{many}")
        return Line(record, text, "faults")

    def _control(self, state: Instance, record: Record) -> Line:
        name = field_of(record, "name", str, "control")
        skip = {"seq", "ts", "instance", "kind", "ph", "name"}
        detail = " ".join(f"{k}={v}" for k, v in record.items() if k not in skip)
        return Line(record, f"CONTROL {name}{suffix(detail, ' ')}", "control")


def ident_of(submission: Submission | None) -> int | None:
    return submission.ident if submission is not None else None


def sequence(record: Record) -> int:
    seq = record.get("seq") if isinstance(record, Mapping) else None
    return seq if isinstance(seq, int) else 0


def suffix(meaning: str, separator: str = ": ") -> str:
    return f"{separator}{meaning}" if meaning else ""


def dropped(record: Record) -> str:
    return " (dropped: the device is removed)" if record.get("dropped") else ""
