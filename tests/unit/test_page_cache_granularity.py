"""The FUSE mount measures the page-cache granularity the kernel gives it, pins 4 KiB
when the kernel would cache larger folios, and says so in the fault log.

The kernel here caches FUSE files in 4 KiB folios; a kernel with large folios is
played by the self-test reporting a larger size on the first mount, which is what it
would see there (the READ completing a touch grows to the folio).  The pinned mount is
real either way: its READs are checked to stay one page even under MADV_HUGEPAGE.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from device.control.manager import GpuServer
from device.fuse import granularity
from device.fuse.server import FuseAperture, FuseUnavailable
from device.gpu.memory.physical import PhysicalGpu
from device.gpu.modes import MappingMode

SIZE = 8 << 20

TOUCH = r"""
import mmap, sys
fd, size = int(sys.argv[1]), int(sys.argv[2])
m = mmap.mmap(fd, size, mmap.MAP_SHARED)
m.madvise(mmap.MADV_HUGEPAGE)  # as QEMU maps the aperture: large READs if allowed
for offset in range(0, size, 4096):
    m[offset]
print("done", flush=True)
"""


class Recorder:
    """A backend serving zeros and keeping the length of every READ."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.lengths: list[int] = []

    def fault(self, offset: int, length: int, later: object) -> bytes:
        with self.lock:
            self.lengths.append(length)
        return bytes(length)

    def writeback(self, offset: int, data: bytes) -> None:
        pass


@pytest.fixture
def mounted() -> Iterator[list[FuseAperture]]:
    made: list[FuseAperture] = []
    yield made
    for fuse in made:
        fuse.close()


def touch_all(fuse: FuseAperture) -> None:
    out = subprocess.run(
        [sys.executable, "-c", TOUCH, str(fuse.file_fd), str(SIZE)],
        pass_fds=(fuse.file_fd,), capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert out.stdout.strip() == "done"


def test_this_kernel_gives_4k_folios_and_keeps_large_reads(
    mounted: list[FuseAperture],
) -> None:
    backend = Recorder()
    fuse = FuseAperture("granular", SIZE, backend)
    mounted.append(fuse)
    fuse.start()
    assert (fuse.granularity, fuse.unpinned_granularity, fuse.pinned) == (4096, 4096, False)
    touch_all(fuse)
    assert max(backend.lengths) > 4096  # unpinned: hugepage-advised touches read big


def test_large_folios_are_pinned_to_4k(
    mounted: list[FuseAperture], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real = granularity.measure
    seen: list[int] = []

    def kernel_with_large_folios(path: str, probe: granularity.Probe) -> int:
        size = real(path, probe)
        seen.append(size)
        return 64 * 1024 if len(seen) == 1 else size  # the first mount: 64 KiB folios

    monkeypatch.setattr(granularity, "measure", kernel_with_large_folios)
    backend = Recorder()
    fuse = FuseAperture("pinned", SIZE, backend)
    mounted.append(fuse)
    with caplog.at_level(logging.WARNING):
        fuse.start()
    assert fuse.pinned and fuse.io_size == 4096
    assert (fuse.granularity, fuse.unpinned_granularity) == (4096, 64 * 1024)
    assert "remounting with 4 KiB pinned" in caplog.text
    touch_all(fuse)
    assert backend.lengths and max(backend.lengths) == 4096  # one page per READ, always


def test_a_kernel_that_will_not_pin_is_refused_with_the_reason(
    mounted: list[FuseAperture], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(granularity, "measure", lambda path, probe: 2 << 20)
    fuse = FuseAperture("stubborn", SIZE, Recorder())
    mounted.append(fuse)
    with pytest.raises(FuseUnavailable, match="2097152-byte folios even with one-page"):
        fuse.start()
    assert fuse.fuse_fd < 0 and fuse.file_fd < 0  # nothing left mounted or open


def test_the_fault_log_reports_the_granularity(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = granularity.measure
    calls: list[int] = []

    def large_first(path: str, probe: granularity.Probe) -> int:
        calls.append(1)
        size = real(path, probe)
        return 16384 if len(calls) == 1 else size

    with GpuServer(PhysicalGpu(128 << 20)) as server:
        plain = server.create_instance("plain", "mgpu-64", short_tmp / "a.sock",
                                       mapping=MappingMode.FAULT)  # fmt: skip
        monkeypatch.setattr(granularity, "measure", large_first)
        pinned = server.create_instance("pin", "mgpu-64", short_tmp / "b.sock",
                                        mapping=MappingMode.FAULT)  # fmt: skip
        first = [(r.kind, r.length) for r in plain.device.window.log.records]
        second = [(r.kind, r.length) for r in pinned.device.window.log.records]
    assert first == [("mounted", 4096)]
    assert second == [("pinned_4k", 16384), ("mounted", 4096)]
    json.dumps(second)  # plain values: the control socket's `faults` shows them as they are
