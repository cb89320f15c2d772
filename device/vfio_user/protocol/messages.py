"""Typed vfio-user messages and their byte layouts (little endian, as in the spec).

Every payload type is a frozen dataclass with ``pack()`` giving the payload bytes (the
part after the 16-byte header) and ``unpack(payload, fds)`` parsing them.  Parsing is
strict: a payload of the wrong length, a wrong ``argsz`` or fds where none belong raise
``MalformedMessage``.  Nothing here touches a socket.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import ClassVar, NamedTuple, Self

from device.errors import FramingError, MalformedMessage
from device.vfio_user.protocol.constants import (
    HEADER_SIZE,
    HEADER_TYPE_MASK,
    REGION_INFO_CAP_SPARSE_MMAP,
    REGION_INFO_CAP_SPARSE_MMAP_VERSION,
    HeaderFlags,
    IrqSetFlags,
)

_HEADER = struct.Struct("<HHIII")


_FLAG_REPLY = int(HeaderFlags.TYPE_REPLY)
_FLAG_NO_REPLY = int(HeaderFlags.NO_REPLY)
_FLAG_ERROR = int(HeaderFlags.ERROR)


class Header(NamedTuple):
    # A NamedTuple, not a dataclass: one is built per message on the hot path.
    msg_id: int
    command: int
    size: int
    flags: int = 0
    error: int = 0

    @property
    def is_reply(self) -> bool:
        return self.flags & HEADER_TYPE_MASK == _FLAG_REPLY

    @property
    def no_reply(self) -> bool:
        return bool(self.flags & _FLAG_NO_REPLY)

    @property
    def is_error(self) -> bool:
        return bool(self.flags & _FLAG_ERROR)

    def pack(self) -> bytes:
        return _HEADER.pack(self.msg_id, self.command, self.size, self.flags, self.error)

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview) -> Header:
        if len(data) < HEADER_SIZE:
            raise FramingError(f"header needs {HEADER_SIZE} bytes, got {len(data)}")
        return cls(*_HEADER.unpack_from(data))


def encode_message(
    msg_id: int,
    command: int,
    payload: bytes = b"",
    *,
    reply: bool,
    error: int = 0,
    no_reply: bool = False,
) -> bytes:
    """Header plus payload, ready to send."""
    flags = _FLAG_REPLY if reply else 0
    if error:
        flags |= _FLAG_ERROR
    if no_reply:
        flags |= _FLAG_NO_REPLY
    return _HEADER.pack(msg_id, command, HEADER_SIZE + len(payload), flags, error) + payload


def _exact(payload: bytes | memoryview, size: int, what: str) -> None:
    if len(payload) != size:
        raise MalformedMessage(f"{what}: payload is {len(payload)} bytes, expected {size}")


def _at_least(payload: bytes | memoryview, size: int, what: str) -> None:
    if len(payload) < size:
        raise MalformedMessage(f"{what}: payload is {len(payload)} bytes, needs {size}")


def _no_fds(fds: tuple[int, ...], what: str) -> None:
    if fds:
        raise MalformedMessage(f"{what} carries {len(fds)} unexpected file descriptors")


# --------------------------------------------------------------------------- VERSION

_VERSION = struct.Struct("<HH")


@dataclass(frozen=True)
class Version:
    """VERSION request and reply: major, minor and a JSON capabilities object."""

    major: int
    minor: int
    capabilities: dict[str, object] = field(default_factory=dict)

    def pack(self) -> bytes:
        text = json.dumps({"capabilities": self.capabilities}, separators=(",", ":"))
        return _VERSION.pack(self.major, self.minor) + text.encode() + b"\0"

    @classmethod
    def unpack(cls, payload: bytes | memoryview, fds: tuple[int, ...] = ()) -> Self:
        _no_fds(fds, "VERSION")
        _at_least(payload, _VERSION.size, "VERSION")
        major, minor = _VERSION.unpack_from(payload)
        raw = bytes(payload[_VERSION.size :])
        capabilities: dict[str, object] = {}
        if raw:
            if not raw.endswith(b"\0"):
                raise MalformedMessage("VERSION: capabilities string is not NUL-terminated")
            text = raw[:-1]
            try:
                parsed = json.loads(text) if text else {}
            except (ValueError, RecursionError) as exc:  # UnicodeDecodeError: a ValueError
                raise MalformedMessage(f"VERSION: capabilities are not JSON: {exc}") from None
            if not isinstance(parsed, dict):
                raise MalformedMessage("VERSION: capabilities JSON is not an object")
            caps = parsed.get("capabilities", {})
            if not isinstance(caps, dict):
                raise MalformedMessage("VERSION: 'capabilities' is not an object")
            capabilities = caps
        return cls(major, minor, capabilities)


# --------------------------------------------------------------------------- DMA

_DMA_MAP = struct.Struct("<IIQQQ")
_DMA_UNMAP = struct.Struct("<IIQQ")


@dataclass(frozen=True)
class DmaMap:
    argsz: int
    flags: int
    offset: int
    address: int
    size: int
    fd: int | None = None

    def pack(self) -> bytes:
        return _DMA_MAP.pack(self.argsz, self.flags, self.offset, self.address, self.size)

    @classmethod
    def unpack(cls, payload: bytes | memoryview, fds: tuple[int, ...] = ()) -> Self:
        _exact(payload, _DMA_MAP.size, "DMA_MAP")
        argsz, flags, offset, address, size = _DMA_MAP.unpack_from(payload)
        if argsz != _DMA_MAP.size:
            raise MalformedMessage(f"DMA_MAP: argsz {argsz} != {_DMA_MAP.size}")
        if len(fds) > 1:
            raise MalformedMessage(f"DMA_MAP carries {len(fds)} fds, at most 1 allowed")
        return cls(argsz, flags, offset, address, size, fds[0] if fds else None)


@dataclass(frozen=True)
class DmaUnmap:
    """DMA_UNMAP request and reply (the reply echoes the request; no bitmap support)."""

    argsz: int
    flags: int
    address: int
    size: int

    def pack(self) -> bytes:
        return _DMA_UNMAP.pack(self.argsz, self.flags, self.address, self.size)

    @classmethod
    def unpack(cls, payload: bytes | memoryview, fds: tuple[int, ...] = ()) -> Self:
        _no_fds(fds, "DMA_UNMAP")
        _at_least(payload, _DMA_UNMAP.size, "DMA_UNMAP")
        argsz, flags, address, size = _DMA_UNMAP.unpack_from(payload)
        if argsz != len(payload):
            raise MalformedMessage(f"DMA_UNMAP: argsz {argsz} != payload size {len(payload)}")
        return cls(argsz, flags, address, size)


# --------------------------------------------------------------------------- DEVICE_GET_INFO

_DEVICE_INFO = struct.Struct("<IIII")


@dataclass(frozen=True)
class DeviceInfoRequest:
    argsz: int

    def pack(self) -> bytes:
        return _DEVICE_INFO.pack(self.argsz, 0, 0, 0)

    @classmethod
    def unpack(cls, payload: bytes | memoryview, fds: tuple[int, ...] = ()) -> Self:
        _no_fds(fds, "DEVICE_GET_INFO")
        _exact(payload, _DEVICE_INFO.size, "DEVICE_GET_INFO")
        argsz = struct.unpack_from("<I", payload)[0]
        if argsz < _DEVICE_INFO.size:
            raise MalformedMessage(f"DEVICE_GET_INFO: argsz {argsz} < {_DEVICE_INFO.size}")
        return cls(argsz)


@dataclass(frozen=True)
class DeviceInfo:
    flags: int
    num_regions: int
    num_irqs: int
    argsz: int = _DEVICE_INFO.size

    def pack(self) -> bytes:
        return _DEVICE_INFO.pack(self.argsz, self.flags, self.num_regions, self.num_irqs)

    @classmethod
    def unpack(cls, payload: bytes | memoryview, fds: tuple[int, ...] = ()) -> Self:
        _no_fds(fds, "DEVICE_GET_INFO reply")
        _exact(payload, _DEVICE_INFO.size, "DEVICE_GET_INFO reply")
        argsz, flags, num_regions, num_irqs = _DEVICE_INFO.unpack_from(payload)
        return cls(flags, num_regions, num_irqs, argsz)


# --------------------------------------------------------------------------- REGION_INFO

_REGION_INFO = struct.Struct("<IIIIQQ")
REGION_INFO_SIZE = _REGION_INFO.size  # 32
_CAP_HEADER = struct.Struct("<HHI")
_SPARSE_HEADER = struct.Struct("<II")
_SPARSE_AREA = struct.Struct("<QQ")


@dataclass(frozen=True)
class RegionInfoRequest:
    argsz: int
    index: int

    def pack(self) -> bytes:
        return _REGION_INFO.pack(self.argsz, 0, self.index, 0, 0, 0)

    @classmethod
    def unpack(cls, payload: bytes | memoryview, fds: tuple[int, ...] = ()) -> Self:
        _no_fds(fds, "DEVICE_GET_REGION_INFO")
        # QEMU sends the whole (possibly enlarged) argsz buffer; only the head matters.
        _at_least(payload, REGION_INFO_SIZE, "DEVICE_GET_REGION_INFO")
        argsz, _flags, index, _cap, _size, _off = _REGION_INFO.unpack_from(payload)
        if argsz < REGION_INFO_SIZE:
            raise MalformedMessage(f"DEVICE_GET_REGION_INFO: argsz {argsz} < {REGION_INFO_SIZE}")
        return cls(argsz, index)


@dataclass(frozen=True)
class SparseArea:
    offset: int
    size: int


@dataclass(frozen=True)
class RegionInfo:
    """A region's description; ``sparse_areas`` becomes the sparse-mmap capability."""

    index: int
    flags: int
    size: int
    offset: int = 0
    sparse_areas: tuple[SparseArea, ...] = ()

    def full_size(self) -> int:
        if not self.sparse_areas:
            return REGION_INFO_SIZE
        return (
            REGION_INFO_SIZE
            + _CAP_HEADER.size
            + _SPARSE_HEADER.size
            + _SPARSE_AREA.size * len(self.sparse_areas)
        )

    def pack_reply(self, client_argsz: int) -> bytes:
        """The reply payload: truncated to the client's buffer, argsz says the full size.

        QEMU first asks with argsz 32; a region with capabilities then answers with the
        bare struct and the larger argsz, and QEMU asks again with room for the caps.
        """
        full = self.full_size()
        cap_offset = REGION_INFO_SIZE if self.sparse_areas else 0
        flags = self.flags
        head = _REGION_INFO.pack(full, flags, self.index, cap_offset, self.size, self.offset)
        if not self.sparse_areas or client_argsz < full:
            return head
        caps = _CAP_HEADER.pack(
            REGION_INFO_CAP_SPARSE_MMAP, REGION_INFO_CAP_SPARSE_MMAP_VERSION, 0
        ) + _SPARSE_HEADER.pack(len(self.sparse_areas), 0)
        caps += b"".join(_SPARSE_AREA.pack(a.offset, a.size) for a in self.sparse_areas)
        return head + caps

    @classmethod
    def unpack(cls, payload: bytes | memoryview) -> tuple[Self, int]:
        """Parse a reply; returns the info and the argsz the server asked for."""
        _at_least(payload, REGION_INFO_SIZE, "DEVICE_GET_REGION_INFO reply")
        argsz, flags, index, cap_offset, size, offset = _REGION_INFO.unpack_from(payload)
        areas: list[SparseArea] = []
        seen: set[int] = set()
        while cap_offset:
            if cap_offset in seen or cap_offset + _CAP_HEADER.size > len(payload):
                if len(payload) < argsz:
                    break  # truncated reply: capabilities not included yet
                raise MalformedMessage(f"region info: bad capability offset {cap_offset}")
            seen.add(cap_offset)
            cap_id, _version, next_offset = _CAP_HEADER.unpack_from(payload, cap_offset)
            if cap_id == REGION_INFO_CAP_SPARSE_MMAP:
                base = cap_offset + _CAP_HEADER.size
                _at_least(payload, base + _SPARSE_HEADER.size, "sparse mmap capability")
                count, _ = _SPARSE_HEADER.unpack_from(payload, base)
                base += _SPARSE_HEADER.size
                _at_least(payload, base + count * _SPARSE_AREA.size, "sparse mmap areas")
                for i in range(count):
                    area_offset, area_size = _SPARSE_AREA.unpack_from(
                        payload, base + i * _SPARSE_AREA.size
                    )
                    areas.append(SparseArea(area_offset, area_size))
            cap_offset = next_offset
        return cls(index, flags, size, offset, tuple(areas)), argsz


