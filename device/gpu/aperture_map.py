"""Which device memory backs each page of an instance's BAR2 aperture, and which
pages the guest may touch now: the one place that says how an aperture page maps.

Today the map is the identity over the instance's partition of device memory:
aperture offset X is partition offset X, and a page is mapped while a placed
resource covers it.  Every translation and permission check (fault callbacks,
trapped accesses, the engine's coherency syncs, PLACE's returned offset) goes
through this object, so a GPU MMU (a page table of aperture page -> device page)
replaces this class and nothing else.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from device.gpu.allocator import Extent
from device.units import PAGE_SIZE


class ApertureMap:
    def __init__(self, partition: Extent, size: int) -> None:
        self.partition = partition
        self.size = size
        # One flag per page; fault threads read it without a lock: a flag flip is
        # always followed by a revoke, which settles any race.
        self.mapped: npt.NDArray[np.bool_] = np.zeros(size // PAGE_SIZE, dtype=np.bool_)

    @staticmethod
    def pages(offset: int, length: int) -> slice:
        return slice(offset // PAGE_SIZE, (offset + length + PAGE_SIZE - 1) // PAGE_SIZE)

    # ---------------------------------------------------------------- translation

    def to_device(self, aperture_offset: int) -> int:
        """The device-memory offset behind an aperture offset."""
        return self.partition.offset + aperture_offset

    def to_aperture(self, device_offset: int) -> int:
        """Where device memory at ``device_offset`` appears in the aperture."""
        return device_offset - self.partition.offset

    def placement(self, extent: Extent) -> int:
        """The aperture offset at which a resource occupying ``extent`` is placed."""
        return self.to_aperture(extent.offset)

    # ---------------------------------------------------------------- permissions

    def map(self, offset: int, length: int) -> None:
        self.mapped[self.pages(offset, length)] = True

    def unmap(self, offset: int, length: int) -> None:
        self.mapped[self.pages(offset, length)] = False

    def is_mapped(self, offset: int, length: int) -> bool:
        """Every page of [offset, offset+length) is mapped."""
        return bool(self.mapped[self.pages(offset, length)].all())

    def any_mapped(self, offset: int, length: int) -> bool:
        return bool(self.mapped[self.pages(offset, length)].any())
