"""Resources: the device-memory allocations of one instance, by handle.

Resources are carved out of the instance's partition of device memory.  Handles are
never reused while the instance lives, so a stale handle is always caught.  A
resource may be *placed* in the BAR2 aperture (where: ``ApertureMap``).

Lifetime.  A command that uses a resource *pins* it for its duration.  Removing a
resource (DESTROY, reset) takes its handle away at once, but its memory is scrubbed
and returned to the allocator only when nothing pins it: ``unpin`` hands back the
resource whose last pin went, and the owner then scrubs and ``free``s it.  So a
freed page is never written by a command that started before the DESTROY.
Not thread-safe: the owner holds its lock.
"""

from __future__ import annotations

from dataclasses import dataclass

from device.errors import DeviceError, OutOfMemory
from device.gpu.allocator import Extent, PageAllocator
from device.gpu.registers import ErrorCode


@dataclass
class Resource:
    handle: int
    extent: Extent  # absolute offset in device memory, whole pages
    size: int  # bytes the driver asked for
    placed: bool = False
    pins: int = 0  # commands using it now
    removed: bool = False  # its handle is gone; memory freed when unpinned


@dataclass(frozen=True)
class Pin:
    """A command's hold on [start, end) of device memory inside one resource."""

    resource: Resource
    start: int
    end: int


class ResourceTable:
    def __init__(self, partition: Extent) -> None:
        self.partition = partition
        self.allocator = PageAllocator(partition.offset, partition.size)
        self.resources: dict[int, Resource] = {}
        self._next_handle = 1

    @property
    def free_bytes(self) -> int:
        return self.allocator.free_bytes

    def create(self, size: int) -> Resource:
        if size <= 0:
            raise DeviceError(ErrorCode.INVALID_ARGUMENT, "resource size must be positive")
        if size > self.allocator.free_bytes:
            raise DeviceError(
                ErrorCode.QUOTA_EXCEEDED,
                f"{size} bytes asked, {self.allocator.free_bytes} of the quota left",
            )
        try:
            extent = self.allocator.allocate(size)
        except OutOfMemory as exc:
            raise DeviceError(ErrorCode.NO_MEMORY, str(exc)) from None
        handle = self._next_handle
        self._next_handle = handle + 1 if handle < 0xFFFFFFFF else 1
        resource = Resource(handle, extent, size)
        self.resources[handle] = resource
        return resource

    def get(self, handle: int) -> Resource:
        try:
            return self.resources[handle]
        except KeyError:
            raise DeviceError(ErrorCode.INVALID_HANDLE, f"no resource {handle:#x}") from None

    def remove(self, handle: int) -> Resource:
        """Take a handle away; free the resource's memory once ``pins`` is 0."""
        resource = self.get(handle)
        del self.resources[handle]
        resource.removed = True
        return resource

    def remove_all(self) -> list[Resource]:
        gone = list(self.resources.values())
        for resource in gone:
            resource.removed = True
        self.resources.clear()
        return gone

    def pin(self, handle: int, offset: int, length: int) -> Pin:
        resource = self.get(handle)
        if offset < 0 or length < 0 or offset + length > resource.size:
            raise DeviceError(
                ErrorCode.OUT_OF_BOUNDS,
                f"{offset:#x}+{length:#x} outside resource {handle:#x} ({resource.size:#x})",
            )
        resource.pins += 1
        start = resource.extent.offset + offset
        return Pin(resource, start, start + length)

    def unpin(self, pin: Pin) -> Resource | None:
        """Drop a pin; returns the resource if it was removed and is now unused."""
        resource = pin.resource
        resource.pins -= 1
        return resource if resource.removed and resource.pins == 0 else None

    def free(self, resource: Resource) -> None:
        """Return a removed, unpinned (and scrubbed) resource's pages."""
        assert resource.removed and resource.pins == 0, "freeing a resource still in use"
        self.allocator.free(resource.extent)
