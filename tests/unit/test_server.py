"""A real server (Endpoint + GpuInstance) on a unix socket, driven by the client
library with real SCM_RIGHTS fd passing: correct answers, and no crash, desync or fd
leak whatever a client sends.  The server runs in this process, so /proc/self/fd
counts its fds."""

from __future__ import annotations

import errno
import gc
import mmap
import os
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from device.errors import VfioUserError
from device.gpu import abi
from device.gpu.instance.instance import GpuInstance
from device.gpu.regs import table as regs
from device.vfio_user.client import VfioUserClient, create_guest_ram
from device.vfio_user.protocol import messages as m
from device.vfio_user.protocol.constants import Command, IrqSetFlags, PciIrq, PciRegion
from device.vfio_user.server import Endpoint
from tests.helpers import wait_until
from tests.unit.conftest import ServeInstance

APERTURE = 256 << 20
SCRATCH = regs.BY_NAME["SCRATCH"].offset
VERSION_REG = regs.BY_NAME["VERSION"].offset
TRIGGER_EVENTFD = IrqSetFlags.DATA_EVENTFD | IrqSetFlags.ACTION_TRIGGER
TRIGGER_NONE = IrqSetFlags.DATA_NONE | IrqSetFlags.ACTION_TRIGGER
TRIGGER_BOOL = IrqSetFlags.DATA_BOOL | IrqSetFlags.ACTION_TRIGGER


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def settled_fds() -> int:
    """The open fd count once garbage from earlier tests (sockets, memfds that only
    the collector closes) is gone: a baseline that later counts can equal exactly."""
    gc.collect()
    count = open_fds()
    for _ in range(50):
        time.sleep(0.01)
        gc.collect()
        now = open_fds()
        if now == count:
            return count
        count = now
    return count


def wait_served(endpoint: Endpoint, count: int) -> None:
    """Until the server has finished with (closed) ``count`` clients in all."""
    wait_until(lambda: endpoint.clients_served >= count, 5.0, f"{count} clients served")


@pytest.fixture
def endpoint(serve_instance: ServeInstance) -> Endpoint:
    return serve_instance(aperture_size=APERTURE, name="srv")


def device_of(endpoint: Endpoint) -> GpuInstance:
    assert isinstance(endpoint.device, GpuInstance)
    return endpoint.device


def raw_exchange(
    client: VfioUserClient, data: bytes, fds: tuple[int, ...] = (), expect_reply: bool = True
) -> m.Header | None:
    client.send_raw(data, fds)
    if not expect_reply:
        return None
    frame = client.receive()
    assert frame.fds == ()
    return frame.header


def assert_hung_up(client: VfioUserClient) -> None:
    """The server closed this connection (and sent nothing first)."""
    client.connection.sock.settimeout(5)
    assert client.connection.sock.recv(100) == b"", "the server should hang up"


def works(endpoint: Endpoint) -> None:
    """A new client gets correct answers."""
    with VfioUserClient.connect(endpoint.path) as client:
        assert client.read32(0, 0) == abi.ID_VALUE
        assert client.device_info().num_regions == 9


def eventfds(count: int) -> tuple[int, ...]:
    return tuple(os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(count))


def close_all(fds: tuple[int, ...]) -> None:
    for fd in fds:
        os.close(fd)


# ---------------------------------------------------------------------- VERSION


def test_version_reply_is_0_0_and_never_longer_than_the_request(endpoint: Endpoint) -> None:
    requests: list[dict[str, object]] = [
        {
            "max_msg_fds": 16,
            "max_data_xfer_size": 1 << 20,
            "pgsizes": 4096,
            "max_dma_maps": 65535,
            "migration": {"pgsize": 4096},
        },  # like QEMU
        {"pgsizes": 4096},
        {"max_msg_fds": 1},  # our value (16) is longer than the client's: left out
        {"x": 1},
        {},
    ]
    for caps in requests:
        with VfioUserClient.connect(endpoint.path, negotiate=False) as client:
            request = m.Version(0, 0, caps).pack()
            reply = client.request(Command.VERSION, request)
            version = m.Version.unpack(reply.payload)
            assert (version.major, version.minor) == (0, 0)
            assert len(reply.payload) <= len(request), caps
            assert reply.payload.endswith(b"\0")
            assert set(version.capabilities) <= set(caps), "a subset of what was offered"
            assert client.read32(0, 0) == abi.ID_VALUE


def test_commands_before_version_are_refused_with_einval(endpoint: Endpoint) -> None:
    with VfioUserClient.connect(endpoint.path, negotiate=False) as client:
        for call in (
            client.device_info,
            lambda: client.read32(0, 0),
            client.reset,
            lambda: client.region_info(0),
        ):
            with pytest.raises(VfioUserError) as exc:
                call()
            assert exc.value.errno == errno.EINVAL
        client.version()
        assert client.device_info().num_regions == 9
        with pytest.raises(VfioUserError) as exc:
            client.version()  # only once
        assert exc.value.errno == errno.EINVAL


def test_a_refused_version_leaves_the_session_unnegotiated(endpoint: Endpoint) -> None:
    with VfioUserClient.connect(endpoint.path, negotiate=False) as client:
        with pytest.raises(VfioUserError) as exc:
            client.request(Command.VERSION, m.Version(1, 0, {}).pack())
        assert exc.value.errno == errno.ENOTSUP, "major 1 is not ours"
        with pytest.raises(VfioUserError) as exc:
            client.request(Command.VERSION, struct.pack("<HH", 0, 0) + b"{bad json\0")
        assert exc.value.errno == errno.EINVAL
        with pytest.raises(VfioUserError):
            client.version({"max_data_xfer_size": -1})
        with pytest.raises(VfioUserError):
            client.device_info()
        assert client.version().major == 0
        assert client.device_info().num_irqs == 5


# ---------------------------------------------------------------------- device and regions


def test_device_info(endpoint: Endpoint) -> None:
    with VfioUserClient.connect(endpoint.path) as client:
        info = client.device_info()
        assert info.flags == 3, "VFIO_DEVICE_FLAGS_PCI | RESET"
        assert (info.num_regions, info.num_irqs) == (9, 5)


