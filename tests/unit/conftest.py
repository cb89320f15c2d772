"""Shared fixtures: a GPU instance served on a real unix socket, always torn down."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from device.gpu.instance import GpuInstance
from device.vfio_user.server import Endpoint

ServeInstance = Callable[..., Endpoint]


@pytest.fixture
def serve_instance() -> Iterator[ServeInstance]:
    """``serve_instance(aperture_size=..., **GpuInstance kwargs)`` -> a started Endpoint."""
    workdir = Path(tempfile.mkdtemp(prefix="mgpu-unit-"))
    started: list[tuple[Endpoint, GpuInstance]] = []

    def serve(aperture_size: int = 1 << 20, name: str = "unit", **kwargs: object) -> Endpoint:
        device = GpuInstance(name, aperture_size=aperture_size, **kwargs)  # type: ignore[arg-type]
        endpoint = Endpoint(workdir / f"{name}{len(started)}.sock", device, name)
        endpoint.start()
        started.append((endpoint, device))
        return endpoint

    yield serve
    for endpoint, device in started:
        endpoint.stop()
        device.close()
    shutil.rmtree(workdir, ignore_errors=True)
