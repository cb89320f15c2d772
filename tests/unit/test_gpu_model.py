"""The mediated GPU through the vfio-user client: instance types and quotas, resources,
every engine command with its results, bad commands, interrupts, reset, isolation."""

from __future__ import annotations

import fcntl
import os
import select
import shutil
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from device.control.manager import GpuServer
from device.errors import CapacityError
from device.gpu import abi
from device.gpu.abi import ErrorCode
from device.gpu.engine.commands import COMMAND_SIZE, Opcode, encode
from device.gpu.memory.physical import PhysicalGpu
from device.gpu.modes import InterruptMode
from device.gpu.types import InstanceType
from device.harness.driver import DriverError, MgpuDriver
from device.vfio_user.client import VfioUserClient
from device.vfio_user.protocol.constants import PciRegion

MiB = 1 << 20
TYPES = (
    InstanceType("small", 4 * MiB, 1, "4 MiB, 1 context"),
    InstanceType("big", 16 * MiB, 2, "16 MiB, 2 contexts"),
)


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="mgpu-model-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def server(workdir: Path) -> Iterator[GpuServer]:
    with GpuServer(PhysicalGpu(32 * MiB, contexts=4, types=TYPES)) as gpu_server:
        yield gpu_server


@pytest.fixture
def driver(server: GpuServer, workdir: Path) -> Iterator[MgpuDriver]:
    served = server.create_instance("a", "small", workdir / "a.sock")
    client = VfioUserClient.connect(served.endpoint.path)
    drv = MgpuDriver(client)
    yield drv
    drv.close()
    client.close()


def floats(values: list[float] | np.ndarray) -> bytes:
    return np.asarray(values, dtype=np.float32).tobytes()


# ---------------------------------------------------------------------- types, quotas


def test_available_instances_follow_the_pool_and_creation_beyond_it_fails(
    server: GpuServer, workdir: Path
) -> None:
    assert server.available_instances() == {"small": 4, "big": 2}
    server.create_instance("b0", "big", workdir / "b0.sock")
    # 16 MiB and 2 contexts left: contexts bound the small ones.
    assert server.available_instances() == {"small": 2, "big": 1}
    server.create_instance("b1", "big", workdir / "b1.sock")
    # Memory left: 0; contexts left: 0.
    assert server.available_instances() == {"small": 0, "big": 0}
    with pytest.raises(CapacityError, match="contexts"):
        server.create_instance("s0", "small", workdir / "s0.sock")
    server.destroy_instance("b0")
    assert server.available_instances() == {"small": 2, "big": 1}
    assert not (workdir / "b0.sock").exists()
    with pytest.raises(CapacityError, match="unknown instance type"):
        server.create_instance("x", "huge", workdir / "x.sock")


def test_registers_report_quotas(driver: MgpuDriver) -> None:
    assert driver.read("MEM_QUOTA_LO") == 4 * MiB
    assert driver.read("CONTEXT_QUOTA") == 1
    assert driver.read("APERTURE_SIZE_LO") == 4 * MiB
    assert driver.read("MEM_FREE_LO") == 4 * MiB
    assert driver.read("VERSION") == (abi.VERSION_MAJOR << 16) | abi.VERSION_MINOR


def test_resources_are_limited_by_the_quota(driver: MgpuDriver) -> None:
    handles = [driver.create(MiB) for _ in range(3)]  # ring and fence live in guest RAM
    assert len(set(handles)) == 3
    assert driver.read("RESOURCE_COUNT") == 3
    assert driver.read("MEM_FREE_LO") == MiB
    with pytest.raises(DriverError) as exc:
        driver.create(2 * MiB)
    assert exc.value.code == ErrorCode.QUOTA_EXCEEDED
    assert driver.read("INT_STATUS") & abi.IntBit.ERROR
    assert driver.read("ERROR_CODE") == ErrorCode.QUOTA_EXCEEDED
    last = driver.create(MiB)
    driver.destroy(handles[1])
    # 1 MiB free, but the quota is not the problem: it is one free run.
    assert driver.read("MEM_FREE_LO") == MiB
    with pytest.raises(DriverError) as exc:
        driver.destroy(handles[1])  # twice: a stale handle
    assert exc.value.code == ErrorCode.INVALID_HANDLE
    handle = driver.create(MiB)
    assert handle not in handles and handle != last, "handles are never reused"
    with pytest.raises(DriverError) as exc:
        driver.create(0)
    assert exc.value.code == ErrorCode.INVALID_ARGUMENT


