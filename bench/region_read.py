"""Benchmark: 4-byte REGION_READ round trip against a raw Python socket ping-pong.

Three figures, measured in one run:

- ``handle``: the server's own time per REGION_READ (decode, dispatch, register read,
  encode), calling ``Session.handle`` directly with no I/O;
- ``vfio-user``: the round trip seen by ``device.client.VfioUserClient`` against a
  ``python -m device serve`` process;
- ``floor``: the same message sizes (32 bytes out, 36 back) between a raw Python echo
  peer and a raw client: the cheapest Python can do over a unix socket.

Client and peers are pinned to one CPU (idle vCPUs on these VMs take 60-70 us to wake,
which would swamp what we measure), and the two round trips are interleaved in rounds
(A B A B) so machine noise hits both alike.  Prints a table and writes JSON.

    python -m bench.region_read [--rounds 20] [--per-round 2000] [--json PATH]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench.common import percentile, publish
from device.gpu.instance.instance import GpuInstance
from device.vfio_user.client import VfioUserClient
from device.vfio_user.protocol import messages as m
from device.vfio_user.protocol.codec import Frame
from device.vfio_user.protocol.constants import Command
from device.vfio_user.session import Session

ROOT = Path(__file__).resolve().parent.parent

REQUEST_SIZE = 32  # header + {u64 offset, u32 region, u32 count}
REPLY_SIZE = 36  # the same + 4 data bytes

ECHO_PEER = f"""
import socket, sys
listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
listener.bind(sys.argv[1]); listener.listen(1)
print("ready", flush=True)
conn, _ = listener.accept()
reply = bytes({REPLY_SIZE})
while True:
    data = conn.recv(65536)
    if not data:
        break
    conn.send(reply)
"""


def summarize(samples_ns: list[int]) -> dict[str, float]:
    us = [s / 1000 for s in samples_ns]
    median = statistics.median(us)
    return {
        "median_us": round(median, 3),
        "p99_us": round(percentile(us, 0.99), 3),
        "msgs_per_s": round(1e6 / median) if median else 0.0,
        "samples": len(us),
    }


def pin(cpu: int) -> list[str]:
    return ["taskset", "-c", str(cpu)]


def start(argv: list[str], ready_word: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if ready_word not in line:
        proc.kill()
        raise RuntimeError(f"{argv[0]} did not start: {line!r}")
    return proc


def measure_handle(iterations: int) -> list[int]:
    device = GpuInstance("bench", aperture_size=1 << 20)
    session = Session(device)
    session.negotiated = True
    payload = m.RegionAccess(0, 0, 4).pack()
    header = m.Header(1, Command.REGION_READ, 16 + len(payload))
    frame = Frame(header, payload)
    samples = []
    clock = time.perf_counter_ns
    for _ in range(iterations):
        t0 = clock()
        session.handle(frame)
        samples.append(clock() - t0)
    session.close()
    device.close()
    return samples


def round_trips(call: Callable[[], object], count: int) -> list[int]:
    clock = time.perf_counter_ns
    samples = []
    for _ in range(count):
        t0 = clock()
        call()
        samples.append(clock() - t0)
    return samples


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--per-round", type=int, default=2000)
    parser.add_argument("--cpu", type=int, default=0, help="CPU to pin everything to")
    parser.add_argument(
        "--json", type=Path, default=ROOT / "bench" / "results" / "region_read.json"
    )
    args = parser.parse_args()

    os.sched_setaffinity(0, {args.cpu})
    workdir = Path(tempfile.mkdtemp(prefix="mgpu-bench-"))
    server_sock, echo_sock = workdir / "gpu.sock", workdir / "echo.sock"
    python = sys.executable
    server = start(
        [
            *pin(args.cpu),
            python,
            "-m",
            "device",
            "serve",
            "--socket",
            str(server_sock),
            "--log-level",
            "warning",
        ],
        "ready",
    )
    echo = start([*pin(args.cpu), python, "-c", ECHO_PEER, str(echo_sock)], "ready")
    try:
        client = VfioUserClient.connect(server_sock, timeout=None)
        raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        raw.connect(str(echo_sock))
        request = bytes(REQUEST_SIZE)

        def raw_round_trip() -> None:
            raw.send(request)
            got = raw.recv(65536)
            assert len(got) == REPLY_SIZE

        def vfio_round_trip() -> None:
            client.region_read(0, 0, 4)

        for warm in (raw_round_trip, vfio_round_trip):
            round_trips(warm, 500)
        floor: list[int] = []
        vfio: list[int] = []
        for _ in range(args.rounds):
            floor += round_trips(raw_round_trip, args.per_round)
            vfio += round_trips(vfio_round_trip, args.per_round)
        handle = measure_handle(args.rounds * args.per_round)
        client.close()
        raw.close()
    finally:
        for proc in (server, echo):
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for path in (server_sock, echo_sock):
            path.unlink(missing_ok=True)
        workdir.rmdir()

    results = {
        "benchmark": "region_read_4_bytes",
        "pinned_cpu": args.cpu,
        "floor_python_echo": summarize(floor),
        "vfio_user_round_trip": summarize(vfio),
        "server_handle": summarize(handle),
    }
    floor_median = results["floor_python_echo"]["median_us"]
    vfio_median = results["vfio_user_round_trip"]["median_us"]
    results["ratio_round_trip_to_floor"] = round(vfio_median / floor_median, 3)
    results["targets"] = {"server_handle_median_us_max": 5.0, "ratio_round_trip_to_floor_max": 1.5}

    print(f"{'path':<28}{'median us':>12}{'p99 us':>12}{'msgs/s':>12}")
    for key in ("floor_python_echo", "vfio_user_round_trip", "server_handle"):
        row = results[key]
        print(f"{key:<28}{row['median_us']:>12.2f}{row['p99_us']:>12.2f}{row['msgs_per_s']:>12.0f}")
    print(
        f"round trip / floor: {results['ratio_round_trip_to_floor']:.2f}x (target <= 1.5x); "
        f"server handle median {results['server_handle']['median_us']:.2f} us (target <= 5 us)"
    )
    publish(results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
