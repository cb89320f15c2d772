"""Benchmark rows: one server with many instances and many clients.

- ``scale.startup``: ``python -m device serve`` with 32 instances, from exec to every
  socket listening, against the same server with one instance;
- ``scale.idle_memory``: resident memory per idle instance (32 instances against one,
  the difference over 31), in MiB;
- ``scale.clients8``: 8 client processes hammering register reads on 8 of the 32
  instances at once, per-client round trip, against one client alone on the same
  server in the same run (2 cores: the clients compete with the server for them);
- ``scale.aggregate``: the messages per second all 8 clients got through together,
  against one client alone;
- ``scale.server_cpu``: the server's CPU time per message with 8 clients, against one
  client alone (so client contention on a 2-core machine shows apart from server
  cost): from the kernel's scheduler statistics, all threads;
- ``scale.pool``: the pool's bookkeeping with 1 million pages (4 GiB) fragmented into
  32768 holes by 64 KiB resources: one allocate + free of a 64 KiB resource, against
  the same in a pool of 1024 pages fragmented alike.

    python -m bench.scale [--quick]
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import ROOT, Row, row_from
from bench.region_read import _start, _stop, cpu_ns
from device.gpu.memory.allocator import PageAllocator
from device.units import PAGE_SIZE

INSTANCES = 32
CLIENTS = 8
BURSTS = 3

CLIENT = r"""
import json, struct, sys, time
from device.vfio_user.client import VfioUserClient
path, count = sys.argv[1], int(sys.argv[2])
client = VfioUserClient.connect(path)
sock = client.connection.sock
sock.settimeout(None)
request = struct.pack("<HHIIIQII", 7, 9, 32, 0, 0, 0, 0, 4)
send, recv, clock = sock.send, sock.recv, time.perf_counter_ns
print("ready", flush=True)
sys.stdin.readline()
samples = []
for _ in range(count):
    t = clock()
    send(request)
    if len(recv(4096)) != 36:
        raise SystemExit("short reply")
    samples.append(clock() - t)
print(json.dumps(samples), flush=True)
client.close()
"""


def start_server(
    workdir: Path, instances: int
) -> tuple[subprocess.Popen[bytes], list[Path], float]:
    """A server with ``instances`` mgpu-64 instances; seconds until all listen."""
    sockets = [workdir / f"gpu{n}.sock" for n in range(instances)]
    argv = [sys.executable, "-m", "device", "serve", "--type", "mgpu-64", "--mapping", "static",
            "--log-level", "warning"]  # fmt: skip
    for path in sockets:
        argv += ["--socket", str(path)]
    t = time.perf_counter()
    proc = _start(argv, None)
    deadline = t + 60
    while not all(path.exists() for path in sockets):
        if proc.poll() is not None or time.perf_counter() > deadline:
            _stop(proc)
            raise RuntimeError(f"the server with {instances} instances did not start")
        time.sleep(0.005)
    return proc, sockets, time.perf_counter() - t


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def hammer(sockets: list[Path], count: int) -> tuple[list[list[float]], float]:
    """Client processes, one per socket, all released at once: their samples (us)
    and the wall time of the whole burst."""
    clients = [
        subprocess.Popen(
            [sys.executable, "-c", CLIENT, str(path), str(count)],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for path in sockets
    ]
    try:
        for client in clients:
            assert client.stdout is not None
            if client.stdout.readline().strip() != "ready":
                raise RuntimeError("a benchmark client did not start")
        t = time.perf_counter()
        for client in clients:
            assert client.stdin is not None
            client.stdin.write("go\n")
            client.stdin.flush()
        outputs = [client.communicate(timeout=120)[0] for client in clients]
        wall = time.perf_counter() - t
    finally:
        for client in clients:
            if client.poll() is None:
                client.kill()
                client.wait()
    return [[s / 1000 for s in json.loads(out)] for out in outputs], wall


def fragmented(pages: int) -> tuple[PageAllocator, int]:
    """A pool of ``pages`` pages full of 64 KiB allocations, every other one freed."""
    piece = 16 * PAGE_SIZE
    allocator = PageAllocator(0, pages * PAGE_SIZE)
    extents = [allocator.allocate(piece) for _ in range(pages // 16)]
    for extent in extents[::2]:
        allocator.free(extent)
    return allocator, piece


def pool_samples(pages: int, ops: int) -> list[float]:
    allocator, piece = fragmented(pages)
    clock = time.perf_counter_ns
    samples: list[float] = []
    for _ in range(ops):
        t = clock()
        for extent in allocator.allocate_pages(piece):  # as the pool allocates
            allocator.free(extent)
        samples.append((clock() - t) / 1000)
    return samples


def rows(quick: bool) -> list[Row]:
    count = 4000 if quick else 10000
    with tempfile.TemporaryDirectory(prefix="mgpu-bench-") as tmp:
        workdir = Path(tmp)
        one, _, one_startup = start_server(workdir, 1)
        one_rss = rss_mib(one.pid)
        _stop(one)
        for path in workdir.iterdir():
            path.unlink()
        server, sockets, startup = start_server(workdir, INSTANCES)
        try:
            time.sleep(0.2)  # let the threads settle before reading memory
            many_rss = rss_mib(server.pid)
            alone: list[float] = []
            together: list[float] = []
            walls: dict[str, list[float]] = {"alone": [], "together": []}
            cpu: dict[str, list[float]] = {"alone": [], "together": []}
            for _ in range(BURSTS):  # interleaved: one client, eight, one, eight...
                for kind, clients in (("alone", 1), ("together", CLIENTS)):
                    before = cpu_ns(server.pid)
                    samples, wall = hammer(sockets[:clients], count)
                    cpu[kind].append((cpu_ns(server.pid) - before) / (clients * count) / 1000)
                    walls[kind].append(clients * count / wall)
                    (alone if clients == 1 else together).extend(
                        s for client in samples for s in client
                    )
        finally:
            _stop(server)
    pool = pool_samples(1 << 20, 2000 if quick else 10000)
    small = pool_samples(1024, 2000 if quick else 10000)
    return [
        Row("scale.startup", f"scale: startup, {INSTANCES} instances", "ms", startup * 1000,
            baseline_label="1 instance", baseline=one_startup * 1000),
        Row("scale.idle_memory", "scale: memory per idle instance", "MiB",
            (many_rss - one_rss) / (INSTANCES - 1), note=f"RSS {one_rss:.0f} -> {many_rss:.0f}"),
        row_from("scale.clients8", f"scale: {CLIENTS} clients, per client", "us", together,
                 alone, baseline_label="1 client", target=3.0),
        Row("scale.aggregate", f"scale: {CLIENTS} clients, aggregate", "msg/s",
            statistics.median(walls["together"]), baseline_label="1 client",
            baseline=statistics.median(walls["alone"]), higher_is_better=True),
        Row("scale.server_cpu", f"scale: server CPU/msg, {CLIENTS} clients", "us",
            statistics.median(cpu["together"]), baseline_label="1 client",
            baseline=statistics.median(cpu["alone"])),
        row_from("scale.pool", "scale: pool alloc+free, 1M pages", "us", pool, small,
                 baseline_label="1K pages", target=2.0),
    ]  # fmt: skip


def main() -> int:
    from bench.__main__ import main as bench_main

    return bench_main(["--only", "scale", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