def test_fragmented_quota_reports_no_memory(driver: MgpuDriver) -> None:
    handles = [driver.create(MiB) for _ in range(4)]
    driver.destroy(handles[0])
    driver.destroy(handles[2])
    with pytest.raises(DriverError) as exc:
        driver.create(2 * MiB)
    assert exc.value.code == ErrorCode.NO_MEMORY


def test_placed_resource_is_visible_in_the_aperture(server: GpuServer, driver: MgpuDriver) -> None:
    device = server.instances["a"].device
    handle = driver.create(8192)
    offset = driver.place(handle)
    assert offset % 4096 == 0 and offset + 8192 <= device.aperture_size
    pattern = bytes(range(256)) * 4
    source = driver.ram.alloc(len(pattern))
    driver.ram.write(source, pattern)
    driver.run(
        encode(
            Opcode.WRITE_RESOURCE, guest_addr=source, handle=handle, offset=100, length=len(pattern)
        )
    )
    # The aperture (what QEMU maps as BAR2) shows the resource at the placed offset.
    assert bytes(device.aperture[offset + 100 : offset + 100 + len(pattern)]) == pattern
    region = driver.client.region_read(PciRegion.BAR2, offset + 100, 16)
    assert region == pattern[:16]
    driver.remove(handle)
    with pytest.raises(DriverError):
        driver.remove(0xDEAD)


# ---------------------------------------------------------------------- commands


def test_copy_commands_between_guest_memory_and_resources(driver: MgpuDriver) -> None:
    size = 3 * 4096 + 5
    data = os.urandom(size)
    source, target = driver.ram.alloc(size), driver.ram.alloc(size)
    driver.ram.write(source, data)
    first, second = driver.create(size), driver.create(size + 100)
    driver.run(
        encode(Opcode.WRITE_RESOURCE, guest_addr=source, handle=first, offset=0, length=size),
        encode(
            Opcode.COPY_RESOURCE,
            src_handle=first,
            src_offset=0,
            dst_handle=second,
            dst_offset=100,
            length=size,
        ),
        encode(Opcode.READ_RESOURCE, handle=second, offset=100, guest_addr=target, length=size),
    )
    assert driver.ram.read(target, size) == data


def test_fill_and_overlapping_copy(driver: MgpuDriver) -> None:
    handle = driver.create(4096)
    out = driver.ram.alloc(4096)
    driver.run(
        encode(Opcode.FILL, handle=handle, offset=0, length=4096, value=0x11223344),
        encode(Opcode.FILL, handle=handle, offset=8, length=8, value=0xAABBCCDD),
        # Overlapping move within one resource: bytes 0..32 to 4..36.
        encode(
            Opcode.COPY_RESOURCE,
            src_handle=handle,
            src_offset=0,
            dst_handle=handle,
            dst_offset=4,
            length=32,
        ),
        encode(Opcode.READ_RESOURCE, handle=handle, offset=0, guest_addr=out, length=4096),
    )
    words = struct.unpack("<1024I", driver.ram.read(out, 4096))
    expected = [0x11223344] * 1024
    expected[2:4] = [0xAABBCCDD] * 2
    moved = expected[:8]
    expected[1:9] = moved
    assert list(words) == expected


