"""Fixtures that boot real guests in real QEMU with our server attached.

Every fixture cleans up what it started (QEMU by PID, server threads, sockets) even
when the test fails.  The guest runtime is provisioned by ``guest_images`` (cached
outside the repo), so these tests never skip for a missing QEMU.  ``short_tmp`` comes
from tests/conftest.py.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from device.control.manager import GpuServer, ServedInstance
from device.gpu.physical import PhysicalGpu
from guest_images import Runtime, ensure_runtime

FIGURES = Path(__file__).resolve().parents[2] / "bench" / "results" / "qemu_figures.json"


@pytest.fixture(scope="session")
def runtime() -> Runtime:
    return ensure_runtime(progress=print)


@pytest.fixture
def gpu_server() -> Iterator[GpuServer]:
    with GpuServer(PhysicalGpu(512 * 1024 * 1024)) as server:
        yield server


CreateInstance = Callable[..., ServedInstance]


@pytest.fixture
def instance(gpu_server: GpuServer, short_tmp: Path) -> CreateInstance:
    """``instance(name, type_name="mgpu-64", **options)``: an instance of ``gpu_server``
    served on ``short_tmp / "NAME.sock"`` (``short_tmp`` is where the test's VMs go too).
    """

    def create(name: str, type_name: str = "mgpu-64", **options: Any) -> ServedInstance:
        return gpu_server.create_instance(name, type_name, short_tmp / f"{name}.sock", **options)

    return create


@pytest.fixture(scope="session")
def figures() -> Iterator[dict[str, float]]:
    """Figures the QEMU tests measure, written to bench/results for the record."""
    collected: dict[str, float] = {}
    yield collected
    if collected:
        FIGURES.parent.mkdir(parents=True, exist_ok=True)
        FIGURES.write_text(json.dumps(collected, indent=2, sort_keys=True) + "\n")
        print("MGPU-FIGURES " + json.dumps(collected, sort_keys=True))
