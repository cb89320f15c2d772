"""Benchmark: the costs of the GPU MMU and of eviction, each against a baseline measured
in the same run.

- ``evict``: evicting a resource of PAGES pages to host memory, per page, when the
  guest holds no copy (clean) and when it dirtied every page (dirty: the revocation
  writes them back first); baseline: a numpy copy of the same bytes.
- ``page_in``: paging it back in, per page; baseline: the same numpy copy.
- ``copy``: engine COPY_RESOURCE from a resource the guest has mapped and touched (its
  pages are fenced and revoked around the command) against one that is not mapped,
  interleaved A B A B.

    python -m bench.mmu [--pages 1024] [--rounds 9] [--json PATH]   (needs root: FUSE)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import percentile, publish
from bench.fault import PAGE, child, finish
from device.control.manager import GpuServer
from device.gpu.engine.commands import Opcode, encode
from device.gpu.memory.physical import PhysicalGpu
from device.gpu.memory.resources import Resource
from device.gpu.modes import MappingMode
from device.gpu.types import InstanceType
from device.harness.driver import MgpuDriver
from device.vfio_user.client import VfioUserClient
from device.vfio_user.protocol.constants import PciRegion

ROOT = Path(__file__).resolve().parent.parent


def row(samples: list[float]) -> dict[str, float]:
    return {
        "median": round(statistics.median(samples), 3),
        "p99": round(percentile(samples, 0.99), 3),
        "samples": len(samples),
    }


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "mmu.json")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench.mmu needs root (fault mode mounts FUSE)", file=sys.stderr)
        return 2
    size = args.pages * PAGE
    quota = 1 << (4 * size - 1).bit_length()
    itype = InstanceType("bench", quota, 1, "benchmark")
    workdir = Path(tempfile.mkdtemp(prefix="mgpu-bench-"))
    results: dict[str, object] = {"benchmark": "mmu", "pages": args.pages}
    per_page: dict[str, list[float]] = {"numpy": [], "evict_clean": [], "evict_dirty": [],
                                        "page_in": []}  # fmt: skip
    copy_us: dict[str, list[float]] = {"unmapped": [], "mapped": []}
    with GpuServer(PhysicalGpu(quota, 2, (itype,))) as server:
        served = server.create_instance("b", "bench", workdir / "b.sock", mapping=MappingMode.FAULT)
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
            for _ in range(args.rounds):
                measure_moves(physical, resource, fd, at + size, args.pages, per_page)
                measure_copies(driver, (plain, mapped), target, fd, at + size, copy_us)
            os.close(fd)
            driver.close()
    os.rmdir(workdir)
    baseline = statistics.median(per_page["numpy"])
    for kind, samples in per_page.items():
        results[f"{kind}_us_per_page"] = row(samples)
        results[f"ratio_{kind}_to_numpy"] = round(statistics.median(samples) / baseline, 2)
    for kind, samples in copy_us.items():
        results[f"copy_{kind}_us"] = row(samples)
    results["ratio_copy_mapped_to_unmapped"] = round(
        statistics.median(copy_us["mapped"]) / statistics.median(copy_us["unmapped"]), 2
    )
    print(f"{'path':<22}{'median':>12}{'p99':>12}{'ratio':>9}")
    for kind, samples in per_page.items():
        data = row(samples)
        print(f"{kind + ' us/page':<22}{data['median']:>12.3f}{data['p99']:>12.3f}"
              f"{results[f'ratio_{kind}_to_numpy']:>9}")  # fmt: skip
    for kind, samples in copy_us.items():
        data = row(samples)
        print(f"{'copy ' + kind + ' us':<22}{data['median']:>12.1f}{data['p99']:>12.1f}")
    print(f"copy of a mapped, guest-cached resource / unmapped: "
          f"{results['ratio_copy_mapped_to_unmapped']}x")  # fmt: skip
    publish(results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