def test_blit_copies_a_rectangle_between_pitches(driver: MgpuDriver) -> None:
    src_pitch, dst_pitch, width, height = 64, 100, 20, 7
    src, dst = driver.create(src_pitch * height), driver.create(dst_pitch * height)
    image = np.arange(src_pitch * height, dtype=np.uint32).astype(np.uint8)
    staging, out = driver.ram.alloc(image.size), driver.ram.alloc(dst_pitch * height)
    driver.ram.write(staging, image.tobytes())
    driver.run(
        encode(Opcode.WRITE_RESOURCE, guest_addr=staging, handle=src, offset=0, length=image.size),
        encode(Opcode.FILL, handle=dst, offset=0, length=dst_pitch * height, value=0),
        encode(
            Opcode.BLIT,
            src_handle=src,
            src_offset=3,
            src_pitch=src_pitch,
            dst_handle=dst,
            dst_offset=5,
            dst_pitch=dst_pitch,
            extent=width | height << 32,
        ),
        encode(
            Opcode.READ_RESOURCE, handle=dst, offset=0, guest_addr=out, length=dst_pitch * height
        ),
    )
    result = np.frombuffer(driver.ram.read(out, dst_pitch * height), dtype=np.uint8)
    result = result.reshape(height, dst_pitch)
    expected = np.zeros((height, dst_pitch), dtype=np.uint8)
    expected[:, 5 : 5 + width] = image.reshape(height, src_pitch)[:, 3 : 3 + width]
    np.testing.assert_array_equal(result, expected)


def test_saxpy_and_matmul_compute_float32_results(driver: MgpuDriver) -> None:
    rng = np.random.default_rng(7)
    x, y = rng.standard_normal(1000, dtype=np.float32), rng.standard_normal(1000, dtype=np.float32)
    alpha = np.float32(2.5)
    m, n, k = 9, 7, 13
    a = rng.standard_normal((m, k), dtype=np.float32)
    b = rng.standard_normal((k, n), dtype=np.float32)
    handles = {
        name: driver.create(size)
        for name, size in (
            ("x", x.nbytes),
            ("y", y.nbytes),
            ("a", a.nbytes),
            ("b", b.nbytes),
            ("c", m * n * 4),
        )
    }
    commands = []
    for name, array in (("x", x), ("y", y), ("a", a), ("b", b)):
        address = driver.ram.alloc(array.nbytes)
        driver.ram.write(address, array.tobytes())
        commands.append(
            encode(
                Opcode.WRITE_RESOURCE,
                guest_addr=address,
                handle=handles[name],
                offset=0,
                length=array.nbytes,
            )
        )
    y_out, c_out = driver.ram.alloc(y.nbytes), driver.ram.alloc(m * n * 4)
    alpha_bits = struct.unpack("<I", struct.pack("<f", alpha))[0]
    driver.run(
        *commands,
        encode(
            Opcode.SAXPY,
            x_handle=handles["x"],
            x_offset=0,
            y_handle=handles["y"],
            y_offset=0,
            count=1000,
            alpha=alpha_bits,
        ),
        encode(
            Opcode.MATMUL,
            a_handle=handles["a"],
            b_handle=handles["b"],
            c_handle=handles["c"],
            m=m,
            n=n,
            k=k,
        ),
        encode(
            Opcode.READ_RESOURCE, handle=handles["y"], offset=0, guest_addr=y_out, length=y.nbytes
        ),
        encode(
            Opcode.READ_RESOURCE, handle=handles["c"], offset=0, guest_addr=c_out, length=m * n * 4
        ),
    )
    got_y = np.frombuffer(driver.ram.read(y_out, y.nbytes), dtype=np.float32)
    np.testing.assert_allclose(got_y, alpha * x + y, rtol=1e-6)
    got_c = np.frombuffer(driver.ram.read(c_out, m * n * 4), dtype=np.float32).reshape(m, n)
    np.testing.assert_allclose(got_c, a @ b, rtol=1e-5, atol=1e-5)


