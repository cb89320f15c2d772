"""A real server (Endpoint + GpuInstance) on a unix socket, driven by the client
library with real SCM_RIGHTS fd passing: correct answers, and no crash, desync or fd
leak whatever a client sends."""

from __future__ import annotations

import errno
import mmap
import os
import socket
import struct
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from device.client import VfioUserClient
from device.gpu import registers as regs
from device.gpu.instance import GpuInstance
from device.protocol import messages as m
from device.protocol.constants import Command, IrqSetFlags, PciIrq, PciRegion
from device.protocol.errors import VfioUserError
from device.server import Endpoint

from .conftest import ServeInstance

APERTURE = 256 << 20


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def endpoint(serve_instance: ServeInstance) -> Endpoint:
    return serve_instance(aperture_size=APERTURE, name="srv")


def device_of(endpoint: Endpoint) -> GpuInstance:
    assert isinstance(endpoint.device, GpuInstance)
    return endpoint.device


def raw_exchange(client: VfioUserClient, data: bytes, fds: tuple[int, ...] = (),
                 expect_reply: bool = True) -> m.Header | None:
    client.send_raw(data, fds)
    if not expect_reply:
        return None
    return client.receive().header


def wait_served(endpoint: Endpoint, count: int) -> None:
    deadline = time.monotonic() + 5
    while endpoint.clients_served < count and time.monotonic() < deadline:
        time.sleep(0.01)
    assert endpoint.clients_served >= count


# ---------------------------------------------------------------------- answers


def test_version_reply_is_a_subset_and_never_longer_than_the_request(endpoint: Endpoint) -> None:
    with VfioUserClient.connect(endpoint.path, negotiate=False) as client:
        request = m.Version(0, 0, {"max_msg_fds": 16, "max_data_xfer_size": 1 << 20}).pack()
        reply = client.request(Command.VERSION, request)
        version = m.Version.unpack(reply.payload)
        assert (version.major, version.minor) == (0, 0)
        assert len(reply.payload) <= len(request)
        assert set(version.capabilities) <= {"max_msg_fds", "max_data_xfer_size"}
    with VfioUserClient.connect(endpoint.path, negotiate=False) as client:
        tiny = m.Version(0, 0, {"pgsizes": 4096}).pack()
        reply = client.request(Command.VERSION, tiny)
        assert len(reply.payload) <= len(tiny)


def test_commands_before_version_are_refused(endpoint: Endpoint) -> None:
    with VfioUserClient.connect(endpoint.path, negotiate=False) as client:
        with pytest.raises(VfioUserError) as exc:
            client.device_info()
        assert exc.value.errno == errno.EINVAL
        client.version()
        assert client.device_info().num_regions == 9
        with pytest.raises(VfioUserError):
            client.version()  # only once


def test_device_info_and_every_region(endpoint: Endpoint) -> None:
    with VfioUserClient.connect(endpoint.path) as client:
        info = client.device_info()
        assert (info.flags, info.num_regions, info.num_irqs) == (3, 9, 5)
        expected = {0: (64 * 1024, 3), 2: (APERTURE, 0xF), 4: (16 * 1024, 3), 7: (4096, 3)}
        for index in range(9):
            region, fd = client.region_info(index)
            size, flags = expected.get(index, (0, 0))
            assert (region.size, region.flags) == (size, flags), index
            assert (fd is not None) == (index == 2), index
            if index == 2:
                assert fd is not None
                assert region.sparse_areas == (m.SparseArea(0, APERTURE),)
                mapping = mmap.mmap(fd, region.size, mmap.MAP_SHARED, offset=region.offset)
                mapping[0x100:0x108] = b"aperture"
                assert bytes(device_of(endpoint).aperture[0x100:0x108]) == b"aperture"
                assert client.region_read(2, 0x100, 8) == b"aperture"
                mapping.close()
                os.close(fd)
        with pytest.raises(VfioUserError):
            client.region_info(9)
        irqs = [client.irq_info(i) for i in range(5)]
        assert [i.count for i in irqs] == [0, 0, 8, 1, 1]


def test_first_region_info_request_is_truncated_and_carries_no_fd(endpoint: Endpoint) -> None:
    with VfioUserClient.connect(endpoint.path) as client:
        reply = client.request(Command.DEVICE_GET_REGION_INFO, m.RegionInfoRequest(32, 2).pack())
        assert reply.fds == ()
        info, wanted = m.RegionInfo.unpack(reply.payload)
        assert len(reply.payload) == 32 and wanted == 64 and info.flags & 8


