"""Ring commands, declared once: each opcode's argument layout, its documentation and
its handler are one decorated function here.  The engine dispatches from ``SPECS``
and passes the arguments by name; ``docs/registers.md`` and the guest C header are
generated from ``COMMANDS``.  Adding a command is one function (and ``python -m
device.docs``).

Wire format: a ring is a power-of-two array of 64-byte commands in guest memory,
each ``u32 opcode, u32 flags (must be 0), u64 args[7]``, little endian; a handler's
parameters after ``run`` name args[0], args[1], ... in order.  The driver writes
commands at RING_TAIL, advances RING_TAIL and writes the context's DOORBELL; the
device executes them in order, advancing RING_HEAD after each.

Every argument is a guest value: handlers check each one before use and raise
``DeviceError``, which fails the command (the ring halts in ERROR, the ERROR
interrupt is raised); they never touch memory outside what ``run`` hands them.
"""

from __future__ import annotations

import enum
import inspect
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt
from numpy.lib.stride_tricks import as_strided

from device.errors import DeviceError
from device.gpu.abi import ErrorCode

COMMAND_SIZE = 64
COMMAND_STRUCT = struct.Struct("<II7Q")
MAX_ARGS = 7
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


class Execution(Protocol):
    """What a handler may do while its command runs (the engine provides it)."""

    def source(self, handle: int, offset: int, length: int) -> npt.NDArray[np.uint8]:
        """Bytes [offset, offset+length) of a resource the command reads: checked, and
        held (resident, fenced from the guest) for the command."""

    def target(self, handle: int, offset: int, length: int) -> npt.NDArray[np.uint8]:
        """As ``source``, for bytes the command writes (and may read)."""

    def read_guest_into(self, address: int, out: npt.NDArray[np.uint8]) -> None: ...
    def write_guest(self, address: int, data: bytes | memoryview) -> None: ...
    def signal_fence(self, value: int) -> None: ...


Handler = Callable[..., None]  # (run: Execution, **arguments: int) -> None


@dataclass(frozen=True)
class CommandSpec:
    opcode: Opcode
    args: tuple[str, ...]
    doc: str
    handler: Handler


_TABLE: dict[Opcode, CommandSpec] = {}


def command(opcode: Opcode, doc: str) -> Callable[[Handler], Handler]:
    """Declare a ring command: its arguments are the handler's parameters after ``run``."""

    def declare(handler: Handler) -> Handler:
        args = tuple(inspect.signature(handler).parameters)[1:]
        if len(args) > MAX_ARGS or opcode in _TABLE:
            raise ValueError(f"{opcode.name}: too many arguments or declared twice")
        _TABLE[opcode] = CommandSpec(opcode, args, doc, handler)
        return handler

    return declare


def check_length(length: int) -> None:
    if not 0 < length <= MAX_TRANSFER:
        raise DeviceError(ErrorCode.INVALID_ARGUMENT, f"length {length} outside 1..{MAX_TRANSFER}")


# ---------------------------------------------------------------- the commands


@command(Opcode.NOP, "Does nothing.")
def nop(run: Execution) -> None:
    pass


@command(
    Opcode.WRITE_RESOURCE,
    "Copy `length` bytes of guest memory at `guest_addr` into the resource at `offset`.",
)
def write_resource(run: Execution, guest_addr: int, handle: int, offset: int, length: int) -> None:
    check_length(length)
    run.read_guest_into(guest_addr, run.target(handle, offset, length))


@command(Opcode.READ_RESOURCE, "Copy `length` bytes of the resource at `offset` to guest memory.")
def read_resource(run: Execution, handle: int, offset: int, guest_addr: int, length: int) -> None:
    check_length(length)
    run.write_guest(guest_addr, run.source(handle, offset, length).data)


@command(Opcode.COPY_RESOURCE, "Copy between two resources (or within one; overlap is handled).")
def copy_resource(
    run: Execution, src_handle: int, src_offset: int, dst_handle: int, dst_offset: int,
    length: int,
) -> None:  # fmt: skip
    check_length(length)
    source = run.source(src_handle, src_offset, length)
    target = run.target(dst_handle, dst_offset, length)
    np.copyto(target, source)  # numpy copes with overlap


@command(Opcode.FILL, "Fill with the 32-bit `value`; `offset` and `length` are multiples of 4.")
def fill(run: Execution, handle: int, offset: int, length: int, value: int) -> None:
    check_length(length)
    if offset % 4 or length % 4 or value > 0xFFFFFFFF:
        raise DeviceError(ErrorCode.INVALID_ARGUMENT, "FILL needs 4-byte alignment")
    run.target(handle, offset, length).view(np.uint32)[:] = value


def _surface(
    pick: Callable[[int, int, int], npt.NDArray[np.uint8]],
    handle: int, offset: int, pitch: int, width: int, height: int,
) -> npt.NDArray[np.uint8]:  # fmt: skip
    if width <= 0 or height <= 0 or pitch < width or pitch * height > MAX_TRANSFER:
        raise DeviceError(
            ErrorCode.INVALID_ARGUMENT, f"bad surface: pitch {pitch}, {width} x {height}"
        )
    flat = pick(handle, offset, pitch * (height - 1) + width)
    return as_strided(flat, shape=(height, width), strides=(pitch, 1), writeable=True)