def test_fence_writes_guest_memory_sets_register_and_raises_msix(driver: MgpuDriver) -> None:
    fence_fd = driver.vectors[abi.INT_VECTORS[abi.IntBit.FENCE]]
    slot = driver.ram.alloc(8)
    driver.submit(encode(Opcode.NOP), encode(Opcode.FENCE, guest_addr=slot, value=0x1234_5678_9A))
    assert select.select([fence_fd], [], [], 10)[0], "no fence interrupt"
    assert os.eventfd_read(fence_fd) == 1
    assert int.from_bytes(driver.ram.read(slot, 8), "little") == 0x1234_5678_9A
    assert driver.read(driver.ctx("FENCE_LO")) == 0x3456_789A
    assert driver.read(driver.ctx("FENCE_HI")) == 0x12
    assert driver.read("INT_STATUS") & abi.IntBit.FENCE
    driver.write("INT_ACK", abi.IntBit.FENCE)
    assert not driver.read("INT_STATUS") & abi.IntBit.FENCE
    assert driver.read(driver.ctx("RING_HEAD")) == 2 * COMMAND_SIZE


def test_masked_interrupt_stays_pending_without_msix(driver: MgpuDriver) -> None:
    driver.write("INT_MASK", abi.IntBit.FENCE)
    driver.submit(driver.fence())
    fence_fd = driver.vectors[0]
    for _ in range(200):
        if driver.read(driver.ctx("FENCE_LO")) == driver.fence_value:
            break
    assert driver.read("INT_STATUS") & abi.IntBit.FENCE
    assert not select.select([fence_fd], [], [], 0.2)[0], "masked vector fired"


# ---------------------------------------------------------------------- bad input


BAD_COMMANDS = [
    (
        encode(Opcode.COPY_RESOURCE, src_handle=0x999, dst_handle=1, length=4),
        ErrorCode.INVALID_HANDLE,
    ),
    (encode(Opcode.FILL, handle=1, offset=4096, length=4, value=0), ErrorCode.OUT_OF_BOUNDS),
    (encode(Opcode.FILL, handle=1, offset=0, length=3, value=0), ErrorCode.INVALID_ARGUMENT),
    (
        encode(Opcode.WRITE_RESOURCE, guest_addr=0xDEAD_0000_0000, handle=1, length=16),
        ErrorCode.DMA_FAULT,
    ),
    (encode(Opcode.READ_RESOURCE, handle=1, guest_addr=0x10, length=16), ErrorCode.DMA_FAULT),
    (
        encode(Opcode.COPY_RESOURCE, src_handle=1, dst_handle=1, length=0),
        ErrorCode.INVALID_ARGUMENT,
    ),
    (
        encode(Opcode.MATMUL, a_handle=1, b_handle=1, c_handle=1, m=0, n=1, k=1),
        ErrorCode.INVALID_ARGUMENT,
    ),
    (
        encode(Opcode.MATMUL, a_handle=1, b_handle=1, c_handle=1, m=64, n=64, k=64),
        ErrorCode.OUT_OF_BOUNDS,
    ),
    (encode(Opcode.SAXPY, x_handle=1, x_offset=2, y_handle=1, count=4), ErrorCode.INVALID_ARGUMENT),
    (
        encode(
            Opcode.BLIT, src_handle=1, src_pitch=4, dst_handle=1, dst_pitch=4, extent=8 | 1 << 32
        ),
        ErrorCode.INVALID_ARGUMENT,
    ),
    (struct.pack("<II7Q", 0x77, 0, *[0] * 7), ErrorCode.INVALID_COMMAND),
    (struct.pack("<II7Q", Opcode.NOP, 1, *[0] * 7), ErrorCode.INVALID_COMMAND),
]


