"""Server-initiated DMA over the socket (DMA_READ/DMA_WRITE) for guest memory mapped
without an fd, driven through the bring-up DMA engine registers."""

from __future__ import annotations

import errno
import os
import select
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from device.errors import VfioUserError
from device.gpu import abi
from device.gpu.instance.instance import GpuInstance
from device.gpu.regs import table as regs
from device.vfio_user.client import BytearrayMemory, VfioUserClient, create_guest_ram
from device.vfio_user.protocol.constants import PciIrq, PciRegion
from device.vfio_user.server import Endpoint
from tests.helpers import run_copy

GUEST_BASE = 0x10_0000
GUEST_SIZE = 4 << 20
Served = tuple[GpuInstance, Endpoint, VfioUserClient, BytearrayMemory]


def reg(name: str) -> int:
    return regs.BY_NAME[name].offset


@pytest.fixture
def served(short_tmp: Path) -> Iterator[Served]:
    workdir = short_tmp
    device = GpuInstance("dma", aperture_size=8 << 20)
    endpoint = Endpoint(workdir / "gpu.sock", device, "dma")
    endpoint.start()
    memory = BytearrayMemory(GUEST_BASE, GUEST_SIZE)
    client = VfioUserClient.connect(endpoint.path, timeout=10)
    client.guest_memory = memory
    try:
        yield device, endpoint, client, memory
    finally:
        client.close()
        endpoint.stop()
        device.close()
        workdir.rmdir()  # fails if stop() left the socket behind


def test_copy_to_and_from_aperture_over_messages_larger_than_one_transfer(served: Served) -> None:
    device, _, client, memory = served
    client.dma_map(GUEST_BASE, GUEST_SIZE)  # no fd: only messages reach this memory
    vectors = tuple(os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(3))
    client.set_irq_eventfds(PciIrq.MSIX, vectors)
    eventfd = vectors[abi.INT_VECTORS[abi.IntBit.DMA]]
    length = (1 << 20) + 4096 + 3  # more than max_data_xfer_size: several DMA messages
    pattern = bytes((i * 7 + 1) & 0xFF for i in range(length))
    memory.write(GUEST_BASE, pattern)

    served_before = client.server_requests_served
    assert run_copy(client, abi.DmaCommand.TO_APERTURE, GUEST_BASE, 0x1000, length) == 2
    assert client.server_requests_served - served_before == 2  # two DMA_READs
    assert device.aperture[0x1000 : 0x1000 + length] == pattern
    assert select.select([eventfd], [], [], 5)[0], "completion interrupt not raised"
    assert os.eventfd_read(eventfd) == 1

    target = GUEST_BASE + (2 << 20)
    assert run_copy(client, abi.DmaCommand.FROM_APERTURE, target, 0x1000, length) == 2
    assert memory.read(target, length) == pattern
    assert client.read32(PciRegion.BAR0, reg("DMA_ERROR")) == 0
    assert client.read32(PciRegion.BAR0, reg("INT_STATUS")) & abi.IntBit.DMA
    for fd in vectors:
        os.close(fd)


def test_unmapped_or_out_of_range_dma_sets_error_status_and_keeps_serving(served: Served) -> None:
    device, _, client, memory = served
    client.dma_map(GUEST_BASE, GUEST_SIZE)
    # A guest address nobody mapped: EFAULT, no message sent.
    assert run_copy(client, abi.DmaCommand.TO_APERTURE, 0x9000_0000, 0, 4096) == 3
    assert client.read32(PciRegion.BAR0, reg("DMA_ERROR")) == errno.EFAULT
    # A range that runs past the end of the mapping.
    end = GUEST_BASE + GUEST_SIZE - 100
    assert run_copy(client, abi.DmaCommand.TO_APERTURE, end, 0, 4096) == 3
    # An aperture range past the BAR.
    assert run_copy(client, abi.DmaCommand.TO_APERTURE, GUEST_BASE, device.aperture_size, 16) == 3
    assert client.read32(PciRegion.BAR0, reg("DMA_ERROR")) == errno.EINVAL
    # The device still works afterwards.
    memory.write(GUEST_BASE, b"still alive")
    assert run_copy(client, abi.DmaCommand.TO_APERTURE, GUEST_BASE, 0, 11) == 2
    assert bytes(device.aperture[0:11]) == b"still alive"