def read_config(client: VfioUserClient) -> bytes:
    return client.region_read(PciRegion.CONFIG, 0, 4096)


def test_whole_config_space(endpoint: Endpoint) -> None:
    with VfioUserClient.connect(endpoint.path) as client:
        config = read_config(client)
        vendor, device = struct.unpack_from("<HH", config, 0)
        assert (vendor, device) == (0x1234, 0x4D47)
        assert int.from_bytes(config[9:12], "little") == 0x030200
        assert struct.unpack_from("<H", config, 6)[0] & 0x10, "capability list bit"
        assert config[0x3D] == 0, "no INTx"
        chain, pointer = [], config[0x34]
        while pointer:
            chain.append((config[pointer], pointer))
            pointer = config[pointer + 1]
        assert [c for c, _ in chain] == [0x01, 0x11, 0x10]
        msix = dict(chain)[0x11]
        control, table, pba = struct.unpack_from("<HII", config, msix + 2)
        assert (control & 0x7FF) + 1 == 8 and table == 0x0004 and pba == 0x2004
        pcie = dict(chain)[0x10]
        caps = struct.unpack_from("<H", config, pcie + 2)[0]
        assert caps & 0xF == 2 and (caps >> 4) & 0xF == 0, "version 2 endpoint"
        assert struct.unpack_from("<I", config, pcie + 4)[0] & (1 << 28), "FLR"
        assert struct.unpack_from("<I", config, 0x100)[0] == 0, "no extended capabilities"
        assert struct.unpack_from("<I", config, 0x18)[0] == 0xC, "BAR2: 64-bit prefetchable"


def test_bar_sizing_and_read_only_bytes(endpoint: Endpoint) -> None:
    with VfioUserClient.connect(endpoint.path) as client:
        for offset in (0x10, 0x18, 0x1C, 0x20, 0x14):
            client.region_write(PciRegion.CONFIG, offset, b"\xff\xff\xff\xff")
        config = read_config(client)
        bar0, bar1, bar2, bar3, bar4 = struct.unpack_from("<5I", config, 0x10)
        assert bar0 == (~(64 * 1024 - 1)) & 0xFFFFFFFF
        assert bar1 == 0, "unused BAR stays 0"
        assert bar2 == ((~(APERTURE - 1)) & 0xFFFFFFFF) | 0xC
        assert bar3 == 0xFFFFFFFF
        assert bar4 == (~(16 * 1024 - 1)) & 0xFFFFFFFF
        before = read_config(client)[:4]
        client.region_write(PciRegion.CONFIG, 0, b"\0\0\0\0")
        assert read_config(client)[:4] == before, "IDs are read only"


def test_registers_and_access_widths(endpoint: Endpoint) -> None:
    scratch = regs.BY_NAME["SCRATCH"].offset
    with VfioUserClient.connect(endpoint.path) as client:
        assert client.read32(0, 0) == regs.ID_VALUE
        client.write32(0, scratch, 0x11223344)
        assert client.read32(0, scratch) == 0x11223344
        client.region_write(0, scratch + 1, b"\xaa")
        client.region_write(0, scratch + 2, b"\xbb\xcc")
        assert client.read32(0, scratch) == 0xCCBBAA44
        assert client.region_read(0, scratch + 1, 2) == b"\xaa\xbb"
        client.write32(0, 0, 0)  # ID is read only
        assert client.read32(0, 0) == regs.ID_VALUE
        with pytest.raises(VfioUserError) as exc:
            client.region_read(0, 64 * 1024 - 2, 4)
        assert exc.value.errno == errno.EINVAL


def test_reset_and_flr_clear_scratch(endpoint: Endpoint) -> None:
    scratch = regs.BY_NAME["SCRATCH"].offset
    with VfioUserClient.connect(endpoint.path) as client:
        client.write32(0, scratch, 5)
        client.reset()
        assert client.read32(0, scratch) == 0
        client.write32(0, scratch, 6)
        config = read_config(client)
        pointer = config[0x34]
        while config[pointer] != 0x10:
            pointer = config[pointer + 1]
        devctl = struct.unpack_from("<H", config, pointer + 8)[0]
        client.region_write(PciRegion.CONFIG, pointer + 8,
                            struct.pack("<H", devctl | 0x8000))
        assert client.read32(0, scratch) == 0
        assert not struct.unpack_from("<H", read_config(client), pointer + 8)[0] & 0x8000


