"""Benchmark rows: aperture pages on demand (fault mode) against plain memfd pages.

Each touch comes from a child process (as QEMU touches the aperture; touching our own
FUSE mapping from this process while it holds the GIL would deadlock), and each
figure has a memfd baseline touched the same way in the same run:

- ``fault.sequential``: sequential first touch of a freshly mapped resource, the
  aperture mapped with MADV_HUGEPAGE as QEMU maps it (1 MiB READs served whole);
- ``fault.lived_in``: the same after the guest had mapped the window sparsely (a
  64 KiB piece per 2 MiB window, touched: the refused readahead leaves pages behind)
  and UNMAPped it again: the state a real guest reaches;
- ``fault.every_other``: every other 2 MiB window unmapped (denied policy dummy), the
  mapped windows touched;
- ``fault.random``: first touch of one page at a time in random order, no hugepage
  advice: one 4 KiB READ per touch (the per-fault latency);
- ``fault.server``: the server's Python time per 4 KiB READ (parse, check, serve,
  encode), against the least a Python handler can do (parse the header, copy a page).

Sequential rows are per page (the whole touch divided by its pages; p99 is the worst
round); random rows per touch.  Needs root (a FUSE mount).

    python -m bench.fault [--quick]
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.common import Row, row_from
from device.control.manager import GpuServer
from device.fuse import protocol as fp
from device.gpu.abi import ResourceCommand
from device.gpu.instance.instance import GpuInstance
from device.gpu.memory.physical import PhysicalGpu
from device.gpu.modes import DeniedPolicy, MappingMode
from device.gpu.types import InstanceType
from device.units import PAGE_SIZE

WINDOW = 2 << 20  # the hugepage window MADV_HUGEPAGE reads around a touch
PIECE = 64 << 10  # what the lived-in guest maps of each window

CHILD = r"""
import json, mmap, os, sys, time
fd, size, plan = int(sys.argv[1]), int(sys.argv[2]), json.loads(sys.stdin.read())
m = mmap.mmap(fd, size, mmap.MAP_SHARED)
if plan["huge"]:
    m.madvise(mmap.MADV_HUGEPAGE)
clock = time.perf_counter_ns
samples = []
start = clock()
if plan["each"]:
    for offset in plan["offsets"]:
        t = clock()
        m[offset]
        samples.append(clock() - t)
else:
    for offset in plan["offsets"]:
        m[offset]
