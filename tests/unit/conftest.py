"""Shared fixtures: a GPU instance served on a real unix socket, always torn down."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from device.gpu.instance.instance import GpuInstance
from device.vfio_user.server import Endpoint
from tests.helpers import short_tmp_dir

ServeInstance = Callable[..., Endpoint]


@pytest.fixture
def serve_instance() -> Iterator[ServeInstance]:
    """``serve_instance(aperture_size=..., **GpuInstance kwargs)`` -> a started Endpoint."""
    started: list[tuple[Endpoint, GpuInstance]] = []
    with short_tmp_dir(prefix="mgpu-unit-") as workdir:

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
