"""Benchmark rows: the command engine, driven by the reference driver over a real socket.

- ``engine.fence``: ring submit to fence interrupt, host side, for the smallest
  command (a FENCE alone): from the DOORBELL write to the fence eventfd becoming
  readable in the client (the trapped write, the engine thread's wake-up, the ring
  read from guest RAM, the fence write and the interrupt signal), against one trapped
  register write in the same run.  Server and client pinned to one CPU, as for the
  trapped path.
- ``engine.copy``: COPY_RESOURCE throughput, submit to fence, against ``np.copyto``
  of the same size in this process (rounds interleaved).  Target >= 0.8x numpy.
- ``engine.upload`` and ``engine.create_destroy`` (full run): WRITE_RESOURCE from
  fd-backed guest RAM against the same numpy copy; resource CREATE + DESTROY pairs
  through the registers against the allocator alone.

    python -m bench.engine [--quick]
"""

from __future__ import annotations

import os
import select
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from bench.common import Row, row_from
from bench.region_read import _start, _stop, wait_for_socket
from device.gpu.engine.commands import Opcode, encode
from device.gpu.memory.allocator import PageAllocator
from device.gpu.regs import table as regs
from device.harness.driver import GuestRam, MgpuDriver
from device.vfio_user.client import VfioUserClient
from device.vfio_user.protocol.constants import PciRegion

SCRATCH = regs.BY_NAME["SCRATCH"].offset


@contextmanager
def served_driver(ram_size: int, cpu: int | None) -> Iterator[MgpuDriver]:
    """An mgpu-1024 instance in a ``python -m device serve`` process, and our driver."""
    with tempfile.TemporaryDirectory(prefix="mgpu-bench-") as workdir:
        path = Path(workdir) / "gpu.sock"
        proc = _start(
            [sys.executable, "-m", "device", "serve", "--type", "mgpu-1024",
             "--log-level", "warning", "--socket", str(path)],
            cpu,
        )  # fmt: skip
        try:
            wait_for_socket(path, proc)
            with VfioUserClient.connect(path) as client:
                driver = MgpuDriver(client, GuestRam(client, size=ram_size))
                try:
                    yield driver
                finally:
                    driver.close()
        finally:
            _stop(proc)


def fence_samples(driver: MgpuDriver, count: int) -> tuple[list[float], list[float]]:
    """Doorbell to fence interrupt, and one trapped write, in microseconds."""
    fence_fd = driver.vectors[0]
    clock = time.perf_counter_ns
    tail_offset = regs.BY_NAME[driver.ctx("RING_TAIL")].offset
    doorbell = regs.BY_NAME[driver.ctx("DOORBELL")].offset
    client = driver.client
    fences: list[float] = []
    writes: list[float] = []
    for _ in range(count):
        command = driver.fence()
        driver.ram.write(driver.ring + driver.tail, command)
        driver.tail = (driver.tail + len(command)) % driver.ring_size
        client.write32(PciRegion.BAR0, tail_offset, driver.tail)
        t = clock()
        client.write32(PciRegion.BAR0, doorbell, 1)
        if not select.select([fence_fd], [], [], 5.0)[0]:
            raise TimeoutError("no fence interrupt in 5 s")
        fences.append((clock() - t) / 1000)
        os.eventfd_read(fence_fd)
        t = clock()
        client.write32(PciRegion.BAR0, SCRATCH, 1)
        writes.append((clock() - t) / 1000)
    driver.wait_fence(driver.fence_value)  # acknowledges the interrupt as a driver does
    return fences, writes


def copy_samples(
    driver: MgpuDriver, size: int, rounds: int, upload: bool
) -> dict[str, list[float]]:
    """MB/s per round: numpy, engine copy and (optionally) upload."""
    src, dst = driver.create(size), driver.create(size)
    guest = driver.ram.alloc(size)
    driver.run(encode(Opcode.FILL, handle=src, offset=0, length=size, value=0xA5A5A5A5))
    a = np.full(size, 0xA5, dtype=np.uint8)
    b = np.empty(size, dtype=np.uint8)
    copy = encode(Opcode.COPY_RESOURCE, src_handle=src, dst_handle=dst, length=size)
    write = encode(Opcode.WRITE_RESOURCE, guest_addr=guest, handle=dst, length=size)
    np.copyto(b, a)  # warm up: first touches of fresh memory are page faults
    driver.run(copy, write)
    samples: dict[str, list[float]] = {"numpy": [], "copy": [], "upload": []}
    for _ in range(rounds):
        t = time.perf_counter()
        np.copyto(b, a)
        samples["numpy"].append(size / (time.perf_counter() - t) / 1e6)
        t = time.perf_counter()
        driver.run(copy)
        samples["copy"].append(size / (time.perf_counter() - t) / 1e6)
        if upload:
            t = time.perf_counter()
            driver.run(write)
            samples["upload"].append(size / (time.perf_counter() - t) / 1e6)
    driver.destroy(src)
    driver.destroy(dst)
    return samples


def create_destroy(driver: MgpuDriver, pairs: int) -> tuple[float, float]:
    """Microseconds per CREATE + DESTROY pair through the registers, and allocator alone."""
    t = time.perf_counter()
    for _ in range(pairs):
        driver.destroy(driver.create(4096))
    ours = (time.perf_counter() - t) / pairs * 1e6
    allocator = PageAllocator(0, 1 << 30)
    t = time.perf_counter()
    for _ in range(pairs):
        allocator.free(allocator.allocate(4096))
    return ours, (time.perf_counter() - t) / pairs * 1e6


def rows(quick: bool) -> list[Row]:
    size = 32 << 20  # the same in both runs: the reference compares the quick rows too
    os.sched_setaffinity(0, {0})
    try:
        with served_driver(size + (4 << 20), 0) as driver:
            fences, writes = fence_samples(driver, 1000 if quick else 3000)
            rates = copy_samples(driver, size, 15, upload=not quick)
            pairs = None if quick else create_destroy(driver, 2000)
    finally:
        os.sched_setaffinity(0, range(os.cpu_count() or 1))
    result = [
        row_from("engine.fence", "engine: doorbell to fence interrupt", "us", fences, writes,
                 baseline_label="1 trapped wr", target_value=30.0),
        row_from("engine.copy", f"engine: copy {size >> 20} MiB", "MB/s", rates["copy"],
                 rates["numpy"], baseline_label="numpy", target=0.8, higher_is_better=True),
    ]  # fmt: skip
    if not quick:
        result.append(
            row_from("engine.upload", f"engine: upload {size >> 20} MiB", "MB/s",
                     rates["upload"], rates["numpy"], baseline_label="numpy",
                     higher_is_better=True)
        )  # fmt: skip
    if pairs is not None:
        result.append(
            Row("engine.create_destroy", "engine: CREATE+DESTROY pair", "us", pairs[0],
                baseline_label="allocator", baseline=pairs[1])
        )  # fmt: skip
    return result


def main() -> int:
    from bench.__main__ import main as bench_main

    return bench_main(["--only", "engine", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