# --------------------------------------------------------------------------- IRQ_INFO

_IRQ_INFO = struct.Struct("<IIII")


@dataclass(frozen=True)
class IrqInfoRequest:
    argsz: int
    index: int

    def pack(self) -> bytes:
        return _IRQ_INFO.pack(self.argsz, 0, self.index, 0)

    @classmethod
    def unpack(cls, payload: bytes | memoryview, fds: tuple[int, ...] = ()) -> Self:
        _no_fds(fds, "DEVICE_GET_IRQ_INFO")
        _exact(payload, _IRQ_INFO.size, "DEVICE_GET_IRQ_INFO")
        argsz, _flags, index, _count = _IRQ_INFO.unpack_from(payload)
        if argsz < _IRQ_INFO.size:
            raise MalformedMessage(f"DEVICE_GET_IRQ_INFO: argsz {argsz} < {_IRQ_INFO.size}")
        return cls(argsz, index)


@dataclass(frozen=True)
class IrqInfo:
    index: int
    flags: int
    count: int

    def pack(self) -> bytes:
        return _IRQ_INFO.pack(_IRQ_INFO.size, self.flags, self.index, self.count)

    @classmethod
    def unpack(cls, payload: bytes | memoryview, fds: tuple[int, ...] = ()) -> Self:
        _no_fds(fds, "DEVICE_GET_IRQ_INFO reply")
        _exact(payload, _IRQ_INFO.size, "DEVICE_GET_IRQ_INFO reply")
        _argsz, flags, index, count = _IRQ_INFO.unpack_from(payload)
        return cls(index, flags, count)


