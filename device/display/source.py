"""What a display must offer to be seen: the ``FrameSource`` protocol.

The device side implements it (an instance's display engine: its scanout registers
latched at vblank, its cursor plane); everything in this layer only reads it.  Three
members, all safe to call from any thread at any time:

    name      the display's name: the instance's name (``mgpu screendump NAME``, the
              VNC port list and the web page show it)
    serial    an int that grows whenever what ``scanout()`` returns may have changed:
              a flip latched, a vblank while the scanout is enabled (a guest may draw
              into the front buffer), a mode set, a cursor moved or changed, the
              display turned on or off.  Viewers poll it (at most ``max_fps`` times a
              second, only while someone is watching) and call ``scanout()`` only when
              it moved; bumping it when nothing changed costs a conversion and a
              comparison, never a wrong picture.  It never decreases.
    scanout() the current picture as an immutable snapshot: a ``Scanout`` (a
              ``Frame`` and an optional ``Cursor``), or None while the display is off.
              It must not return a view of memory the guest or the device will change
              afterwards (copy the scanout buffer, or hand over bytes already frozen),
              and must not block on the guest: viewers call it from their serving
              threads.  A bad programming (stride too small, buffer beyond its
              resource, unknown format) may be returned as is: converting it raises
              ``FrameError`` and viewers show black and say why.

``Framebuffer`` is a real frame source over a numpy buffer in this process (tests,
benchmarks and demos draw into it): ``buffer`` is the back buffer in the pixel
format's bytes, ``present()`` freezes it into the picture viewers see (a flip).
"""

from __future__ import annotations

import threading
from typing import NamedTuple, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from device.display.frame import RGB, Cursor, Frame, PixelFormat, from_rgb
from device.errors import FrameError


class Scanout(NamedTuple):
    frame: Frame
    cursor: Cursor | None = None


@runtime_checkable
class FrameSource(Protocol):
    """A display: see the module's docstring for the contract of each member."""

    @property
    def name(self) -> str: ...

    @property
    def serial(self) -> int: ...

    def scanout(self) -> Scanout | None: ...


def display_of(device: object) -> FrameSource | None:
    """The frame source of a device model: its ``display`` attribute when that is a
    ``FrameSource``, else None.  The GPU instance gets one when it has a display
    engine; the control plane registers it under the instance's name."""
    display = getattr(device, "display", None)
    return display if isinstance(display, FrameSource) else None


class Framebuffer:
    """A ``FrameSource`` over a numpy framebuffer in this process.

    Draw into ``buffer`` (``height`` lines of ``stride`` bytes, in ``format``; or use
    ``draw_rgb``), then ``present()``: viewers see the picture as it was at that call.
    ``set_mode`` changes size and format (the buffer is new and black); ``set_cursor``
    moves or hides the cursor; ``set_enabled(False)`` turns the display off."""

    def __init__(
        self,
        name: str,
        width: int = 1024,
        height: int = 768,
        format: PixelFormat = PixelFormat.XRGB8888,
        stride: int | None = None,
    ) -> None:
        self._name = name
        self._lock = threading.Lock()
        self._serial = 0
        self._cursor: Cursor | None = None
        self._enabled = True
        self._shown: Frame | None = None
        self.set_mode(width, height, format, stride)

    @property
    def name(self) -> str:
        return self._name

    @property
    def serial(self) -> int:
        return self._serial

    def scanout(self) -> Scanout | None:
        with self._lock:
            if not self._enabled or self._shown is None:
                return None
            return Scanout(self._shown, self._cursor)

    def set_mode(
        self, width: int, height: int, format: PixelFormat, stride: int | None = None
    ) -> None:
        """A new mode: a black back buffer of that size, shown at once."""
        self.width, self.height, self.format = width, height, format
        self.stride = width * format.bytes_per_pixel if stride is None else stride
        self.buffer: npt.NDArray[np.uint8] = np.zeros((height, self.stride), dtype=np.uint8)
        self.present()

    def draw_rgb(self, rgb: RGB, x: int = 0, y: int = 0) -> None:
        """Write an RGB picture into the back buffer at (x, y), in the buffer's format."""
        height, width = rgb.shape[:2]
        bpp = self.format.bytes_per_pixel
        data = np.frombuffer(from_rgb(rgb, self.format), dtype=np.uint8)
        self.buffer[y : y + height, x * bpp : (x + width) * bpp] = data.reshape(height, -1)

    def present(self) -> None:
        """Freeze the back buffer into the shown picture (the copy is made outside the
        lock: viewers never wait for it)."""
        frame = Frame(self.width, self.height, self.stride, self.format, self.buffer.tobytes())
        with self._lock:
            self._shown = frame
            self._serial += 1

    def show(self, frame: Frame) -> None:
        """Show a frame built elsewhere, as is (a bad one included)."""
        with self._lock:
            self._shown = frame
            self._serial += 1

    def set_cursor(self, cursor: Cursor | None) -> None:
        with self._lock:
            self._cursor = cursor
            self._serial += 1

    def set_enabled(self, enabled: bool) -> None:
        with self._lock:
            self._enabled = enabled
            self._serial += 1


def describe_display(source: FrameSource) -> dict[str, object]:
    """What the control plane shows of a display: its name, mode and serial."""
    shown: dict[str, object] = {"name": source.name, "serial": source.serial}
    try:
        scanout = source.scanout()
    except Exception as exc:  # a broken source is reported, not raised
        return {**shown, "width": None, "height": None, "format": None, "problem": repr(exc)}
    if scanout is None:
        return {**shown, "width": None, "height": None, "format": None, "problem": "off"}
    frame = scanout.frame
    try:
        fmt = frame.check().name
        problem = None
    except FrameError as exc:
        fmt, problem = f"{frame.format:#010x}", str(exc)
    return {**shown, "width": frame.width, "height": frame.height, "format": fmt,
            "problem": problem}  # fmt: skip