@command(
    Opcode.BLIT,
    "2D copy of `extent` (width in bytes in bits 31:0, height in rows in bits 63:32) "
    "between surfaces with the given pitches (bytes per row).",
)
def blit(
    run: Execution, src_handle: int, src_offset: int, src_pitch: int, dst_handle: int,
    dst_offset: int, dst_pitch: int, extent: int,
) -> None:  # fmt: skip
    width, height = extent & 0xFFFFFFFF, extent >> 32
    source = _surface(run.source, src_handle, src_offset, src_pitch, width, height)
    target = _surface(run.target, dst_handle, dst_offset, dst_pitch, width, height)
    target[...] = source.copy() if np.shares_memory(source, target) else source


def _floats(
    pick: Callable[[int, int, int], npt.NDArray[np.uint8]], handle: int, offset: int, count: int
) -> npt.NDArray[np.float32]:
    if offset % 4:
        raise DeviceError(ErrorCode.INVALID_ARGUMENT, "float32 data must be 4-byte aligned")
    return pick(handle, offset, count * 4).view(np.float32)


@command(
    Opcode.SAXPY,
    "float32: y[i] = alpha * x[i] + y[i] for `count` elements; `alpha` is the "
    "IEEE-754 bits of a float32 in bits 31:0; offsets are multiples of 4.",
)
def saxpy(
    run: Execution, x_handle: int, x_offset: int, y_handle: int, y_offset: int, count: int,
    alpha: int,
) -> None:  # fmt: skip
    if not 0 < count <= MAX_TRANSFER // 4 or alpha > 0xFFFFFFFF:
        raise DeviceError(ErrorCode.INVALID_ARGUMENT, f"bad SAXPY count {count}")
    scale = np.float32(struct.unpack("<f", alpha.to_bytes(4, "little"))[0])
    x = _floats(run.source, x_handle, x_offset, count)
    y = _floats(run.target, y_handle, y_offset, count)
    y[:] = scale * x + y


@command(
    Opcode.MATMUL,
    "float32, row major, from offset 0 of each resource: C (m x n) = A (m x k) "
    f"@ B (k x n); each dimension 1..{MAX_MATRIX_DIM}.",
)
def matmul(
    run: Execution, a_handle: int, b_handle: int, c_handle: int, m: int, n: int, k: int
) -> None:
    if not all(0 < d <= MAX_MATRIX_DIM for d in (m, n, k)):
        raise DeviceError(ErrorCode.INVALID_ARGUMENT, f"bad MATMUL dims {m}x{n}x{k}")
    matrix_a = _floats(run.source, a_handle, 0, m * k).reshape(m, k)
    matrix_b = _floats(run.source, b_handle, 0, k * n).reshape(k, n)
    matrix_c = _floats(run.target, c_handle, 0, m * n).reshape(m, n)
    np.matmul(matrix_a, matrix_b, out=matrix_c)


@command(
    Opcode.FENCE,
    "After all earlier commands: write the 64-bit `value` to `guest_addr` (unless "
    "it is 0), set the context's FENCE register, set INT_STATUS.FENCE and raise "
    "MSI-X vector 0 unless masked.",
)
def fence(run: Execution, guest_addr: int, value: int) -> None:
    if guest_addr:
        run.write_guest(guest_addr, value.to_bytes(8, "little"))
    run.signal_fence(value)


# ---------------------------------------------------------------- the table

COMMANDS: tuple[CommandSpec, ...] = tuple(_TABLE[op] for op in sorted(_TABLE))
SPECS: dict[int, CommandSpec] = {spec.opcode: spec for spec in COMMANDS}
assert set(SPECS) == set(Opcode), "every opcode needs a handler"


@dataclass(frozen=True)
class Command:
    opcode: int
    flags: int
    args: tuple[int, ...]

    @classmethod
    def decode(cls, raw: bytes) -> Command:
        opcode, flags, *args = COMMAND_STRUCT.unpack(raw)
        return cls(opcode, flags, tuple(args))

    def spec(self) -> CommandSpec:
        """The command's table entry; a bad opcode or flags fail the command."""
        if self.flags:
            raise DeviceError(ErrorCode.INVALID_COMMAND, f"flags {self.flags:#x} must be 0")
        spec = SPECS.get(self.opcode)
        if spec is None:
            raise DeviceError(ErrorCode.INVALID_COMMAND, f"unknown opcode {self.opcode:#x}")
        return spec

    def arguments(self) -> dict[str, int]:
        return dict(zip(self.spec().args, self.args, strict=False))

    def arg(self, name: str) -> int:
        return self.arguments()[name]


def encode(opcode: Opcode, **args: int) -> bytes:
    """A command's 64 bytes; drivers and tests build rings with it."""
    spec = SPECS[opcode]
    unknown = set(args) - set(spec.args)
    if unknown:
        raise TypeError(f"{opcode.name} has no argument(s) {sorted(unknown)}")
    values = [args.get(name, 0) for name in spec.args]
    values += [0] * (MAX_ARGS - len(values))
    return COMMAND_STRUCT.pack(opcode, 0, *values)