def test_every_region_and_irq_info(endpoint: Endpoint) -> None:
    expected = {0: (64 * 1024, 3), 2: (APERTURE, 0xF), 4: (16 * 1024, 3), 7: (4096, 3)}
    with VfioUserClient.connect(endpoint.path) as client:
        for index in range(9):
            region, fd = client.region_info(index)
            try:
                size, flags = expected.get(index, (0, 0))
                assert (region.index, region.size, region.flags) == (index, size, flags), index
                assert (fd is not None) == (index == 2), f"only BAR2 has an fd ({index})"
                if index != 2:
                    assert region.sparse_areas == ()
            finally:
                if fd is not None:
                    os.close(fd)
        with pytest.raises(VfioUserError) as exc:
            client.region_info(9)
        assert exc.value.errno == errno.EINVAL
        irqs = [client.irq_info(i) for i in range(5)]
        assert [i.index for i in irqs] == [0, 1, 2, 3, 4]
        assert [i.count for i in irqs] == [0, 0, 8, 1, 1], "MSI-X has 8 vectors"
        assert all(i.flags & 1 for i in irqs), "eventfd capable"
        with pytest.raises(VfioUserError):
            client.irq_info(5)


def test_bar2_fd_only_with_the_full_reply(endpoint: Endpoint) -> None:
    with VfioUserClient.connect(endpoint.path) as client:
        reply = client.request(Command.DEVICE_GET_REGION_INFO, m.RegionInfoRequest(32, 2).pack())
        assert reply.fds == ()
        info, wanted = m.RegionInfo.unpack(reply.payload)
        assert len(reply.payload) == 32 and wanted == 64
        assert info.flags == 0xF and info.size == APERTURE
        assert reply.payload[12:16] == struct.pack("<I", 32), "cap_offset set"
        full = m.RegionInfoRequest(64, 2).pack() + bytes(32)
        reply = client.request(Command.DEVICE_GET_REGION_INFO, full)
        assert len(reply.fds) == 1, "exactly one fd"
        os.close(reply.fds[0])
        info, wanted = m.RegionInfo.unpack(reply.payload)
        assert wanted == 64 and len(reply.payload) == 64
        assert info.sparse_areas == (m.SparseArea(0, APERTURE),), "one area: all of BAR2"


def test_bar2_mmap_is_the_device_aperture(endpoint: Endpoint) -> None:
    device = device_of(endpoint)
    with VfioUserClient.connect(endpoint.path) as client:
        region, fd = client.region_info(2)
        assert fd is not None
        try:
            mapping = mmap.mmap(fd, region.size, mmap.MAP_SHARED, offset=region.offset)
        finally:
            os.close(fd)
        try:
            mapping[0x100:0x108] = b"aperture"
            mapping[APERTURE - 4 :] = b"last"
            assert bytes(device.aperture[0x100:0x108]) == b"aperture"
            assert client.region_read(2, 0x100, 8) == b"aperture"
            assert client.region_read(2, APERTURE - 4, 4) == b"last"
            client.region_write(2, 0x200, b"from the server side")
            assert mapping[0x200:0x214] == b"from the server side"
        finally:
            mapping.close()


def read_config(client: VfioUserClient) -> bytes:
    return client.region_read(PciRegion.CONFIG, 0, 4096)


def capabilities(config: bytes) -> dict[int, int]:
    """{capability id: offset}, following the chain from 0x34."""
    chain: dict[int, int] = {}
    pointer = config[0x34]
    while pointer:
        assert pointer >= 0x40 and pointer not in chain.values(), "a sane, finite chain"
        chain[config[pointer]] = pointer
        pointer = config[pointer + 1]
    return chain


def test_whole_config_space(endpoint: Endpoint) -> None:
    with VfioUserClient.connect(endpoint.path) as client:
        config = read_config(client)
        assert len(config) == 4096
        assert struct.unpack_from("<HH", config, 0) == (0x1234, 0x4D47)
        assert int.from_bytes(config[9:12], "little") == 0x030200
        assert config[0x0E] == 0, "type 0 header"
        assert struct.unpack_from("<H", config, 6)[0] & 0x10, "capability list bit"
        assert config[0x3D] == 0, "no INTx pin"
        assert struct.unpack_from("<I", config, 0x10)[0] == 0, "BAR0: 32-bit memory"
        assert struct.unpack_from("<I", config, 0x18)[0] == 0xC, "BAR2: 64-bit prefetchable"
        pointer, order = config[0x34], []
        while pointer:
            order.append(config[pointer])
            pointer = config[pointer + 1]
        assert order == [0x01, 0x11, 0x10], "PM -> MSI-X -> PCIe, then the end"
        caps = capabilities(config)
        control, table, pba = struct.unpack_from("<HII", config, caps[0x11] + 2)
        assert (control & 0x7FF) + 1 == 8, "MSI-X table size 8"
        assert (table & 7, table & ~7) == (4, 0), "table in BAR4 at 0"
        assert (pba & 7, pba & ~7) == (4, 0x2000), "PBA in BAR4 at 0x2000"
        pcie_caps = struct.unpack_from("<H", config, caps[0x10] + 2)[0]
        assert pcie_caps & 0xF == 2, "PCIe capability version 2"
        assert (pcie_caps >> 4) & 0xF == 0, "PCIe endpoint"
        assert struct.unpack_from("<I", config, caps[0x10] + 4)[0] & (1 << 28), "FLR capable"
        assert struct.unpack_from("<I", config, 0x100)[0] == 0, "no extended capabilities"


def test_bar_sizing(endpoint: Endpoint) -> None:
    with VfioUserClient.connect(endpoint.path) as client:
        for offset in (0x10, 0x14, 0x18, 0x1C, 0x20, 0x24, 0x30):
            client.region_write(PciRegion.CONFIG, offset, b"\xff\xff\xff\xff")
        bars = struct.unpack_from("<6I", read_config(client), 0x10)
        assert bars[0] == 0xFFFF0000, "BAR0: 64 KiB"
        assert bars[1] == 0, "unused BAR stays 0"
        assert bars[2] == (~(APERTURE - 1) & 0xFFFFFFFF) | 0xC == 0xF000000C
        assert bars[3] == 0xFFFFFFFF, "BAR2's upper half: all ones below 4 GiB"
        assert bars[4] == 0xFFFFC000, "BAR4: 16 KiB"
        assert bars[5] == 0
        assert struct.unpack_from("<I", read_config(client), 0x30)[0] == 0, "no ROM"
        # Programming an address keeps the flag bits and drops the bits below the size.
        client.region_write(PciRegion.CONFIG, 0x18, struct.pack("<I", 0x1234_5678))
        assert struct.unpack_from("<I", read_config(client), 0x18)[0] == 0x1000000C


