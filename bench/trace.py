"""Benchmark: what tracing costs when it is off (and when it is on).

Three builds of the BAR0 register read path, in one process, pinned to one CPU, in
interleaved rounds (stubbed, off, on, stubbed, off, on, ...) so machine noise hits
all of them:

- ``stubbed``: ``GpuInstance.region_read`` as it was before the hooks (no tracing
  check, no surprise-removal check), patched onto the instance;
- ``off``: the shipped code with tracing off (the default);
- ``on``: tracing every kind into the in-memory buffer.

Two paths: ``round_trip``, a REGION_READ of a register through the real socket with
our vfio-user client (what a guest's MMIO read costs the server), and ``direct``, the
model's ``region_read`` called in-process (the hook's cost with nothing around it).
Each sample is the mean of a batch; the table shows the median and p99 of the samples
and the ratio of each build to ``stubbed`` (target for ``off``: within 2 %, i.e.
negligible against run-to-run noise).

    python -m bench.trace [--rounds 30] [--batch 2000] [--json PATH]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import percentile, publish
from device import trace
from device.control.manager import GpuServer
from device.gpu.instance.instance import GpuInstance
from device.gpu.memory.physical import PhysicalGpu
from device.gpu.regs import table as regs
from device.gpu.regs.file import DYNAMIC_OFFSETS
from device.vfio_user.client import VfioUserClient
from device.vfio_user.protocol.constants import PciRegion

ROOT = Path(__file__).resolve().parent.parent
SCRATCH = regs.BY_NAME["SCRATCH"].offset


def stubbed_region_read(self: GpuInstance, index: int, offset: int, count: int) -> bytes:
    """``region_read`` without the hooks: the code before tracing existed."""
    self._check_access(index, offset, count)
    if index == PciRegion.BAR0:
        if count == 4 and not offset & 3 and offset not in DYNAMIC_OFFSETS:
            return self.registers.values.get(offset, 0).to_bytes(4, "little")
        with self._locked():
            return self.registers.read(offset, count)
    return self._region_read(index, offset, count)


def build(device: GpuInstance, variant: str) -> None:
    """Switch the instance to one build."""
    if variant == "stubbed":
        device.region_read = types.MethodType(stubbed_region_read, device)  # type: ignore[method-assign]
    else:
        device.__dict__.pop("region_read", None)
    if variant == "on":
        trace.start()
    else:
        trace.stop()
        trace.clear()


def row(samples_s: list[float], baseline: list[float]) -> dict[str, float]:
    median = statistics.median(samples_s)
    return {
        "median_ns": round(median * 1e9, 1),
        "p99_ns": round(percentile(samples_s, 0.99) * 1e9, 1),
        "ratio_to_stubbed": round(median / statistics.median(baseline), 4),
        "samples": len(samples_s),
    }


def measure(
    device: GpuInstance, op: Callable[[], object], rounds: int, batch: int
) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {"stubbed": [], "off": [], "on": []}
    for _ in range(rounds):
        for variant, values in samples.items():
            build(device, variant)
            for _ in range(batch // 10):  # warm the build's path
                op()
            t = time.perf_counter()
            for _ in range(batch):
                op()
            values.append((time.perf_counter() - t) / batch)
    build(device, "off")
    return samples


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--batch", type=int, default=2000)
    parser.add_argument("--cpu", type=int, default=0)
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "trace.json")
    args = parser.parse_args()
    os.sched_setaffinity(0, {args.cpu})
    workdir = Path(tempfile.mkdtemp(prefix="mgpu-bench-"))
    results: dict[str, Any] = {"benchmark": "trace", "cpu": args.cpu, "batch": args.batch}
    with GpuServer(PhysicalGpu(64 << 20)) as server:
        served = server.create_instance("bench", "mgpu-64", workdir / "gpu.sock")
        device = served.device
        with VfioUserClient.connect(served.endpoint.path) as client:
            paths: dict[str, Callable[[], object]] = {
                "round_trip": lambda: client.read32(PciRegion.BAR0, SCRATCH),
                "direct": lambda: device.region_read(PciRegion.BAR0, SCRATCH, 4),
            }
            for name, op in paths.items():
                batch = args.batch if name == "round_trip" else args.batch * 50
                samples = measure(device, op, args.rounds, batch)
                results[name] = {v: row(s, samples["stubbed"]) for v, s in samples.items()}
        server.destroy_instance("bench")
    workdir.rmdir()
    print(f"{'path':<12}{'build':<9}{'median ns':>11}{'p99 ns':>10}{'x stubbed':>11}")
    for name in ("round_trip", "direct"):
        for variant, r in results[name].items():
            print(
                f"{name:<12}{variant:<9}{r['median_ns']:>11.1f}{r['p99_ns']:>10.1f}"
                f"{r['ratio_to_stubbed']:>11.3f}"
            )
    off = results["round_trip"]["off"]["ratio_to_stubbed"]
    print(f"tracing off costs {100 * (off - 1):+.1f} % on a register round trip (target <= 2 %)")
    results["targets"] = {"round_trip_off_ratio_max": 1.02}
    publish(results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
