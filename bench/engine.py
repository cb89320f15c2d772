"""Benchmark: the command engine's copy throughput against numpy, and the resource
create/destroy rate.

- ``copy``: COPY_RESOURCE of SIZE bytes between two resources, timed from submit to
  fence (driver.run: ring write, doorbell, engine, fence interrupt), against
  ``np.copyto`` of the same size between two arrays in this process.  Rounds
  interleave the two (A B A B) so machine noise hits both.  Target: >= 0.8x numpy.
- ``upload``: WRITE_RESOURCE from fd-backed guest RAM, against the same numpy copy.
- ``create/destroy``: resource CREATE + DESTROY pairs through the registers (8 trapped
  register accesses per pair), against the allocator alone in this process.

    python -m bench.engine [--size 32M] [--rounds 15] [--json PATH]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import percentile, publish
from device.control.cli import parse_size
from device.control.manager import GpuServer
from device.gpu.engine.commands import Opcode, encode
from device.gpu.memory.allocator import PageAllocator
from device.gpu.memory.physical import PhysicalGpu
from device.gpu.types import InstanceType
from device.harness.driver import GuestRam, MgpuDriver
from device.vfio_user.client import VfioUserClient

ROOT = Path(__file__).resolve().parent.parent


def rate_row(samples_s: list[float], size: int) -> dict[str, float]:
    rates = [size / s / 1e6 for s in samples_s]  # MB/s per sample
    return {
        "median_MBps": round(statistics.median(rates), 1),
        "p99_low_MBps": round(percentile(rates, 0.01), 1),
        "median_ms": round(statistics.median(samples_s) * 1e3, 3),
        "p99_ms": round(percentile(samples_s, 0.99) * 1e3, 3),
        "samples": len(samples_s),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=parse_size, default=32 << 20)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--pairs", type=int, default=2000)
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "engine.json")
    parser.add_argument(
        "--cpu", type=int, default=0, help="CPU to pin to: idle vCPUs here take 60-70 us to wake"
    )
    args = parser.parse_args()
    os.sched_setaffinity(0, {args.cpu})
    size = args.size
    quota = 1 << (3 * size).bit_length()
    itype = InstanceType("bench", quota, 1, "benchmark")
    workdir = Path(tempfile.mkdtemp(prefix="mgpu-bench-"))
    results: dict[str, Any] = {"benchmark": "engine", "size_bytes": size}
    with GpuServer(PhysicalGpu(quota, 1, (itype,))) as server:
        served = server.create_instance("bench", "bench", workdir / "gpu.sock")
        with VfioUserClient.connect(served.endpoint.path) as client:
            driver = MgpuDriver(client, GuestRam(client, size=size + (1 << 20)))
            src, dst = driver.create(size), driver.create(size)
            guest = driver.ram.alloc(size)
            driver.run(encode(Opcode.FILL, handle=src, offset=0, length=size, value=0xA5A5A5A5))
            a = np.full(size, 0xA5, dtype=np.uint8)
            b = np.empty(size, dtype=np.uint8)
            copy = encode(Opcode.COPY_RESOURCE, src_handle=src, dst_handle=dst, length=size)
            upload = encode(Opcode.WRITE_RESOURCE, guest_addr=guest, handle=dst, length=size)
            np.copyto(b, a)  # warm up: first touches of fresh memory are page faults
            driver.run(copy, upload)
            samples: dict[str, list[float]] = {"numpy": [], "copy": [], "upload": []}
            for _ in range(args.rounds):
                t = time.perf_counter()
                np.copyto(b, a)
                samples["numpy"].append(time.perf_counter() - t)
                t = time.perf_counter()
                driver.run(copy)
                samples["copy"].append(time.perf_counter() - t)
                t = time.perf_counter()
                driver.run(upload)
                samples["upload"].append(time.perf_counter() - t)
            for key, values in samples.items():
                results[key] = rate_row(values, size)

            t = time.perf_counter()
            for _ in range(args.pairs):
                driver.destroy(driver.create(4096))
            pair_s = (time.perf_counter() - t) / args.pairs
            allocator = PageAllocator(0, quota)
            t = time.perf_counter()
            for _ in range(args.pairs):
                allocator.free(allocator.allocate(4096))
            alloc_s = (time.perf_counter() - t) / args.pairs
            results["create_destroy"] = {
                "pairs_per_s": round(1 / pair_s),
                "us_per_pair": round(pair_s * 1e6, 1),
                "allocator_only_pairs_per_s": round(1 / alloc_s),
            }
            driver.close()
    workdir.rmdir()
    numpy_rate = results["numpy"]["median_MBps"]
    for key in ("copy", "upload"):
        results[f"ratio_{key}_to_numpy"] = round(results[key]["median_MBps"] / numpy_rate, 3)
    results["targets"] = {"ratio_copy_to_numpy_min": 0.8}
    print(f"{'path':<10}{'median MB/s':>14}{'p1 MB/s':>12}{'median ms':>12}{'p99 ms':>10}")
    for key in ("numpy", "copy", "upload"):
        row = results[key]
        print(
            f"{key:<10}{row['median_MBps']:>14.0f}{row['p99_low_MBps']:>12.0f}"
            f"{row['median_ms']:>12.2f}{row['p99_ms']:>10.2f}"
        )
    cd = results["create_destroy"]
    print(
        f"engine copy / numpy: {results['ratio_copy_to_numpy']:.2f}x (target >= 0.8x); "
        f"upload / numpy: {results['ratio_upload_to_numpy']:.2f}x"
    )
    print(
        f"create+destroy: {cd['pairs_per_s']} pairs/s ({cd['us_per_pair']} us; allocator "
        f"alone {cd['allocator_only_pairs_per_s']} pairs/s)"
    )
    publish(results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
