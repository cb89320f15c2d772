"""Fixtures that boot real guests in real QEMU with our server attached.

Every fixture cleans up what it started (QEMU by PID, server threads, sockets) even
when the test fails.  The guest runtime is provisioned by ``guest_images`` (cached
outside the repo), so these tests never skip for a missing QEMU.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from device.control.manager import GpuServer
from device.gpu.physical import PhysicalGpu
from guest_images import Runtime, ensure_runtime

FIGURES = Path(__file__).resolve().parents[2] / "bench" / "results" / "qemu_figures.json"


@pytest.fixture(scope="session")
def runtime() -> Runtime:
    return ensure_runtime(progress=print)


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    # unix socket paths are limited to 107 bytes; pytest's tmp paths can be longer.
    path = Path(tempfile.mkdtemp(prefix="mgpu-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def gpu_server() -> Iterator[GpuServer]:
    with GpuServer(PhysicalGpu(512 * 1024 * 1024)) as server:
        yield server


@pytest.fixture(scope="session")
def figures() -> Iterator[dict[str, float]]:
    """Figures the QEMU tests measure, written to bench/results for the record."""
    collected: dict[str, float] = {}
    yield collected
    if collected:
        FIGURES.parent.mkdir(parents=True, exist_ok=True)
        FIGURES.write_text(json.dumps(collected, indent=2, sort_keys=True) + "\n")
        print("MGPU-FIGURES " + json.dumps(collected, sort_keys=True))