def test_read_only_config_bytes_ignore_writes(endpoint: Endpoint) -> None:
    with VfioUserClient.connect(endpoint.path) as client:
        before = read_config(client)
        caps = capabilities(before)
        client.region_write(PciRegion.CONFIG, 0, b"\xff" * 4096)
        client.region_write(PciRegion.CONFIG, 0, b"\x00" * 4096)
        after = read_config(client)
        for start, end, what in [
            (0x00, 0x04, "vendor and device IDs"),
            (0x08, 0x0C, "revision and class"),
            (0x0E, 0x0F, "header type"),
            (0x2C, 0x30, "subsystem IDs"),
            (0x34, 0x35, "capability pointer"),
            (0x3D, 0x3E, "interrupt pin"),
            (caps[0x01], caps[0x01] + 4, "PM header and capabilities"),
            (caps[0x11], caps[0x11] + 2, "MSI-X header"),
            (caps[0x11] + 4, caps[0x11] + 12, "MSI-X table and PBA"),
            (caps[0x10], caps[0x10] + 8, "PCIe header, capabilities, device caps"),
            (0x100, 0x1000, "extended config space"),
        ]:
            assert after[start:end] == before[start:end], what
        assert struct.unpack_from("<H", after, 6)[0] & 0x10, "cap list bit is read only"
        # Writable bytes do take writes: the command register and the latency timer.
        client.region_write(PciRegion.CONFIG, 4, b"\x06\x00")
        client.region_write(PciRegion.CONFIG, 0x0D, b"\x40")
        config = read_config(client)
        assert struct.unpack_from("<H", config, 4)[0] == 6 and config[0x0D] == 0x40


def test_config_accesses_outside_4k_are_refused(endpoint: Endpoint) -> None:
    with VfioUserClient.connect(endpoint.path) as client:
        for offset, count in ((4094, 4), (4096, 1), (1 << 40, 4)):
            with pytest.raises(VfioUserError) as exc:
                client.region_read(PciRegion.CONFIG, offset, count)
            assert exc.value.errno == errno.EINVAL
        with pytest.raises(VfioUserError):
            client.region_write(PciRegion.CONFIG, 4095, b"\0\0")
        assert client.region_read(PciRegion.CONFIG, 4092, 4) == b"\0\0\0\0"


# ---------------------------------------------------------------------- registers


def test_id_scratch_and_access_widths(endpoint: Endpoint) -> None:
    with VfioUserClient.connect(endpoint.path) as client:
        assert client.read32(0, 0) == abi.ID_VALUE == 0x4D475055
        assert client.region_read(0, 0, 1) == b"\x55"
        assert client.region_read(0, 2, 2) == b"\x47\x4d"
        client.write32(0, SCRATCH, 0x11223344)
        assert client.read32(0, SCRATCH) == 0x11223344
        client.region_write(0, SCRATCH + 1, b"\xaa")
        client.region_write(0, SCRATCH + 2, b"\xbb\xcc")
        assert client.read32(0, SCRATCH) == 0xCCBBAA44
        assert client.region_read(0, SCRATCH + 1, 2) == b"\xaa\xbb"
        assert client.region_read(0, SCRATCH + 3, 1) == b"\xcc"
        assert client.region_read(0, SCRATCH, 8)[:4] == struct.pack("<I", 0xCCBBAA44)


def test_read_only_registers_ignore_writes(endpoint: Endpoint) -> None:
    with VfioUserClient.connect(endpoint.path) as client:
        version = client.read32(0, VERSION_REG)
        client.write32(0, 0, 0)
        client.region_write(0, 1, b"\0\0")
        client.write32(0, VERSION_REG, 0xFFFFFFFF)
        assert client.read32(0, 0) == abi.ID_VALUE
        assert client.read32(0, VERSION_REG) == version


def test_accesses_past_the_bar_fail_with_einval(endpoint: Endpoint) -> None:
    with VfioUserClient.connect(endpoint.path) as client:
        for region, offset, count in (
            (0, 64 * 1024 - 2, 4),
            (0, 64 * 1024, 4),
            (4, 16 * 1024, 4),
            (2, APERTURE - 1, 2),
            (1, 0, 4),
            (8, 0, 1),
            (42, 0, 4),
        ):
            with pytest.raises(VfioUserError) as exc:
                client.region_read(region, offset, count)
            assert exc.value.errno == errno.EINVAL, (region, offset)
        with pytest.raises(VfioUserError) as exc:
            client.region_write(0, 64 * 1024 - 1, b"\0\0")
        assert exc.value.errno == errno.EINVAL
        assert client.region_read(0, 64 * 1024 - 4, 4) == bytes(4)


def test_device_reset_clears_scratch(endpoint: Endpoint) -> None:
    with VfioUserClient.connect(endpoint.path) as client:
        client.write32(0, SCRATCH, 5)
        client.reset()
        assert client.read32(0, SCRATCH) == 0
        assert client.read32(0, 0) == abi.ID_VALUE


def test_pcie_flr_clears_scratch(endpoint: Endpoint) -> None:
    with VfioUserClient.connect(endpoint.path) as client:
        client.write32(0, SCRATCH, 6)
        devctl = capabilities(read_config(client))[0x10] + 8
        value = struct.unpack_from("<H", read_config(client), devctl)[0]
        client.region_write(PciRegion.CONFIG, devctl, struct.pack("<H", value | 0x8000))
        assert client.read32(0, SCRATCH) == 0
        after = struct.unpack_from("<H", read_config(client), devctl)[0]
        assert after == value, "the FLR bit reads back 0, the rest is kept"
        # A config write that does not set the bit is not a reset.
        client.write32(0, SCRATCH, 7)
        client.region_write(PciRegion.CONFIG, devctl, struct.pack("<H", value))
        assert client.read32(0, SCRATCH) == 7


# ---------------------------------------------------------------------- DMA


@pytest.fixture
def ram() -> Iterator[int]:
    fd = create_guest_ram("unit-guest-ram", 1 << 20)  # sealed: the server maps it
    yield fd
    os.close(fd)


def test_dma_map_with_an_fd_then_unmap(endpoint: Endpoint, ram: int) -> None:
    os.pwrite(ram, b"guest bytes", 0x2000)
    with VfioUserClient.connect(endpoint.path) as client:
        session = endpoint.session
        assert session is not None
        with_client = open_fds()
        client.dma_map(0x100000, 1 << 20, fd=ram)
        assert open_fds() == with_client, "the received fd is closed, the mapping keeps none"
        assert len(session.dma) == 1
        assert session.dma.read(0x102000, 11) == b"guest bytes", "the device sees guest RAM"
        session.dma.write(0x103000, b"device wrote")
        assert os.pread(ram, 12, 0x3000) == b"device wrote"
        client.dma_unmap(0x100000, 1 << 20)
        assert len(session.dma) == 0
        with pytest.raises(VfioUserError) as exc:
            session.dma.read(0x102000, 1)
        assert exc.value.errno == errno.EFAULT
        assert open_fds() == with_client


