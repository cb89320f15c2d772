"""One server process: a physical GPU and the GPU instances created on it at run time.

``GpuServer`` is the Python control API (the CLI and the tests use it): it creates an
instance of a type, serves it on its own vfio-user socket, and destroys it again
(disconnecting its client, freeing its partition).  Creating more than the physical
GPU can hold raises ``CapacityError`` with what is left.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from device.errors import CapacityError
from device.gpu.instance import GpuInstance
from device.gpu.modes import DeniedPolicy, InterruptMode, MappingMode
from device.gpu.physical import PhysicalGpu
from device.vfio_user.server import Endpoint

log = logging.getLogger(__name__)


@dataclass
class ServedInstance:
    device: GpuInstance
    endpoint: Endpoint


class GpuServer:
    def __init__(self, physical: PhysicalGpu) -> None:
        self.physical = physical
        self.instances: dict[str, ServedInstance] = {}
        self._lock = threading.Lock()

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
            endpoint.start()
            served = ServedInstance(device, endpoint)
            self.instances[name] = served
        log.info("created %s (%s) on %s", name, type_name, socket_path)
        return served

    def destroy_instance(self, name: str) -> None:
        with self._lock:
            served = self.instances.pop(name)
        served.endpoint.stop()
        served.device.close()
        log.info("destroyed %s", name)

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
