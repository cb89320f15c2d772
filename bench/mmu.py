"""Benchmark: the costs of the GPU MMU and of eviction, each against a baseline measured
in the same run.

- ``evict``: evicting a resource of PAGES pages to host memory, per page, when the
  guest holds no copy (clean) and when it dirtied every page (dirty: the revocation
  writes them back first); baseline: a numpy copy of the same bytes.
- ``page_in``: paging it back in, per page; baseline: the same numpy copy.
- ``copy``: engine COPY_RESOURCE from a resource the guest has mapped and touched (its
  pages are fenced and revoked around the command) against one that is not mapped,
  interleaved A B A B.

Full run only.

    python -m bench.mmu [--quick]   (needs root: FUSE)
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import Row, row_from
from device.control.manager import GpuServer
from device.gpu.engine.commands import Opcode, encode
from device.gpu.memory.physical import PhysicalGpu
from device.gpu.memory.resources import Resource
from device.gpu.modes import MappingMode
from device.gpu.types import InstanceType
from device.harness.driver import MgpuDriver
from device.vfio_user.client import VfioUserClient
from device.vfio_user.protocol.constants import PciRegion

PAGE = 4096

HOLDER = r"""
import mmap, sys
fd, size, mode = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
m = mmap.mmap(fd, size, mmap.MAP_SHARED)
for offset in range(0, size, 4096):
    if mode == "touch":
        m[offset]
    else:
        m[offset] = 1
print("held", flush=True)
sys.stdin.readline()  # keep the mapping until the parent has measured
"""


def child(fd: int, size: int, mode: str) -> tuple[subprocess.Popen[str], None]:
    """A process that maps the aperture, touches (or dirties) every page and holds it."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(fd), str(size), mode],
        pass_fds=(fd,), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "held":
        raise RuntimeError("the page-holding child failed")
    return proc, None


def finish(proc: subprocess.Popen[str]) -> None:
    assert proc.stdin is not None
    proc.stdin.write("\n")
    proc.stdin.flush()
    proc.wait(30)


def measure_moves(
    physical: PhysicalGpu, resource: Resource, fd: int, span: int, pages: int,
    per_page: dict[str, list[float]],
) -> None:  # fmt: skip
    """One round: the numpy baseline, eviction clean and dirty, and page-ins."""
    size = pages * PAGE
    source = np.ones(size, dtype=np.uint8)
    t = time.perf_counter_ns()
    np.copy(source)
    per_page["numpy"].append((time.perf_counter_ns() - t) / pages / 1000)
    for kind in ("evict_clean", "evict_dirty"):
        proc = child(fd, span, "dirty")[0] if kind == "evict_dirty" else None
        t = time.perf_counter_ns()
        assert physical.evict(resource)
        per_page[kind].append((time.perf_counter_ns() - t) / pages / 1000)
        t = time.perf_counter_ns()
        physical.page_in(resource)
        per_page["page_in"].append((time.perf_counter_ns() - t) / pages / 1000)
        if proc is not None:
            finish(proc)


def measure_copies(
    driver: MgpuDriver, sources: tuple[int, int], target: int, fd: int, span: int,
    copy_us: dict[str, list[float]],
) -> None:  # fmt: skip
    """One round: COPY from the unmapped, then from the mapped and guest-cached source."""
    size = span  # the mapped resource starts at aperture offset 0: span is its size
    for kind, handle in zip(("unmapped", "mapped"), sources, strict=True):
        proc = child(fd, span, "touch")[0] if kind == "mapped" else None
        t = time.perf_counter_ns()
        driver.run(encode(Opcode.COPY_RESOURCE, src_handle=handle, dst_handle=target,
                          length=size))  # fmt: skip
        copy_us[kind].append((time.perf_counter_ns() - t) / 1000)
        if proc is not None:
            finish(proc)


def rows(quick: bool) -> list[Row]:
    if os.geteuid() != 0:
        raise RuntimeError("the mmu rows need root (fault mode mounts FUSE)")
    pages, rounds = (256, 3) if quick else (1024, 9)
    size = pages * PAGE
    quota = 1 << (4 * size - 1).bit_length()
    itype = InstanceType("bench", quota, 1, "benchmark")
    per_page: dict[str, list[float]] = {"numpy": [], "evict_clean": [], "evict_dirty": [],
                                        "page_in": []}  # fmt: skip
    copy_us: dict[str, list[float]] = {"unmapped": [], "mapped": []}
    with (
        tempfile.TemporaryDirectory(prefix="mgpu-bench-") as workdir,
        GpuServer(PhysicalGpu(quota, 2, (itype,))) as server,
    ):
        served = server.create_instance(
            "b", "bench", Path(workdir) / "b.sock", mapping=MappingMode.FAULT
        )
        device, physical = served.device, server.physical
        with VfioUserClient.connect(served.endpoint.path) as client:
            driver = MgpuDriver(client)
            _, fd = client.region_info(PciRegion.BAR2)
            assert fd is not None
            mapped, plain, target = (driver.create(size) for _ in range(3))
            for handle in (mapped, plain):
                driver.run(encode(Opcode.FILL, handle=handle, length=size, value=0x01020304))
            at = driver.place(mapped)
            resource = device.resources.get(mapped)
            for _ in range(rounds):
                measure_moves(physical, resource, fd, at + size, pages, per_page)
                measure_copies(driver, (plain, mapped), target, fd, at + size, copy_us)
            os.close(fd)
            driver.close()
    numpy = per_page["numpy"]
    return [
        row_from("mmu.evict_clean", "mmu: evict, clean", "us/page", per_page["evict_clean"],
                 numpy, baseline_label="numpy copy"),
        row_from("mmu.evict_dirty", "mmu: evict, guest dirtied", "us/page",
                 per_page["evict_dirty"], numpy, baseline_label="numpy copy"),
        row_from("mmu.page_in", "mmu: page in", "us/page", per_page["page_in"], numpy,
                 baseline_label="numpy copy"),
        row_from("mmu.copy_mapped", "mmu: engine copy of a mapped res", "us",
                 copy_us["mapped"], copy_us["unmapped"], baseline_label="unmapped"),
    ]  # fmt: skip


def main() -> int:
    from bench.__main__ import main as bench_main

    return bench_main(["--only", "mmu", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
