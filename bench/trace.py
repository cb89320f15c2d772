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

Full run only.

    python -m bench.trace [--quick]
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import types
from collections.abc import Callable
from pathlib import Path

from bench.common import Row, row_from
from device import trace
from device.control.manager import GpuServer
from device.gpu.instance.instance import GpuInstance
from device.gpu.memory.physical import PhysicalGpu
from device.gpu.regs import table as regs
from device.gpu.regs.file import DYNAMIC_OFFSETS
from device.vfio_user.client import VfioUserClient
from device.vfio_user.protocol.constants import PciRegion

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


def rows(quick: bool) -> list[Row]:
    rounds, batch = (5, 1000) if quick else (30, 2000)
    os.sched_setaffinity(0, {0})
    try:
        with (
            tempfile.TemporaryDirectory(prefix="mgpu-bench-") as workdir,
            GpuServer(PhysicalGpu(64 << 20)) as server,
        ):
            served = server.create_instance("bench", "mgpu-64", Path(workdir) / "gpu.sock")
            device = served.device
            with VfioUserClient.connect(served.endpoint.path) as client:
                round_trip = measure(
                    device, lambda: client.read32(PciRegion.BAR0, SCRATCH), rounds, batch
                )
                direct = measure(
                    device, lambda: device.region_read(PciRegion.BAR0, SCRATCH, 4), rounds,
                    batch * 50,
                )  # fmt: skip
            server.destroy_instance("bench")
    finally:
        os.sched_setaffinity(0, range(os.cpu_count() or 1))
    ns = [1e9]
    return [
        row_from("trace.off_round_trip", "trace off: register round trip", "ns",
                 _scaled(round_trip["off"], ns), _scaled(round_trip["stubbed"], ns),
                 baseline_label="no hooks", target=1.02),
        row_from("trace.on_round_trip", "trace on: register round trip", "ns",
                 _scaled(round_trip["on"], ns), _scaled(round_trip["stubbed"], ns),
                 baseline_label="no hooks"),
        row_from("trace.off_direct", "trace off: region_read in-process", "ns",
                 _scaled(direct["off"], ns), _scaled(direct["stubbed"], ns),
                 baseline_label="no hooks"),
    ]  # fmt: skip


def _scaled(samples: list[float], factor: list[float]) -> list[float]:
    return [s * factor[0] for s in samples]


def main() -> int:
    from bench.__main__ import main as bench_main

    return bench_main(["--only", "trace", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