def test_dma_map_unmap_rules(endpoint: Endpoint) -> None:
    ram = os.memfd_create("ram", os.MFD_CLOEXEC)
    os.ftruncate(ram, 1 << 20)
    with VfioUserClient.connect(endpoint.path) as client:
        client.dma_map(0x100000, 1 << 20, fd=ram)
        session = endpoint.session
        assert session is not None and len(session.dma) == 1
        with pytest.raises(VfioUserError) as exc:
            client.dma_map(0x180000, 1 << 20)
        assert exc.value.errno == errno.EEXIST
        with pytest.raises(VfioUserError) as exc:
            client.dma_unmap(0x100000, 4096)
        assert exc.value.errno == errno.ENOENT
        with pytest.raises(VfioUserError):
            client.dma_map(0x300001, 4096)  # not page aligned
        client.dma_map(0x400000, 4096)
        client.dma_unmap(0x100000, 1 << 20)
        assert len(session.dma) == 1
        client.dma_unmap(0, 0, flags=2)  # unmap all
        assert len(session.dma) == 0
    os.close(ram)


def test_irq_eventfds_assign_fire_deassign_disable(endpoint: Endpoint) -> None:
    device = device_of(endpoint)
    with VfioUserClient.connect(endpoint.path) as client:
        fds = tuple(os.eventfd(0, os.EFD_NONBLOCK) for _ in range(3))
        client.set_irq_eventfds(PciIrq.MSIX, fds)
        assert device.irqs is not None
        assert device.irqs.raise_irq(PciIrq.MSIX, 1)
        assert os.eventfd_read(fds[1]) == 1
        client.set_irqs(PciIrq.MSIX, 0x22, 0, 3, b"\x01\x00\x01")  # DATA_BOOL trigger
        assert os.eventfd_read(fds[0]) == 1 and os.eventfd_read(fds[2]) == 1
        client.set_irqs(PciIrq.MSIX, 0x24, 1, 1)  # eventfd, no fds: de-assign vector 1
        assert device.irqs.assigned(PciIrq.MSIX) == [0, 2]
        client.set_irqs(PciIrq.MSIX, 0x21, 0, 0)  # DATA_NONE, count 0: disable all
        assert device.irqs.assigned(PciIrq.MSIX) == []
        with pytest.raises(VfioUserError):
            client.set_irqs(PciIrq.MSIX, 0x24, 7, 2, fds=fds[:2])  # beyond 8 vectors
        for fd in fds:
            os.close(fd)


# ---------------------------------------------------------------------- robustness


@pytest.mark.parametrize("command", [0, 6, 14, 16, 17, 18, 99, 65535])
def test_unknown_or_refused_commands_get_an_errno(endpoint: Endpoint, command: int) -> None:
    with VfioUserClient.connect(endpoint.path) as client:
        header = raw_exchange(client, m.encode_message(77, command, b"junk", reply=False))
        assert header is not None
        assert header.msg_id == 77 and header.is_reply and header.is_error
        assert header.error in (errno.ENOTSUP, errno.EINVAL)
        assert client.read32(0, 0) == regs.ID_VALUE


@pytest.mark.parametrize("command,payload", [
    (Command.DMA_MAP, b"\x20\0\0\0"),
    (Command.DMA_UNMAP, bytes(23)),
    (Command.DEVICE_GET_INFO, b"\x04\0\0\0" + bytes(12)),
    (Command.DEVICE_GET_REGION_INFO, bytes(31)),
    (Command.DEVICE_GET_IRQ_INFO, bytes(15)),
    (Command.DEVICE_SET_IRQS, struct.pack("<IIIII", 99, 0x24, 2, 0, 1)),
    (Command.DEVICE_SET_IRQS, struct.pack("<IIIII", 20, 0x3F, 2, 0, 1)),
    (Command.REGION_READ, m.RegionAccess(0, 0, 4).pack() + b"x"),
    (Command.REGION_READ, m.RegionAccess(0, 0, 2 << 20).pack()),
    (Command.REGION_WRITE, m.RegionAccess(0, 0, 8, b"1234").pack()),
    (Command.REGION_READ, m.RegionAccess(0, 42, 4).pack()),
    (Command.DEVICE_RESET, b"x"),
])
def test_malformed_payloads_get_an_errno_and_the_session_goes_on(
    endpoint: Endpoint, command: int, payload: bytes
) -> None:
    with VfioUserClient.connect(endpoint.path) as client:
        header = raw_exchange(client, m.encode_message(5, command, payload, reply=False))
        assert header is not None and header.is_error and header.msg_id == 5
        assert client.read32(0, 0) == regs.ID_VALUE


