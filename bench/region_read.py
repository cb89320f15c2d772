"""Benchmark rows: the trapped path, a 4-byte REGION_READ round trip.

A raw client (prebuilt request bytes, one ``send`` and one ``recv``: no client-side
Python worth speaking of) times round trips against three servers in one run, each in
its own process, interleaved in rounds (A B C A B C ...) so machine noise hits all:

- ours: ``python -m device serve`` (an mgpu instance, a BAR0 register);
- the C reference: libvfio-user's gpio sample server (its BAR2), when its path is
  given (``--c-server`` or ``MGPU_BENCH_C_SERVER``); build it outside this repository;
- a raw Python echo peer answering 36 bytes to each 32: the cheapest Python server.

Everything is pinned to one CPU (idle vCPUs on these VMs take 60-70 us to wake, which
would swamp what is measured); the full run adds a row with client and server on
different CPUs.  The server CPU time per message comes from the kernel's scheduler
statistics of the server process (all threads), which move less with load than wall
clock does.

    python -m bench.region_read [--quick] [--c-server PATH]
"""

from __future__ import annotations

import functools
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from bench.common import ROOT, Row, row_from
from device.vfio_user.client import VfioUserClient

C_SERVER_ENV = "MGPU_BENCH_C_SERVER"
T = TypeVar("T")
REPLY_SIZE = 36
_REQUEST = struct.Struct("<HHIIIQII")  # header, then offset, region, count

ECHO_PEER = f"""
import socket, sys
listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
listener.bind(sys.argv[1]); listener.listen(1)
conn, _ = listener.accept()
reply = bytes({REPLY_SIZE})
while True:
    data = conn.recv(65536)
    if not data:
        break
    conn.send(reply)
"""


def cpu_ns(pid: int) -> int:
    """CPU time of every thread of a process so far, from the scheduler's statistics."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


def wait_for_socket(path: Path, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode} before listening")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{proc.args!r} did not create {path} in {timeout} s")
        time.sleep(0.01)


def _retry(connect: Callable[[], T], timeout: float = 10.0) -> T:
    """Connect once the peer listens (its socket file appears at bind, before listen)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return connect()
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


@dataclass
class Peer:
    """One server process and a raw connection to it."""

    name: str
    proc: subprocess.Popen[bytes]
    sock: socket.socket
    request: bytes
    samples: list[float] = field(default_factory=list)
    cpu_ns: int = 0
    messages: int = 0

    def run(self, count: int) -> None:
        send, recv, clock, request = (
            self.sock.send,
            self.sock.recv,
            time.perf_counter_ns,
            self.request,
        )
        out = self.samples
        cpu = cpu_ns(self.proc.pid)
        for _ in range(count):
            t = clock()
            send(request)
            if len(recv(4096)) != REPLY_SIZE:
                raise RuntimeError(f"{self.name}: short reply")
            out.append((clock() - t) / 1000)
        self.cpu_ns += cpu_ns(self.proc.pid) - cpu
        self.messages += count


def _start(argv: list[str], cpu: int | None) -> subprocess.Popen[bytes]:
    pin = ["taskset", "-c", str(cpu)] if cpu is not None else []
    return subprocess.Popen(
        [*pin, *argv], cwd=ROOT, stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL
    )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextmanager
def peers(c_server: str | None, cpu: int | None, *, echo: bool = True) -> Iterator[list[Peer]]:
    """Our server, the C sample (if given) and the echo peer, connected and negotiated."""
    with tempfile.TemporaryDirectory(prefix="mgpu-bench-") as workdir, ExitStack() as stack:
        specs: list[tuple[str, list[str], int]] = [
            ("mgpu", [sys.executable, "-m", "device", "serve", "--log-level", "warning",
                      "--socket"], 0),
        ]  # fmt: skip
        if c_server:
            specs.append(("C sample", [c_server], 2))  # the gpio sample serves BAR2
        if echo:
            specs.append(("py echo", [sys.executable, "-c", ECHO_PEER], -1))
        result: list[Peer] = []
        for name, argv, region in specs:
            path = Path(workdir) / f"{len(result)}.sock"
            proc = _start([*argv, str(path)], cpu)
            stack.callback(_stop, proc)
            wait_for_socket(path, proc)
            if region < 0:
                sock = stack.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
                _retry(functools.partial(sock.connect, str(path)))
            else:
                client = _retry(functools.partial(VfioUserClient.connect, path))
                sock = client.connection.sock
                stack.callback(client.close)
            sock.settimeout(None)
            request = _REQUEST.pack(7, 9, _REQUEST.size, 0, 0, 0, max(region, 0), 4)
            result.append(Peer(name, proc, sock, request))
        yield result


def measure(c_server: str | None, cpu: int | None, rounds: int, per_round: int) -> list[Peer]:
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    try:
        with peers(c_server, None if cpu is None else cpu) as found:
            for peer in found:
                peer.run(per_round // 4)  # warm up
                peer.samples.clear()
                peer.cpu_ns = peer.messages = 0
            for _ in range(rounds):
                for peer in found:
                    peer.run(per_round)
            return found
    finally:
        os.sched_setaffinity(0, range(os.cpu_count() or 1))


def rows(quick: bool, c_server: str | None) -> list[Row]:
    rounds, per_round = (20, 2000) if quick else (30, 4000)
    found = {peer.name: peer for peer in measure(c_server, 0, rounds, per_round)}
    ours, echo = found["mgpu"], found["py echo"]
    result: list[Row] = []
    if "C sample" in found:
        result.append(
            row_from("trapped.vs_c", "trapped: REGION_READ 4B round trip", "us", ours.samples,
                     found["C sample"].samples, baseline_label="C sample", target=1.2)
        )  # fmt: skip
    result += [
        row_from("trapped.vs_echo", "trapped: REGION_READ 4B round trip", "us", ours.samples,
                 echo.samples, baseline_label="py echo"),
        Row("trapped.server_cpu", "trapped: server CPU per message", "us",
            ours.cpu_ns / ours.messages / 1000, baseline_label="py echo",
            baseline=echo.cpu_ns / echo.messages / 1000),
    ]  # fmt: skip
    if not quick:
        across = {peer.name: peer for peer in measure(c_server, None, rounds // 2, per_round)}
        base = across.get("C sample", across["py echo"])
        result.append(
            row_from("trapped.across_cpus", "trapped: round trip, any CPU", "us",
                     across["mgpu"].samples, base.samples, baseline_label=base.name)
        )  # fmt: skip
    return result


def main() -> int:
    from bench.__main__ import main as bench_main

    return bench_main(["--only", "trapped", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
