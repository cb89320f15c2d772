"""Frames as a display's scanout hands them over, and their conversion to RGB.

A ``Frame`` is one picture in device memory's terms: width, height, stride (bytes from
one line to the next) and a DRM pixel format, over the bytes of its lines.  A
``Cursor`` is the hardware cursor plane: up to 64x64 ARGB8888 pixels at a position
that may lie partly (or wholly) off screen.  ``to_rgb`` turns both into what people
see: a ``(height, width, 3)`` uint8 array, red, green, blue.

Pixel formats follow DRM's fourcc semantics (``include/uapi/drm/drm_fourcc.h``): the
name lists components from the most significant bit of a little-endian word, so
XRGB8888 is B, G, R, X in memory and RGB565 is a little-endian u16 with red in bits
15-11, green in 10-5, blue in 4-0.  Narrow components are widened by bit replication
(0x1f -> 0xff), as pixman and the kernel's format helpers do.

Blending follows DRM's default "Pre-multiplied" pixel blend mode: the primary plane
lies on the CRTC's black background, so an ARGB8888 frame shows its colour channels
unchanged; the cursor's premultiplied colour is added to what lies under it scaled by
``255 - alpha``.

Anything wrong with a frame or cursor raises ``FrameError`` naming what and why;
nothing here reads outside the buffer it was given.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from device.errors import FrameError

RGB = npt.NDArray[np.uint8]  # (height, width, 3): red, green, blue

MAX_SIDE = 8192  # widest and tallest frame a display may hand over
CURSOR_SIZE = 64  # the cursor plane's largest side


def fourcc(code: str) -> int:
    """DRM's fourcc_code(): the four characters as a little-endian u32."""
    a, b, c, d = (ord(ch) for ch in code)
    return a | b << 8 | c << 16 | d << 24


class PixelFormat(enum.IntEnum):
    """The scanout pixel formats, valued as DRM fourcc codes."""

    XRGB8888 = fourcc("XR24")
    ARGB8888 = fourcc("AR24")
    RGB565 = fourcc("RG16")

    @property
    def bytes_per_pixel(self) -> int:
        return 2 if self is PixelFormat.RGB565 else 4


Buffer = bytes | bytearray | memoryview


@dataclass(frozen=True)
class Frame:
    """One picture: ``height`` lines of ``stride`` bytes, ``width`` pixels used in each.

    ``data`` must hold ``stride * (height - 1) + width * bytes_per_pixel`` bytes at
    least (the last line needs no padding).  ``format`` may be any int: a value that
    is no ``PixelFormat`` is refused when the frame is converted, not when it is built,
    so that a device can hand over whatever a guest programmed."""

    width: int
    height: int
    stride: int
    format: int
    data: Buffer

    def pixel_format(self) -> PixelFormat:
        try:
            return PixelFormat(self.format)
        except ValueError:
            known = ", ".join(f"{f.name} ({f.value:#010x})" for f in PixelFormat)
            raise FrameError(f"unknown pixel format {self.format:#010x} (known: {known})") from None

    def check(self) -> PixelFormat:
        """The frame's pixel format once every field is consistent; FrameError if not."""
        fmt = self.pixel_format()
        if not (0 < self.width <= MAX_SIDE and 0 < self.height <= MAX_SIDE):
            raise FrameError(
                f"frame size {self.width}x{self.height} out of range (1 to {MAX_SIDE} a side)"
            )
        line = self.width * fmt.bytes_per_pixel
        if self.stride < line:
            raise FrameError(
                f"stride {self.stride} too small for {self.width} {fmt.name} pixels "
                f"({line} bytes a line)"
            )
        needed = self.stride * (self.height - 1) + line
        if len(self.data) < needed:
            raise FrameError(
                f"frame buffer too short: {len(self.data)} bytes for {self.width}x{self.height} "
                f"{fmt.name} with stride {self.stride} (needs {needed})"
            )
        return fmt


@dataclass(frozen=True)
class Cursor:
    """The cursor plane: ``width`` x ``height`` ARGB8888 pixels (premultiplied, tightly
    packed: B, G, R, A in memory) whose top-left corner is at (``x``, ``y``) on the
    screen; either may be negative, and any part off screen is clipped."""

    x: int
    y: int
    data: Buffer
    width: int = CURSOR_SIZE
    height: int = CURSOR_SIZE

    def check(self) -> None:
        if not (0 < self.width <= CURSOR_SIZE and 0 < self.height <= CURSOR_SIZE):
            raise FrameError(
                f"cursor size {self.width}x{self.height} out of range (1 to {CURSOR_SIZE} a side)"
            )
        needed = self.width * self.height * 4
        if len(self.data) < needed:
            raise FrameError(
                f"cursor buffer too short: {len(self.data)} bytes for "
                f"{self.width}x{self.height} ARGB8888 (needs {needed})"
            )


