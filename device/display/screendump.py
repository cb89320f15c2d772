"""Screendumps: what a display shows, as a PIL image or a PNG (encoded by Pillow).

The control socket's ``screendump`` command, ``mgpu screendump INSTANCE FILE.png`` and
the pytest plugin's ``guest.screendump()`` all come here.  A display that is off, or
whose frame is bad, raises ``FrameError`` saying so: a screendump never invents a
picture.
"""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image

from device.display.frame import RGB, to_rgb
from device.display.source import FrameSource
from device.errors import FrameError

PNG_COMPRESS_LEVEL = 1  # zlib level: fast; screens compress well anyway


def capture(source: FrameSource) -> RGB:
    """The display's current picture (frame and cursor) as RGB."""
    scanout = source.scanout()
    if scanout is None:
        raise FrameError(f"display {source.name!r} is off (no scanout enabled)")
    return to_rgb(scanout.frame, scanout.cursor)


def image(source: FrameSource) -> Image.Image:
    """The display's current picture as an RGB PIL image."""
    return Image.fromarray(capture(source), "RGB")


def png_bytes(rgb: RGB) -> bytes:
    out = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(out, "PNG", compress_level=PNG_COMPRESS_LEVEL)
    return out.getvalue()


def write_png(source: FrameSource, path: Path) -> tuple[int, int]:
    """Write the display's picture to ``path`` as PNG; its (width, height)."""
    rgb = capture(source)
    data = png_bytes(rgb)
    path.write_bytes(data)
    return rgb.shape[1], rgb.shape[0]