# --------------------------------------------------------------------------- SET_IRQS

_IRQ_SET = struct.Struct("<IIIII")
IRQ_SET_SIZE = _IRQ_SET.size  # 20


@dataclass(frozen=True)
class SetIrqs:
    """DEVICE_SET_IRQS.  ``data`` holds the DATA_BOOL bytes; eventfds travel in ``fds``."""

    flags: int
    index: int
    start: int
    count: int
    data: bytes = b""
    fds: tuple[int, ...] = ()

    @property
    def argsz(self) -> int:
        return IRQ_SET_SIZE + len(self.data)

    def pack(self) -> bytes:
        return _IRQ_SET.pack(self.argsz, self.flags, self.index, self.start, self.count) + self.data

    @classmethod
    def unpack(cls, payload: bytes | memoryview, fds: tuple[int, ...] = ()) -> Self:
        _at_least(payload, IRQ_SET_SIZE, "DEVICE_SET_IRQS")
        argsz, flags, index, start, count = _IRQ_SET.unpack_from(payload)
        if argsz != len(payload):
            raise MalformedMessage(f"DEVICE_SET_IRQS: argsz {argsz} != payload {len(payload)}")
        data = bytes(payload[IRQ_SET_SIZE:])
        if flags & IrqSetFlags.DATA_BOOL:
            if len(data) != count:
                raise MalformedMessage(
                    f"DEVICE_SET_IRQS: DATA_BOOL needs {count} bytes, got {len(data)}"
                )
        elif data:
            raise MalformedMessage("DEVICE_SET_IRQS: data present without DATA_BOOL")
        if fds and not flags & IrqSetFlags.DATA_EVENTFD:
            raise MalformedMessage("DEVICE_SET_IRQS: fds passed without DATA_EVENTFD")
        if flags & IrqSetFlags.DATA_EVENTFD and fds and len(fds) != count:
            raise MalformedMessage(f"DEVICE_SET_IRQS: {len(fds)} eventfds for a count of {count}")
        return cls(flags, index, start, count, data, fds)


