"""Aperture pages on demand: the fault callback checks each first touch against the
resources placed *now*; placing, removing and destroying revoke; each denied-access
policy; coherency between guest writes and the engine; isolation between instances.

The "guest" here touches the aperture with pread/pwrite on the same FUSE file QEMU
would map: they go through the same page cache and fault path, and they release the
GIL (touching our own mapping from Python while holding it would deadlock the server).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import random
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from device.control.manager import GpuServer
from device.errors import VfioUserError
from device.gpu import abi
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
TYPES = (InstanceType("small", 4 * MiB, 1, "4 MiB"),)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="fault mode mounts FUSE as root")


class Guest:
    """A driver plus 'guest touches' of the aperture through the BAR2 region fd."""

    def __init__(self, client: VfioUserClient) -> None:
        self.client = client
        self.driver = MgpuDriver(client)
        info, fd = client.region_info(PciRegion.BAR2)
        assert fd is not None
        self.info, self.fd = info, fd

    def touch(self, offset: int, length: int = 4) -> bytes:
        return os.pread(self.fd, length, offset)

    def store(self, offset: int, data: bytes) -> None:
        assert os.pwrite(self.fd, data, offset) == len(data)

    def placed(self, size: int, fill: int | None = None) -> tuple[int, int]:
        handle = self.driver.create(size)
        if fill is not None:
            self.driver.run(encode(Opcode.FILL, handle=handle, offset=0, length=size, value=fill))
        return handle, self.driver.place(handle)

    def close(self) -> None:
        os.close(self.fd)
        self.driver.close()
        self.client.close()


@pytest.fixture
def make_guest(short_tmp: Path) -> Iterator[Callable[..., tuple[Guest, GpuInstance]]]:
    workdir = short_tmp
    server = GpuServer(PhysicalGpu(16 * MiB, contexts=4, types=TYPES))
    guests: list[Guest] = []

    def make(
        denied: DeniedPolicy = DeniedPolicy.SIGBUS, mapping: MappingMode = MappingMode.FAULT
    ) -> tuple[Guest, GpuInstance]:
        name = f"g{len(guests)}"
        served = server.create_instance(
            name, "small", workdir / f"{name}.sock", mapping=mapping, denied=denied
        )
        guest = Guest(VfioUserClient.connect(served.endpoint.path))
        guests.append(guest)
        return guest, served.device

    yield make
    for guest in guests:
        guest.close()
    for served in server.instances.values():  # never leave a toucher hanging in D state
        fuse = served.device.window.fuse
        if fuse is not None:
            fuse.abort()
    server.close()


def test_fault_mode_serves_only_placed_pages_and_revokes(
    make_guest: Callable[..., tuple[Guest, GpuInstance]],
) -> None:
    guest, device = make_guest("sigbus")
    log = device.window.log
    assert guest.info.offset == 0 and guest.info.flags & 4, "BAR2 is mmappable"
    with pytest.raises(OSError) as exc:
        guest.touch(0)
    assert exc.value.errno == errno.EIO, "a touch of an unallocated page is refused"
    assert log.count("denied") >= 1

    handle, offset = guest.placed(2 * PAGE, fill=0x11223344)
    served = log.count("served")
    assert guest.touch(offset + PAGE, 4) == bytes.fromhex("44332211")
    assert log.count("served") == served + 1
    assert guest.touch(offset + PAGE + 8, 4) == bytes.fromhex("44332211")
    assert log.count("served") == served + 1, "a cached page does not fault again"

    guest.store(offset + 16, b"guest!")  # dirty in the page cache
    guest.driver.remove(handle)  # revoke: written back, then the touch faults again
    assert log.count("written_back") >= 1
    with pytest.raises(OSError):
        guest.touch(offset)
    guest.driver.place(handle)
    assert guest.touch(offset + 16, 6) == b"guest!", "no update lost across revoke"

    guest.driver.destroy(handle)
    with pytest.raises(OSError):
        guest.touch(offset)
    again, offset_again = guest.placed(PAGE)
    assert offset_again == offset
    assert guest.touch(offset, 64) == bytes(64), "freed memory is scrubbed before reuse"
    del again


def test_dummy_policy_gives_zero_pages_until_real_memory_arrives(
    make_guest: Callable[..., tuple[Guest, GpuInstance]],
) -> None:
    guest, device = make_guest("dummy")
    log = device.window.log
    assert guest.touch(0, 16) == bytes(16)
    assert log.count("dummy") == 1
    guest.store(0, b"lost")  # writes to a dummy page are dropped on writeback
    _, offset = guest.placed(PAGE, fill=0xABABABAB)
    assert offset == 0
    assert guest.touch(0, 4) == b"\xab" * 4, "placing drops the cached dummy page"
    assert log.count("write_dropped") >= 1


def test_report_policy_reads_ones_latches_and_interrupts(
    make_guest: Callable[..., tuple[Guest, GpuInstance]],
) -> None:
    guest, _ = make_guest("report")
    vector = abi.INT_VECTORS[abi.IntBit.FAULT]
    before = guest.driver.drain_interrupts()[vector]
    assert guest.touch(3 * PAGE + 12, 4) == b"\xff" * 4
    assert guest.driver.read("FAULT_COUNT") == 1
    assert guest.driver.read("FAULT_OFFSET_LO") == 3 * PAGE, "the faulting page"
    assert guest.driver.read("INT_STATUS") & abi.IntBit.FAULT
    assert (
        guest.driver.wait_interrupt(abi.IntBit.FAULT)
        or guest.driver.interrupts_seen[vector] > before
    )


def test_engine_and_guest_see_each_others_writes_with_no_update_lost(
    make_guest: Callable[..., tuple[Guest, GpuInstance]],
) -> None:
    guest, _ = make_guest("sigbus")
    pages = 16
    handle, offset = guest.placed(pages * PAGE, fill=0)
    other = guest.driver.create(pages * PAGE)
    rng = random.Random(5)
    model = bytearray(pages * PAGE)
    for round_ in range(40):
        page = rng.randrange(pages)
        data = rng.randbytes(PAGE)
        guest.store(offset + page * PAGE, data)  # guest writes a page
        model[page * PAGE : (page + 1) * PAGE] = data
        engine_page = rng.randrange(pages)
        if engine_page != page:  # the engine fills another page of the same resource
            value = rng.getrandbits(32)
            guest.driver.run(
                encode(
                    Opcode.FILL, handle=handle, offset=engine_page * PAGE, length=PAGE, value=value
                )
            )
            word = value.to_bytes(4, "little")
            model[engine_page * PAGE : (engine_page + 1) * PAGE] = word * (PAGE // 4)
        if round_ % 7 == 0:  # revoke and refault cycles in between
            guest.driver.remove(handle)
            guest.driver.place(handle)
    # The engine sees the guest's writes (copy out through the engine)...
    guest.driver.run(
        encode(Opcode.COPY_RESOURCE, src_handle=handle, dst_handle=other, length=pages * PAGE)
    )
    out = guest.driver.ram.alloc(pages * PAGE)
    guest.driver.run(
        encode(Opcode.READ_RESOURCE, handle=other, guest_addr=out, length=pages * PAGE)
    )
    assert guest.driver.ram.read(out, pages * PAGE) == bytes(model)
    # ...and the guest sees the engine's writes.
    assert guest.touch(offset, pages * PAGE) == bytes(model)


def test_two_instances_never_see_each_others_memory(
    make_guest: Callable[..., tuple[Guest, GpuInstance]],
) -> None:
    a, _ = make_guest("dummy")
    b, _ = make_guest("dummy")
    handle, offset = a.placed(4 * PAGE, fill=0x5EC12E75)
    a.store(offset, b"top secret")
    a.driver.remove(handle)  # written back into A's device memory
    # B's aperture is another file over another partition: its pages never hold A's data.
    for page in range(0, 4 * MiB, 64 * PAGE):
        assert b"\x75\x2e\xc1\x5e" not in b.touch(page, PAGE)
    b_handle, b_offset = b.placed(4 * PAGE)
    assert b.touch(b_offset, 4 * PAGE) == bytes(4 * PAGE)
    del b_handle
    # A frees its resource; the pages it gets next are zeroed.
    a.driver.destroy(handle)
    _, offset2 = a.placed(4 * PAGE)
    assert offset2 == offset and a.touch(offset, 16) == bytes(16)


@pytest.mark.parametrize("denied", list(DeniedPolicy), ids=str)
def test_trap_mode_checks_every_access(denied: DeniedPolicy, short_tmp: Path) -> None:
    workdir = short_tmp
    with GpuServer(PhysicalGpu(8 * MiB, contexts=2, types=TYPES)) as server:
        served = server.create_instance(
            "t", "small", workdir / "t.sock", mapping=MappingMode.TRAP, denied=denied
        )
        with VfioUserClient.connect(served.endpoint.path) as client:
            info, fd = client.region_info(PciRegion.BAR2)
            assert fd is None and not info.flags & 4, "trap mode: no mmap, no fd"
            driver = MgpuDriver(client)
            if denied is DeniedPolicy.SIGBUS:
                with pytest.raises(VfioUserError) as exc:
                    client.region_read(PciRegion.BAR2, 0, 4)
                assert exc.value.errno == errno.EFAULT
            else:
                expected = bytes(4) if denied is DeniedPolicy.DUMMY else b"\xff" * 4
                assert client.region_read(PciRegion.BAR2, 0, 4) == expected
                client.region_write(PciRegion.BAR2, 0, b"drop")  # dropped
            if denied is DeniedPolicy.REPORT:
                assert driver.read("FAULT_COUNT") == 2
                assert driver.read("FAULT_FLAGS") == 1, "the last one was a write"
            handle = driver.create(PAGE)
            offset = driver.place(handle)
            client.region_write(PciRegion.BAR2, offset + 8, b"kept")
            assert client.region_read(PciRegion.BAR2, offset + 8, 4) == b"kept"
            assert client.region_read(PciRegion.BAR2, offset, 4) == bytes(4), (
                "the dropped write never reached memory"
            )
            driver.remove(handle)
            with (
                pytest.raises(VfioUserError)
                if denied is DeniedPolicy.SIGBUS
                else contextlib.nullcontext()
            ):
                client.region_read(PciRegion.BAR2, offset + 8, 4)
            driver.close()


def test_destroyed_instance_mapping_never_reaches_the_next_owner_of_its_memory(
    make_guest: Callable[..., tuple[Guest, GpuInstance]], short_tmp: Path
) -> None:
    workdir = short_tmp / "reuse"
    workdir.mkdir()
    with GpuServer(PhysicalGpu(4 * MiB, contexts=2, types=TYPES)) as server:
        first = server.create_instance(
            "first",
            "small",
            workdir / "a.sock",
            mapping=MappingMode.FAULT,
            denied=DeniedPolicy.DUMMY,
        )
        old = Guest(VfioUserClient.connect(first.endpoint.path))
        _, offset = old.placed(PAGE, fill=0x01010101)
        assert old.touch(offset, 4) == b"\x01" * 4  # cached in the old owner's page cache
        old.client.close()
        server.destroy_instance("first")  # its pages go back to the pool, zeroed
        assert server.physical.free_bytes == 4 * MiB, "the next owner reuses the same pages"
        second = server.create_instance(
            "second",
            "small",
            workdir / "b.sock",
            mapping=MappingMode.FAULT,
            denied=DeniedPolicy.DUMMY,
        )
        new = Guest(VfioUserClient.connect(second.endpoint.path))
        _, new_offset = new.placed(PAGE, fill=0x0B0B0B0B)
        assert new_offset == offset
        # The old mapping is revoked and its connection gone: never the new owner's data.
        with pytest.raises(OSError):
            old.touch(offset, 4)
        assert new.touch(offset, 4) == b"\x0b" * 4
        os.close(old.fd)
        old.driver.close()
        new.close()


def test_concurrent_guest_writes_and_engine_commands_lose_no_update(
    make_guest: Callable[..., tuple[Guest, GpuInstance]],
) -> None:
    """The guest keeps writing its half of a placed resource while the engine keeps
    filling the other half (each command writes back and drops the pages it uses):
    the last value each side wrote to each page survives, checked by checksum."""
    guest, _ = make_guest("sigbus")
    pages = 16
    handle, offset = guest.placed(pages * PAGE, fill=0)
    last_guest: dict[int, bytes] = {}
    stop = threading.Event()

    def guest_writer() -> None:
        counter = 0
        while not stop.is_set():
            page = counter % (pages // 2)
            data = hashlib.sha256(counter.to_bytes(8, "little")).digest() * (PAGE // 32)
            guest.store(offset + page * PAGE, data)
            last_guest[page] = data
            counter += 1

    writer = threading.Thread(target=guest_writer)
    writer.start()
    last_engine: dict[int, int] = {}
    try:
        for round_ in range(60):
            page = pages // 2 + round_ % (pages // 2)
            value = (round_ * 2654435761) & 0xFFFFFFFF
            guest.driver.run(
                encode(Opcode.FILL, handle=handle, offset=page * PAGE, length=PAGE, value=value)
            )
            last_engine[page] = value
    finally:
        stop.set()
        writer.join(30)
    image = guest.touch(offset, pages * PAGE)
    for page, data in last_guest.items():
        got = image[page * PAGE : (page + 1) * PAGE]
        assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest(), page
    for page, value in last_engine.items():
        assert image[page * PAGE : (page + 1) * PAGE] == value.to_bytes(4, "little") * 1024
    # And the engine's view agrees with the guest's, byte for byte.
    copy = guest.driver.create(pages * PAGE)
    guest.driver.run(
        encode(Opcode.COPY_RESOURCE, src_handle=handle, dst_handle=copy, length=pages * PAGE)
    )
    out = guest.driver.ram.alloc(pages * PAGE)
    guest.driver.run(encode(Opcode.READ_RESOURCE, handle=copy, guest_addr=out, length=pages * PAGE))
    assert guest.driver.ram.read(out, pages * PAGE) == image


NONROOT = """
import os, sys
sys.path.insert(0, sys.argv[1])
from device.fuse.server import FuseAperture, FuseUnavailable
class Backend:
    def fault(self, offset, length): return b"\\x42" * length
    def writeback(self, offset, data): pass