@pytest.mark.parametrize(("command", "code"), BAD_COMMANDS)
def test_bad_command_halts_ring_with_error_and_interrupt(
    driver: MgpuDriver, command: bytes, code: ErrorCode
) -> None:
    handle = driver.create(4096)
    assert handle == 1
    errors_before = driver.drain_interrupts()[abi.INT_VECTORS[abi.IntBit.ERROR]]
    driver.submit(command, driver.fence())
    with pytest.raises(DriverError) as exc:
        driver.wait_fence(driver.fence_value, timeout=10)
    assert exc.value.code == code
    assert driver.read(driver.ctx("RING_STATUS")) == abi.RingStatus.ERROR
    assert driver.read("ERROR_CONTEXT") == 0
    assert driver.read("ERROR_RING_OFFSET") == 0
    assert driver.read(driver.ctx("FENCE_LO")) == 0, "commands after the bad one ran"
    driver.drain_interrupts()
    assert driver.interrupts_seen[
        abi.INT_VECTORS[abi.IntBit.ERROR]
    ] > errors_before or driver.wait_interrupt(abi.IntBit.ERROR), "no error interrupt"
    # Re-enabling the ring recovers; the device is fine.
    driver.setup_ring()
    driver.run(encode(Opcode.FILL, handle=handle, offset=0, length=4, value=1))


def test_bad_ring_configuration_is_refused(driver: MgpuDriver) -> None:
    driver.write(driver.ctx("RING_CONTROL"), 0)
    driver.write(driver.ctx("RING_SIZE"), 3000)  # not a power of two
    driver.write(driver.ctx("RING_CONTROL"), abi.RING_CONTROL_ENABLE)
    assert driver.read(driver.ctx("RING_STATUS")) == abi.RingStatus.ERROR
    assert driver.read("ERROR_CODE") == ErrorCode.INVALID_ARGUMENT
    driver.write(driver.ctx("RING_CONTROL"), 0)
    driver.write(driver.ctx("RING_SIZE"), 4096)
    driver.write(driver.ctx("RING_BASE_LO"), driver.ring + 8)  # misaligned
    driver.write(driver.ctx("RING_CONTROL"), abi.RING_CONTROL_ENABLE)
    assert driver.read(driver.ctx("RING_STATUS")) == abi.RingStatus.ERROR
    # A tail outside the ring.
    driver.setup_ring()
    driver.write(driver.ctx("RING_TAIL"), driver.ring_size + 64)
    driver.write(driver.ctx("DOORBELL"), 1)
    for _ in range(200):
        if driver.read(driver.ctx("RING_STATUS")) == abi.RingStatus.ERROR:
            break
    assert driver.read(driver.ctx("RING_STATUS")) == abi.RingStatus.ERROR
    # Contexts beyond the quota ignore writes.
    driver.write("CTX3_RING_CONTROL", abi.RING_CONTROL_ENABLE)
    assert driver.read("CTX3_RING_CONTROL") == 0