total = clock() - start
print(json.dumps({"total_ns": total, "samples": samples}), flush=True)
m.close()
"""


def touch(fd: int, size: int, offsets: list[int], *, huge: bool, each: bool) -> dict[str, object]:
    """Touch ``offsets`` of the file from a child process; its timings."""
    plan = json.dumps({"huge": huge, "each": each, "offsets": offsets})
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(fd), str(size)],
        input=plan,
        pass_fds=(fd,),
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    result: dict[str, object] = json.loads(out)
    return result


def pages_of(ranges: list[tuple[int, int]]) -> list[int]:
    return [
        offset for start, length in ranges for offset in range(start, start + length, PAGE_SIZE)
    ]


class Bench:
    """One fault-mode instance with one resource covering the measured range."""

    def __init__(self, device: GpuInstance, size: int) -> None:
        self.device = device
        self.size = size
        self.window = device.window
        self.handle = device.resource_command(ResourceCommand.CREATE, RES_SIZE=size)
        self.memfd = os.memfd_create("bench-baseline", os.MFD_CLOEXEC)

    def fresh_memfd(self) -> int:
        os.ftruncate(self.memfd, 0)
        os.ftruncate(self.memfd, self.size)
        return self.memfd

    def map(self, at: int, length: int) -> None:
        self.device.resource_command(
            ResourceCommand.MAP, RES_HANDLE=self.handle, RES_APERTURE=at, RES_RANGE_OFFSET=at,
            RES_RANGE_LENGTH=length,
        )  # fmt: skip

    def unmap_all(self) -> None:
        self.device.resource_command(
            ResourceCommand.UNMAP, RES_APERTURE=0, RES_RANGE_LENGTH=self.size
        )

    def per_page(self, fd: int, ranges: list[tuple[int, int]]) -> float:
        """Microseconds per page of a sequential touch of ``ranges``, hugepage advised."""
        offsets = pages_of(ranges)
        result = touch(fd, self.size, offsets, huge=True, each=False)
        total = result["total_ns"]
        assert isinstance(total, int)
        return total / len(offsets) / 1000

    def live_in(self) -> None:
        """Map a piece of each window, touch it, unmap: what a real guest leaves."""
        self.unmap_all()
        self.window.deny_all()
        pieces = [(at, PIECE) for at in range(0, self.size, WINDOW)]
        for at, length in pieces:
            self.map(at, length)
        touch(self.window.file_fd, self.size, [at for at, _ in pieces], huge=True, each=False)
        self.unmap_all()

    def sequential(self, rounds: int) -> tuple[list[float], list[float], list[float]]:
        memfd: list[float] = []
        fresh: list[float] = []
        lived: list[float] = []
        whole = [(0, self.size)]
        for _ in range(rounds):
            memfd.append(self.per_page(self.fresh_memfd(), whole))
            self.unmap_all()
            self.window.deny_all()
            self.map(0, self.size)
            fresh.append(self.per_page(self.window.file_fd, whole))
            self.live_in()
            self.map(0, self.size)
            lived.append(self.per_page(self.window.file_fd, whole))
        return memfd, fresh, lived

    def every_other(self, rounds: int) -> tuple[list[float], list[float]]:
        mapped = [(at, WINDOW) for at in range(0, self.size, 2 * WINDOW)]
        memfd: list[float] = []
        ours: list[float] = []
        for _ in range(rounds):
            memfd.append(self.per_page(self.fresh_memfd(), mapped))
            self.unmap_all()
            self.window.deny_all()
            for at, length in mapped:
                self.map(at, length)
            ours.append(self.per_page(self.window.file_fd, mapped))
        return memfd, ours

    def random_touch(self, pages: int) -> tuple[list[float], list[float]]:
        offsets = random.Random(19).sample(range(0, self.size, PAGE_SIZE), pages)
        base = touch(self.fresh_memfd(), self.size, offsets, huge=False, each=True)
        self.unmap_all()
        self.window.deny_all()
        self.map(0, self.size)
        ours = touch(self.window.file_fd, self.size, offsets, huge=False, each=True)
        return _us(base["samples"]), _us(ours["samples"])

    def server_time(self, requests: int) -> tuple[list[float], list[float]]:
        """Python time per READ of one page through the handler, and the floor."""
        fuse = self.window.fuse
        assert fuse is not None
        self.unmap_all()
        self.map(0, self.size)
        request = bytearray(
            fp.IN_HEADER.pack(80, fp.Opcode.READ, 7, 2, 0, 0, 0, 0, 0)
            + fp.READ_IN.pack(0, 0, PAGE_SIZE, 0, 0, 0, 0)
        )
        view = memoryview(request)
        page = bytes(PAGE_SIZE)
        pages = self.size // PAGE_SIZE
        clock = time.perf_counter_ns
        ours: list[float] = []
        floor: list[float] = []
        for i in range(requests):
            fp.READ_IN.pack_into(
                request, fp.IN_HEADER.size, 0, (i % pages) * PAGE_SIZE, PAGE_SIZE, 0, 0, 0, 0
            )
            t = clock()
            fuse._handle(view)
            ours.append((clock() - t) / 1000)
            t = clock()
            fp.IN_HEADER.unpack_from(view)
            fp.READ_IN.unpack_from(view, fp.IN_HEADER.size)
            fp.OUT_HEADER.pack(16 + PAGE_SIZE, 0, 80) + page
            floor.append((clock() - t) / 1000)
        self.window.log.clear()
        return ours, floor

    def close(self) -> None:
        os.close(self.memfd)


def _us(samples: object) -> list[float]:
    assert isinstance(samples, list)
    return [s / 1000 for s in samples]


@contextmanager
def fault_instance(size: int) -> Iterator[Bench]:
    quota = 1 << (2 * size - 1).bit_length()
    itype = InstanceType("bench", quota, 1, "benchmark")
    with tempfile.TemporaryDirectory(prefix="mgpu-bench-") as workdir:
        with GpuServer(PhysicalGpu(quota, 1, (itype,))) as server:
            device = server.create_instance(
                "bench", "bench", Path(workdir) / "gpu.sock", mapping=MappingMode.FAULT,
                denied=DeniedPolicy.DUMMY,
            ).device  # fmt: skip
            bench = Bench(device, size)
            try:
                yield bench
            finally:
                bench.close()


def rows(quick: bool) -> list[Row]:
    if os.geteuid() != 0:
        raise RuntimeError("the fault rows need root (fault mode mounts FUSE)")
    size = 64 << 20
    rounds = 5 if quick else 9
    with fault_instance(size) as bench:
        memfd, fresh, lived = bench.sequential(rounds)
        memfd_half, every_other = bench.every_other(rounds)
        random_memfd, random_ours = bench.random_touch(2000 if quick else 4000)
        server, floor = bench.server_time(3000 if quick else 20000)
    page = "us/page"
    return [
        row_from("fault.sequential", "fault: sequential first touch", page, fresh, memfd,
                 baseline_label="memfd", target=1.3),
        row_from("fault.lived_in", "fault: the same after UNMAP", page, lived, memfd,
                 baseline_label="memfd", target=1.3),
        row_from("fault.every_other", "fault: every other 2M unmapped", page, every_other,
                 memfd_half, baseline_label="memfd", target=1.5),
        row_from("fault.random", "fault: random first touch", "us", random_ours, random_memfd,
                 baseline_label="memfd", target=5.0),
        row_from("fault.server", "fault: server Python per READ", "us", server, floor,
                 baseline_label="py floor", target_value=3.0),
    ]  # fmt: skip


def main() -> int:
    from bench.__main__ import main as bench_main

    return bench_main(["--only", "fault", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
