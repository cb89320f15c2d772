"""Resources: the device-memory allocations of one instance, by handle.

Resources are carved out of the instance's partition of device memory.  Handles are
never reused while the instance lives, so a stale handle is always caught.  A
resource may be *placed* in the BAR2 aperture, at the aperture offset that matches
its place in the partition.
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

    def destroy(self, handle: int) -> Resource:
        resource = self.get(handle)
        del self.resources[handle]
        self.allocator.free(resource.extent)
        return resource

    def aperture_offset(self, resource: Resource) -> int:
        return resource.extent.offset - self.partition.offset

    def clear(self) -> list[Resource]:
        gone = list(self.resources.values())
        for resource in gone:
            self.allocator.free(resource.extent)
        self.resources.clear()
        return gone
