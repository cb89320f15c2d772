"""The GPU MMU behind BAR2, validated at fault time, on one shared pool with eviction.

The "guest" is a child process that mmaps the instance's FUSE aperture file exactly as
QEMU does (MAP_SHARED), so its writes sit dirty in the page cache and come back only
as writebacks when pages are revoked: the path where bytes get lost if the server
gets the order of revocations, page-table changes and device accesses wrong.  (The
serving process must not touch its own FUSE mapping: the child does.)
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from device.control.manager import GpuServer
from device.errors import DeviceError
from device.gpu.abi import ErrorCode, ResourceCommand
from device.gpu.engine.commands import Opcode, encode
from device.gpu.instance.instance import GpuInstance
from device.gpu.memory.physical import PhysicalGpu
from device.gpu.modes import DeniedPolicy, MappingMode
from device.gpu.types import InstanceType
from device.harness.driver import MgpuDriver
from device.vfio_user.client import VfioUserClient
from device.vfio_user.protocol.constants import PciRegion

MiB = 1 << 20
PAGE = 4096

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="fault mode mounts FUSE as root")

CHILD = r"""
import mmap, os, sys
fd, size = int(sys.argv[1]), int(sys.argv[2])
view = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
for line in sys.stdin:
    op, *args = line.split()
    try:
        if op == "w":  # w OFFSET HEX: store bytes
            offset, data = int(args[0]), bytes.fromhex(args[1])
            view[offset : offset + len(data)] = data
            print("ok", flush=True)
        elif op == "f":  # f OFFSET LENGTH STRIDE BYTE: store BYTE at every STRIDE-th offset
            offset, length, stride, byte = map(int, args)
            for at in range(offset, offset + length, stride):
                view[at] = byte
            print("ok", flush=True)
        elif op == "r":  # r OFFSET LENGTH: load bytes
            offset, length = int(args[0]), int(args[1])
            print("ok", view[offset : offset + length].hex(), flush=True)
    except Exception as exc:  # SIGBUS kills us instead; anything else is reported
        print("error", type(exc).__name__, flush=True)
