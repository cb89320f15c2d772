"""The RFB protocol (RFC 6143), server side, sans I/O: numbers, pixel formats, the
client-message reader and the encoders (Raw, ZRLE, the DesktopSize pseudo-encoding).

Nothing here touches a socket.  ``ClientReader.feed(bytes)`` returns the messages
completed so far and never holds more than one message's fixed part: ClientCutText
text (up to 4 GiB by its length field) is skipped as it streams by, and SetEncodings'
list (up to 65535 entries) is read four bytes at a time, keeping only encodings this
server knows.  Anything the protocol does not allow raises ``RfbError``; the caller
drops that client alone.
"""

from __future__ import annotations

import enum
import struct
import zlib
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

from device.display.frame import RGB
from device.display.tiles import Rect
from device.errors import MgpuError

VERSION_3_8 = b"RFB 003.008\n"
VERSIONS = {b"RFB 003.003\n": (3, 3), b"RFB 003.007\n": (3, 7), VERSION_3_8: (3, 8)}
SECURITY_NONE = 1
ZRLE_TILE = 64


class RfbError(MgpuError):
    """A VNC client broke the protocol (the message says how); it is disconnected."""


class Encoding(enum.IntEnum):
    RAW = 0
    ZRLE = 16
    DESKTOP_SIZE = -223


PIXEL_ENCODINGS = (Encoding.ZRLE, Encoding.RAW)  # ours, by our preference when asked


class ClientType(enum.IntEnum):
    SET_PIXEL_FORMAT = 0
    SET_ENCODINGS = 2
    UPDATE_REQUEST = 3
    KEY_EVENT = 4
    POINTER_EVENT = 5
    CLIENT_CUT_TEXT = 6


# Size of each client message's fixed part, its type byte included.
FIXED_SIZE = {
    ClientType.SET_PIXEL_FORMAT: 20,
    ClientType.SET_ENCODINGS: 4,
    ClientType.UPDATE_REQUEST: 10,
    ClientType.KEY_EVENT: 8,
    ClientType.POINTER_EVENT: 6,
    ClientType.CLIENT_CUT_TEXT: 8,
}

SERVER_FRAMEBUFFER_UPDATE = 0
PIXEL_FORMAT = struct.Struct(">BBBBHHHBBB3x")
RECT_HEADER = struct.Struct(">HHHHi")


class PixelFormat(NamedTuple):
    """An RFB PIXEL_FORMAT (true colour only: colour maps are refused)."""

    bits_per_pixel: int = 32
    depth: int = 24
    big_endian: bool = False
    true_colour: bool = True
    red_max: int = 255
    green_max: int = 255
    blue_max: int = 255
    red_shift: int = 16
    green_shift: int = 8
    blue_shift: int = 0

    @classmethod
    def parse(cls, data: bytes) -> PixelFormat:
        bpp, depth, big, true_colour, *rest = PIXEL_FORMAT.unpack(data)
        fmt = cls(bpp, depth, bool(big), bool(true_colour), *rest)
        fmt.check()
        return fmt

    def pack(self) -> bytes:
        return PIXEL_FORMAT.pack(
            self.bits_per_pixel, self.depth, int(self.big_endian), int(self.true_colour),
            self.red_max, self.green_max, self.blue_max,
            self.red_shift, self.green_shift, self.blue_shift,
        )  # fmt: skip

    def check(self) -> None:
        if self.bits_per_pixel not in (8, 16, 32):
            raise RfbError(f"bits-per-pixel {self.bits_per_pixel} (8, 16 or 32 are supported)")
        if not self.true_colour:
            raise RfbError("colour-map pixel formats are not supported (true colour only)")
        for colour, top, shift in self._channels():
            if top < 1 or shift + top.bit_length() > self.bits_per_pixel:
                raise RfbError(
                    f"{colour} max {top} at shift {shift} does not fit {self.bits_per_pixel} bits"
                )

    def _channels(self) -> tuple[tuple[str, int, int], ...]:
        return (
            ("red", self.red_max, self.red_shift),
            ("green", self.green_max, self.green_shift),
            ("blue", self.blue_max, self.blue_shift),
        )

    @property
    def bytes_per_pixel(self) -> int:
        return self.bits_per_pixel // 8

    def pixels(self, rgb: RGB) -> npt.NDArray[np.uint8]:
        """``rgb`` in this format: an array (height, width, bytes_per_pixel) of uint8."""
        height, width = rgb.shape[:2]
        if self == NATIVE:
            out = np.zeros((height, width, 4), dtype=np.uint8)
            out[..., 0:3] = rgb[..., 2::-1]
            return out
        value = np.zeros((height, width), dtype=np.uint32)
        for index, (_, top, shift) in enumerate(self._channels()):
            channel = rgb[..., index].astype(np.uint32)
            if top != 255:
                channel = (channel * top + 127) // 255
            value |= channel << shift
        dtype = np.dtype(f"{'>' if self.big_endian else '<'}u{self.bytes_per_pixel}")
        return value.astype(dtype).view(np.uint8).reshape(height, width, self.bytes_per_pixel)

    def cpixel_bytes(self) -> slice:
        """Which bytes of a pixel ZRLE sends (RFC 6143 7.7.5's CPIXEL)."""
        if self.bits_per_pixel == 32 and self.depth <= 24:
            used = 0
            for _, top, shift in self._channels():
                used |= top << shift
            if used < 1 << 24:
                return slice(1, 4) if self.big_endian else slice(0, 3)
            if used & 0xFF == 0:
                return slice(0, 3) if self.big_endian else slice(1, 4)
        return slice(0, self.bytes_per_pixel)