def test_dma_map_rules(endpoint: Endpoint, ram: int) -> None:
    with VfioUserClient.connect(endpoint.path) as client:
        session = endpoint.session
        assert session is not None
        client.dma_map(0x100000, 1 << 20, fd=ram)
        for address, size in ((0x180000, 1 << 20), (0x0, 0x101000), (0x100000, 4096)):
            with pytest.raises(VfioUserError) as exc:
                client.dma_map(address, size)
            assert exc.value.errno == errno.EEXIST, hex(address)
        for address, size in ((0x100000, 4096), (0x200000, 4096), (0x0, 1 << 20)):
            with pytest.raises(VfioUserError) as exc:
                client.dma_unmap(address, size)
            assert exc.value.errno == errno.ENOENT, hex(address)
        for address, size in ((0x300001, 4096), (0x300000, 100), (0x300000, 0)):
            with pytest.raises(VfioUserError) as exc:
                client.dma_map(address, size)
            assert exc.value.errno == errno.EINVAL
        client.dma_map(0x400000, 4096)  # without an fd: reached by DMA_READ/WRITE messages
        client.dma_map(0x200000, 4096)  # right after the first range: no overlap
        assert len(session.dma) == 3
        client.dma_unmap(0x100000, 1 << 20)
        assert len(session.dma) == 2
        with pytest.raises(VfioUserError) as exc:
            client.dma_unmap(0, 4096, flags=2)  # unmap-all wants address and size 0
        assert exc.value.errno == errno.EINVAL
        client.dma_unmap(0, 0, flags=2)  # VFIO_DMA_UNMAP_FLAG_ALL
        assert len(session.dma) == 0


def test_dma_unmap_reply_echoes_the_request(endpoint: Endpoint) -> None:
    with VfioUserClient.connect(endpoint.path) as client:
        client.dma_map(0x10000, 4096)
        request = m.DmaUnmap(24, 0, 0x10000, 4096).pack()
        reply = client.request(Command.DMA_UNMAP, request)
        assert reply.payload == request


def test_dma_map_of_an_fd_that_cannot_be_mapped_is_closed_and_served_by_messages(
    endpoint: Endpoint,
) -> None:
    with VfioUserClient.connect(endpoint.path) as client:
        with_client = open_fds()
        (fd,) = eventfds(1)
        client.dma_map(0x100000, 4096, fd=fd)
        small = create_guest_ram("small", 4096)  # 4 KiB file, 1 MiB asked
        client.dma_map(0x200000, 1 << 20, fd=small)
        close_all((fd, small))
        assert open_fds() == with_client
        session = endpoint.session
        assert session is not None and len(session.dma) == 2
        assert all(region.mapping is None for region in session.dma.regions)


# ---------------------------------------------------------------------- interrupts


def test_irq_eventfds_assign_fire_deassign_disable(endpoint: Endpoint) -> None:
    device = device_of(endpoint)
    with VfioUserClient.connect(endpoint.path) as client:
        with_client = open_fds()
        fds = eventfds(3)
        client.set_irq_eventfds(PciIrq.MSIX, fds)
        assert open_fds() == with_client + 6, "the server keeps its own copies"
        irqs = device.interrupts.lines
        assert irqs is not None and endpoint.session is not None
        assert irqs is endpoint.session.irqs
        assert irqs.assigned(PciIrq.MSIX) == [0, 1, 2]
        assert irqs.raise_irq(PciIrq.MSIX, 2)
        assert os.eventfd_read(fds[2]) == 1
        with pytest.raises(BlockingIOError):
            os.eventfd_read(fds[1])
        assert not irqs.raise_irq(PciIrq.MSIX, 5), "vector 5 has no eventfd"
        client.set_irqs(PciIrq.MSIX, TRIGGER_BOOL, 0, 3, b"\x01\x00\x01")
        assert os.eventfd_read(fds[0]) == 1 and os.eventfd_read(fds[2]) == 1
        with pytest.raises(BlockingIOError):
            os.eventfd_read(fds[1])
        client.set_irqs(PciIrq.MSIX, TRIGGER_NONE, 1, 1)  # DATA_NONE with a count fires
        assert os.eventfd_read(fds[1]) == 1
        client.set_irqs(PciIrq.MSIX, TRIGGER_EVENTFD, 1, 1)  # count, no fds: de-assign
        assert irqs.assigned(PciIrq.MSIX) == [0, 2]
        assert not irqs.raise_irq(PciIrq.MSIX, 1)
        assert open_fds() == with_client + 5, "the server closed its copy"
        client.set_irqs(PciIrq.MSIX, TRIGGER_NONE, 0, 0)  # DATA_NONE, count 0: disable all
        assert irqs.assigned(PciIrq.MSIX) == []
        assert not irqs.raise_irq(PciIrq.MSIX, 0)
        assert open_fds() == with_client + 3
        close_all(fds)


def test_reassigning_a_vector_closes_the_old_eventfd(endpoint: Endpoint) -> None:
    device = device_of(endpoint)
    with VfioUserClient.connect(endpoint.path) as client:
        with_client = open_fds()
        first, second = eventfds(2)
        client.set_irq_eventfds(PciIrq.MSIX, (first,), start=4)
        client.set_irq_eventfds(PciIrq.MSIX, (second,), start=4)
        assert open_fds() == with_client + 3
        assert device.interrupts.lines is not None and device.interrupts.lines.raise_irq(
            PciIrq.MSIX, 4
        )
        assert os.eventfd_read(second) == 1
        with pytest.raises(BlockingIOError):
            os.eventfd_read(first)
        close_all((first, second))


def test_bad_set_irqs_are_refused_and_their_fds_closed(endpoint: Endpoint) -> None:
    with VfioUserClient.connect(endpoint.path) as client:
        with_client = open_fds()
        fds = eventfds(2)
        for index, start in ((PciIrq.MSIX, 7), (PciIrq.INTX, 0), (PciIrq.MSI, 0), (9, 0)):
            with pytest.raises(VfioUserError) as exc:
                client.set_irq_eventfds(index, fds, start=start)
            assert exc.value.errno == errno.EINVAL, index
        with pytest.raises(VfioUserError):  # two data types at once
            client.set_irqs(PciIrq.MSIX, 0x26, 0, 2, fds=fds)
        with pytest.raises(VfioUserError):  # eventfds for ACTION_MASK
            client.set_irqs(PciIrq.MSIX, 0x0C, 0, 2, fds=fds)
        close_all(fds)
        assert open_fds() == with_client