"""


class MappedGuest:
    """A child process with the aperture mmapped, driven line by line."""

    def __init__(self, fd: int, size: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(fd), str(size)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, pass_fds=(fd,),
        )  # fmt: skip

    def _ask(self, line: str) -> list[str]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline().split()
        assert answer and answer[0] == "ok", f"guest: {line!r} -> {answer or 'died'}"
        return answer

    def store(self, offset: int, data: bytes) -> None:
        self._ask(f"w {offset} {data.hex()}")

    def stripe(self, offset: int, length: int, stride: int, byte: int) -> None:
        self._ask(f"f {offset} {length} {stride} {byte}")

    def load(self, offset: int, length: int) -> bytes:
        return bytes.fromhex(self._ask(f"r {offset} {length}")[1])

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Rig:
    def __init__(self, device: GpuInstance, client: VfioUserClient) -> None:
        self.device, self.client = device, client
        self.driver = MgpuDriver(client)
        _, fd = client.region_info(PciRegion.BAR2)
        assert fd is not None
        self.fd = fd
        self.guest = MappedGuest(fd, device.aperture_size)

    def create(self, size: int, fill: int | None = None) -> int:
        handle = self.driver.create(size)
        if fill is not None:
            self.driver.run(encode(Opcode.FILL, handle=handle, length=size, value=fill))
        return handle

    def map(self, handle: int, at: int | None, offset: int = 0, length: int = 0) -> int:
        return self.driver.map(handle, at, offset, length)

    def unmap(self, at: int, length: int) -> None:
        self.driver.unmap(at, length)

    def resource_bytes(self, handle: int, length: int) -> bytes:
        """The resource as the engine sees it (READ_RESOURCE into driver RAM)."""
        out = self.driver.ram.alloc(length)
        self.driver.run(encode(Opcode.READ_RESOURCE, handle=handle, guest_addr=out, length=length))
        return self.driver.ram.read(out, length)

    def close(self) -> None:
        self.guest.close()
        os.close(self.fd)
        self.driver.close()
        self.client.close()


@pytest.fixture
def rigs(short_tmp: Path) -> Iterator[Callable[..., Rig]]:
    servers: list[GpuServer] = []
    made: list[Rig] = []

    def make(
        pool: int = 16 * MiB,
        itype: InstanceType | None = None,
        denied: DeniedPolicy = DeniedPolicy.SIGBUS,
        overcommit: float = 1.0,
        count: int = 1,
    ) -> Rig:
        if not servers:
            types = (itype or InstanceType("small", 4 * MiB, 2, "4 MiB"),)
            servers.append(GpuServer(PhysicalGpu(pool, 8, types, overcommit=overcommit)))
        server = servers[0]
        name = f"g{len(made)}"
        type_name = next(iter(server.physical.types))
        served = server.create_instance(
            name, type_name, short_tmp / f"{name}.sock", mapping=MappingMode.FAULT, denied=denied
        )
        rig = Rig(served.device, VfioUserClient.connect(served.endpoint.path))
        made.append(rig)
        return rig

    yield make
    for rig in made:
        rig.close()
    for server in servers:
        server.close()


def test_map_unmap_and_map_another_resource_at_the_same_offset(rigs: Callable[..., Rig]) -> None:
    rig = rigs()
    a = rig.create(2 * PAGE, fill=0xAAAAAAAA)
    b = rig.create(2 * PAGE, fill=0xBBBBBBBB)
    at = 16 * PAGE  # chosen by the driver
    assert rig.map(a, at) == at
    assert rig.guest.load(at + PAGE, 4) == b"\xaa" * 4
    rig.guest.store(at + 8, b"written by the guest")  # dirty in the page cache
    rig.unmap(at, 2 * PAGE)  # revoked: the dirty page goes back to A
    assert rig.resource_bytes(a, 28)[8:] == b"written by the guest"
    assert rig.map(b, at) == at
    assert rig.guest.load(at, 8) == b"\xbb" * 8, "the guest sees B now"
    assert rig.guest.load(at + 8, 4) == b"\xbb" * 4, "no stale A page survives the remap"
    assert rig.resource_bytes(b, PAGE) == b"\xbb" * PAGE, "and B never got A's bytes"
    records = rig.device.window.log.of("served")
    assert records[-1].handle == b and records[-1].device_page is not None


def test_a_small_aperture_windows_through_a_larger_quota(rigs: Callable[..., Rig]) -> None:
    windowed = InstanceType("win", 4 * MiB, 1, "4 MiB through 1 MiB", aperture=1 * MiB)
    rig = rigs(itype=windowed)
    assert rig.device.aperture_size == 1 * MiB
    assert rig.client.region_info(PciRegion.BAR2)[0].size == 1 * MiB
    big = rig.create(3 * MiB)
    for chunk in range(3):  # the engine writes each MiB with its own byte
        value = (0x11 * (chunk + 1)) * 0x01010101
        rig.driver.run(encode(Opcode.FILL, handle=big, offset=chunk * MiB, length=MiB, value=value))
    for chunk in range(3):  # the driver slides a 1 MiB window over it
        rig.map(big, 0, offset=chunk * MiB, length=MiB)
        assert rig.guest.load(MiB - 16, 16) == bytes([0x11 * (chunk + 1)]) * 16
        rig.guest.store(100, bytes([chunk]) * 4)
        rig.unmap(0, MiB)
    data = rig.resource_bytes(big, 3 * MiB)
    for chunk in range(3):
        assert data[chunk * MiB + 100 : chunk * MiB + 104] == bytes([chunk]) * 4


def test_map_refusals_carry_their_status(rigs: Callable[..., Rig]) -> None:
    rig = rigs()
    a, b = rig.create(2 * PAGE), rig.create(PAGE)
    rig.map(a, 0)
    cases: list[tuple[Callable[[], object], ErrorCode]] = [
        (lambda: rig.map(b, PAGE), ErrorCode.APERTURE_BUSY),
        (lambda: rig.map(a, 8 * PAGE), ErrorCode.ALREADY_MAPPED),
        (lambda: rig.map(b, 100), ErrorCode.INVALID_ARGUMENT),
        (lambda: rig.map(b, 4 * MiB), ErrorCode.OUT_OF_BOUNDS),
        (lambda: rig.map(b, None, offset=PAGE, length=PAGE), ErrorCode.OUT_OF_BOUNDS),
    ]
    for attempt, code in cases:
        with pytest.raises(Exception) as exc:
            attempt()
        assert getattr(exc.value, "code", None) == code, exc.value
    rig.unmap(0, 2 * PAGE)
    full = rig.create(4 * MiB - 3 * PAGE)  # the rest of the quota: 1021 pages
    # Map it in two ranges that leave three single free pages: 0, 511 and 1023.
    assert rig.map(full, PAGE, offset=0, length=510 * PAGE) == PAGE
    assert rig.map(full, 512 * PAGE, offset=510 * PAGE, length=511 * PAGE) == 512 * PAGE
    with pytest.raises(Exception) as exc:
        rig.map(a, None)  # two pages: no free run is that long
    assert getattr(exc.value, "code", None) == ErrorCode.NO_APERTURE_SPACE
    assert rig.map(b, None) == 0, "one page still fits, first fit"


@pytest.mark.parametrize("denied", [DeniedPolicy.DUMMY, DeniedPolicy.REPORT], ids=str)
def test_mapping_after_a_dummy_touch_keeps_the_resource_intact(
    rigs: Callable[..., Rig], denied: DeniedPolicy
) -> None:
    rig = rigs(denied=denied)
    at = 4 * PAGE
    expected = b"\x00" if denied is DeniedPolicy.DUMMY else b"\xff"
    assert rig.guest.load(at, 4) == expected * 4  # a dummy page, now cached
    rig.guest.store(at, b"junk in a dummy page")  # and dirty
    handle = rig.create(PAGE, fill=0x5A5A5A5A)
    rig.map(handle, at)  # once committed the dirty dummy page into the new resource
    assert rig.resource_bytes(handle, PAGE) == b"\x5a" * PAGE
    assert rig.guest.load(at, 4) == b"\x5a" * 4
    assert rig.device.window.log.count("write_dropped") >= 1


def test_engine_blits_while_the_guest_writes_other_bytes_of_the_same_pages(
    rigs: Callable[..., Rig],
) -> None:
    rig = rigs()
    pages = 8
    half = PAGE // 2
    target = rig.create(pages * PAGE, fill=0)
    source = rig.create(pages * PAGE)
    at = rig.map(target, None)
    for round_ in range(1, 121):
        value = round_ & 0xFF
        rig.driver.run(
            encode(Opcode.FILL, handle=source, length=pages * PAGE, value=value * 0x01010101)
        )
        # The engine blits the right half of every page while the guest writes the
        # left half of the same pages: both must survive, byte for byte.
        rig.driver.submit(
            encode(
                Opcode.BLIT, src_handle=source, src_pitch=PAGE, dst_handle=target,
                dst_offset=half, dst_pitch=PAGE, extent=pages << 32 | half,
            ),
            rig.driver.fence(),
        )  # fmt: skip
        rig.guest.stripe(at, pages * PAGE, PAGE, value)  # byte 0 of each page...
        rig.guest.stripe(at + half - 1, pages * PAGE, PAGE, value)  # ...and the last left byte
        rig.driver.wait_fence(rig.driver.fence_value)
        if round_ % 20 == 0:
            device_view = rig.resource_bytes(target, pages * PAGE)
            guest_view = rig.guest.load(at, pages * PAGE)
            for page in range(pages):
                base = page * PAGE
                for view in (device_view, guest_view):
                    assert view[base] == value and view[base + half - 1] == value, (round_, page)
                    assert view[base + half : base + PAGE] == bytes([value]) * half, (round_, page)


def test_eviction_and_page_in_lose_no_byte_across_cycles(rigs: Callable[..., Rig]) -> None:
    # A pool of 8 MiB under two instances of 8 MiB each (overcommit 2): whoever
    # allocates past the pool evicts the other's idle resources.
    itype = InstanceType("big", 8 * MiB, 1, "8 MiB")
    first = rigs(pool=8 * MiB, itype=itype, overcommit=2.0)
    second = rigs(itype=itype)
    physical = first.device.physical
    size = 3 * MiB
    mine = [first.create(size, fill=(0x21 + n) * 0x01010101) for n in range(2)]
    offsets = [first.map(handle, None) for handle in mine]
    first.guest.store(offsets[0] + 12345, b"guest bytes, dirty")  # cached, dirty
    expected = [bytearray(bytes([0x21 + n]) * size) for n in range(2)]
    expected[0][12345 : 12345 + 18] = b"guest bytes, dirty"
    for cycle in range(3):
        theirs = second.create(5 * MiB, fill=0x77777777)  # evicts first's idle memory
        assert physical.evictions >= cycle + 1
        assert second.resource_bytes(theirs, 64) == b"\x77" * 64
        # The first guest touches its pages again: page-in at fault time.
        for n in range(2):
            assert first.guest.load(offsets[n] + size - 8, 8) == bytes(expected[n][-8:])
        second.driver.destroy(theirs)
        assert first.guest.load(offsets[0] + 12345, 18) == b"guest bytes, dirty"
        stamp = f"cycle {cycle}".encode()
        first.guest.store(offsets[1] + 4096 * cycle, stamp)
        expected[1][4096 * cycle : 4096 * cycle + len(stamp)] = stamp
    assert physical.page_ins >= 1
    for n, handle in enumerate(mine):
        data = first.resource_bytes(handle, size)
        assert hashlib.sha256(data).digest() == hashlib.sha256(expected[n]).digest(), n
    kinds = {r.kind for r in first.device.window.log.records}
    assert {"evicted", "paged_in"} <= kinds


def test_overcommit_and_limits_decide_available_instances() -> None:
    itype = InstanceType("t", 4 * MiB, 1, "4 MiB")
    plain = PhysicalGpu(8 * MiB, 8, (itype,))
    over = PhysicalGpu(8 * MiB, 8, (itype,), overcommit=1.5)
    try:
        assert plain.available_instances("t") == 2
        assert over.available_instances("t") == 3
    finally:
        plain.close()
        over.close()


def test_a_static_instance_fd_is_its_own_memory_and_cannot_be_truncated(short_tmp: Path) -> None:
    with GpuServer(PhysicalGpu(16 * MiB, 4, (InstanceType("s", 4 * MiB, 1, "s"),))) as server:
        served = server.create_instance("s", "s", short_tmp / "s.sock")
        with VfioUserClient.connect(served.endpoint.path) as client:
            info, fd = client.region_info(PciRegion.BAR2)
            assert fd is not None
            try:
                assert os.fstat(fd).st_size == info.size == 4 * MiB
                with pytest.raises(PermissionError):
                    os.ftruncate(fd, 0)  # sealed: the server cannot be SIGBUSed
                with pytest.raises(PermissionError):
                    os.ftruncate(fd, 64 * MiB)  # nor grown into other memory
            finally:
                os.close(fd)


def test_a_resource_in_non_contiguous_pages_works_for_engine_and_guest(
    rigs: Callable[..., Rig],
) -> None:
    rig = rigs(pool=4 * MiB, itype=InstanceType("all", 4 * MiB, 1, "all of it"))
    hold = [rig.create(MiB) for _ in range(4)]  # fill the pool, then punch two holes
    rig.driver.destroy(hold[1])
    rig.driver.destroy(hold[3])
    split = rig.create(2 * MiB, fill=0x3C3C3C3C)  # only in two separate runs
    assert [r["runs"] for r in rig.device.describe_resources() if r["handle"] == split] == [2]
    at = rig.map(split, None)
    rig.guest.store(at + MiB - 2, b"across")  # straddles the two runs
    rig.driver.run(encode(Opcode.FILL, handle=split, offset=MiB + 8, length=8, value=0x01020304))
    data = rig.resource_bytes(split, 2 * MiB)
    assert data[MiB - 2 : MiB + 4] == b"across"
    assert data[MiB + 8 : MiB + 16] == bytes.fromhex("0403020104030201")
    assert data[: MiB - 2] == b"\x3c" * (MiB - 2)
    with pytest.raises(DeviceError) as exc:
        rig.device.resource_command(ResourceCommand.CREATE, RES_SIZE=8 * MiB)
    assert exc.value.code == ErrorCode.QUOTA_EXCEEDED


def test_allocation_waits_for_a_busy_resource_to_evict_and_trapped_writes_lose_nothing(
    short_tmp: Path,
) -> None:
    """Instance one writes its resource word by word (each access pins it for a moment)
    while instance two allocates past the pool: the allocation waits for the resource
    to be idle and evicts it (it once failed with NO_MEMORY, and a page-in that failed
    so was served as an unmapped page), the writes that follow page it back in, and
    every word of both ends where it was written."""
    pool, size = 32 * 1024, 24 * 1024
    itype = InstanceType("half", pool, 1, "the pool, as a limit")
    pattern = [bytes([n]) * size for n in (0x51, 0x52)]
    with GpuServer(PhysicalGpu(pool, 4, (itype,), overcommit=2.0)) as server:
        one, two = (
            server.create_instance(name, "half", short_tmp / f"{name}.sock",
                                   mapping=MappingMode.TRAP).device
            for name in ("one", "two")
        )  # fmt: skip
        handle = one.resource_command(ResourceCommand.CREATE, RES_SIZE=size)
        at1 = one.resource_command(ResourceCommand.MAP_ANY, RES_HANDLE=handle)

        def writer() -> None:
            for i in range(0, size, 4):
                one.region_write(PciRegion.BAR2, at1 + i, pattern[0][i : i + 4])

        thread = threading.Thread(target=writer)
        thread.start()
        theirs = two.resource_command(ResourceCommand.CREATE, RES_SIZE=size)
        at2 = two.resource_command(ResourceCommand.MAP_ANY, RES_HANDLE=theirs)
        for i in range(0, size, 4):
            two.region_write(PciRegion.BAR2, at2 + i, pattern[1][i : i + 4])
        thread.join(60)
        assert server.physical.evictions >= 1
        assert one.read_aperture(at1, size) == pattern[0]
        assert two.read_aperture(at2, size) == pattern[1]
