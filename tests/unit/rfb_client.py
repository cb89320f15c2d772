"""A small blocking RFB client for the VNC server's tests: the handshake, raw updates in
any true-colour pixel format, DesktopSize.  It sends what a test tells it to, valid or
not; the real client of the tests is vncdotool, this one is for the protocol's corners."""

from __future__ import annotations

import socket
import struct

import numpy as np
import numpy.typing as npt

from device.display.rfb import Encoding, PixelFormat
from device.display.tiles import Rect

RGB = npt.NDArray[np.uint8]


class RfbClient:
    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.format = PixelFormat()
        self.width = self.height = 0
        self.name = ""
        self.screen: RGB = np.zeros((0, 0, 3), dtype=np.uint8)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RfbClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def recv_exact(self, count: int) -> bytes:
        data = bytearray()
        while len(data) < count:
            chunk = self.sock.recv(count - len(data))
            if not chunk:
                raise ConnectionError(f"closed after {len(data)} of {count} bytes")
            data += chunk
        return bytes(data)

    def read_to_end(self) -> bytes:
        """Everything until the server closes the connection."""
        data = bytearray()
        while chunk := self.sock.recv(65536):
            data += chunk
        return bytes(data)

    def handshake(self, version: bytes = b"RFB 003.008\n") -> None:
        assert self.recv_exact(12) == b"RFB 003.008\n"
        self.sock.sendall(version)
        if version == b"RFB 003.003\n":
            assert struct.unpack(">I", self.recv_exact(4))[0] == 1
        else:
            count = self.recv_exact(1)[0]
            assert list(self.recv_exact(count)) == [1]
            self.sock.sendall(b"\x01")
            if version == b"RFB 003.008\n":
                assert self.recv_exact(4) == b"\x00\x00\x00\x00"
        self.sock.sendall(b"\x01")  # shared
        self.width, self.height = struct.unpack(">HH", self.recv_exact(4))
        self.format = PixelFormat.parse(self.recv_exact(16))
        (length,) = struct.unpack(">I", self.recv_exact(4))
        self.name = self.recv_exact(length).decode()
        self.screen = np.zeros((self.height, self.width, 3), dtype=np.uint8)

    def set_encodings(self, encodings: list[int]) -> None:
        self.sock.sendall(struct.pack(">BxH", 2, len(encodings)))
        self.sock.sendall(b"".join(struct.pack(">i", e) for e in encodings))

    def set_pixel_format(self, fmt: PixelFormat) -> None:
        self.sock.sendall(b"\x00\x00\x00\x00" + fmt.pack())
        self.format = fmt

    def request(self, incremental: bool = False, rect: Rect | None = None) -> None:
        rect = rect or Rect(0, 0, self.width, self.height)
        self.sock.sendall(struct.pack(">BBHHHH", 3, int(incremental), *rect))

    def read_update(self) -> list[tuple[Rect, int]]:
        """One FramebufferUpdate (raw rectangles and DesktopSize), applied to ``screen``."""
        kind, count = struct.unpack(">BxH", self.recv_exact(4))
        assert kind == 0, f"message type {kind}"
        rects = []
        for _ in range(count):
            x, y, w, h, encoding = struct.unpack(">HHHHi", self.recv_exact(12))
            rect = Rect(x, y, w, h)
            rects.append((rect, encoding))
            if encoding == Encoding.DESKTOP_SIZE:
                self.width, self.height = w, h
                self.screen = np.zeros((h, w, 3), dtype=np.uint8)
                continue
            assert encoding == Encoding.RAW, f"encoding {encoding}"
            data = self.recv_exact(w * h * self.format.bytes_per_pixel)
            self.screen[y : y + h, x : x + w] = decode(self.format, data, w, h)
        return rects


def decode(fmt: PixelFormat, data: bytes, width: int, height: int) -> RGB:
    """Raw pixels in ``fmt`` back to RGB (exact where every component is 8 bits)."""
    dtype = np.dtype(f"{'>' if fmt.big_endian else '<'}u{fmt.bytes_per_pixel}")
    value = np.frombuffer(data, dtype=dtype).astype(np.uint32).reshape(height, width)
    rgb = np.empty((height, width, 3), dtype=np.uint8)
    channels = ((fmt.red_max, fmt.red_shift), (fmt.green_max, fmt.green_shift),
                (fmt.blue_max, fmt.blue_shift))  # fmt: skip
    for index, (top, shift) in enumerate(channels):
        rgb[..., index] = (((value >> shift) & top) * 255 + top // 2) // top
    return rgb