def _lines(frame: Frame, fmt: PixelFormat) -> npt.NDArray[np.uint8]:
    """The used bytes of every line: shape (height, width, bytes_per_pixel)."""
    bpp = fmt.bytes_per_pixel
    raw = np.frombuffer(frame.data, dtype=np.uint8)
    # The last line may be short of its padding: pad the view, never read past the end.
    rows = np.lib.stride_tricks.as_strided(
        raw, shape=(frame.height, frame.width * bpp), strides=(frame.stride, 1), writeable=False
    )
    return rows.reshape(frame.height, frame.width, bpp)


def _widen(value: npt.NDArray[Any], bits: int) -> npt.NDArray[np.uint8]:
    """A ``bits``-wide component scaled to 8 bits by bit replication."""
    return ((value << (8 - bits)) | (value >> (2 * bits - 8))).astype(np.uint8)


def frame_to_rgb(frame: Frame) -> RGB:
    """The frame's pixels as RGB (a new array); FrameError if the frame is bad."""
    fmt = frame.check()
    pixels = _lines(frame, fmt)
    if fmt is PixelFormat.RGB565:
        word = pixels[..., 0].astype(np.uint16) | (pixels[..., 1].astype(np.uint16) << 8)
        rgb = np.empty((frame.height, frame.width, 3), dtype=np.uint8)
        rgb[..., 0] = _widen(word >> 11, 5)
        rgb[..., 1] = _widen((word >> 5) & 0x3F, 6)
        rgb[..., 2] = _widen(word & 0x1F, 5)
        return rgb
    # XRGB8888 and ARGB8888: B, G, R, X/A in memory; alpha over black leaves RGB as is.
    return np.ascontiguousarray(pixels[..., 2::-1])


def compose_cursor(rgb: RGB, cursor: Cursor) -> None:
    """Blend the cursor onto ``rgb`` in place (premultiplied alpha), clipped to it."""
    cursor.check()
    height, width = rgb.shape[:2]
    left, top = max(cursor.x, 0), max(cursor.y, 0)
    right, bottom = min(cursor.x + cursor.width, width), min(cursor.y + cursor.height, height)
    if left >= right or top >= bottom:
        return
    image = np.frombuffer(cursor.data, dtype=np.uint8, count=cursor.width * cursor.height * 4)
    image = image.reshape(cursor.height, cursor.width, 4)
    part = image[top - cursor.y : bottom - cursor.y, left - cursor.x : right - cursor.x]
    colour = part[..., 2::-1].astype(np.uint16)
    keep = 255 - part[..., 3:4].astype(np.uint16)
    under = rgb[top:bottom, left:right].astype(np.uint16)
    blended = colour + (under * keep + 127) // 255
    rgb[top:bottom, left:right] = np.minimum(blended, 255).astype(np.uint8)


def to_rgb(frame: Frame, cursor: Cursor | None = None) -> RGB:
    """What the display shows: the frame with the cursor on top."""
    rgb = frame_to_rgb(frame)
    if cursor is not None:
        compose_cursor(rgb, cursor)
    return rgb


def from_rgb(rgb: RGB, fmt: PixelFormat, stride: int | None = None) -> bytes:
    """The bytes of a frame in ``fmt`` showing ``rgb`` (padding lines to ``stride``):
    what a guest would write; the inverse of ``frame_to_rgb`` where ``fmt`` holds the
    colours exactly (RGB565 keeps the top 5, 6, 5 bits)."""
    height, width = rgb.shape[:2]
    bpp = fmt.bytes_per_pixel
    stride = width * bpp if stride is None else stride
    out = np.zeros((height, stride), dtype=np.uint8)
    line = out[:, : width * bpp].reshape(height, width, bpp)
    if fmt is PixelFormat.RGB565:
        r, g, b = (rgb[..., i].astype(np.uint16) for i in range(3))
        word = (r >> 3) << 11 | (g >> 2) << 5 | (b >> 3)
        line[..., 0] = word & 0xFF
        line[..., 1] = word >> 8
    else:
        line[..., 0:3] = rgb[..., 2::-1]
        line[..., 3] = 0xFF
    return out.tobytes()