aperture = FuseAperture("nonroot", 1 << 20, Backend())
try:
    fd = aperture.start()
except FuseUnavailable as exc:
    print("unavailable:", exc)
    sys.exit(0)
print("served:", os.pread(fd, 4, 8192).hex())
aperture.close()
"""


@pytest.mark.skipif(
    shutil.which("runuser") is None or not Path("/usr/bin/python3").exists(),
    reason="needs runuser and the system python3 to act as another user",
)
def test_fault_mode_without_root_uses_fusermount3_or_says_why(short_tmp: Path) -> None:
    """Where fusermount3 may mount (setuid honoured, /dev/fuse reachable) a user gets a
    working aperture; where it may not (as on these sandboxes) a clear error, never a
    hang or a traceback."""
    root = Path(__file__).resolve().parents[2]
    workdir = short_tmp
    # A copy the other user can read, wherever this checkout lives.
    (workdir / "device" / "fuse").mkdir(parents=True)
    for module in ("__init__.py", "errors.py"):  # what device.fuse imports
        shutil.copy(root / "device" / module, workdir / "device")
    for source in (root / "device" / "fuse").glob("*.py"):
        shutil.copy(source, workdir / "device" / "fuse")
    (workdir / "nonroot.py").write_text(NONROOT)
    for path in [workdir, *workdir.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    result = subprocess.run(
        [
            "runuser",
            "-u",
            "nobody",
            "--",
            "/usr/bin/python3",
            str(workdir / "nonroot.py"),
            str(workdir),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/tmp",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(("served: 42424242", "unavailable:")), result.stdout
    if result.stdout.startswith("unavailable:"):
        assert "fusermount3" in result.stdout