NATIVE = PixelFormat()  # XRGB8888 as RFB says it: 32 bpp little endian, B, G, R, X


def server_init(width: int, height: int, name: str) -> bytes:
    encoded = name.encode()[:255]
    return (
        struct.pack(">HH", width, height)
        + NATIVE.pack()
        + struct.pack(">I", len(encoded))
        + (encoded)
    )


def update_header(rects: int) -> bytes:
    return struct.pack(">BxH", SERVER_FRAMEBUFFER_UPDATE, rects)


def rect_header(rect: Rect, encoding: Encoding) -> bytes:
    return RECT_HEADER.pack(rect.x, rect.y, rect.width, rect.height, encoding)


def desktop_size(width: int, height: int) -> bytes:
    return rect_header(Rect(0, 0, width, height), Encoding.DESKTOP_SIZE)


def encode_raw(fmt: PixelFormat, rgb: RGB) -> bytes:
    return fmt.pixels(rgb).tobytes()


class ZrleEncoder:
    """ZRLE for one connection: one zlib stream for the connection's lifetime (the
    client keeps its inflater), 64x64 tiles, each solid (one CPIXEL) or raw."""

    def __init__(self) -> None:
        self._stream = zlib.compressobj(1)

    def encode(self, fmt: PixelFormat, rgb: RGB) -> bytes:
        pixels = fmt.pixels(rgb)[..., fmt.cpixel_bytes()]
        height, width = pixels.shape[:2]
        parts: list[bytes] = []
        for top in range(0, height, ZRLE_TILE):
            for left in range(0, width, ZRLE_TILE):
                tile = pixels[top : top + ZRLE_TILE, left : left + ZRLE_TILE]
                first = tile[0, 0]
                if (tile == first).all():
                    parts += (b"\x01", first.tobytes())
                else:
                    parts += (b"\x00", tile.tobytes())
        data = self._stream.compress(b"".join(parts)) + self._stream.flush(zlib.Z_SYNC_FLUSH)
        return struct.pack(">I", len(data)) + data


# ---------------------------------------------------------------------- client messages


class SetPixelFormat(NamedTuple):
    format: PixelFormat


class SetEncodings(NamedTuple):
    encodings: tuple[int, ...]  # the known ones, in the client's order


class UpdateRequest(NamedTuple):
    incremental: bool
    rect: Rect


class InputIgnored(NamedTuple):
    kind: ClientType  # key, pointer or cut text: this server is view-only


ClientMessage = SetPixelFormat | SetEncodings | UpdateRequest | InputIgnored
KNOWN_ENCODINGS = frozenset(Encoding)


class ClientReader:
    """Client-to-server messages after the handshake, from a byte stream."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._skip = 0  # bytes of cut text still to pass over
        self._encodings_left = 0  # SetEncodings entries still to read
        self._encodings: list[int] = []

    @property
    def buffered(self) -> int:
        """Bytes held for a message not complete yet (a fixed part at most)."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[ClientMessage]:
        self._buffer += data
        out: list[ClientMessage] = []
        pos = 0
        try:
            while pos < len(self._buffer):
                used = self._step(pos, out)
                if not used:
                    break
                pos += used
        finally:
            del self._buffer[:pos]  # no view of the buffer may be alive here
        return out

    def _step(self, pos: int, out: list[ClientMessage]) -> int:
        """Consume the buffer from ``pos``; the bytes used (0: wait for more)."""
        available = len(self._buffer) - pos
        if self._skip:
            used = min(self._skip, available)
            self._skip -= used
            return used
        if self._encodings_left:
            return self._read_encodings(bytes(self._buffer[pos : pos + available // 4 * 4]), out)
        kind = self._buffer[pos]
        if kind not in FIXED_SIZE:
            raise RfbError(f"unknown client message type {kind}")
        size = FIXED_SIZE[ClientType(kind)]
        if available < size:
            return 0
        self._parse(ClientType(kind), bytes(self._buffer[pos : pos + size]), out)
        return size

    def _parse(self, kind: ClientType, body: bytes, out: list[ClientMessage]) -> None:
        if kind is ClientType.SET_PIXEL_FORMAT:
            out.append(SetPixelFormat(PixelFormat.parse(body[4:20])))
        elif kind is ClientType.SET_ENCODINGS:
            (count,) = struct.unpack_from(">H", body, 2)
            self._encodings = []
            self._encodings_left = count
            if not count:
                out.append(SetEncodings(()))
        elif kind is ClientType.UPDATE_REQUEST:
            incremental, x, y, width, height = struct.unpack_from(">BHHHH", body, 1)
            out.append(UpdateRequest(bool(incremental), Rect(x, y, width, height)))
        elif kind is ClientType.CLIENT_CUT_TEXT:
            (self._skip,) = struct.unpack_from(">I", body, 4)
            out.append(InputIgnored(kind))
        else:
            out.append(InputIgnored(kind))

    def _read_encodings(self, data: bytes, out: list[ClientMessage]) -> int:
        entries = min(self._encodings_left, len(data) // 4)
        for (value,) in struct.iter_unpack(">i", data[: entries * 4]):
            if value in KNOWN_ENCODINGS and value not in self._encodings:
                self._encodings.append(value)
        self._encodings_left -= entries
        if not self._encodings_left:
            out.append(SetEncodings(tuple(self._encodings)))
        return entries * 4
