"""What the control plane, tests and tools do with an instance beyond vfio-user:
observe it (resources, the page table, stats, fault-log records as events and trace),
drive its resource commands from Python, and inject faults.  A mixin of
``GpuInstance``, kept apart so that the instance module stays the composition of
the device's parts."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from device import trace
from device.errors import DeviceError
from device.gpu import inject
from device.gpu.abi import ErrorCode, ResourceCommand
from device.gpu.aperture.fault_log import FaultRecord
from device.gpu.regs import table as regs
from device.vfio_user.protocol.constants import PciRegion

if TYPE_CHECKING:
    from contextlib import AbstractContextManager

    from device.gpu.aperture.window import Aperture
    from device.gpu.engine.executor import Engine
    from device.gpu.instance.interrupts import Interrupts
    from device.gpu.memory.page_table import ApertureTable
    from device.gpu.memory.physical import PhysicalGpu
    from device.gpu.memory.resources import Pin, ResourceTable
    from device.gpu.regs.file import RegisterFile

log = logging.getLogger("device.gpu.instance.instance")

# FaultLog kinds -> (control event, trace kind); the event is None for trace-only ones.
FAULT_EVENTS: dict[str, tuple[str | None, str]] = {
    "served": ("FAULT", "fault"),
    "paged_in": ("FAULT", "page_in"),
    "denied": ("ACCESS_DENIED", "fault"),
    "dummy": ("ACCESS_DENIED", "fault"),
    "reported": ("ACCESS_DENIED", "fault"),
    "write_dropped": ("ACCESS_DENIED", "writeback"),
    "revoked": ("REVOKED", "revoke"),
    "evicted": ("EVICTED", "evict"),
    "written_back": (None, "writeback"),
}
SLOWED_KINDS = frozenset({"served", "paged_in", "denied", "dummy", "reported"})
EventListener = Callable[[str, dict[str, Any]], None]


class InstanceApi:
    if TYPE_CHECKING:  # what the mixin uses of its GpuInstance
        name: str
        window: Aperture
        table: ApertureTable
        physical: PhysicalGpu
        resources: ResourceTable
        registers: RegisterFile
        interrupts: Interrupts
        engine: Engine
        faults: inject.Faults
        listeners: list[EventListener]
        region_access_count: dict[int, int]
        resets: int

        def _locked(self) -> AbstractContextManager[None]: ...
        def region_write(self, index: int, offset: int, data: bytes) -> None: ...
        def pin_resource(self, handle: int, offset: int, length: int) -> Pin: ...
        def unpin_resources(self, pins: list[Pin]) -> None: ...
    # ------------------------------------------------------------------ observation

    def describe_resources(self) -> list[dict[str, int | bool]]:
        """The live resources, for the control plane and tests."""
        with self._locked():
            resources = list(self.resources.resources.values())
        with self.physical.lock:
            return [
                {
                    "handle": r.handle,
                    "size": r.size,
                    "resident": r.resident,
                    "pages": r.page_count,
                    "runs": len(r.runs),
                    "mapped_pages": len(r.mapped_at),
                    "pins": r.pins,
                }
                for r in resources
            ]

    def describe_aperture(self) -> list[dict[str, int | bool]]:
        """The page table's mapped runs: aperture offset, length, resource handle and
        offset in it, and whether that resource is resident."""
        with self.window.lock, self.physical.lock:
            return self.table.runs()

    def read_aperture(self, offset: int, length: int) -> bytes:
        """What the aperture shows at [offset, offset+length), as the device sees it
        (the guest's dirty bytes included; unmapped pages read as zeros)."""
        parts = []
        for entry, at, size in self.window._runs_of(offset, length):
            if entry is None:
                parts.append(bytes(size))
            else:
                parts.append(self.window._resource_access(entry, at, size, None, device=True))
        return b"".join(parts)

    # ------------------------------------------------------------------ Python API

    def resource_command(self, command: ResourceCommand, **values: int) -> int:
        """Run a resource command through the RES_* registers, as a driver would
        (tests, benchmarks, the control plane): writes ``values`` (64-bit ones by their
        name without _LO/_HI), then RES_COMMAND; returns RES_HANDLE for CREATE, else
        RES_OFFSET.  Raises DeviceError with RES_STATUS on failure."""
        for name, value in values.items():
            if f"{name}_LO" in regs.BY_NAME:
                self._write_register(f"{name}_LO", value & 0xFFFFFFFF)
                self._write_register(f"{name}_HI", value >> 32)
            else:
                self._write_register(name, value)
        self._write_register("RES_COMMAND", command)
        status = self.registers.get("RES_STATUS")
        if status:
            raise DeviceError(status, f"{command.name} failed: {ErrorCode(status).name}")
        if command is ResourceCommand.CREATE:
            return self.registers.get("RES_HANDLE")
        return self.registers.get64("RES_OFFSET")

    def _write_register(self, name: str, value: int) -> None:
        self.region_write(PciRegion.BAR0, regs.BY_NAME[name].offset, value.to_bytes(4, "little"))

    # ------------------------------------------------------------------ events, injection

    def _event(self, name: str, **data: Any) -> None:
        """Tell the control plane's listeners (never under the lock)."""
        for listener in list(self.listeners):
            try:
                listener(name, {"instance": self.name, **data})
            except Exception:
                log.exception("%s: event listener failed on %s", self.name, name)

    def _on_fault_record(self, record: FaultRecord) -> None:
        """Every FaultLog record: tracing, the control events, and slow faults."""
        event, kind = FAULT_EVENTS.get(record.kind, (None, "fault"))
        if trace.ENABLED:
            trace.emit(
                self.name, kind, name=record.kind, seq=record.seq, offset=record.offset,
                length=record.length, write=record.write, handle=record.handle,
            )  # fmt: skip
        if event is not None and self.listeners:
            self._event(event, kind=record.kind, offset=record.offset, length=record.length)

    def inject(self, fault: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """Inject a fault (``inject.FAULTS``); its effective parameters.  ValueError for
        bad parameters, DeviceError (INVALID_HANDLE, OUT_OF_BOUNDS) for a bad bit flip."""
        params = dict(params or {})
        if fault == "bit-flip":
            checked = inject.check_params(fault, params)
            checked["value"] = self.flip_bit(checked["handle"], checked["offset"], checked["bit"])
        elif fault == "irq-spurious":
            checked = inject.check_params(fault, params)
            if checked["vector"] >= self.interrupts.vectors:
                raise ValueError(f"vector must be 0..{self.interrupts.vectors - 1}")
            self.interrupts.signal_now([checked["vector"]])
        else:
            checked = self.faults.arm(fault, params)
        log.warning("%s: injected %s %s", self.name, fault, checked)
        if trace.ENABLED:
            trace.emit(self.name, "control", name=f"inject {fault}", **checked)
        return checked

    def flip_bit(self, handle: int, offset: int, bit: int) -> int:
        """Flip one bit of resource ``handle``'s memory; the byte's new value.  The
        resource is pinned meanwhile (a DESTROY frees it only afterwards)."""
        pin = self.pin_resource(handle, offset, 1)  # DeviceError for a bad handle/offset
        try:  # pinned and fenced: resident, the guest's copy written back and dropped
            resource = pin.resource
            with self.physical.lock:
                byte = bytearray(resource.read(offset, 1))
                value = inject.flip_bit(memoryview(byte), 0, bit)
                resource.write(offset, bytes(byte))
        finally:
            self.unpin_resources([pin])
        return value

    def stats(self) -> dict[str, Any]:
        """Counters for `mgpu top` (rates are differences of two samples)."""
        log_counters = dict(self.window.log.counters)
        return {
            "register_accesses": sum(self.region_access_count.values()),
            "faults": sum(log_counters.get(k, 0) for k in SLOWED_KINDS),
            "resident_bytes": self.resources.committed,
            "ring_busy_seconds": round(self.engine.busy_seconds, 6),
            "commands": self.engine.commands_executed,
            "resets": self.resets,
            "errors": self.registers.get("ERROR_COUNT"),
        }