def test_mask_unmask_keeps_an_interrupt_pending_and_err_req_take_eventfds(
    endpoint: Endpoint,
) -> None:
    device = device_of(endpoint)
    with VfioUserClient.connect(endpoint.path) as client:
        (vector,) = eventfds(1)
        client.set_irq_eventfds(PciIrq.MSIX, (vector,))
        client.set_irqs(PciIrq.MSIX, IrqSetFlags.DATA_NONE | IrqSetFlags.ACTION_MASK, 0, 1)
        assert device.interrupts.lines is not None
        assert not device.interrupts.lines.raise_irq(PciIrq.MSIX, 0)
        with pytest.raises(BlockingIOError):
            os.eventfd_read(vector)
        client.set_irqs(PciIrq.MSIX, IrqSetFlags.DATA_NONE | IrqSetFlags.ACTION_UNMASK, 0, 1)
        assert os.eventfd_read(vector) == 1, "the pending interrupt fires on unmask"
        err, req = eventfds(2)
        client.set_irq_eventfds(PciIrq.ERR, (err,))
        client.set_irq_eventfds(PciIrq.REQ, (req,))
        assert device.interrupts.lines.raise_irq(PciIrq.ERR) and os.eventfd_read(err) == 1
        assert device.interrupts.lines.raise_irq(PciIrq.REQ) and os.eventfd_read(req) == 1
        close_all((vector, err, req))


def test_device_interrupts_reach_the_eventfd(endpoint: Endpoint) -> None:
    """The device's own interrupt path: a bad resource command raises ERROR (vector 1)."""
    with VfioUserClient.connect(endpoint.path) as client:
        fds = eventfds(8)
        client.set_irq_eventfds(PciIrq.MSIX, fds)
        client.write32(0, regs.BY_NAME["RES_COMMAND"].offset, 0x7F)  # no such command
        assert os.eventfd_read(fds[1]) == 1
        assert client.read32(0, regs.BY_NAME["INT_STATUS"].offset) & abi.IntBit.ERROR
        close_all(fds)


# ---------------------------------------------------------------------- robustness


@pytest.mark.parametrize("command", [0, 6, 14, 16, 17, 18, 19, 99, 65535])
def test_unknown_or_refused_commands_get_an_errno(endpoint: Endpoint, command: int) -> None:
    with VfioUserClient.connect(endpoint.path) as client:
        header = raw_exchange(client, m.encode_message(77, command, b"junk", reply=False))
        assert header is not None
        assert header.msg_id == 77 and header.command == command
        assert header.is_reply and header.is_error and header.size == 16
        assert header.error in (errno.ENOTSUP, errno.EINVAL)
        assert client.read32(0, 0) == abi.ID_VALUE


def test_unknown_commands_before_version_get_an_errno_too(endpoint: Endpoint) -> None:
    with VfioUserClient.connect(endpoint.path, negotiate=False) as client:
        header = raw_exchange(client, m.encode_message(8, 99, b"", reply=False))
        assert header is not None and header.is_error and header.msg_id == 8
        client.version()
        assert client.read32(0, 0) == abi.ID_VALUE


MALFORMED = [
    (Command.VERSION, b"\0\0\0\0{}"),  # again, and not NUL-terminated
    (Command.DMA_MAP, b"\x20\0\0\0"),
    (Command.DMA_MAP, m.DmaMap(40, 3, 0, 0x100000, 4096).pack()),  # argsz
    (Command.DMA_UNMAP, bytes(23)),
    (Command.DMA_UNMAP, m.DmaUnmap(24, 0, 0x100000, 4096).pack()),  # nothing mapped
    (Command.DMA_UNMAP, m.DmaUnmap(24, 1, 0, 0).pack()),  # dirty bitmap
    (Command.DEVICE_GET_INFO, b"\x04\0\0\0" + bytes(12)),
    (Command.DEVICE_GET_INFO, b""),
    (Command.DEVICE_GET_REGION_INFO, bytes(31)),
    (Command.DEVICE_GET_REGION_INFO, m.RegionInfoRequest(16, 0).pack()),
    (Command.DEVICE_GET_IRQ_INFO, bytes(15)),
    (Command.DEVICE_SET_IRQS, struct.pack("<IIIII", 99, 0x24, 2, 0, 1)),
    (Command.DEVICE_SET_IRQS, struct.pack("<IIIII", 20, 0x3F, 2, 0, 1)),
    (Command.DEVICE_SET_IRQS, struct.pack("<IIIII", 22, 0x22, 2, 0, 3) + b"\1\1"),
    (Command.REGION_READ, m.RegionAccess(0, 0, 4).pack() + b"x"),
    (Command.REGION_READ, m.RegionAccess(0, 0, 4).pack()[:12]),
    (Command.REGION_READ, m.RegionAccess(0, 2, 2 << 20).pack()),  # over max_data_xfer_size
    (Command.REGION_READ, m.RegionAccess(0, 0, 0).pack()),
    (Command.REGION_READ, m.RegionAccess(0, 42, 4).pack()),
    (Command.REGION_WRITE, m.RegionAccess(0, 0, 8, b"1234").pack()),
    (Command.REGION_WRITE, m.RegionAccess(SCRATCH, 0, 4).pack()),  # no data
    (Command.REGION_WRITE_MULTI, struct.pack("<Q", 2) + bytes(24)),
    (Command.DEVICE_RESET, b"x"),
]


@pytest.mark.parametrize("command,payload", MALFORMED)
def test_malformed_payloads_get_an_errno_and_the_session_goes_on(
    endpoint: Endpoint, command: int, payload: bytes
) -> None:
    with VfioUserClient.connect(endpoint.path) as client:
        client.write32(0, SCRATCH, 0x5A5A)
        header = raw_exchange(client, m.encode_message(5, command, payload, reply=False))
        assert header is not None and header.is_reply and header.is_error
        assert header.msg_id == 5 and header.command == command
        assert header.error > 0
        assert client.read32(0, SCRATCH) == 0x5A5A, "refused means no effect"
        assert client.read32(0, 0) == abi.ID_VALUE


def test_pipelined_requests_are_answered_in_order(endpoint: Endpoint) -> None:
    with VfioUserClient.connect(endpoint.path) as client:
        read_id = m.encode_message(
            10, Command.REGION_READ, m.RegionAccess(0, 0, 4).pack(), reply=False
        )
        bad = m.encode_message(11, Command.REGION_READ, b"short", reply=False)
        write = m.encode_message(
            12,
            Command.REGION_WRITE,
            m.RegionAccess(SCRATCH, 0, 4, b"\x01\x02\x03\x04").pack(),
            reply=False,
        )
        read_scratch = m.encode_message(
            13, Command.REGION_READ, m.RegionAccess(SCRATCH, 0, 4).pack(), reply=False
        )
        client.send_raw(read_id + bad + write + read_scratch)
        replies = [client.receive() for _ in range(4)]
        assert [r.header.msg_id for r in replies] == [10, 11, 12, 13]
        assert [r.header.is_error for r in replies] == [False, True, False, False]
        assert replies[0].payload[16:] == struct.pack("<I", abi.ID_VALUE)
        assert replies[3].payload[16:] == b"\x01\x02\x03\x04"