# --------------------------------------------------------------------------- REGION_READ/WRITE

_REGION_RW = struct.Struct("<QII")
REGION_RW_SIZE = _REGION_RW.size  # 16


@dataclass(slots=True)
class RegionAccess:
    """REGION_READ request (no data), REGION_READ reply (data), REGION_WRITE request
    (data) and REGION_WRITE reply (no data, count echoed)."""

    offset: int
    region: int
    count: int
    data: bytes = b""

    def pack(self) -> bytes:
        return _REGION_RW.pack(self.offset, self.region, self.count) + self.data

    @classmethod
    def unpack(
        cls, payload: bytes | memoryview, fds: tuple[int, ...] = (), *, with_data: bool
    ) -> RegionAccess:
        return cls(*parse_region_access(payload, fds, with_data=with_data))


def parse_region_access(
    payload: bytes | memoryview, fds: tuple[int, ...] = (), *, with_data: bool
) -> tuple[int, int, int, bytes]:
    """(offset, region, count, data) of a REGION_READ/WRITE; a tuple, for the hot path."""
    if fds:
        _no_fds(fds, "REGION access")
    if len(payload) < REGION_RW_SIZE:
        raise MalformedMessage(f"REGION access: payload is {len(payload)} bytes, needs 16")
    offset, region, count = _REGION_RW.unpack_from(payload)
    data = bytes(payload[REGION_RW_SIZE:])
    if with_data:
        if len(data) != count:
            raise MalformedMessage(f"REGION access: count {count} but {len(data)} data bytes")
    elif data:
        raise MalformedMessage("REGION access: unexpected data bytes")
    return offset, region, count, data


