"""One server process: a physical GPU and the GPU instances created on it at run time.

``GpuServer`` is the Python control API (the CLI and the tests use it): it creates an
instance of a type, serves it on its own vfio-user socket, and destroys it again
(disconnecting its client, freeing its resources).  Creating more than the physical
GPU can hold raises ``CapacityError`` with what is left.

Displays: an instance whose device model has a display (``display_of``: the
instance's ``display`` attribute, a ``FrameSource``) is registered in ``displays``
under its name while it lives; screendumps, the VNC server and the web page find it
there.

Events (the control socket's, docs/control.md) go to ``listeners`` as (name, data):
INSTANCE_ADDED and INSTANCE_DELETED from here, CLIENT_CONNECTED and
CLIENT_DISCONNECTED from each endpoint, and whatever each instance reports (faults,
resets, engine errors).  A listener must not block: it is called from device threads.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from device.display.registry import DisplayRegistry
from device.display.source import display_of
from device.errors import CapacityError
from device.gpu.instance.instance import GpuInstance
from device.gpu.memory.physical import PhysicalGpu
from device.gpu.modes import DeniedPolicy, InterruptMode, MappingMode
from device.vfio_user.server import Endpoint

log = logging.getLogger(__name__)


EventListener = Callable[[str, dict[str, Any]], None]


@dataclass
class ServedInstance:
    device: GpuInstance
    endpoint: Endpoint
    client_connected: bool = False

    def describe(self) -> dict[str, Any]:
        """What the control plane shows of one instance."""
        device = self.device
        return {
            "name": device.name,
            "type": device.instance_type.name,
            "socket": str(self.endpoint.path),
            "mapping": device.window.mode.value,
            "policy": device.window.policy.value,
            "interrupts": device.interrupt_mode.value,
            "memory": device.aperture_size,
            "contexts": device.contexts,
            "client_connected": self.client_connected,
            "clients_served": self.endpoint.clients_served,
            "injected": device.faults.describe(),
            "stats": device.stats(),
        }


class GpuServer:
    def __init__(self, physical: PhysicalGpu) -> None:
        self.physical = physical
        self.instances: dict[str, ServedInstance] = {}
        self.listeners: list[EventListener] = []
        self.displays = DisplayRegistry()
        self._lock = threading.Lock()

    def emit(self, event: str, data: dict[str, Any]) -> None:
        for listener in list(self.listeners):
            try:
                listener(event, data)
            except Exception:
                log.exception("event listener failed on %s", event)

    def create_instance(
        self,
        name: str,
        type_name: str,
        socket_path: Path,
        interrupts: InterruptMode = InterruptMode.MSIX,
        mapping: MappingMode = MappingMode.STATIC,
        denied: DeniedPolicy = DeniedPolicy.SIGBUS,
    ) -> ServedInstance:
        with self._lock:
            if name in self.instances:
                raise CapacityError(f"instance {name!r} already exists")
            device = GpuInstance(
                name,
                physical=self.physical,
                instance_type=type_name,
                interrupts=interrupts,
                mapping=mapping,
                denied=denied,
            )
            try:
                endpoint = Endpoint(socket_path, device, name)
            except BaseException:
                device.close()
                raise
            served = ServedInstance(device, endpoint)
            device.listeners.append(self.emit)
            endpoint.on_client = lambda connected: self._client(served, connected)
            endpoint.start()
            self.instances[name] = served
            display = display_of(device)
            if display is not None:
                self.displays.add(display, name)
        log.info("created %s (%s) on %s", name, type_name, socket_path)
        self.emit(
            "INSTANCE_ADDED", {"instance": name, "type": type_name, "socket": str(socket_path)}
        )
        return served

    def _client(self, served: ServedInstance, connected: bool) -> None:
        served.client_connected = connected
        event = "CLIENT_CONNECTED" if connected else "CLIENT_DISCONNECTED"
        self.emit(event, {"instance": served.device.name})

    def destroy_instance(self, name: str) -> None:
        with self._lock:
            served = self.instances.pop(name)
            self.displays.remove(name)
        served.endpoint.stop()
        served.device.close()
        log.info("destroyed %s", name)
        self.emit("INSTANCE_DELETED", {"instance": name})

    def available_instances(self) -> dict[str, int]:
        return {t: self.physical.available_instances(t) for t in self.physical.types}

    def close(self) -> None:
        for name in list(self.instances):
            self.destroy_instance(name)
        self.physical.close()

    def __enter__(self) -> GpuServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["CapacityError", "GpuServer", "ServedInstance"]