def test_replies_from_the_client_get_no_answer(endpoint: Endpoint) -> None:
    with VfioUserClient.connect(endpoint.path) as client:
        for command in (Command.DMA_READ, Command.REGION_READ, 99):
            raw_exchange(
                client, m.encode_message(9, command, b"stray", reply=True), expect_reply=False
            )
        raw_exchange(
            client, m.encode_message(9, 1, b"", reply=True, error=errno.EIO), expect_reply=False
        )
        # Had anything been answered, this request would get the wrong reply (the
        # client checks the id and raises).
        assert client.read32(0, 0) == abi.ID_VALUE
        assert client.read32(0, VERSION_REG) == abi.VERSION_MAJOR << 16 | abi.VERSION_MINOR


def test_no_reply_commands_get_no_answer_even_when_refused(endpoint: Endpoint) -> None:
    with VfioUserClient.connect(endpoint.path) as client:
        raw_exchange(
            client, m.encode_message(10, 99, b"bad", reply=False, no_reply=True), expect_reply=False
        )
        raw_exchange(
            client,
            m.encode_message(11, Command.REGION_READ, b"x", reply=False, no_reply=True),
            expect_reply=False,
        )
        write = m.RegionAccess(SCRATCH, 0, 4, b"\x01\0\0\0").pack()
        raw_exchange(
            client,
            m.encode_message(12, Command.REGION_WRITE, write, reply=False, no_reply=True),
            expect_reply=False,
        )
        # The next answer is for the next request, with its id: the stream is in sync.
        reply = client.request(Command.REGION_READ, m.RegionAccess(SCRATCH, 0, 4).pack())
        assert reply.payload[16:] == b"\x01\0\0\0", "the posted write was applied"
        header = raw_exchange(
            client,
            m.encode_message(
                0xBEEF, Command.REGION_READ, m.RegionAccess(0, 0, 4).pack(), reply=False
            ),
        )
        assert header is not None and header.msg_id == 0xBEEF and not header.is_error


def test_region_write_multi_is_applied_in_order(endpoint: Endpoint) -> None:
    entries = [(SCRATCH, 0, 4, b"\x01\x02\x03\x04"), (SCRATCH + 3, 0, 1, b"\xff")]
    payload = struct.pack("<Q", len(entries)) + b"".join(
        struct.pack("<QII8s", *entry) for entry in entries
    )
    with VfioUserClient.connect(endpoint.path) as client:
        # QEMU sends these with No_reply, like posted writes.
        raw_exchange(
            client,
            m.encode_message(50, Command.REGION_WRITE_MULTI, payload, reply=False, no_reply=True),
            expect_reply=False,
        )
        assert client.read32(0, SCRATCH) == 0xFF030201


def test_unexpected_fds_are_refused_and_closed(endpoint: Endpoint) -> None:
    before = open_fds()
    with VfioUserClient.connect(endpoint.path) as client:
        with_client = open_fds()
        for msg_id, command, payload in [
            (3, Command.REGION_READ, m.RegionAccess(0, 0, 4).pack()),
            (4, Command.DEVICE_GET_INFO, m.DeviceInfoRequest(16).pack()),
            (5, Command.DEVICE_RESET, b""),
            (6, 99, b""),
        ]:
            fds = eventfds(5)
            header = raw_exchange(
                client, m.encode_message(msg_id, command, payload, reply=False), fds
            )
            assert header is not None and header.is_error and header.msg_id == msg_id
            assert header.error == (errno.ENOTSUP if command == 99 else errno.EINVAL)
            close_all(fds)
            assert open_fds() == with_client, f"the server closed the fds ({command})"
        # fds on a no-reply message and on a reply from the client: closed as well.
        fds = eventfds(3)
        raw_exchange(
            client,
            m.encode_message(7, Command.REGION_READ, b"", reply=False, no_reply=True),
            fds,
            expect_reply=False,
        )
        raw_exchange(
            client, m.encode_message(8, Command.DMA_READ, b"", reply=True), fds, expect_reply=False
        )
        close_all(fds)
        assert client.read32(0, 0) == abi.ID_VALUE
        assert open_fds() == with_client
        # More eventfds than the index has vectors: refused, closed.
        many = eventfds(20)
        header = raw_exchange(
            client,
            m.encode_message(
                9, Command.DEVICE_SET_IRQS, m.SetIrqs(0x24, 2, 0, 20).pack(), reply=False
            ),
            many,
        )
        assert header is not None and header.is_error
        close_all(many)
        assert open_fds() == with_client
    wait_served(endpoint, 1)
    assert open_fds() == before


def test_more_fds_than_one_read_can_carry_disconnects_without_a_leak(endpoint: Endpoint) -> None:
    before = open_fds()
    with VfioUserClient.connect(endpoint.path) as client:
        fds = eventfds(70)
        client.send_raw(
            m.encode_message(
                3, Command.DEVICE_SET_IRQS, m.SetIrqs(0x24, 2, 0, 70).pack(), reply=False
            ),
            fds,
        )
        close_all(fds)
        assert_hung_up(client)
    wait_served(endpoint, 1)
    assert open_fds() == before
    works(endpoint)


@pytest.mark.parametrize("size", [0, 8, 15, (2 << 20) + 1, 4 << 20, 0xFFFFFFFF])
def test_broken_framing_disconnects_that_client_only(endpoint: Endpoint, size: int) -> None:
    before = open_fds()
    with VfioUserClient.connect(endpoint.path) as client:
        client.write32(0, SCRATCH, 0x600D)
        client.send_raw(struct.pack("<HHIII", 1, Command.REGION_READ, size, 0, 0) + bytes(16))
        assert_hung_up(client)
    wait_served(endpoint, 1)
    with VfioUserClient.connect(endpoint.path) as client:
        assert client.read32(0, 0) == abi.ID_VALUE
        assert client.read32(0, SCRATCH) == 0x600D, "the device state survives"
    wait_served(endpoint, 2)
    assert open_fds() == before


