"""The RES_* registers: resource commands (CREATE, DESTROY, PLACE, REMOVE) and the
lifetime of a resource's device memory.

Theory of operation.  A command runs inline, under the instance lock (it is cheap
bookkeeping), and reports RES_STATUS; what must not run under the lock (aperture
revocations, which wait for FUSE writebacks) is deferred to just after it.  DESTROY
takes the handle away and unmaps the resource's aperture pages at once (so the
guest's writebacks to it are dropped), revokes the guest's copies after the lock,
and scrubs and frees the memory only when no engine command pins it: at once if
none did, else when the last pin is dropped (``unpin``).  Scrubbing happens before
the pages return to the allocator, so nobody else can be handed them unscrubbed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from device.errors import DeviceError
from device.gpu import registers as regs
from device.gpu.aperture import Aperture
from device.gpu.aperture_map import ApertureMap
from device.gpu.physical import PhysicalGpu
from device.gpu.register_file import RegisterFile
from device.gpu.registers import ErrorCode
from device.gpu.resources import Pin, Resource, ResourceTable

log = logging.getLogger(__name__)

Defer = Callable[[Callable[[], None]], None]  # run an action once the lock is released


class ResourceCommands:
    def __init__(
        self,
        name: str,
        registers: RegisterFile,
        resources: ResourceTable,
        pages: ApertureMap,
        window: Aperture,
        physical: PhysicalGpu,
        *,
        defer: Defer,
        report_error: Callable[[ErrorCode], None],
        free: Callable[[Resource], None],
    ) -> None:
        self.name = name
        self.registers = registers
        self.resources = resources
        self.pages = pages
        self.window = window
        self.physical = physical
        self._defer = defer
        self._report_error = report_error
        self._free = free  # takes the instance lock and returns the pages

    def run(self, command: int) -> None:
        """A RES_COMMAND write (lock held)."""
        try:
            if command == regs.ResourceCommand.CREATE:
                resource = self.resources.create(self.registers.get64("RES_SIZE"))
                self.registers.set("RES_HANDLE", resource.handle)
            elif command == regs.ResourceCommand.DESTROY:
                self._destroy(self.resources.remove(self.registers.get("RES_HANDLE")))
            elif command == regs.ResourceCommand.PLACE:
                self._place(self.resources.get(self.registers.get("RES_HANDLE")))
            elif command == regs.ResourceCommand.REMOVE:
                self._remove(self.resources.get(self.registers.get("RES_HANDLE")))
            else:
                raise DeviceError(ErrorCode.INVALID_COMMAND, f"no resource command {command}")
        except DeviceError as exc:
            log.info("%s: resource command %d failed: %s", self.name, command, exc)
            self.registers.set("RES_STATUS", exc.code)
            self._report_error(ErrorCode(exc.code))
            return
        self.registers.set("RES_STATUS", ErrorCode.NONE)

    def _place(self, resource: Resource) -> None:
        resource.placed = True
        offset, size = self.pages.placement(resource.extent), resource.extent.size
        self.registers.set64("RES_OFFSET", offset)
        self._defer(lambda: self.window.allow(offset, size))

    def _remove(self, resource: Resource) -> None:
        resource.placed = False
        offset, size = self.pages.placement(resource.extent), resource.extent.size
        self._defer(lambda: self.window.deny(offset, size))

    def _destroy(self, resource: Resource) -> None:
        offset, size = self.pages.placement(resource.extent), resource.extent.size
        self.pages.unmap(offset, size)
        unused = resource.pins == 0  # pins only fall from here on: the handle is gone

        def destroyed() -> None:
            self.window.revoke(offset, size)  # drop the guest's copies of its pages
            if unused:
                self.release(resource)

        self._defer(destroyed)

    # ---------------------------------------------------------------- lock not held

    def release(self, resource: Resource) -> None:
        """Zero a removed, unpinned resource, then give its pages back."""
        self.physical.scrub(resource.extent.offset, resource.extent.size)
        self._free(resource)

    def released_by(self, unpinned: list[Resource]) -> None:
        """Resources whose last pin went (destroyed while a command used them)."""
        for resource in unpinned:
            self.release(resource)


__all__ = ["Pin", "ResourceCommands"]
