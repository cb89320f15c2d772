"""Benchmark rows observed by a real guest (QEMU, TCG): the full run only.

One guest with two vfio-user devices side by side, each served by its own process:
our instance (``python -m device serve``, fault mode) and, when its path is given,
libvfio-user's C gpio sample server.  The guest programs
(``guest_images/programs``) time from inside the guest:

- ``guest.trapped_read``: a trapped 32-bit BAR read (``mgpu-probe latency``) of our
  SCRATCH register, against the same read of the C sample's BAR2 in the same guest
  (an I/O BAR: ``inl``, also one message per read; rounds interleaved); without the C
  sample the row has no baseline.  Target 1.1x.
- ``guest.first_touch``: writing every word of a freshly mapped 4 MiB resource through
  the aperture (``mgpu-probe fill``: each page's first touch is a fault), per page,
  against reading the same pages back once they are all present (``check``).
- ``guest.trapped_read_polled``: the same with our server polling 50 us before it
  sleeps (``serve --poll-us 50``), in a second guest: it keeps a CPU spinning, so its
  neighbours' figures move too.
- ``guest.submit_to_fence``: ``mgpu-ring``'s submission (upload, copy, SAXPY,
  readback and a FENCE: 8 commands) to its fence interrupt, through the guest driver,
  against one trapped register read.

    python -m bench.guest [--c-server PATH]     (boots QEMU: about a minute)
"""

from __future__ import annotations

import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from bench.common import Row
from bench.region_read import _start, _stop, wait_for_socket
from device.gpu.regs import table as regs
from device.harness.vm import GuestVM
from guest_images import parse_results
from guest_images.build import ensure_runtime

SCRATCH = regs.BY_NAME["SCRATCH"].offset
GPIO_VENDOR = "0x494f"  # libvfio-user's gpio sample
ROUNDS = 5
READS = 2000
TOUCHED = 4 << 20
POLL_US = 50  # the budget of the polled row (serve --poll-us)


def latency(vm: GuestVM, bdf: str, bar: int, offset: int) -> tuple[float, float]:
    result = parse_results(vm.check(f"mgpu-probe latency {bdf} {bar} {offset:#x} {READS}"))
    return int(result["median_ns"]) / 1000, int(result["p99_ns"]) / 1000


def first_touch(vm: GuestVM, bdf: str) -> tuple[float, float]:
    """(us per page of the first-touch pass, us per page of the cached pass)."""
    created = parse_results(vm.check(f"mgpu-probe res {bdf} create {TOUCHED}"))
    handle = created["handle"]
    mapped = parse_results(vm.check(f"mgpu-probe map {bdf} {handle} any 0 {TOUCHED}"))
    at = mapped["offset"]
    fill = parse_results(vm.check(f"mgpu-probe fill {bdf} 2 {at} {TOUCHED} 0x1234"))
    check = parse_results(vm.check(f"mgpu-probe check {bdf} 2 {at} {TOUCHED} 0x1234"))
    vm.check(f"mgpu-probe unmap {bdf} {at} {TOUCHED}")
    vm.check(f"mgpu-probe res {bdf} destroy {handle}")
    words_per_page = 1024
    return (
        float(fill["ns_per_word"]) * words_per_page / 1000,
        float(check["ns_per_word"]) * words_per_page / 1000,
    )


def rows(quick: bool, c_server: str | None) -> list[Row]:
    if quick:
        return []
    result = booted(c_server, [], measure)
    # The same guest read with our server polling before it sleeps (serve --poll-us).
    polled = booted(
        c_server, ["--poll-us", str(POLL_US)],
        lambda vm, _: trapped_reads(vm, "guest.trapped_read_polled",
                                    f"guest: the same, --poll-us {POLL_US}"),
    )  # fmt: skip
    result.append(polled[0])
    return result


def booted(
    c_server: str | None, options: list[str], run: Callable[[GuestVM, bool], list[Row]]
) -> list[Row]:
    """Serve our instance (and the C sample), boot a guest with both, ``run`` it."""
    runtime = ensure_runtime()
    with tempfile.TemporaryDirectory(prefix="mgpu-bench-") as tmp:
        workdir = Path(tmp)
        sockets = [workdir / "gpu.sock"]
        # Our server in its own process, as the C sample is: neither shares a GIL or a
        # CPU placement with this one.
        argv = [sys.executable, "-m", "device", "serve", "--type", "mgpu-64",
                "--mapping", "fault", "--log-level", "warning", *options,
                "--socket", str(sockets[0])]  # fmt: skip
        if c_server:
            sockets.append(workdir / "gpio.sock")
        servers = [_start(argv, None)]
        if c_server:
            servers.append(_start([c_server, str(sockets[1])], None))
        try:
            for path, proc in zip(sockets, servers, strict=True):
                wait_for_socket(path, proc)
            (workdir / "vm").mkdir()
            with GuestVM(runtime, workdir / "vm", vfio_user_sockets=sockets) as vm:
                vm.start()
                return run(vm, c_server is not None)
        finally:
            for proc in servers:
                _stop(proc)


def trapped_reads(
    vm: GuestVM, key: str = "guest.trapped_read", label: str = "guest: trapped 32-bit BAR read"
) -> list[Row]:
    """Our register read against the C sample's, in interleaved rounds."""
    ours_bdf = parse_results(vm.check("mgpu-probe find"))["bdf"]
    script = (
        f"for d in /sys/bus/pci/devices/*; do [ $(cat $d/vendor) = {GPIO_VENDOR} ] && "
        "basename $d; done; true"
    )
    found = vm.check(f"sh -c '{script}'").split()
    ours: list[tuple[float, float]] = []
    theirs: list[tuple[float, float]] = []
    for _ in range(ROUNDS):
        ours.append(latency(vm, ours_bdf, 0, SCRATCH))
        if found:
            theirs.append(latency(vm, found[0], 2, 0))
    return [
        Row(key, label, "us",
            statistics.median(m for m, _ in ours), max(p for _, p in ours),
            baseline_label="C sample" if theirs else "",
            baseline=statistics.median(m for m, _ in theirs) if theirs else None,
            target=1.1),
    ]  # fmt: skip


def measure(vm: GuestVM, with_sample: bool) -> list[Row]:
    (read,) = trapped_reads(vm)
    ours_bdf = parse_results(vm.check("mgpu-probe find"))["bdf"]
    touch = [first_touch(vm, ours_bdf) for _ in range(3)]
    vm.check("modprobe mgpu")
    fences = [
        float(parse_results(vm.check("mgpu-ring 0", timeout=120))["submit_to_interrupt_us"])
        for _ in range(3)
    ]
    return [
        read,
        Row("guest.first_touch", "guest: aperture first touch", "us/page",
            statistics.median(t for t, _ in touch), max(t for t, _ in touch),
            baseline_label="cached pass", baseline=statistics.median(c for _, c in touch)),
        Row("guest.submit_to_fence", "guest: submit to fence (8 cmds)", "us",
            statistics.median(fences), max(fences), baseline_label="1 trapped rd",
            baseline=read.median),
    ]  # fmt: skip


def main() -> int:
    from bench.__main__ import main as bench_main

    return bench_main(["--only", "guest", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
