"""Command ring format: the single source of truth for what a driver writes to a ring.

A ring is a power-of-two array of 64-byte commands in guest memory.  Each command is
``u32 opcode, u32 flags (must be 0), u64 args[7]``, little endian.  The driver writes
commands at RING_TAIL, advances RING_TAIL and writes the context's DOORBELL; the
device executes them in order, advancing RING_HEAD after each.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

COMMAND_SIZE = 64
COMMAND_STRUCT = struct.Struct("<II7Q")
MAX_TRANSFER = 64 * 1024 * 1024  # per command
MAX_MATRIX_DIM = 4096


class Opcode(enum.IntEnum):
    NOP = 0x00
    WRITE_RESOURCE = 0x01
    READ_RESOURCE = 0x02
    COPY_RESOURCE = 0x03
    FILL = 0x04
    BLIT = 0x05
    SAXPY = 0x06
    MATMUL = 0x07
    FENCE = 0x08


@dataclass(frozen=True)
class CommandSpec:
    opcode: Opcode
    args: tuple[str, ...]
    doc: str


COMMANDS: tuple[CommandSpec, ...] = (
    CommandSpec(Opcode.NOP, (), "Does nothing."),
    CommandSpec(
        Opcode.WRITE_RESOURCE,
        ("guest_addr", "handle", "offset", "length"),
        "Copy `length` bytes of guest memory at `guest_addr` into the resource at `offset`.",
    ),
    CommandSpec(
        Opcode.READ_RESOURCE,
        ("handle", "offset", "guest_addr", "length"),
        "Copy `length` bytes of the resource at `offset` to guest memory.",
    ),
    CommandSpec(
        Opcode.COPY_RESOURCE,
        ("src_handle", "src_offset", "dst_handle", "dst_offset", "length"),
        "Copy between two resources (or within one; overlap is handled).",
    ),
    CommandSpec(
        Opcode.FILL,
        ("handle", "offset", "length", "value"),
        "Fill with the 32-bit `value`; `offset` and `length` are multiples of 4.",
    ),
    CommandSpec(
        Opcode.BLIT,
        (
            "src_handle",
            "src_offset",
            "src_pitch",
            "dst_handle",
            "dst_offset",
            "dst_pitch",
            "extent",
        ),
        "2D copy of `extent` (width in bytes in bits 31:0, height in rows in bits "
        "63:32) between surfaces with the given pitches (bytes per row).",
    ),
    CommandSpec(
        Opcode.SAXPY,
        ("x_handle", "x_offset", "y_handle", "y_offset", "count", "alpha"),
        "float32: y[i] = alpha * x[i] + y[i] for `count` elements; `alpha` is the "
        "IEEE-754 bits of a float32 in bits 31:0; offsets are multiples of 4.",
    ),
    CommandSpec(
        Opcode.MATMUL,
        ("a_handle", "b_handle", "c_handle", "m", "n", "k"),
        "float32, row major, from offset 0 of each resource: C (m x n) = A (m x k) "
        f"@ B (k x n); each dimension 1..{MAX_MATRIX_DIM}.",
    ),
    CommandSpec(
        Opcode.FENCE,
        ("guest_addr", "value"),
        "After all earlier commands: write the 64-bit `value` to `guest_addr` (unless "
        "it is 0), set the context's FENCE register, set INT_STATUS.FENCE and raise "
        "MSI-X vector 0 unless masked.",
    ),
)

SPECS: dict[int, CommandSpec] = {spec.opcode: spec for spec in COMMANDS}


@dataclass(frozen=True)
class Command:
    opcode: int
    flags: int
    args: tuple[int, ...]

    @classmethod
    def decode(cls, raw: bytes) -> Command:
        opcode, flags, *args = COMMAND_STRUCT.unpack(raw)
        return cls(opcode, flags, tuple(args))

    def arg(self, name: str) -> int:
        return self.args[SPECS[self.opcode].args.index(name)]


def encode(opcode: Opcode, **args: int) -> bytes:
    """A command's 64 bytes; drivers and tests build rings with it."""
    spec = SPECS[opcode]
    unknown = set(args) - set(spec.args)
    if unknown:
        raise TypeError(f"{opcode.name} has no argument(s) {sorted(unknown)}")
    values = [args.get(name, 0) for name in spec.args]
    values += [0] * (7 - len(values))
    return COMMAND_STRUCT.pack(opcode, 0, *values)
