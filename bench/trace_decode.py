"""Benchmark: what decoding a trace costs, against what the undecoded paths cost.

A real trace first: the reference driver, over the client library, runs ring
submissions (copies and fences), resource commands and register polls against an
in-process instance with tracing on; its records are then timed in interleaved rounds
(A B C D, A B C D, ...) so machine noise hits every variant:

- ``parse``: ``json.loads`` of each JSON line (reading a saved file, the floor of
  ``mgpu trace decode``);
- ``decode``: parse and ``Decoder.decode`` (``mgpu trace decode FILE``);
- ``chrome``: ``trace.chrome_trace`` plus ``json.dumps``, the Perfetto writer before
  decoding (the baseline of the next one);
- ``perfetto``: ``insight.perfetto.chrome_trace`` plus ``json.dumps``, what
  ``mgpu trace stop --perfetto`` now writes (decoded names, tracks, flows).

Each sample is the time per record over the whole trace; the table shows the median and
p99 over the rounds, and the ratios ``decode / parse`` and ``perfetto / chrome``.

    python -m bench.trace_decode [--rounds 15] [--submissions 400] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import percentile, publish
from device import trace
from device.gpu.engine.commands import Opcode, encode
from device.gpu.instance.instance import GpuInstance
from device.harness.driver import MgpuDriver
from device.insight import perfetto
from device.insight.decode import Decoder
from device.vfio_user.client import VfioUserClient
from device.vfio_user.server import Endpoint

ROOT = Path(__file__).resolve().parent.parent


def record_a_session(submissions: int) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix="mgpu-bench-") as workdir:
        device = GpuInstance("bench", aperture_size=1 << 20)
        endpoint = Endpoint(Path(workdir) / "gpu.sock", device, "bench")
        endpoint.start()
        trace.clear()
        trace.start()
        try:
            with VfioUserClient.connect(endpoint.path) as client:
                driver = MgpuDriver(client)
                handle = driver.create(64 * 1024)
                source = driver.ram.alloc(4096)
                for n in range(submissions):
                    write = encode(
                        Opcode.WRITE_RESOURCE, guest_addr=source, handle=handle,
                        offset=(n % 16) * 4096, length=4096,
                    )  # fmt: skip
                    driver.run(write, encode(Opcode.NOP))
                    driver.read("INT_STATUS")
                driver.close()
            return [dict(r) for r in trace.records()]
        finally:
            trace.stop()
            trace.clear()
            endpoint.stop()
            device.close()


def variants(lines: list[str], records: list[dict[str, Any]]) -> dict[str, Callable[[], None]]:
    def parse() -> None:
        for line in lines:
            json.loads(line)

    def decode() -> None:
        decoder = Decoder()
        for line in lines:
            decoder.decode(json.loads(line))

    def chrome() -> None:
        json.dumps(trace.chrome_trace(records))

    def timeline() -> None:
        json.dumps(perfetto.chrome_trace(records))

    return {"parse": parse, "decode": decode, "chrome": chrome, "perfetto": timeline}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--submissions", type=int, default=400)
    parser.add_argument(
        "--json", type=Path, default=ROOT / "bench" / "results" / "trace_decode.json"
    )
    args = parser.parse_args(argv)
    records = record_a_session(args.submissions)
    lines = [json.dumps(r) for r in records]
    runs = variants(lines, records)
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, run in runs.items():
            started = time.perf_counter()
            run()
            samples[name].append((time.perf_counter() - started) / len(records) * 1e6)
    medians = {name: statistics.median(values) for name, values in samples.items()}
    print(f"{len(records)} records, {args.rounds} interleaved rounds; microseconds per record")
    print(f"{'variant':<10}{'median':>10}{'p99':>10}")
    for name, values in samples.items():
        print(f"{name:<10}{medians[name]:>10.2f}{percentile(values, 0.99):>10.2f}")
    ratios = {
        "decode/parse": medians["decode"] / medians["parse"],
        "perfetto/chrome": medians["perfetto"] / medians["chrome"],
    }
    for name, ratio in ratios.items():
        print(f"{name:<16}{ratio:>6.2f}x")
    publish(
        {
            "records": len(records),
            "rounds": args.rounds,
            "us_per_record": {
                name: {"median": medians[name], "p99": percentile(values, 0.99)}
                for name, values in samples.items()
            },
            "ratios": ratios,
            "buffer_of_100k_records_s": {
                name: medians[name] * trace.BUFFER_RECORDS / 1e6 for name in medians
            },
        },
        args.json,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
