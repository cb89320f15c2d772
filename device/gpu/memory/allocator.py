"""Page-granular allocator of a contiguous address range (device memory, partitions).

First fit over a sorted list of free runs; freeing coalesces with both neighbours,
so the free list is always the minimal set of maximal runs.  Allocations are
contiguous runs of whole pages.  Not thread-safe: the owner holds its own lock.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from device.errors import OutOfMemory
from device.units import PAGE_SIZE


@dataclass(frozen=True)
class Extent:
    offset: int
    size: int

    @property
    def end(self) -> int:
        return self.offset + self.size


def pages(size: int) -> int:
    return (size + PAGE_SIZE - 1) // PAGE_SIZE


class PageAllocator:
    def __init__(self, base: int, size: int) -> None:
        if base % PAGE_SIZE or size % PAGE_SIZE or size <= 0:
            raise ValueError("allocator range must be whole, non-empty pages")
        self.base = base
        self.size = size
        self._free_starts: list[int] = [base]
        self._free_sizes: dict[int, int] = {base: size}
        self._allocated: dict[int, int] = {}
        self._free_total = size  # kept, not summed: every pool allocation asks for it

    @property
    def free_bytes(self) -> int:
        return self._free_total

    @property
    def largest_free(self) -> int:
        return max(self._free_sizes.values(), default=0)

    @property
    def allocated(self) -> dict[int, int]:
        return dict(self._allocated)

    def allocate(self, size: int) -> Extent:
        """A run of whole pages covering ``size`` bytes, at the lowest address that fits."""
        if size <= 0:
            raise ValueError("allocation size must be positive")
        wanted = pages(size) * PAGE_SIZE
        for i, start in enumerate(self._free_starts):
            run = self._free_sizes[start]
            if run < wanted:
                continue
            del self._free_sizes[start]
            if run == wanted:
                del self._free_starts[i]
            else:
                self._free_starts[i] = start + wanted
                self._free_sizes[start + wanted] = run - wanted
            self._allocated[start] = wanted
            self._free_total -= wanted
            return Extent(start, wanted)
        raise OutOfMemory(
            f"no free run of {wanted} bytes ({self.free_bytes} free, "
            f"largest run {self.largest_free})"
        )

    def allocate_pages(self, size: int) -> list[Extent]:
        """Whole pages covering ``size`` bytes, contiguous when a run is large enough,
        else gathered from the largest free runs (a resource's pages need not be
        contiguous).  All or nothing."""
        wanted = pages(size) * PAGE_SIZE
        if wanted > self.free_bytes:
            raise OutOfMemory(f"{wanted} bytes asked, {self.free_bytes} free")
        try:
            return [self.allocate(wanted)]
        except OutOfMemory:
            pass
        runs: list[Extent] = []
        left = wanted
        for start in sorted(self._free_sizes, key=self._free_sizes.__getitem__, reverse=True):
            take = min(left, self._free_sizes[start])
            runs.append(self._take(start, take))
            left -= take
            if not left:
                return runs
        raise AssertionError("free_bytes covered the request")  # pragma: no cover

    def _take(self, start: int, size: int) -> Extent:
        """The first ``size`` bytes of the free run at ``start``."""
        i = bisect.bisect_left(self._free_starts, start)
        run = self._free_sizes.pop(start)
        if run == size:
            del self._free_starts[i]
        else:
            self._free_starts[i] = start + size
            self._free_sizes[start + size] = run - size
        self._allocated[start] = size
        self._free_total -= size
        return Extent(start, size)

    def free(self, extent: Extent) -> None:
        if self._allocated.get(extent.offset) != extent.size:
            raise ValueError(f"{extent} is not an allocation of this allocator")
        del self._allocated[extent.offset]
        start, size = extent.offset, extent.size
        self._free_total += size
        i = bisect.bisect_left(self._free_starts, start)
        # Merge with the following run.
        if i < len(self._free_starts) and self._free_starts[i] == start + size:
            size += self._free_sizes.pop(self._free_starts[i])
            del self._free_starts[i]
        # Merge with the preceding run.
        if i > 0:
            previous = self._free_starts[i - 1]
            if previous + self._free_sizes[previous] == start:
                self._free_sizes[previous] += size
                return
        self._free_starts.insert(i, start)
        self._free_sizes[start] = size
