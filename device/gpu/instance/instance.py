"""One GPU instance as a vfio-user PCI device: it composes the parts, it does not do them.

Region layout (vfio PCI region indexes):
  BAR0  64 KiB, 32-bit MMIO, trapped: every access is a REGION message answered by the
        register file (``regs/file.py``, table in ``regs/table.py``).
  BAR2  the aperture, 64-bit prefetchable: device memory as ``ApertureMap`` maps it.
        How the guest reaches it is the instance's mapping mode (``aperture/window.py``):
        static (QEMU maps the instance's private sealed memfd 1:1), fault (QEMU maps
        a FUSE file and each first touch asks us) or trap (every access is a message).
  BAR4  16 KiB, 32-bit MMIO: the MSI-X table (QEMU emulates it) and PBA; MSI-X only.
  CONFIG 4 KiB PCI Express config space (``identity.py``).

The parts: ``PciFunction`` (config space, FLR), ``RegisterFile`` (BAR0 values and write
actions), ``Interrupts`` (causes and vectors), one ``Ring`` per context, the ``Engine``
(ring commands, ``engine/commands.py``), ``BringUpDma``, ``ResourceTable`` and the aperture
(``ApertureMap`` plus the ``Aperture`` window).

Locking: ``_lock`` guards registers, resources and ring state, taken only through
``_locked()``.  The socket thread (register accesses), the engine and the bring-up DMA
worker hold it only for bookkeeping, never while they move data or wait for the
client.  What must not run under it (revocations, which wait for FUSE writebacks;
interrupt signals, which write to a client's eventfd) is deferred by ``_locked()``
until the lock is released.

Resets and destruction fence the workers for real: outstanding message DMA is
cancelled first (it may wait for a client that waits for us), then no command or
bring-up copy runs until the reset is done; memory is released only when no worker
can touch it any more.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import threading
from collections.abc import Callable, Iterator

from device import trace
from device.errors import VfioUserError
from device.gpu import inject
from device.gpu.abi import NO_CONTEXT, ErrorCode, FaultFlag, IntBit
from device.gpu.aperture.window import Aperture
from device.gpu.engine.bringup_dma import BringUpDma
from device.gpu.engine.executor import Engine
from device.gpu.engine.rings import Ring
from device.gpu.instance import regions
from device.gpu.instance.api import EventListener, InstanceApi
from device.gpu.instance.hosts import WorkerHosts
from device.gpu.instance.identity import PciFunction
from device.gpu.instance.interrupts import Interrupts
from device.gpu.instance.resource_commands import ResourceCommands
from device.gpu.memory.page_table import ApertureTable
from device.gpu.memory.physical import PhysicalGpu
from device.gpu.memory.resources import Resource, ResourceTable
from device.gpu.modes import DeniedPolicy, InterruptMode, MappingMode
from device.gpu.regs.file import DYNAMIC_OFFSETS, RegisterFile
from device.gpu.regs.table import ReadAction, Register, WriteAction
from device.gpu.types import MAX_CONTEXTS_PER_INSTANCE, InstanceType
from device.units import MiB
from device.vfio_user.dma import DmaTable
from device.vfio_user.irq import IrqLines
from device.vfio_user.protocol.constants import (
    PCI_NUM_REGIONS,
    PciRegion,
)
from device.vfio_user.protocol.messages import DeviceInfo, IrqInfo, RegionInfo

log = logging.getLogger(__name__)

DEFAULT_APERTURE_SIZE = 256 * MiB
# How long destruction waits for a worker to finish its current job.  Nothing it does
# can block once message DMA is cancelled, so this is a bound on one command's work.
STOP_TIMEOUT = 30.0
# A plain int: comparing with an enum member costs a class attribute lookup (70 ns of
# the 400 ns a trapped register read spends in the device).
_BAR0 = int(PciRegion.BAR0)


class _Locked:
    """``GpuInstance._locked()``: a class, not a generator context manager, because the
    engine takes the lock several times per command and a generator costs 1 us a time.
    It keeps no state between enter and exit, so one object serves every thread."""

    __slots__ = ("instance",)

    def __init__(self, instance: GpuInstance) -> None:
        self.instance = instance

    def __enter__(self) -> None:
        self.instance._lock.acquire()

    def __exit__(self, *exc: object) -> None:
        instance = self.instance
        try:
            deferred = instance._deferred
            if deferred:
                instance._deferred = []
            vectors = instance.interrupts.take_queued()
        finally:
            instance._lock.release()
        for action in deferred:
            action()
        if vectors:
            instance.interrupts.signal(vectors)


class GpuInstance(InstanceApi, WorkerHosts):
    """The device model behind one vfio-user socket.

    Made by ``PhysicalGpu``'s owner with ``physical`` and ``instance_type``; without
    them it gets a private physical GPU the size of its aperture (tests, one-off use).
    ``aperture`` is the 1:1 view of a static instance's memory; ``read_aperture`` reads
    through the page table in any mode; ``window`` is how the guest reaches BAR2.
    """

    def __init__(
        self,
        name: str = "gpu0",
        aperture_size: int = DEFAULT_APERTURE_SIZE,
        *,
        physical: PhysicalGpu | None = None,
        instance_type: str | None = None,
        interrupts: InterruptMode = InterruptMode.MSIX,
        mapping: MappingMode = MappingMode.STATIC,
        denied: DeniedPolicy = DeniedPolicy.SIGBUS,
    ) -> None:
        self.name = name
        self.interrupt_mode = InterruptMode(interrupts)
        self._owns_physical = physical is None
        if physical is None:
            private = InstanceType(
                "private", aperture_size, MAX_CONTEXTS_PER_INSTANCE,
                "a private GPU the size of its aperture",
            )  # fmt: skip
            physical = PhysicalGpu(
                aperture_size, MAX_CONTEXTS_PER_INSTANCE, (private,), name=f"{name}-private"
            )
            instance_type = "private"
        if instance_type is None:
            raise ValueError("an instance on a shared physical GPU needs an instance type")
        self.physical = physical
        mapping = MappingMode(mapping)
        static = mapping is MappingMode.STATIC
        self.instance_type, self.private = physical.reserve(name, instance_type, static=static)
        self.aperture_size = self.instance_type.aperture_size
        self.contexts = self.instance_type.contexts
        self.table = ApertureTable(self.aperture_size)
        self._static_view = self.private.view(0, self.aperture_size) if self.private else None
        self.resources = ResourceTable(name, self.instance_type.memory)
        self._lock = threading.Lock()
        self._locked_block = _Locked(self)
        self._deferred: list[Callable[[], None]] = []
        self.faults = inject.Faults(name)  # what is injected (inject.py)
        self.listeners: list[EventListener] = []  # control-plane events (name, data)
        try:
            self.window = Aperture(
                name, physical, self.table, self.private, mapping, DeniedPolicy(denied),
                self._report_fault,
            )  # fmt: skip
        except BaseException:
            if self._static_view is not None:
                self._static_view.release()
            physical.release(name)
            if self._owns_physical:
                physical.close()
            raise
        physical.attach(name, self)
        self.window.log.listeners.append(self._on_fault_record)
        self.dma: DmaTable | None = None
        self.region_access_count: dict[int, int] = {}
        self.resets = 0
        self.function = PciFunction(self.interrupt_mode, self.aperture_size)
        self.config = self.function.config
        self.registers = RegisterFile(self._register_writers(), self._register_readers())
        self.interrupts = Interrupts(self.registers, self.interrupt_mode, name, self.faults)
        self.rings = [Ring(c, self.registers, self._report_error) for c in range(self.contexts)]
        self._region_sizes = {i: self.region_info(i)[0].size for i in range(PCI_NUM_REGIONS)}
        self.resource_commands = ResourceCommands(
            name, self.registers, self.resources, self.window, physical,
            defer=self._defer, report_error=self._report_error, locked=self._locked,
        )  # fmt: skip
        self.bring_up = BringUpDma(name, self.registers, self)
        self._reset_registers()
        self.engine = Engine(self, self.contexts, name, self.faults)
        self._closed = False
        inject.register(self.faults)

    @property
    def aperture(self) -> memoryview:
        """Static mode: the instance's memory as QEMU maps it, 1:1 (tests read it).
        Other modes have no such view: ``read_aperture`` translates."""
        if self._static_view is None:
            raise AttributeError("only a static instance has a 1:1 aperture view")
        return self._static_view

    # ------------------------------------------------------------------ locking

    def _locked(self) -> _Locked:
        """Hold the instance lock; run deferred work and signal interrupts after it."""
        return self._locked_block

    def _defer(self, action: Callable[[], None]) -> None:
        """Run ``action`` once the lock is released (lock held)."""
        self._deferred.append(action)

    # ------------------------------------------------------------------ vfio-user model

    def connect(self, dma: DmaTable, irqs: IrqLines) -> None:
        self.dma = dma
        self.interrupts.lines = irqs

    def disconnect(self) -> None:
        self.dma = None
        self.interrupts.lines = None

    def device_info(self) -> DeviceInfo:
        return regions.device_info()

    def region_info(self, index: int) -> tuple[RegionInfo, int | None]:
        if index == PciRegion.BAR2:
            return self._aperture_region_info()
        return regions.region_info(index, self.interrupt_mode, len(self.config.data))

    def _aperture_region_info(self) -> tuple[RegionInfo, int | None]:
        mode, size = self.window.mode, self.aperture_size
        if mode is MappingMode.TRAP:
            return regions.trapped_aperture(size), None
        if mode is MappingMode.FAULT:  # QEMU maps our FUSE file: faults come to us
            return regions.mapped_aperture(size, 0, size), self.window.file_fd
        # static: QEMU maps the instance's private, sealed memory, and nothing else.
        assert self.private is not None
        return regions.mapped_aperture(size, 0, size), self.private.fd

    def irq_infos(self) -> list[IrqInfo]:
        return regions.irq_infos(self.interrupt_mode)

    def _check_access(self, index: int, offset: int, count: int) -> None:
        size = self._region_sizes.get(index, 0)
        if count <= 0 or offset < 0 or offset + count > size:
            raise VfioUserError(
                errno.EINVAL, f"access {offset:#x}+{count} outside region {index} ({size:#x})"
            )
        self.region_access_count[index] = self.region_access_count.get(index, 0) + 1

    def region_read(self, index: int, offset: int, count: int) -> bytes:
        self._check_access(index, offset, count)
        if trace.ENABLED or self.faults.removed:
            return self._region_read_observed(index, offset, count)
        return self._region_read(index, offset, count)

    def _region_read_observed(self, index: int, offset: int, count: int) -> bytes:
        """A read while tracing, or of a removed device (all ones)."""
        data = b"\xff" * count if self.faults.removed else self._region_read(index, offset, count)
        if trace.ENABLED:
            value = int.from_bytes(data[:8], "little")
            trace.emit(self.name, "register", region=index, offset=offset, size=count, value=value)
        return data

    def _region_read(self, index: int, offset: int, count: int) -> bytes:
        if index == _BAR0:
            if count == 4 and not offset & 3 and offset not in DYNAMIC_OFFSETS:
                return self.registers.values.get(offset, 0).to_bytes(4, "little")  # hot path
            with self._locked():
                return self.registers.read(offset, count)
        if index == PciRegion.BAR2:
            return self.window.read(offset, count)
        if index == PciRegion.BAR4:
            return bytes(count)  # PBA: nothing pending; the table never reaches us
        with self._locked():
            return self.config.read(offset, count)

    def region_write(self, index: int, offset: int, data: bytes) -> None:
        self._check_access(index, offset, len(data))
        if trace.ENABLED:
            value = int.from_bytes(data[:8], "little")
            trace.emit(
                self.name, "register", region=index, offset=offset, size=len(data), value=value,
                write=True, dropped=self.faults.removed,
            )  # fmt: skip
        if self.faults.removed:
            return  # the device fell off the bus: writes go nowhere
        if index == _BAR0:
            with self._locked():
                self.registers.write(offset, data)
        elif index == PciRegion.BAR2:
            self.window.write(offset, data)
        elif index == PciRegion.CONFIG:
            with self._locked():
                self.config.write(offset, data)
                flr = self.function.take_flr(offset, len(data))
            if flr:
                log.info("%s: function-level reset requested", self.name)
                self.reset()

    # ------------------------------------------------------------------ reset, close

    @contextlib.contextmanager
    def _client_requests_cancelled(self) -> Iterator[None]:
        """Fail the message DMA a worker waits on, and any it starts, inside the block."""
        dma = self.dma
        if dma is None:
            yield
            return
        with dma.requests_cancelled():
            yield

    def reset(self) -> None:
        """Device reset (DEVICE_RESET, FLR or the DEVICE_RESET register): stop the rings,
        destroy every resource (memory zeroed), restore the registers."""
        self.faults.on_reset()  # an injected engine hang ends: the reset drops the command
        with (
            self._client_requests_cancelled(),
            self.engine.fenced(),
            self.bring_up.fenced(),
        ):
            with self._locked():
                gone = self.resources.remove_all()
                self._reset_registers()
                self.resets += 1
            self._drop_resources(gone)  # the guest's next touch of any page faults
        log.info("%s: device reset (%d resources freed)", self.name, len(gone))
        self._event("DEVICE_RESET", resets=self.resets, resources_freed=len(gone))

    def _drop_resources(self, gone: list[Resource]) -> None:
        """Unmap every page of the table and free removed resources (lock not held)."""
        pages = list(range(self.table.page_count))
        with self.window.changing(pages), self.window.lock:
            self.table.unmap(0, self.table.page_count)
        for resource in gone:
            self.physical.remove(resource)

    def _reset_registers(self) -> None:
        self.registers.reset(
            {
                "APERTURE_SIZE_LO": self.aperture_size,
                "APERTURE_SIZE_HI": self.aperture_size >> 32,
                "MEM_QUOTA_LO": self.instance_type.memory,
                "MEM_QUOTA_HI": self.instance_type.memory >> 32,
                "CONTEXT_QUOTA": self.contexts,
            }
        )
        for ring in self.rings:
            ring.reset()
        self.bring_up.reset()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        inject.unregister(self.faults)
        self.faults.on_reset()  # release an injected hang: the engine must stop
        with self._client_requests_cancelled():
            stopped = self.engine.stop(STOP_TIMEOUT)
            stopped = self.bring_up.stop(STOP_TIMEOUT) and stopped
        if not stopped:
            # A worker may still write device memory: never hand it to anyone else.
            self.window.deny_all()  # unmap every page from a QEMU that may still be attached
            self.window.close()
            log.error("%s: a worker did not stop; its device memory stays reserved", self.name)
            return
        with self._locked():
            gone = self.resources.remove_all()
        self._drop_resources(gone)  # unmaps every page from a QEMU still attached
        self.window.close()
        if self._static_view is not None:
            self._static_view.release()
        self.physical.release(self.name)
        if self._owns_physical:
            self.physical.close()

    # ------------------------------------------------------------------ register actions

    def _register_writers(self) -> dict[WriteAction, Callable[[Register, int], None]]:
        return {
            WriteAction.INT_ACK: lambda _r, value: self.interrupts.ack(value),
            WriteAction.DEVICE_RESET: self._write_device_reset,
            WriteAction.RES_COMMAND: lambda _r, value: self.resource_commands.run(value),
            WriteAction.DMA_CONTROL: lambda _r, value: self.bring_up.start(value),
            WriteAction.RING_CONFIG: self._write_ring_config,
            WriteAction.RING_CONTROL: self._write_ring_control,
            WriteAction.DOORBELL: self._write_doorbell,
        }

    def _register_readers(self) -> dict[ReadAction, Callable[[], int]]:
        return {
            ReadAction.MEM_FREE: lambda: self.resources.free_bytes,
            ReadAction.RESOURCE_COUNT: lambda: len(self.resources.resources),
        }

    def _ring(self, register: Register) -> Ring | None:
        """The ring a per-context register belongs to; None beyond the context quota."""
        context = register.context
        return self.rings[context] if context is not None and context < self.contexts else None

    def _write_ring_config(self, register: Register, value: int) -> None:
        ring = self._ring(register)
        if ring is not None:
            ring.write_config(register.offset, value)

    def _write_ring_control(self, register: Register, value: int) -> None:
        ring = self._ring(register)
        if ring is not None:
            ring.write_control(value)

    def _write_doorbell(self, register: Register, _value: int) -> None:
        if self._ring(register) is not None:
            self.engine.kick()

    def _write_device_reset(self, _register: Register, value: int) -> None:
        if value & 1:
            self._defer(self.reset)  # a reset waits for the workers: never under the lock

    # ------------------------------------------------------------------ errors, faults

    def _report_error(
        self, code: ErrorCode, context: int = NO_CONTEXT, ring_offset: int = 0
    ) -> None:
        """Latch an error in the ERROR_* registers and raise ERROR (lock held)."""
        self.registers.set("ERROR_CODE", code)
        self.registers.set("ERROR_CONTEXT", context)
        self.registers.set("ERROR_RING_OFFSET", ring_offset)
        self.registers.set("ERROR_COUNT", self.registers.get("ERROR_COUNT") + 1)
        self.interrupts.raise_cause(IntBit.ERROR)
        data = {"code": ErrorCode(code).name, "context": context, "ring_offset": ring_offset}
        self._defer(lambda: self._event("ENGINE_ERROR", **data))

    def _report_fault(self, offset: int, write: bool) -> None:
        """A denied aperture access under the report policy: latch it, interrupt."""
        with self._locked():
            self.registers.set64("FAULT_OFFSET", offset)
            self.registers.set("FAULT_COUNT", self.registers.get("FAULT_COUNT") + 1)
            self.registers.set("FAULT_FLAGS", FaultFlag.WRITE if write else 0)
            self.interrupts.raise_cause(IntBit.FAULT)
