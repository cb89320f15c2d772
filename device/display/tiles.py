"""What one viewer thread knows of one display: its picture and which tiles changed.

Theory of operation.  A ``Screen`` belongs to one serving thread (the VNC server's or
the web server's) and is never shared, so it needs no lock.  ``refresh()`` looks at
the source's ``serial``; only when it moved does it take a scanout, convert it to RGB
and compare it with the previous picture 64x64 tile by tile.  Every change bumps
``version``, and each tile remembers the version that last changed it (a new size
gives every tile the new version).  A viewer keeps, per client, the version of each
tile that client has (``Have``, a few hundred ints: no copy of the picture), so
``stale(have, region)`` gives exactly what that client lacks, as few rectangles as
possible, clipped to the region it asked for, and ``sent(have, region)`` records
what it got.

A display that is off or hands over a bad frame shows black at its last size (640x480
before it ever had one); ``problem`` says why.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

from device.display.frame import RGB, to_rgb
from device.display.source import FrameSource, Scanout
from device.errors import FrameError

log = logging.getLogger(__name__)

TILE = 64
BLANK_SIZE = (640, 480)

Have = npt.NDArray[np.int64]  # a viewer's version of each tile


class Rect(NamedTuple):
    x: int
    y: int
    width: int
    height: int

    def clip(self, other: Rect) -> Rect | None:
        left, top = max(self.x, other.x), max(self.y, other.y)
        right = min(self.x + self.width, other.x + other.width)
        bottom = min(self.y + self.height, other.y + other.height)
        if left >= right or top >= bottom:
            return None
        return Rect(left, top, right - left, bottom - top)


def changed_tiles(old: RGB, new: RGB) -> npt.NDArray[np.bool_]:
    """Which TILE x TILE tiles differ between two pictures of one size."""
    height, width = new.shape[:2]
    rows, cols = -(-height // TILE), -(-width // TILE)
    differs = np.not_equal(old.reshape(height, width * 3), new.reshape(height, width * 3))
    changed = np.zeros((rows, cols), dtype=np.bool_)
    padded = np.zeros(cols * TILE * 3, dtype=np.bool_)
    for row in range(rows):  # a band of tiles: any change in each column, then per tile
        padded[: width * 3] = differs[row * TILE : (row + 1) * TILE].any(axis=0)
        changed[row] = padded.reshape(cols, TILE * 3).any(axis=1)
    return changed


class Screen:
    def __init__(self, source: FrameSource) -> None:
        self.source = source
        self.seen_serial: int | None = None
        self.version = 0
        self.problem: str | None = None
        self._last: Scanout | None = None
        width, height = BLANK_SIZE
        self.rgb: RGB = np.zeros((height, width, 3), dtype=np.uint8)
        self.tile_versions = np.zeros((-(-height // TILE), -(-width // TILE)), dtype=np.int64)

    @property
    def width(self) -> int:
        return int(self.rgb.shape[1])

    @property
    def height(self) -> int:
        return int(self.rgb.shape[0])

    def refresh(self) -> bool:
        """Take the source's picture if its serial moved; whether anything changed."""
        serial = self.source.serial
        if serial == self.seen_serial:
            return False
        self.seen_serial = serial
        new = self._take()
        if new is None:
            return False
        if new.shape != self.rgb.shape:
            self.version += 1
            self.rgb = new
            rows, cols = -(-new.shape[0] // TILE), -(-new.shape[1] // TILE)
            self.tile_versions = np.full((rows, cols), self.version, dtype=np.int64)
            return True
        changed = changed_tiles(self.rgb, new)
        self.rgb = new
        if not changed.any():
            return False
        self.version += 1
        self.tile_versions[changed] = self.version
        return True

    def _take(self) -> RGB | None:
        """The source's picture, black at the current size (``problem`` says why), or
        None when the scanout is the very one taken last (a vblank, nothing drawn:
        one memcmp instead of a conversion and a comparison)."""
        try:
            scanout = self.source.scanout()
            if scanout is None:
                self._last = None
                return self._black("the display is off")
            if scanout == self._last and self.problem is None:
                return None
            self._last = scanout
            rgb = to_rgb(scanout.frame, scanout.cursor)
        except FrameError as exc:
            self._last = None
            return self._black(str(exc))
        except Exception as exc:  # a broken source must not end a thread serving others
            self._last = None
            log.exception("display %s: scanout failed", self.source.name)
            return self._black(f"scanout failed: {exc!r}")
        self.problem = None
        return rgb

    def _black(self, problem: str) -> RGB:
        if problem != self.problem:
            log.warning("display %s shows black: %s", self.source.name, problem)
        self.problem = problem
        return np.zeros_like(self.rgb)

    def unseen(self) -> Have:
        """What a new viewer has: no tile at all."""
        return np.full(self.tile_versions.shape, -1, dtype=np.int64)

    def stale(self, have: Have, region: Rect | None = None) -> list[Rect]:
        """The rectangles a viewer that has ``have`` lacks (tile-aligned, merged,
        clipped to ``region`` and to the screen)."""
        if have.shape != self.tile_versions.shape:
            changed = np.ones(self.tile_versions.shape, dtype=np.bool_)
        else:
            changed = self.tile_versions > have
        screen = Rect(0, 0, self.width, self.height)
        region = screen if region is None else region.clip(screen)
        if region is None or not changed.any():
            return []
        rects = []
        for span in merge_spans(changed):
            pixels = Rect(span.x * TILE, span.y * TILE, span.width * TILE, span.height * TILE)
            clipped = pixels.clip(region)
            if clipped is not None:
                rects.append(clipped)
        return rects

    def sent(self, have: Have, region: Rect) -> Have:
        """``have`` once ``region`` of the current picture was sent: the tiles it
        covers whole (to the screen's edge) are current."""
        if have.shape != self.tile_versions.shape:
            have = self.unseen()
        right, bottom = region.x + region.width, region.y + region.height
        x0, y0 = -(-region.x // TILE), -(-region.y // TILE)
        x1 = have.shape[1] if right >= self.width else right // TILE
        y1 = have.shape[0] if bottom >= self.height else bottom // TILE
        have[y0:y1, x0:x1] = self.tile_versions[y0:y1, x0:x1]
        return have


def merge_spans(changed: npt.NDArray[np.bool_]) -> list[Rect]:
    """Changed tiles as rectangles in tile units: runs along each tile row, merged
    with the run just above when both cover the same columns."""
    done: list[Rect] = []
    open_runs: dict[tuple[int, int], Rect] = {}  # (x, width) -> run ending on the last row
    for row in range(changed.shape[0]):
        line = changed[row]
        edges = np.flatnonzero(np.diff(np.concatenate(([0], line.view(np.int8), [0]))))
        runs = list(zip(edges[::2].tolist(), (edges[1::2] - edges[::2]).tolist(), strict=True))
        still_open: dict[tuple[int, int], Rect] = {}
        for x, width in runs:
            above = open_runs.pop((x, width), None)
            if above is not None:
                still_open[(x, width)] = above._replace(height=above.height + 1)
            else:
                still_open[(x, width)] = Rect(x, row, width, 1)
        done += open_runs.values()
        open_runs = still_open
    done += open_runs.values()
    return done
