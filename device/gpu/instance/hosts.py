"""What the instance's workers call back: the physical GPU moving a resource (the
``ResidencyHost``), the engine taking and finishing ring jobs and pinning resources
(the ``EngineHost``), and the bring-up DMA (the ``BringUpHost``).  A mixin of
``GpuInstance``: the glue between its parts, apart from their composition."""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from device.errors import VfioUserError
from device.gpu import abi
from device.gpu.abi import ErrorCode, IntBit
from device.gpu.memory.resources import Pin, Resource
from device.units import PAGE_SIZE

if TYPE_CHECKING:
    from contextlib import AbstractContextManager

    from device.gpu import inject
    from device.gpu.aperture.window import Aperture
    from device.gpu.engine.bringup_dma import BringUpDma
    from device.gpu.engine.rings import Job, Ring
    from device.gpu.instance.interrupts import Interrupts
    from device.gpu.memory.page_table import ApertureTable
    from device.gpu.memory.physical import PhysicalGpu
    from device.gpu.memory.resources import ResourceTable
    from device.gpu.regs.file import RegisterFile
    from device.vfio_user.dma import DmaTable


class WorkerHosts:
    if TYPE_CHECKING:  # what the mixin uses of its GpuInstance
        window: Aperture
        table: ApertureTable
        physical: PhysicalGpu
        resources: ResourceTable
        registers: RegisterFile
        interrupts: Interrupts
        rings: list[Ring]
        bring_up: BringUpDma
        faults: inject.Faults
        dma: DmaTable | None

        def _locked(self) -> AbstractContextManager[None]: ...

    # ------------------------------------------------------------------ residency host

    def fence_resource(self, resource: Resource) -> None:
        self.window.fence_resource(resource)

    def unfence_resource(self, resource: Resource) -> None:
        self.window.unfence_resource(resource)

    def resource_moved(self, resource: Resource, kind: str) -> None:
        with self.window.lock:
            pages = self.table.pages_of(resource)
        offset = pages[0] * PAGE_SIZE if pages else -1
        self.window.log.add(kind, offset, resource.page_count * PAGE_SIZE, handle=resource.handle)

    def resource_freed(self, resource: Resource) -> None:
        with self._locked():
            self.resources.forget(resource)

    # ------------------------------------------------------------------ the engine's host

    def take_job(self, context: int) -> Job | None:
        with self._locked():
            return self.rings[context].take()

    def finish_job(self, job: Job, error: ErrorCode | None, fence: int | None) -> None:
        with self._locked():
            ring = self.rings[job.context]
            if error is not None:
                ring.fail(job, error)
                return
            if fence is not None and ring.fence(job, fence):
                self.interrupts.raise_cause(IntBit.FENCE)
            ring.complete(job)

    def pin_resource(self, handle: int, offset: int, length: int) -> Pin:
        with self._locked():
            resource = self.resources.get(handle)
            self.resources.check_range(resource, offset, length)
        self.physical.pin(resource)  # pages it back in if it was evicted
        self.window.fence_resource(resource)  # the guest's copies of it written back
        return Pin(resource, offset, length)

    def unpin_resources(self, pins: list[Pin]) -> None:
        for pin in pins:
            self.window.unfence_resource(pin.resource)
            self.physical.unpin(pin.resource)  # frees it if destroyed meanwhile

    def guest_memory(self) -> DmaTable:
        if self.faults.dma_armed and (why := self.faults.dma_should_fail()) is not None:
            raise VfioUserError(errno.EIO, why)
        dma = self.dma
        if dma is None:
            raise VfioUserError(errno.EFAULT, "no client: guest memory is not mapped")
        return dma

    # ------------------------------------------------------------------ bring-up DMA's host

    def aperture_read(self, offset: int, length: int) -> bytes:
        return self.window.read(offset, length, device=True)

    def aperture_write(self, offset: int, data: bytes) -> None:
        self.window.write(offset, data, device=True)

    def bring_up_done(self, generation: int, error: int) -> None:
        with self._locked():
            if generation != self.bring_up.generation:
                return  # reset meanwhile: the result is dropped
            self.registers.set("DMA_ERROR", error)
            self.registers.set("DMA_STATUS", abi.DmaStatus.ERROR if error else abi.DmaStatus.DONE)
            self.interrupts.raise_cause(IntBit.DMA)
