"""Fixtures that boot real guests in real QEMU with our server attached.

They come from mgpu's own pytest plugin (device/harness/pytest_plugin.py: mgpu_runtime,
mgpu_server, mgpu_instance, mgpu_vm, ...), which cleans up what it started (QEMU by
PID, server threads, sockets) even when the test fails, checks each guest's kernel
log and keeps the logs of a failed test.  The older names below are the plugin's
fixtures under the names these tests have always used.  The guest runtime is
provisioned by ``guest_images`` (cached outside the repo), so these tests never skip
for a missing QEMU.  ``short_tmp`` comes from tests/conftest.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from device.control.manager import GpuServer
from device.harness.pytest_plugin import CreateInstance
from guest_images import Runtime

__all__ = ["CreateInstance"]

FIGURES = Path(__file__).resolve().parents[2] / "bench" / "results" / "qemu_figures.json"


@pytest.fixture(scope="session")
def runtime(mgpu_runtime: Runtime) -> Runtime:
    return mgpu_runtime


@pytest.fixture
def gpu_server(mgpu_server: GpuServer) -> GpuServer:
    return mgpu_server


@pytest.fixture
def instance(mgpu_instance: CreateInstance) -> CreateInstance:
    """``instance(name, type_name="mgpu-64", **options)``: an instance of ``gpu_server``
    served on its own socket in the test's short directory (``mgpu_instance``)."""
    return mgpu_instance


@pytest.fixture(scope="session")
def figures() -> Iterator[dict[str, float]]:
    """Figures the QEMU tests measure, written to bench/results for the record."""
    collected: dict[str, float] = {}
    yield collected
    if collected:
        FIGURES.parent.mkdir(parents=True, exist_ok=True)
        FIGURES.write_text(json.dumps(collected, indent=2, sort_keys=True) + "\n")
        print("MGPU-FIGURES " + json.dumps(collected, sort_keys=True))
