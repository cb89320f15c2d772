"""The RES_* registers: resource commands (CREATE, DESTROY) and the GPU MMU commands
that map resources into the aperture (PLACE, REMOVE, MAP, MAP_ANY, UNMAP).

Theory of operation.  A command is checked inline, under the instance lock, and its
result (RES_STATUS, RES_HANDLE, RES_OFFSET) is known before the register write is
answered; the work that must not run under that lock is deferred to just after it
(still before the answer): allocating pages (which may evict another instance's
resource, and so wait for its writebacks) and changing the page table (which
revokes the guest's copies of the pages it changes, inside ``Aperture.changing``).
A page-table change touches exactly the aperture pages it maps or unmaps.  DESTROY
takes the handle away at once and unmaps its pages (the guest's writebacks to it are
dropped); its memory is scrubbed and returned to the pool when no command pins it.

In ``static`` mode the aperture maps the instance's private memory 1:1: a resource
can only show where its pages are (MAP elsewhere is INVALID_ARGUMENT).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager

from device.errors import DeviceError
from device.gpu import inject
from device.gpu.abi import ErrorCode, ResourceCommand
from device.gpu.aperture.window import Aperture
from device.gpu.memory.physical import PhysicalGpu
from device.gpu.memory.resources import Resource, ResourceTable
from device.gpu.regs.file import RegisterFile
from device.units import PAGE_SIZE

log = logging.getLogger(__name__)

Defer = Callable[[Callable[[], None]], None]  # run an action once the lock is released


class ResourceCommands:
    def __init__(
        self,
        name: str,
        registers: RegisterFile,
        resources: ResourceTable,
        window: Aperture,
        physical: PhysicalGpu,
        *,
        defer: Defer,
        report_error: Callable[[ErrorCode], None],
        locked: Callable[[], AbstractContextManager[None]],
    ) -> None:
        self.name = name
        self.registers = registers
        self.resources = resources
        self.window = window
        self.table = window.table
        self.physical = physical
        self.static = window.private is not None
        self._defer = defer
        self._report_error = report_error  # ERROR_* registers and interrupt (lock held)
        self._locked = locked  # the instance lock, for deferred work
        self._handlers: dict[int, Callable[[], None]] = {
            ResourceCommand.CREATE: self._create,
            ResourceCommand.DESTROY: self._destroy,
            ResourceCommand.PLACE: self._place,
            ResourceCommand.REMOVE: self._remove,
            ResourceCommand.MAP: lambda: self._map(anywhere=False),
            ResourceCommand.MAP_ANY: lambda: self._map(anywhere=True),
            ResourceCommand.UNMAP: self._unmap,
        }

    def run(self, command: int) -> None:
        """A RES_COMMAND write (lock held)."""
        handler = self._handlers.get(command)
        try:
            if handler is None:
                raise DeviceError(ErrorCode.INVALID_COMMAND, f"no resource command {command}")
            self.registers.set("RES_STATUS", ErrorCode.NONE)
            handler()
        except DeviceError as exc:
            self._fail(command, exc)

    def _fail(self, command: int, exc: DeviceError) -> None:
        """RES_STATUS and the ERROR interrupt for a failed command (lock held)."""
        log.info("%s: resource command %d failed: %s", self.name, command, exc)
        self.registers.set("RES_STATUS", exc.code)
        self._report_error(ErrorCode(exc.code))

    # ---------------------------------------------------------------- create, destroy

    def _create(self) -> None:
        size = self.registers.get64("RES_SIZE")
        if inject.allocation_should_fail(self.name):
            raise DeviceError(ErrorCode.NO_MEMORY, "injected allocation failure")
        rounded = self.resources.reserve(size)
        handle = self.resources.next_handle()
        self.registers.set("RES_HANDLE", handle)

        def allocate() -> None:  # may evict: never under the lock
            try:
                resource = self.physical.allocate(self.name, handle, size)
            except DeviceError as exc:
                with self._locked():
                    self.resources.unreserve(rounded)
                    self._fail(ResourceCommand.CREATE, exc)
                return
            with self._locked():
                self.resources.add(resource)

        self._defer(allocate)

    def _destroy(self) -> None:
        resource = self.resources.remove(self.registers.get("RES_HANDLE"))
        pages = self.table.pages_of(resource)

        def destroyed() -> None:
            with self.window.changing(pages), self.window.lock:
                for page in pages:
                    self.table.unmap(page, 1)
            self.physical.remove(resource)  # freed now, or when its last pin goes

        self._defer(destroyed)

    # ---------------------------------------------------------------- the GPU MMU

    def _resource(self) -> Resource:
        return self.resources.get(self.registers.get("RES_HANDLE"))

    def _place(self) -> None:
        resource = self._resource()
        with self.window.lock:
            pages = self.table.pages_of(resource)
        whole = len(pages) == resource.page_count and pages == list(
            range(pages[0], pages[0] + len(pages))
        ) if pages else False  # fmt: skip
        if whole:  # placed already: PLACE is idempotent
            self.registers.set64("RES_OFFSET", pages[0] * PAGE_SIZE)
            return
        self._map_range(resource, 0, resource.page_count, None)

    def _remove(self) -> None:
        resource = self._resource()
        with self.window.lock:
            pages = self.table.pages_of(resource)
        self._defer(lambda: self._unmap_pages(pages))

    def _map(self, *, anywhere: bool) -> None:
        resource = self._resource()
        res_offset = self.registers.get64("RES_RANGE_OFFSET")
        length = (
            self.registers.get64("RES_RANGE_LENGTH") or resource.page_count * PAGE_SIZE - res_offset
        )
        at = None if anywhere else self.registers.get64("RES_APERTURE")
        if res_offset % PAGE_SIZE or length % PAGE_SIZE or (at is not None and at % PAGE_SIZE):
            raise DeviceError(
                ErrorCode.INVALID_ARGUMENT, "MAP needs page-aligned offsets and length"
            )
        if length <= 0:
            raise DeviceError(ErrorCode.OUT_OF_BOUNDS, "MAP of nothing")
        self._map_range(
            resource, res_offset // PAGE_SIZE, length // PAGE_SIZE,
            None if at is None else at // PAGE_SIZE,
        )  # fmt: skip

    def _map_range(self, resource: Resource, res_first: int, count: int, first: int | None) -> None:
        """Check a mapping now; apply it after the lock.  ``first`` None: the device picks."""
        with self.window.lock:
            natural = self._natural_page(resource, res_first)
            if first is None:
                first = natural if natural is not None else self.table.find_free(count)
                if first is None:
                    raise DeviceError(
                        ErrorCode.NO_APERTURE_SPACE, f"no free run of {count} aperture pages"
                    )
            elif natural is not None and first != natural:
                raise DeviceError(
                    ErrorCode.INVALID_ARGUMENT,
                    f"static mode maps 1:1: these pages can only show at {natural * PAGE_SIZE:#x}",
                )
            self.table.check_map(first, resource, res_first, count)
        self.registers.set64("RES_OFFSET", first * PAGE_SIZE)
        pages = list(range(first, first + count))

        def apply() -> None:
            with self.window.changing(pages), self.window.lock:
                self.table.map(first, resource, res_first, count)

        self._defer(apply)

    def _natural_page(self, resource: Resource, res_first: int) -> int | None:
        """Static mode: the aperture page resource page ``res_first`` shows at."""
        if not self.static:
            return None
        return resource.runs[0].offset // PAGE_SIZE + res_first

    def _unmap(self) -> None:
        at, length = self.registers.get64("RES_APERTURE"), self.registers.get64("RES_RANGE_LENGTH")
        if at % PAGE_SIZE or length % PAGE_SIZE or not length:
            raise DeviceError(ErrorCode.INVALID_ARGUMENT, "UNMAP needs a page-aligned range")
        if at + length > self.table.size:
            raise DeviceError(ErrorCode.OUT_OF_BOUNDS, "UNMAP outside the aperture")
        pages = list(range(at // PAGE_SIZE, (at + length) // PAGE_SIZE))
        self._defer(lambda: self._unmap_pages(pages))

    def _unmap_pages(self, pages: list[int]) -> None:
        with self.window.changing(pages), self.window.lock:
            for page in pages:
                self.table.unmap(page, 1)


__all__ = ["ResourceCommands"]