def test_a_large_message_split_over_many_reads_is_served(endpoint: Endpoint) -> None:
    data = bytes(range(256)) * 4096  # 1 MiB: the most one message may carry
    with VfioUserClient.connect(endpoint.path) as client:
        message = m.encode_message(
            1, Command.REGION_WRITE, m.RegionAccess(0, 2, len(data), data).pack(), reply=False
        )
        for start in range(0, len(message), 100_003):
            client.send_raw(message[start : start + 100_003])
        header = client.receive().header
        assert header.msg_id == 1 and not header.is_error
        assert client.region_read(2, 0, len(data)) == data


def test_broken_framing_right_after_a_message_with_fds_leaks_nothing(endpoint: Endpoint) -> None:
    before = open_fds()
    message = m.encode_message(1, Command.REGION_READ, m.RegionAccess(0, 0, 4).pack(), reply=False)
    with VfioUserClient.connect(endpoint.path) as client:
        fds = eventfds(3)
        client.send_raw(message[:10], fds)  # the message starts, with fds
        close_all(fds)
        wait_until(
            lambda: endpoint.connection is not None and endpoint.connection.decoder.buffered == 10,
            5.0,
            "the server to read it",
        )
        # Its end and a broken header arrive together, in one read.
        client.send_raw(message[10:] + struct.pack("<HHIII", 2, 9, 4, 0, 0))
        assert_hung_up(client)
    wait_served(endpoint, 1)
    assert open_fds() == before


def test_client_vanishing_mid_message_leaves_nothing_but_device_state(
    endpoint: Endpoint, ram: int
) -> None:
    device = device_of(endpoint)
    before = open_fds()
    with VfioUserClient.connect(endpoint.path) as client:
        session = endpoint.session
        assert session is not None
        client.write32(0, SCRATCH, 0xABCD)
        client.dma_map(0x100000, 1 << 20, fd=ram)
        client.dma_map(0x400000, 4096)
        fds = eventfds(8)
        client.set_irq_eventfds(PciIrq.MSIX, fds)
        close_all(fds)
        assert len(session.dma) == 2 and session.irqs.assigned(PciIrq.MSIX) == list(range(8))
        pending = eventfds(2)
        client.send_raw(
            m.encode_message(
                1, Command.DEVICE_SET_IRQS, m.SetIrqs(0x24, 2, 0, 2).pack(), reply=False
            )[:20],
            pending,
        )  # the message never completes
        close_all(pending)
    wait_served(endpoint, 1)
    assert endpoint.session is None
    assert len(session.dma) == 0, "the DMA table is emptied"
    assert session.irqs.assigned(PciIrq.MSIX) == [], "eventfds are dropped"
    assert device.interrupts.lines is None and device.dma is None
    assert open_fds() == before, "eventfds and fds of the unfinished message are closed"
    assert "unit-guest-ram" not in Path("/proc/self/maps").read_text(), "guest RAM unmapped"
    with VfioUserClient.connect(endpoint.path) as client:
        assert client.read32(0, SCRATCH) == 0xABCD, "device state is kept"
        new_session = endpoint.session
        assert new_session is not None and len(new_session.dma) == 0
        assert new_session.irqs.assigned(PciIrq.MSIX) == []


def test_the_next_client_after_a_hang_up_gets_a_fresh_session(endpoint: Endpoint) -> None:
    with VfioUserClient.connect(endpoint.path) as client:
        client.read32(0, 0)
    wait_served(endpoint, 1)
    with VfioUserClient.connect(endpoint.path, negotiate=False) as client:
        with pytest.raises(VfioUserError):
            client.device_info()  # VERSION again first: nothing carried over
        client.version()
        assert client.device_info().num_regions == 9


def test_a_second_client_waits_until_the_first_leaves(endpoint: Endpoint) -> None:
    first = VfioUserClient.connect(endpoint.path)
    second = VfioUserClient.connect(endpoint.path, negotiate=False, timeout=5)
    try:
        second.send_raw(
            m.encode_message(1, Command.VERSION, m.Version(0, 0, {}).pack(), reply=False)
        )
        assert first.read32(0, 0) == abi.ID_VALUE
        first.close()
        header = second.receive().header  # answered once the first is gone
        assert header.msg_id == 1 and not header.is_error
        assert second.read32(0, 0) == abi.ID_VALUE
    finally:
        first.close()
        second.close()


def test_stop_disconnects_a_connected_client_and_removes_the_socket(short_tmp: Path) -> None:
    workdir = short_tmp
    device = GpuInstance("s", aperture_size=1 << 20)
    server = Endpoint(workdir / "gpu.sock", device, "s")
    try:
        server.start()
        with VfioUserClient.connect(server.path) as client:
            assert client.read32(0, 0) == abi.ID_VALUE
            server.stop()
            assert_hung_up(client)
        assert not (workdir / "gpu.sock").exists()
        sock = socket.socket(socket.AF_UNIX)
        with pytest.raises(OSError):
            sock.connect(str(workdir / "gpu.sock"))
        sock.close()
    finally:
        server.stop()
        device.close()
        workdir.rmdir()  # fails if stop() left anything behind


# ---------------------------------------------------------------------- fuzzing

VALID_PAYLOADS: dict[int, bytes] = {
    Command.VERSION: m.Version(0, 0, {"max_msg_fds": 8}).pack(),
    Command.DMA_MAP: m.DmaMap(32, 3, 0, 0x100000, 4096).pack(),
    Command.DMA_UNMAP: m.DmaUnmap(24, 0, 0x100000, 4096).pack(),
    Command.DEVICE_GET_INFO: m.DeviceInfoRequest(16).pack(),
    Command.DEVICE_GET_REGION_INFO: m.RegionInfoRequest(32, 2).pack(),
    Command.DEVICE_GET_IRQ_INFO: m.IrqInfoRequest(16, 2).pack(),
    Command.DEVICE_SET_IRQS: m.SetIrqs(0x24, 2, 0, 2).pack(),
    Command.REGION_READ: m.RegionAccess(0, 0, 4).pack(),
    Command.REGION_WRITE: m.RegionAccess(0x40, 0, 4, b"\0\0\0\0").pack(),
    Command.REGION_WRITE_MULTI: struct.pack("<QQII8s", 1, 0x40, 0, 4, b"\0" * 8),
    Command.DEVICE_RESET: b"",
}