def test_client_refusing_a_dma_read_becomes_a_device_error(served: Served) -> None:
    _, _, client, _ = served
    # The client maps more than its memory backs: its answer to DMA_READ is EFAULT.
    client.dma_map(GUEST_BASE + GUEST_SIZE, 1 << 20)
    assert run_copy(client, abi.DmaCommand.TO_APERTURE, GUEST_BASE + GUEST_SIZE, 0, 64) == 3
    assert client.read32(PciRegion.BAR0, reg("DMA_ERROR")) == errno.EFAULT


def test_fd_backed_memory_is_accessed_directly_without_messages(served: Served) -> None:
    device, _, client, _ = served
    ram = create_guest_ram("guest-ram", 1 << 20)  # sealed: the server maps it
    client.dma_map(0x4000_0000, 1 << 20, fd=ram)
    os.pwrite(ram, b"through the fd", 0x800)
    before = client.server_requests_served
    assert run_copy(client, abi.DmaCommand.TO_APERTURE, 0x4000_0800, 0x40, 14) == 2
    assert client.server_requests_served == before
    assert bytes(device.aperture[0x40:0x4E]) == b"through the fd"
    assert device.dma is not None
    view = device.dma.view(0x4000_0800, 14)
    assert view.tobytes() == b"through the fd"
    os.close(ram)


def test_disconnect_fails_waiting_dma_instead_of_hanging(served: Served) -> None:
    device, _, client, _ = served
    client.dma_map(GUEST_BASE, GUEST_SIZE)
    assert device.dma is not None
    dma = device.dma
    outcome: list[BaseException | bytes] = []

    def reader() -> None:
        try:
            outcome.append(dma.read(GUEST_BASE, 16))
        except BaseException as exc:  # the test inspects it
            outcome.append(exc)

    thread = threading.Thread(target=reader)
    thread.start()
    # The client never answers: it closes instead.
    client.connection.sock.close()
    thread.join(15)
    assert not thread.is_alive()
    assert isinstance(outcome[0], VfioUserError)
    assert outcome[0].errno == errno.ENOTCONN


def test_pending_dma_of_one_device_never_blocks_another_or_its_own_registers(
    short_tmp: Path,
) -> None:
    workdir = short_tmp
    devices = [GpuInstance(f"g{i}", aperture_size=1 << 20) for i in range(2)]
    endpoints = [Endpoint(workdir / f"g{i}.sock", d, f"g{i}") for i, d in enumerate(devices)]
    for endpoint in endpoints:
        endpoint.start()
    memory = BytearrayMemory(GUEST_BASE, 1 << 20)
    memory.write(GUEST_BASE, b"late answer")
    try:
        with (
            VfioUserClient.connect(endpoints[0].path) as slow,
            VfioUserClient.connect(endpoints[1].path) as other,
        ):
            slow.guest_memory = memory
            slow.dma_map(GUEST_BASE, 1 << 20)
            slow.write32(PciRegion.BAR0, reg("DMA_GUEST_ADDR_LO"), GUEST_BASE)
            slow.write32(PciRegion.BAR0, reg("DMA_LENGTH"), 11)
            # Start the copy without reading anything: its DMA_READ waits, unanswered.
            slow.write32(PciRegion.BAR0, reg("DMA_CONTROL"), abi.DmaCommand.TO_APERTURE)
            for i in range(200):
                other.write32(PciRegion.BAR0, reg("SCRATCH"), i)
                assert other.read32(PciRegion.BAR0, reg("SCRATCH")) == i
            assert devices[0].aperture[0:11] == bytes(11)  # still waiting for the answer
            # The slow device's own socket thread answers registers while its DMA waits.
            assert slow.read32(PciRegion.BAR0, reg("ID")) == abi.ID_VALUE
            assert run_copy(slow, abi.DmaCommand.TO_APERTURE, GUEST_BASE, 0, 11) == 2
            assert bytes(devices[0].aperture[0:11]) == b"late answer"
    finally:
        for endpoint in endpoints:
            endpoint.stop()
        for device in devices:
            device.close()
