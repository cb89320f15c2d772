"""Fixtures that boot real guests in real QEMU with our server attached.

Every fixture cleans up what it started (QEMU by PID, server threads, sockets) even
when the test fails.  The guest runtime is provisioned by ``guest_images`` (cached
outside the repo), so these tests never skip for a missing QEMU.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from device.gpu.instance import GpuInstance
from device.server import Endpoint
from guest_images import Runtime, ensure_runtime


@pytest.fixture(scope="session")
def runtime() -> Runtime:
    return ensure_runtime(progress=print)


@pytest.fixture
def short_tmp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    # unix socket paths are limited to 107 bytes; pytest's tmp paths can be longer.
    import shutil
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="mgpu-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def gpu(short_tmp: Path) -> Iterator[tuple[GpuInstance, Endpoint]]:
    device = GpuInstance("gpu0", aperture_size=64 * 1024 * 1024)
    endpoint = Endpoint(short_tmp / "gpu0.sock", device, "gpu0")
    endpoint.start()
    try:
        yield device, endpoint
    finally:
        endpoint.stop()
        device.close()