def pack_region_access(offset: int, region: int, count: int, data: bytes = b"") -> bytes:
    return _REGION_RW.pack(offset, region, count) + data


_WRITE_ONE = struct.Struct("<QII8s")
WRITE_MULTI_DATA = 8


def unpack_region_write_multi(
    payload: bytes | memoryview, fds: tuple[int, ...] = ()
) -> tuple[RegionAccess, ...]:
    """REGION_WRITE_MULTI: u64 count, then fixed 24-byte entries with up to 8 data bytes."""
    _no_fds(fds, "REGION_WRITE_MULTI")
    _at_least(payload, 8, "REGION_WRITE_MULTI")
    (count,) = struct.unpack_from("<Q", payload)
    _exact(payload, 8 + count * _WRITE_ONE.size, "REGION_WRITE_MULTI")
    writes = []
    for i in range(count):
        offset, region, size, data = _WRITE_ONE.unpack_from(payload, 8 + i * _WRITE_ONE.size)
        if size > WRITE_MULTI_DATA:
            raise MalformedMessage(f"REGION_WRITE_MULTI entry {i}: count {size} > 8")
        writes.append(RegionAccess(offset, region, size, data[:size]))
    return tuple(writes)


# --------------------------------------------------------------------------- DMA_READ/WRITE

_DMA_RW = struct.Struct("<QQ")


@dataclass(frozen=True)
class DmaAccess:
    """DMA_READ/DMA_WRITE, sent by the server: ``{u64 address; u64 count; data[]}``.

    QEMU 11.1.3 lays its replies out the same way (checked with real guests: data at
    payload byte 16), although its C struct ``VFIOUserDMARW`` has a u32 count."""

    address: int
    count: int
    data: bytes = b""

    def pack(self) -> bytes:
        return _DMA_RW.pack(self.address, self.count) + self.data

    @classmethod
    def unpack(cls, payload: bytes | memoryview, fds: tuple[int, ...] = ()) -> Self:
        _no_fds(fds, "DMA access")
        _at_least(payload, _DMA_RW.size, "DMA access")
        address, count = _DMA_RW.unpack_from(payload)
        return cls(address, count, bytes(payload[_DMA_RW.size :]))


# --------------------------------------------------------------------------- empty payloads


@dataclass(frozen=True)
class Empty:
    """DEVICE_RESET request, and the replies that carry no payload."""

    name: ClassVar[str] = "empty"

    def pack(self) -> bytes:
        return b""

    @classmethod
    def unpack(cls, payload: bytes | memoryview, fds: tuple[int, ...] = ()) -> Self:
        _no_fds(fds, "message")
        _exact(payload, 0, "message")
        return cls()