def test_ring_wraps_around(driver: MgpuDriver) -> None:
    handle = driver.create(4096)
    out = driver.ram.alloc(4)
    per_ring = driver.ring_size // COMMAND_SIZE
    for round_ in range(3):
        commands = [
            encode(Opcode.FILL, handle=handle, offset=0, length=4, value=i)
            for i in range(per_ring // 2)
        ]
        driver.run(*commands)
        assert round_ >= 0
    driver.run(encode(Opcode.READ_RESOURCE, handle=handle, offset=0, guest_addr=out, length=4))
    assert int.from_bytes(driver.ram.read(out, 4), "little") == per_ring // 2 - 1


# ---------------------------------------------------------------------- reset, isolation


@pytest.mark.parametrize("how", ["message", "register", "flr"])
def test_reset_frees_resources_zeroes_memory_restores_registers(
    server: GpuServer, driver: MgpuDriver, how: str
) -> None:
    device = server.instances["a"].device
    handle = driver.create(MiB)
    offset = driver.place(handle)
    driver.run(encode(Opcode.FILL, handle=handle, offset=0, length=MiB, value=0x5A5A5A5A))
    assert bytes(device.aperture[offset : offset + 4]) == b"ZZZZ"
    driver.write("SCRATCH", 7)
    free_before = server.physical.free_bytes
    if how == "message":
        driver.client.reset()
    elif how == "register":
        driver.write("DEVICE_RESET", 1)
    else:
        devctl = device.function.devctl
        value = int.from_bytes(driver.client.region_read(PciRegion.CONFIG, devctl, 2), "little")
        driver.client.region_write(PciRegion.CONFIG, devctl, (value | 0x8000).to_bytes(2, "little"))
    assert driver.read("SCRATCH") == 0
    assert driver.read("RESOURCE_COUNT") == 0
    assert driver.read("MEM_FREE_LO") == 4 * MiB
    assert driver.read(driver.ctx("RING_STATUS")) == abi.RingStatus.STOPPED
    assert bytes(device.aperture[offset : offset + 4]) == bytes(4)
    assert server.physical.free_bytes == free_before  # a static instance keeps its memory reserved
    with pytest.raises(DriverError):
        driver.destroy(handle)
    driver.setup_ring()
    driver.run(encode(Opcode.NOP))


def test_two_instances_cannot_reach_each_others_resources(
    server: GpuServer, driver: MgpuDriver, workdir: Path
) -> None:
    other = server.create_instance("b", "small", workdir / "b.sock")
    with VfioUserClient.connect(other.endpoint.path) as client_b:
        driver_b = MgpuDriver(client_b)
        secret = driver.create(4096)
        driver.run(encode(Opcode.FILL, handle=secret, offset=0, length=4096, value=0xC0DE))
        # B's handle space is its own: A's handle means nothing (or B's own) there.
        mine = driver_b.create(4096)
        out = driver_b.ram.alloc(4096)
        driver_b.run(
            encode(Opcode.READ_RESOURCE, handle=mine, offset=0, guest_addr=out, length=4096)
        )
        assert driver_b.ram.read(out, 4096) == bytes(4096)
        driver_b.submit(
            encode(Opcode.READ_RESOURCE, handle=secret + 1, offset=0, guest_addr=out, length=4096),
            driver_b.fence(),
        )
        with pytest.raises(DriverError) as exc:
            driver_b.wait_fence(driver_b.fence_value, timeout=10)
        assert exc.value.code == ErrorCode.INVALID_HANDLE
        # Each aperture fd is the instance's own memory and nothing else: another
        # file, exactly its size, sealed so that a client cannot shrink it.
        a, b = server.instances["a"].device, other.device
        _, a_fd = a.region_info(PciRegion.BAR2)
        b_info, b_fd = b.region_info(PciRegion.BAR2)
        assert a_fd is not None and b_fd is not None
        assert os.fstat(a_fd).st_ino != os.fstat(b_fd).st_ino
        assert os.fstat(b_fd).st_size == b.aperture_size == b_info.offset + b_info.size
        assert fcntl.fcntl(b_fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK
        assert b.aperture is not None
        # B's aperture never shows A's data.
        assert b"\xde\xc0" not in bytes(b.aperture)
        driver_b.close()
    # Destroying B gives its partition back, zeroed.
    server.destroy_instance("b")
    assert server.available_instances()["small"] >= 1


def test_msi_mode_has_msi_capability_and_raises_msi_vectors(
    server: GpuServer, workdir: Path
) -> None:
    served = server.create_instance("m", "small", workdir / "m.sock", interrupts=InterruptMode.MSI)
    with VfioUserClient.connect(served.endpoint.path) as client:
        config = client.region_read(PciRegion.CONFIG, 0, 256)
        caps, pointer = [], config[0x34]
        while pointer:
            caps.append(config[pointer])
            pointer = config[pointer + 1]
        assert caps == [0x01, 0x05, 0x10]  # PM, MSI, PCIe: no MSI-X
        assert client.irq_info(1).count == 4 and client.irq_info(2).count == 0
        bar4, _ = client.region_info(PciRegion.BAR4)
        assert bar4.size == 0
        driver = MgpuDriver(client)
        assert driver.irq_index == 1
        driver.run(encode(Opcode.NOP))
        assert driver.interrupts_seen[0] >= 1 or driver.wait_interrupt(abi.IntBit.FENCE)
        driver.close()
