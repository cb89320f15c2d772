"""Benchmark: aperture pages on demand (fault mode) against plain memfd pages.

- first touch: per-page latency of the first read of each page of a FUSE-backed
  aperture (our fault callback serves it) against the first touch of a memfd mapping,
  both from a child process (as QEMU touches them; touching our own FUSE mapping from
  this process while holding the GIL would deadlock);
- bandwidth: reading the mapped pages once they are all present, against memfd;
- revoke: the cost per page of revoking clean pages and dirty pages (written back);
- server time: Python time to handle one READ request (parse, check, serve, encode).

    python -m bench.fault [--pages 2048] [--json PATH]      (needs root: FUSE mount)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from bench.common import publish
from device.control.manager import GpuServer
from device.fuse import protocol as fp
from device.gpu.abi import ResourceCommand
from device.gpu.memory.physical import PhysicalGpu
from device.gpu.modes import MappingMode
from device.gpu.types import InstanceType

ROOT = Path(__file__).resolve().parent.parent

PAGE = 4096

CHILD = r"""
import json, mmap, os, sys, time
fd, size, mode = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
m = mmap.mmap(fd, size, mmap.MAP_SHARED)
clock = time.perf_counter_ns
out = {}
if mode in ("touch", "dirty"):
    samples = []
    for offset in range(0, size, 4096):
        t = clock()
        if mode == "touch":
            m[offset]
        else:
            m[offset] = 1
        samples.append(clock() - t)
    out["samples"] = samples
    view = memoryview(m)
    rates = []
    for _ in range(5):
        t = clock()
        bytes(view)  # read every mapped byte
        rates.append(size / ((clock() - t) / 1e9) / 1e6)
    out["read_MBps"] = rates
    del view
print(json.dumps(out), flush=True)
sys.stdin.readline()  # keep the mapping until the parent has measured what it needs
"""


def child(fd: int, size: int, mode: str) -> tuple[subprocess.Popen[str], dict[str, list[float]]]:
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(fd), str(size), mode],
        pass_fds=(fd,),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    return proc, json.loads(proc.stdout.readline())


def finish(proc: subprocess.Popen[str]) -> None:
    assert proc.stdin is not None
    proc.stdin.write("\n")
    proc.stdin.flush()
    proc.wait(30)


def summary(samples_ns: Sequence[float]) -> dict[str, float]:
    ordered = sorted(samples_ns)
    return {
        "median_us": round(statistics.median(ordered) / 1000, 2),
        "p99_us": round(ordered[int(0.99 * (len(ordered) - 1))] / 1000, 2),
        "samples": len(ordered),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=2048)
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "fault.json")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench.fault needs root (fault mode mounts FUSE)", file=sys.stderr)
        return 2
    size = args.pages * PAGE
    quota = 1 << (size - 1).bit_length()
    itype = InstanceType("bench", quota, 1, "benchmark")
    workdir = Path(tempfile.mkdtemp(prefix="mgpu-bench-"))
    results: dict[str, object] = {"benchmark": "fault", "pages": args.pages}
    with GpuServer(PhysicalGpu(quota, 1, (itype,))) as server:
        device = server.create_instance(
            "bench", "bench", workdir / "gpu.sock", mapping=MappingMode.FAULT
        ).device
        window = device.window
        fuse = window.fuse
        assert fuse is not None
        # One resource covering the whole range, mapped at aperture offset 0.
        handle = device.resource_command(ResourceCommand.CREATE, RES_SIZE=size)
        device.resource_command(
            ResourceCommand.MAP, RES_HANDLE=handle, RES_APERTURE=0, RES_RANGE_OFFSET=0,
            RES_RANGE_LENGTH=size,
        )  # fmt: skip
        memfd = os.memfd_create("bench-baseline", os.MFD_CLOEXEC)
        os.ftruncate(memfd, size)

        # Interleave: baseline, ours, baseline, ours (fresh pages each time).
        touch: dict[str, list[float]] = {"memfd": [], "fault": []}
        bandwidth: dict[str, list[float]] = {"memfd": [], "fault": []}
        for _ in range(2):
            os.ftruncate(memfd, 0)
            os.ftruncate(memfd, size)
            proc, out = child(memfd, size, "touch")
            touch["memfd"] += out["samples"]
            bandwidth["memfd"] += out["read_MBps"]
            finish(proc)
            window.deny_all()  # drop everything: next touches fault again
            proc, out = child(window.file_fd, size, "touch")
            touch["fault"] += out["samples"]
            bandwidth["fault"] += out["read_MBps"]
            finish(proc)
        results["first_touch_memfd"] = summary(touch["memfd"])
        results["first_touch_fault"] = summary(touch["fault"])
        results["read_bandwidth_MBps"] = {
            k: round(statistics.median(v)) for k, v in bandwidth.items()
        }

        # Revoke cost: clean pages (touched by reads) and dirty pages (written).
        revoke: dict[str, float] = {}
        for mode in ("touch", "dirty"):
            window.deny_all()
            proc, _ = child(window.file_fd, size, mode)
            t = time.perf_counter_ns()
            fuse.invalidate(0, size)
            revoke["clean" if mode == "touch" else "dirty"] = round(
                (time.perf_counter_ns() - t) / args.pages / 1000, 3
            )
            finish(proc)
        results["revoke_us_per_page"] = revoke

        # Server-side Python time per fault: one READ request through the handler.
        request = bytearray(
            fp.IN_HEADER.pack(80, fp.Opcode.READ, 7, 2, 0, 0, 0, 0, 0)
            + fp.READ_IN.pack(0, 0, PAGE, 0, 0, 0, 0)
        )
        view = memoryview(request)
        handle_ns = []
        for i in range(5000):
            fp.READ_IN.pack_into(
                request, fp.IN_HEADER.size, 0, (i % args.pages) * PAGE, PAGE, 0, 0, 0, 0
            )
            t = time.perf_counter_ns()
            fuse._handle(view)
            handle_ns.append(time.perf_counter_ns() - t)
        results["server_time_per_fault"] = summary(handle_ns)
        os.close(memfd)
        window.log.clear()
    workdir.rmdir()

    ours, base = results["first_touch_fault"], results["first_touch_memfd"]
    bw = results["read_bandwidth_MBps"]
    results["ratio_first_touch_to_memfd"] = round(ours["median_us"] / base["median_us"], 2)  # type: ignore[index]
    results["ratio_bandwidth_to_memfd"] = round(bw["fault"] / bw["memfd"], 3)  # type: ignore[index]
    results["targets"] = {
        "ratio_bandwidth_to_memfd_min": 0.9,
        "server_time_per_fault_median_us_max": 5.0,
    }
    print(f"{'first touch':<26}{'median us':>10}{'p99 us':>10}")
    for key in ("first_touch_memfd", "first_touch_fault", "server_time_per_fault"):
        row = results[key]
        print(f"{key:<26}{row['median_us']:>10.2f}{row['p99_us']:>10.2f}")  # type: ignore[index]
    print(
        f"first touch / memfd: {results['ratio_first_touch_to_memfd']}x; read bandwidth "
        f"{bw['fault']} vs {bw['memfd']} MB/s = {results['ratio_bandwidth_to_memfd']}x "  # type: ignore[index]
        f"(target >= 0.9x); revoke per page: clean {revoke['clean']} us, dirty "
        f"{revoke['dirty']} us"
    )
    publish(results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
