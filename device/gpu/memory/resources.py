"""Resources: the device-memory allocations of one instance, by handle.

A resource's pages come from the physical GPU's shared pool at CREATE (or, for a
``static`` instance, from its private memory), page by page: they need not be
contiguous (``runs``).  The instance's quota is a limit on what its live resources
take, not a reservation.  Handles are never reused while the instance lives, so a
stale handle is always caught.  Where a resource shows in the aperture is the page
table's business (``ApertureTable``); the resource only remembers which aperture
pages map it.

Residency and lifetime (all state below is guarded by the physical GPU's lock):
a resource is *resident* (``runs`` hold its bytes) or *evicted* (``saved`` holds
them, its device pages went back to the pool).  A user of its memory *pins* it
(``PhysicalGpu.pin``), which pages it back in first; a pinned resource is never
evicted.  Removing a resource (DESTROY, reset) takes its handle away at once, but
its memory is scrubbed and freed only when nothing pins it and no eviction or
page-in is moving it (``PhysicalGpu.release_if_unused``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from device.errors import DeviceError
from device.gpu.abi import ErrorCode
from device.gpu.memory.allocator import Extent, pages
from device.gpu.memory.device_memory import DeviceMemory
from device.units import PAGE_SIZE


@dataclass(eq=False)
class Resource:
    handle: int
    size: int  # bytes the driver asked for
    owner: str  # the instance's name
    backing: DeviceMemory  # the pool, or a static instance's private memory
    runs: list[Extent]  # resident: its pages in ``backing``, in order
    evictable: bool  # False for static instances (QEMU maps their memory directly)
    saved: npt.NDArray[np.uint8] | None = None  # evicted: its bytes, in host memory
    pins: int = 0
    removed: bool = False
    freed: bool = False
    evicting: bool = False
    paging_in: bool = False
    last_used: int = 0  # the physical GPU's use clock, for LRU eviction
    mapped_at: dict[int, int] = field(default_factory=dict)  # resource page -> aperture page
    fences: int = 0  # device users of its memory now (guarded by the owner's window lock)

    @property
    def page_count(self) -> int:
        return pages(self.size)

    @property
    def resident(self) -> bool:
        return self.saved is None

    def spans(self, offset: int, length: int) -> list[tuple[int, int]]:
        """[offset, offset+length) of the resource as (backing offset, length) pieces."""
        pieces: list[tuple[int, int]] = []
        base = 0
        for run in self.runs:
            lo, hi = max(offset, base), min(offset + length, base + run.size)
            if lo < hi:
                pieces.append((run.offset + lo - base, hi - lo))
            base += run.size
        return pieces

    def device_page(self, page: int) -> int:
        """The backing page number of resource page ``page`` (resident)."""
        if len(self.runs) == 1:
            return self.runs[0].offset // PAGE_SIZE + page
        ((offset, _),) = self.spans(page * PAGE_SIZE, 1)
        return offset // PAGE_SIZE

    def read(self, offset: int, length: int) -> bytes:
        """Bytes of the resource, resident or saved (the caller holds the GPU lock)."""
        if self.saved is not None:
            return self.saved[offset : offset + length].tobytes()
        array = self.backing.array
        if len(self.runs) == 1:  # the common case: one run, one slice
            start = self.runs[0].offset + offset
            return array[start : start + length].tobytes()
        return b"".join(array[o : o + n].tobytes() for o, n in self.spans(offset, length))

    def view(self, offset: int, length: int) -> npt.NDArray[np.uint8] | None:
        """A zero-copy view of the range if its pages are contiguous (pinned), else None."""
        pieces = self.spans(offset, length)
        if len(pieces) != 1:
            return None if pieces else self.backing.array[0:0]
        start, size = pieces[0]
        return self.backing.array[start : start + size]

    def gather(self, offset: int, length: int) -> npt.NDArray[np.uint8]:
        """A copy of the range, gathered from its non-contiguous pages (pinned)."""
        out = np.empty(length, dtype=np.uint8)
        done = 0
        for start, size in self.spans(offset, length):
            out[done : done + size] = self.backing.array[start : start + size]
            done += size
        return out

    def scatter_changes(
        self, offset: int, new: npt.NDArray[np.uint8], old: npt.NDArray[np.uint8]
    ) -> None:
        """Store back the bytes of a gathered copy that changed: only those, so a
        concurrent trapped write to other bytes of the range is not undone (pinned)."""
        changed = np.flatnonzero(new != old)
        if not changed.size:
            return
        done = 0
        for start, size in self.spans(offset, len(new)):
            part = changed[(changed >= done) & (changed < done + size)]
            self.backing.array[start + part - done] = new[part]
            done += size

    def write(self, offset: int, data: bytes | memoryview) -> None:
        """Store bytes, resident or saved (the caller holds the GPU lock)."""
        source = np.frombuffer(data, dtype=np.uint8)
        if self.saved is not None:
            self.saved[offset : offset + len(source)] = source
            return
        done = 0
        for o, n in self.spans(offset, len(source)):
            self.backing.array[o : o + n] = source[done : done + n]
            done += n


@dataclass(frozen=True)
class Pin:
    """A user's hold on [offset, offset+length) of a resident resource."""

    resource: Resource
    offset: int
    length: int


class ResourceTable:
    """One instance's resources by handle, and its quota (guarded by the instance lock)."""

    def __init__(self, owner: str, quota: int) -> None:
        self.owner = owner
        self.quota = quota
        self.committed = 0  # page-rounded bytes of resources not yet freed
        self.resources: dict[int, Resource] = {}
        self._next_handle = 1

    @property
    def free_bytes(self) -> int:
        return self.quota - self.committed

    def reserve(self, size: int) -> int:
        """Take a CREATE of ``size`` bytes out of the quota (DeviceError if it does not
        fit); returns the page-rounded bytes reserved."""
        if size <= 0:
            raise DeviceError(ErrorCode.INVALID_ARGUMENT, "resource size must be positive")
        rounded = pages(size) * PAGE_SIZE
        if rounded > self.free_bytes:
            raise DeviceError(
                ErrorCode.QUOTA_EXCEEDED, f"{size} bytes asked, {self.free_bytes} of the quota left"
            )
        self.committed += rounded
        return rounded

    def unreserve(self, rounded: int) -> None:
        self.committed -= rounded

    def add(self, resource: Resource) -> None:
        """A resource whose bytes were reserved."""
        self.resources[resource.handle] = resource

    def next_handle(self) -> int:
        handle = self._next_handle
        self._next_handle = handle + 1 if handle < 0xFFFFFFFF else 1
        return handle

    def get(self, handle: int) -> Resource:
        try:
            return self.resources[handle]
        except KeyError:
            raise DeviceError(ErrorCode.INVALID_HANDLE, f"no resource {handle:#x}") from None

    def remove(self, handle: int) -> Resource:
        """Take a handle away (its memory is freed once unused: ``forget``)."""
        return self.resources.pop(self.get(handle).handle)

    def remove_all(self) -> list[Resource]:
        gone = list(self.resources.values())
        self.resources.clear()
        return gone

    def forget(self, resource: Resource) -> None:
        """A removed resource's memory went back: its bytes leave the quota."""
        self.committed -= resource.page_count * PAGE_SIZE

    @staticmethod
    def check_range(resource: Resource, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > resource.size:
            raise DeviceError(
                ErrorCode.OUT_OF_BOUNDS,
                f"{offset:#x}+{length:#x} outside resource {resource.handle:#x} "
                f"({resource.size:#x})",
            )