fuzz_payloads = st.one_of(
    st.binary(max_size=80),
    st.tuples(
        st.sampled_from(sorted(VALID_PAYLOADS.values())), st.integers(0, 80), st.binary(max_size=8)
    ).map(lambda t: t[0][: t[1]] + t[2]),
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    command=st.sampled_from([*range(0, 20), 99, 65535]),
    flags=st.sampled_from([0, 0x10, 0x1, 0x20, 0x11, 0x2, 0xF]) | st.integers(0, 2**32 - 1),
    payload=fuzz_payloads,
    fd_count=st.integers(0, 3),
)
def test_fuzz_well_framed_messages_get_an_answer_or_silence_and_stay_in_sync(
    endpoint: Endpoint, command: int, flags: int, payload: bytes, fd_count: int
) -> None:
    """Any well framed message: a reply with its id (unless it is a reply or No_reply),
    then the next request is answered correctly, and no fd outlives the session."""
    before = settled_fds()  # earlier tests' garbage closed first (a full run once saw it)
    served = endpoint.clients_served
    with VfioUserClient.connect(endpoint.path) as client:
        fds = eventfds(fd_count)
        header = m.Header(0x4242, command, 16 + len(payload), flags, 0)
        client.send_raw(header.pack() + payload, fds)
        close_all(fds)
        if not header.is_reply and not header.no_reply:
            answer = client.receive().header
            assert (answer.msg_id, answer.command) == (0x4242, command)
            assert answer.is_reply
            assert answer.size == 16 or not answer.is_error
        assert client.read32(0, 0) == abi.ID_VALUE
    wait_served(endpoint, served + 1)
    # A leak is an fd more than before; fewer is another test's garbage going meanwhile.
    assert settled_fds() <= before


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.binary(min_size=1, max_size=300), negotiate=st.booleans())
def test_fuzz_random_bytes_never_crash_or_leak(
    endpoint: Endpoint, data: bytes, negotiate: bool
) -> None:
    """Random bytes: errno replies or a hang-up, never a crash; after each example a new
    client is served correctly and no fd is left over."""
    before = settled_fds()
    served = endpoint.clients_served
    with VfioUserClient.connect(endpoint.path, negotiate=negotiate) as fuzzer:
        fuzzer.send_raw(data)
        fuzzer.connection.sock.settimeout(0.02)
        try:  # whatever the server answers, if anything
            while fuzzer.connection.sock.recv(1 << 16):
                pass
        except (TimeoutError, ConnectionError):
            pass
    wait_served(endpoint, served + 1)
    works(endpoint)
    wait_served(endpoint, served + 2)
    assert open_fds() == before


def test_two_devices_one_hammered_the_other_keeps_answering(serve_instance: ServeInstance) -> None:
    victim = serve_instance(name="victim")
    bystander = serve_instance(name="bystander")
    stop = threading.Event()
    failures: list[BaseException] = []
    garbage = [
        struct.pack("<HHIII", 1, 9, 4, 0, 0),  # size < 16
        struct.pack("<HHIII", 1, 9, 64 << 20, 0, 0),  # too big
        m.encode_message(2, 99, b"x" * 100, reply=False),
        m.encode_message(3, Command.REGION_READ, b"short", reply=False),
        m.encode_message(4, Command.DMA_MAP, bytes(32), reply=False),
        m.encode_message(5, Command.DEVICE_SET_IRQS, bytes(20), reply=False, no_reply=True),
        bytes(range(256)),
        m.encode_message(6, Command.REGION_WRITE, b"", reply=False)[:10],  # cut short
    ]

    def hammer() -> None:
        rounds = 0
        try:
            while not stop.is_set() or rounds < 20:
                with VfioUserClient.connect(victim.path, negotiate=rounds % 2 == 0) as client:
                    for n in (rounds, rounds * 3 + 1):
                        try:
                            client.send_raw(garbage[n % len(garbage)])
                        except ConnectionError:  # it hung up on the first: fine
                            break
                rounds += 1
        except BaseException as exc:  # reported by the main thread
            failures.append(exc)

    thread = threading.Thread(target=hammer)
    thread.start()
    try:
        with VfioUserClient.connect(bystander.path) as client:
            for value in range(300):
                client.write32(0, SCRATCH, value)
                assert client.read32(0, SCRATCH) == value
                assert client.read32(0, 0) == abi.ID_VALUE
    finally:
        stop.set()
        thread.join(30)
    assert not thread.is_alive() and failures == []
    assert victim.clients_served >= 20
    works(victim)
    works(bystander)


def test_message_dma_honours_the_clients_max_data_xfer_size(endpoint: Endpoint) -> None:
    from device.vfio_user.client import BytearrayMemory

    memory = BytearrayMemory(0x100000, 1 << 20)
    memory.write(0x100000, bytes(range(256)) * 40)
    with VfioUserClient.connect(endpoint.path, negotiate=False) as client:
        client.version({"max_msg_fds": 8, "max_data_xfer_size": 4096})
        client.guest_memory = memory
        client.dma_map(0x100000, 1 << 20)
        reg = {
            name: regs.BY_NAME[name].offset
            for name in ("DMA_GUEST_ADDR_LO", "DMA_LENGTH", "DMA_CONTROL", "DMA_STATUS")
        }
        client.write32(0, reg["DMA_GUEST_ADDR_LO"], 0x100000)
        client.write32(0, reg["DMA_LENGTH"], 10240)
        client.write32(0, reg["DMA_CONTROL"], abi.DmaCommand.TO_APERTURE)
        wait_until(  # no sleep: reading the status is what lets the client answer DMA
            lambda: client.read32(0, reg["DMA_STATUS"]) != abi.DmaStatus.BUSY,
            10,
            "the DMA to finish",
            interval=0,
        )
        assert client.server_requests_served == 3, "10 KiB in 4 KiB DMA_READs"
        assert bytes(device_of(endpoint).aperture[:10240]) == bytes(range(256)) * 40
        with pytest.raises(VfioUserError):
            client.region_read(2, 0, 8192)  # more than the negotiated 4096


class FlakyListener:
    """A listening socket whose first accept() fails as when the process is out of fds."""

    def __init__(self, real: socket.socket) -> None:
        self.real = real
        self.failures = 1

    def accept(self) -> tuple[socket.socket, object]:
        if self.failures:
            self.failures -= 1
            raise OSError(errno.EMFILE, "Too many open files")
        return self.real.accept()

    def shutdown(self, how: int) -> None:
        self.real.shutdown(how)

    def close(self) -> None:
        self.real.close()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_failed_accept_does_not_stop_the_endpoint(short_tmp: Path) -> None:
    workdir = short_tmp
    device = GpuInstance("flaky", aperture_size=1 << 20)
    server = Endpoint(workdir / "gpu.sock", device, "flaky")
    server.listener = FlakyListener(server.listener)  # type: ignore[assignment]
    try:
        server.start()
        with VfioUserClient.connect(server.path, timeout=1) as client:
            assert client.read32(0, 0) == abi.ID_VALUE
    finally:
        server.stop()
        device.close()
        workdir.rmdir()  # fails if stop() left the socket behind