def test_replies_from_the_client_and_no_reply_commands_get_no_answer(endpoint: Endpoint) -> None:
    with VfioUserClient.connect(endpoint.path) as client:
        raw_exchange(client, m.encode_message(9, Command.DMA_READ, b"", reply=True),
                     expect_reply=False)
        raw_exchange(client, m.encode_message(10, 99, b"bad", reply=False, no_reply=True),
                     expect_reply=False)
        write = m.RegionAccess(regs.BY_NAME["SCRATCH"].offset, 0, 4, b"\x01\0\0\0").pack()
        raw_exchange(client, m.encode_message(11, Command.REGION_WRITE, write, reply=False,
                                              no_reply=True), expect_reply=False)
        # The next answer is for the next request: the stream is in sync.
        assert client.read32(0, regs.BY_NAME["SCRATCH"].offset) == 1


def test_unexpected_fds_are_refused_and_closed(endpoint: Endpoint) -> None:
    before = open_fds()
    with VfioUserClient.connect(endpoint.path) as client:
        with_conn = open_fds()
        fds = tuple(os.eventfd(0) for _ in range(5))
        header = raw_exchange(client, m.encode_message(
            3, Command.REGION_READ, m.RegionAccess(0, 0, 4).pack(), reply=False), fds)
        assert header is not None and header.is_error
        for fd in fds:
            os.close(fd)
        assert open_fds() == with_conn, "the server closed the fds it received"
        # Too many fds in one message: refused too.
        many = tuple(os.eventfd(0) for _ in range(20))
        header = raw_exchange(client, m.encode_message(
            4, Command.DEVICE_SET_IRQS, m.SetIrqs(0x24, 2, 0, 20).pack(), reply=False), many)
        assert header is not None and header.is_error
        for fd in many:
            os.close(fd)
        assert open_fds() == with_conn
    wait_served(endpoint, 1)
    assert open_fds() == before


@pytest.mark.parametrize("size", [0, 8, 15, 4 << 20])
def test_broken_framing_disconnects_that_client_only(endpoint: Endpoint, size: int) -> None:
    before = open_fds()
    with VfioUserClient.connect(endpoint.path) as client:
        client.send_raw(struct.pack("<HHIII", 1, Command.REGION_READ, size, 0, 0) + bytes(16))
        client.connection.sock.settimeout(5)
        assert client.connection.sock.recv(100) == b"", "server should hang up"
    wait_served(endpoint, 1)
    with VfioUserClient.connect(endpoint.path) as client:
        assert client.read32(0, 0) == regs.ID_VALUE
    wait_served(endpoint, 2)
    assert open_fds() == before


def test_client_vanishing_mid_message_then_next_client_is_served(endpoint: Endpoint) -> None:
    device = device_of(endpoint)
    with VfioUserClient.connect(endpoint.path) as client:
        client.write32(0, regs.BY_NAME["SCRATCH"].offset, 0xABCD)
        client.set_irq_eventfds(PciIrq.MSIX, (os.eventfd(0),))
        client.send_raw(m.encode_message(1, Command.REGION_READ,
                                         m.RegionAccess(0, 0, 4).pack(), reply=False)[:20])
    wait_served(endpoint, 1)
    assert device.irqs is None and device.dma is None
    with VfioUserClient.connect(endpoint.path) as client:
        assert client.read32(0, regs.BY_NAME["SCRATCH"].offset) == 0xABCD


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(min_size=1, max_size=300))
def test_fuzz_never_crashes_leaks_or_blocks_the_other_device(endpoint: Endpoint,
                                                             data: bytes) -> None:
    """Random bytes, truncated or oversized messages: an errno reply or a hang-up,
    never a crash; no fd leaks; a second device keeps answering meanwhile."""
    other_dir = Path(tempfile.mkdtemp(prefix="mgpu-other-"))
    other_device = GpuInstance("other", aperture_size=1 << 20)
    with Endpoint(other_dir / "o.sock", other_device, "other") as other:
        before = open_fds()
        with VfioUserClient.connect(endpoint.path) as fuzzer, \
                VfioUserClient.connect(other.path) as bystander:
            fuzzer.connection.sock.settimeout(0.05)
            fuzzer.send_raw(data)
            try:  # whatever the server answers, if anything
                fuzzer.connection.sock.recv(1 << 16)
            except (TimeoutError, ConnectionError):
                pass
            assert bystander.read32(0, 0) == regs.ID_VALUE
        served = endpoint.clients_served
        deadline = time.monotonic() + 5
        while endpoint.session is not None and time.monotonic() < deadline:
            time.sleep(0.005)
        assert endpoint.clients_served >= served
        with VfioUserClient.connect(endpoint.path) as client:
            assert client.read32(0, 0) == regs.ID_VALUE
        deadline = time.monotonic() + 5
        while endpoint.session is not None and time.monotonic() < deadline:
            time.sleep(0.005)
        while other.session is not None and time.monotonic() < deadline:
            time.sleep(0.005)
        assert open_fds() == before
    other_device.close()
    other_dir.rmdir()


def test_connection_refused_after_stop_and_socket_removed() -> None:
    workdir = Path(tempfile.mkdtemp(prefix="mgpu-srv-"))
    device = GpuInstance("s", aperture_size=1 << 20)
    server = Endpoint(workdir / "gpu.sock", device, "s")
    server.start()
    server.stop()
    device.close()
    assert not (workdir / "gpu.sock").exists()
    sock = socket.socket(socket.AF_UNIX)
    with pytest.raises(OSError):
        sock.connect(str(workdir / "gpu.sock"))
    sock.close()
    workdir.rmdir()


def test_mask_unmask_keeps_an_interrupt_pending_and_err_req_take_eventfds(
    endpoint: Endpoint
) -> None:
    device = device_of(endpoint)
    with VfioUserClient.connect(endpoint.path) as client:
        vector = os.eventfd(0, os.EFD_NONBLOCK)
        client.set_irq_eventfds(PciIrq.MSIX, (vector,))
        client.set_irqs(PciIrq.MSIX, IrqSetFlags.DATA_NONE | IrqSetFlags.ACTION_MASK, 0, 1)
        assert device.irqs is not None
        assert not device.irqs.raise_irq(PciIrq.MSIX, 0)
        with pytest.raises(BlockingIOError):
            os.eventfd_read(vector)
        client.set_irqs(PciIrq.MSIX, IrqSetFlags.DATA_NONE | IrqSetFlags.ACTION_UNMASK, 0, 1)
        assert os.eventfd_read(vector) == 1, "the pending interrupt fires on unmask"
        err, req = os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(0, os.EFD_NONBLOCK)
        client.set_irq_eventfds(PciIrq.ERR, (err,))
        client.set_irq_eventfds(PciIrq.REQ, (req,))
        assert device.irqs.raise_irq(PciIrq.ERR) and os.eventfd_read(err) == 1
        with pytest.raises(VfioUserError):
            client.set_irq_eventfds(PciIrq.INTX, (os.eventfd(0),))  # no INTx line
        for fd in (vector, err, req):
            os.close(fd)


def test_region_write_multi_is_applied_in_order(endpoint: Endpoint) -> None:
    scratch = regs.BY_NAME["SCRATCH"].offset
    entries = [(scratch, 0, 4, b"\x01\x02\x03\x04"), (scratch + 3, 0, 1, b"\xff")]
    payload = struct.pack("<Q", len(entries)) + b"".join(
        struct.pack("<QII8s", *entry) for entry in entries)
    with VfioUserClient.connect(endpoint.path) as client:
        # QEMU sends these with No_reply, like posted writes.
        raw_exchange(client, m.encode_message(50, Command.REGION_WRITE_MULTI, payload,
                                              reply=False, no_reply=True), expect_reply=False)
        assert client.read32(0, scratch) == 0xFF030201


def test_message_dma_honours_the_clients_max_data_xfer_size(endpoint: Endpoint) -> None:
    from device.client import BytearrayMemory

    memory = BytearrayMemory(0x100000, 1 << 20)
    memory.write(0x100000, bytes(range(256)) * 40)
    with VfioUserClient.connect(endpoint.path, negotiate=False) as client:
        client.version({"max_msg_fds": 8, "max_data_xfer_size": 4096})
        client.guest_memory = memory
        client.dma_map(0x100000, 1 << 20)
        reg = {name: regs.BY_NAME[name].offset for name in
               ("DMA_GUEST_ADDR_LO", "DMA_LENGTH", "DMA_CONTROL", "DMA_STATUS")}
        client.write32(0, reg["DMA_GUEST_ADDR_LO"], 0x100000)
        client.write32(0, reg["DMA_LENGTH"], 10240)
        client.write32(0, reg["DMA_CONTROL"], regs.DmaCommand.TO_APERTURE)
        while client.read32(0, reg["DMA_STATUS"]) == regs.DmaStatus.BUSY:
            pass
        assert client.server_requests_served == 3, "10 KiB in 4 KiB DMA_READs"
        assert bytes(device_of(endpoint).aperture[:10240]) == bytes(range(256)) * 40
        with pytest.raises(VfioUserError):
            client.region_read(2, 0, 8192)  # more than the negotiated 4096
