"""A hostile client's DMA_MAP fds: which are mapped, what a mapping costs, when it goes.

Only sealed tmpfs memfds that cover their range are mmapped; any other fd (an
unsealed memfd the client can truncate, a regular file, the server's own aperture)
is closed and its range served by DMA_READ/DMA_WRITE messages.  A mapping keeps no
fd, the map limit advertised in VERSION is the one enforced, and a DMA_UNMAP while
an access holds the region defers the munmap.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from device.errors import VfioUserError
from device.gpu import abi
from device.gpu.instance.instance import GpuInstance
from device.gpu.modes import MappingMode
from device.gpu.regs import table as regs
from device.vfio_user.client import BytearrayMemory, VfioUserClient, create_guest_ram
from device.vfio_user.dma import MAX_DMA_MAPS_PER_SESSION, DmaTable
from device.vfio_user.protocol.constants import PciRegion
from device.vfio_user.protocol.messages import DmaMap, DmaUnmap
from device.vfio_user.server import Endpoint
from tests.helpers import run_copy
from tests.unit.conftest import ServeInstance

ROOT = Path(__file__).resolve().parents[2]
GUEST = 0x4000_0000
DONE, ERROR = int(abi.DmaStatus.DONE), int(abi.DmaStatus.ERROR)


def reg(name: str) -> int:
    return regs.BY_NAME[name].offset


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def mapped(name: str) -> bool:
    return name in Path("/proc/self/maps").read_text()


def unsealed_memfd(name: str, size: int) -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


def device_of(endpoint: Endpoint) -> GpuInstance:
    assert isinstance(endpoint.device, GpuInstance)
    return endpoint.device


# ---------------------------------------------------------------------- which fds are mapped

# Two instances in one server process, which the test process only talks to: when a
# client's memory kills that process (SIGBUS), the test sees it die instead of dying.
SERVER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from device.gpu.instance.instance import GpuInstance
    from device.vfio_user.server import Endpoint
    workdir = Path(sys.argv[1])
    for name in ("victim", "bystander"):
        device = GpuInstance(name, aperture_size=1 << 20)
        Endpoint(workdir / f"{name}.sock", device, name).start()
    print("ready", flush=True)
    time.sleep(120)
    """
)


def test_truncated_unsealed_memfd_cannot_kill_the_server(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    server = subprocess.Popen(
        [sys.executable, "-c", SERVER, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert server.stdout is not None
        assert server.stdout.readline().strip() == "ready"
        ram = unsealed_memfd("truncated-guest-ram", 1 << 20)
        memory = BytearrayMemory(GUEST, 1 << 20)
        memory.write(GUEST, b"from messages")
        with (
            VfioUserClient.connect(tmp_path / "victim.sock") as client,
            VfioUserClient.connect(tmp_path / "bystander.sock") as bystander,
        ):
            client.guest_memory = memory
            client.dma_map(GUEST, 1 << 20, fd=ram)
            os.ftruncate(ram, 0)  # every page of a mapping of it would now SIGBUS
            try:
                to_aperture = run_copy(client, abi.DmaCommand.TO_APERTURE, GUEST, 0, 13)
                from_aperture = run_copy(client, abi.DmaCommand.FROM_APERTURE, GUEST + 64, 0, 13)
            except (ConnectionError, OSError) as exc:
                server.wait(5)
                raise AssertionError(
                    f"the server died ({server.returncode}, SIGBUS is {-signal.SIGBUS})"
                ) from exc
            # The range was served by messages from the client's own memory.
            assert (to_aperture, from_aperture) == (DONE, DONE)
            assert memory.read(GUEST + 64, 13) == b"from messages"
            assert client.read32(PciRegion.BAR0, reg("ID")) == abi.ID_VALUE
            bystander.write32(PciRegion.BAR0, reg("SCRATCH"), 0x5AFE)
            assert bystander.read32(PciRegion.BAR0, reg("SCRATCH")) == 0x5AFE
        os.close(ram)
        assert server.poll() is None, "the server process survived"
    finally:
        server.kill()
        server.wait()
        if server.stdout is not None:
            server.stdout.close()


def test_sealed_memfd_is_mapped_and_used_directly(serve_instance: ServeInstance) -> None:
    endpoint = serve_instance(name="sealed")
    ram = create_guest_ram("sealed-guest-ram", 1 << 20)
    seals = fcntl.fcntl(ram, fcntl.F_GET_SEALS)
    assert seals & fcntl.F_SEAL_SHRINK and seals & fcntl.F_SEAL_GROW, "the client library seals"
    with VfioUserClient.connect(endpoint.path) as client:
        client.guest_memory = BytearrayMemory(GUEST, 1 << 20)  # would answer, if asked
        client.dma_map(GUEST, 1 << 20, fd=ram)
        session = endpoint.session
        assert session is not None
        (region,) = session.dma.regions
        assert region.mapping is not None and mapped("sealed-guest-ram")
        os.pwrite(ram, b"through the fd", 0x800)
        assert run_copy(client, abi.DmaCommand.TO_APERTURE, GUEST + 0x800, 0x40, 14) == DONE
        assert run_copy(client, abi.DmaCommand.FROM_APERTURE, GUEST + 0x900, 0x40, 14) == DONE
        assert client.server_requests_served == 0, "no DMA_READ/DMA_WRITE message"
        assert os.pread(ram, 14, 0x900) == b"through the fd"
    os.close(ram)
    deadline = time.monotonic() + 10
    while endpoint.clients_served == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not mapped("sealed-guest-ram"), "the disconnect unmapped it"


def test_regular_file_is_not_mapped_and_served_by_messages(
    serve_instance: ServeInstance, tmp_path: Path
) -> None:
    endpoint = serve_instance(name="file")
    path = tmp_path / "hostile-guest-ram"  # could as well be on a FUSE mount the client serves
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    os.ftruncate(fd, 1 << 20)
    memory = BytearrayMemory(GUEST, 1 << 20)
    memory.write(GUEST, b"by message")
    with VfioUserClient.connect(endpoint.path) as client:
        client.guest_memory = memory
        fds = open_fds()
        client.dma_map(GUEST, 1 << 20, fd=fd)
        assert open_fds() == fds, "the fd was closed"
        assert not mapped(str(path))
        session = endpoint.session
        assert session is not None
        assert [region.mapping for region in session.dma.regions] == [None]
        assert run_copy(client, abi.DmaCommand.TO_APERTURE, GUEST, 0, 10) == DONE
        assert client.server_requests_served == 1, "one DMA_READ message"
        assert bytes(device_of(endpoint).aperture[0:10]) == b"by message"
    os.close(fd)


def test_the_servers_own_aperture_fd_mapped_back_is_not_mapped(
    serve_instance: ServeInstance,
) -> None:
    # The fault-mode aperture is a FUSE file this process serves: touching it from
    # here with the GIL held would deadlock.  (A static aperture is the instance's own
    # sealed memfd: mapping that back is harmless, as a peer-to-peer DMA would be.)
    endpoint = serve_instance(name="loop", mapping=MappingMode.FAULT)
    with VfioUserClient.connect(endpoint.path) as client:
        _, fd = client.region_info(PciRegion.BAR2)
        assert fd is not None
        client.dma_map(GUEST, 1 << 20, fd=fd)
        os.close(fd)
        session = endpoint.session
        assert session is not None
        assert [region.mapping for region in session.dma.regions] == [None]


@pytest.mark.parametrize(
    ("seals", "size"),
    [
        (fcntl.F_SEAL_GROW, 1 << 20),  # sealed, but it can still shrink
        (fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW, 4096),  # too small for the range
        (0, 1 << 20),
    ],
)
def test_memfd_that_can_shrink_or_is_too_small_is_message_dma(
    seals: int, size: int, caplog: pytest.LogCaptureFixture
) -> None:
    fd = os.memfd_create("maybe-guest-ram", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    table = DmaTable()
    caplog.set_level(logging.INFO, logger="device.vfio_user.dma")
    region = table.map(DmaMap(32, 3, 0, GUEST, 1 << 20, fd))
    assert region.mapping is None
    with pytest.raises(OSError):
        os.fstat(fd)  # the table closed it
    assert "is not mapped" in caplog.text and "DMA_READ/DMA_WRITE messages" in caplog.text

    class Messages:
        def dma_read_messages(self, address: int, length: int) -> bytes:
            return bytes([0xAB]) * length

        def dma_write_messages(self, address: int, data: bytes) -> None:
            raise AssertionError("not written")

        def block_requests(self) -> None:
            pass

        def unblock_requests(self) -> None:
            pass

    table.message_dma = Messages()
    out = np.zeros(8, dtype=np.uint8)
    table.read_into(GUEST, out)
    assert out.tobytes() == b"\xab" * 8
    with pytest.raises(VfioUserError) as exc:
        table.view(GUEST, 8)
    assert exc.value.errno == errno.EFAULT
    table.clear()


# ---------------------------------------------------------------------- what a mapping costs


def test_fd_backed_maps_keep_no_fd_open(serve_instance: ServeInstance) -> None:
    endpoint = serve_instance(name="fds")
    count = 64
    ram = create_guest_ram("many-maps-ram", count * 4096)
    with VfioUserClient.connect(endpoint.path) as client:
        before = open_fds()
        for i in range(count):
            client.dma_map(GUEST + i * 0x10_0000, 4096, fd=ram, offset=i * 4096)
        assert open_fds() == before, "no fd per mapping"
        session = endpoint.session
        assert session is not None
        assert len(session.dma) == count
        assert all(region.mapping is not None for region in session.dma.regions)
        os.pwrite(ram, b"page 63", 63 * 4096)
        assert session.dma.read(GUEST + 63 * 0x10_0000, 7) == b"page 63"
    os.close(ram)


def test_advertised_map_limit_is_enforced_with_a_clear_error(
    serve_instance: ServeInstance, caplog: pytest.LogCaptureFixture
) -> None:
    endpoint = serve_instance(name="limit")
    caplog.set_level(logging.INFO, logger="device.vfio_user.session")
    with VfioUserClient.connect(endpoint.path) as client:
        limit = client.server_capabilities["max_dma_maps"]
        assert limit == MAX_DMA_MAPS_PER_SESSION
        assert isinstance(limit, int) and limit <= 1024, "many sessions fit vm.max_map_count"
        ram = create_guest_ram("limit-ram", 4096)
        for i in range(limit):
            # Half fd-backed: both kinds count against the one limit.
            client.dma_map(GUEST + i * 4096, 4096, fd=ram if i % 2 else None)
        with pytest.raises(VfioUserError) as exc:
            client.dma_map(GUEST + limit * 4096, 4096)
        assert exc.value.errno == errno.ENOSPC
        assert f"too many DMA mappings: {limit} of {limit}" in caplog.text
        with pytest.raises(VfioUserError) as exc:
            client.dma_map(GUEST + limit * 4096, 4096, fd=ram)
        assert exc.value.errno == errno.ENOSPC
        client.dma_unmap(GUEST, 4096)
        client.dma_map(GUEST + limit * 4096, 4096, fd=ram)  # room again
        os.close(ram)
        assert client.read32(PciRegion.BAR0, reg("ID")) == abi.ID_VALUE


# ---------------------------------------------------------------------- when a mapping goes


def test_unmap_while_an_access_holds_the_region_defers_the_munmap() -> None:
    ram = create_guest_ram("held-guest-ram", 1 << 20)
    os.pwrite(ram, b"still here", 0)
    table = DmaTable()
    table.map(DmaMap(32, 3, 0, GUEST, 1 << 20, os.dup(ram)))
    with table.hold(GUEST, 10) as region:
        assert region.mapping is not None
        table.unmap(DmaUnmap(24, 0, GUEST, 1 << 20))
        assert len(table) == 0
        with pytest.raises(VfioUserError) as exc:
            table.read(GUEST, 10)  # new accesses see it gone...
        assert exc.value.errno == errno.EFAULT
        assert mapped("held-guest-ram"), "...but the one in flight keeps its memory"
        assert region.mapping is not None
        assert ctypes.string_at(region.mapping, 10) == b"still here"
        with pytest.raises(VfioUserError), region.held():
            pass  # a closed region takes no new holders
        assert region.holders == 1
    assert region.mapping is None and not mapped("held-guest-ram")
    os.close(ram)


def test_a_view_keeps_its_memory_mapped_until_it_is_dropped() -> None:
    ram = create_guest_ram("viewed-guest-ram", 1 << 20)
    os.pwrite(ram, b"viewed", 0x100)
    table = DmaTable()
    table.map(DmaMap(32, 3, 0, GUEST, 1 << 20, os.dup(ram)))
    view = table.view(GUEST + 0x100, 6)
    part = view[2:]
    del view
    table.clear()
    assert mapped("viewed-guest-ram")
    assert part.tobytes() == b"ewed", "a view derived from it is safe to read"
    del part
    assert not mapped("viewed-guest-ram")
    os.close(ram)


# ---------------------------------------------------------------------- fds lost in transit

LOST_FDS = textwrap.dedent(
    """
    import os, resource, socket
    from device.errors import FramingError
    from device.vfio_user.transport import Connection
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    fds = [os.eventfd(0) for _ in range(8)]
    connection, peer = Connection(ours), Connection(theirs)
    peer.send(b"x" * 16, fds)
    open_now = len(os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (open_now + 2, resource.getrlimit(
        resource.RLIMIT_NOFILE)[1]))
    try:
        connection.receive()
    except FramingError as exc:
        print(exc)
    """
)


def test_fds_lost_to_the_fd_limit_are_reported_as_such() -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run(
        [sys.executable, "-c", LOST_FDS], capture_output=True, text=True, env=env, timeout=30
    )
    assert result.returncode == 0, result.stderr
    message = result.stdout
    assert "file descriptors were lost" in message, message
    assert "fd limit" in message and "fds open" in message and "RLIMIT_NOFILE" in message


def test_workers_copying_while_the_client_maps_and_unmaps_never_touch_freed_memory() -> None:
    ram = create_guest_ram("churned-guest-ram", 1 << 20)
    table = DmaTable()
    stop = threading.Event()
    unexpected: list[BaseException] = []

    def worker() -> None:
        out = np.zeros(1 << 20, dtype=np.uint8)
        while not stop.is_set():
            try:
                table.read_into(GUEST, out)
                table.write(GUEST, out[:65536].tobytes())
                int(table.view(GUEST, 4096).sum())
            except VfioUserError as exc:  # unmapped at that moment: the expected refusal
                assert exc.errno == errno.EFAULT
            except BaseException as exc:  # the test reports it
                unexpected.append(exc)
                return

    workers = [threading.Thread(target=worker) for _ in range(3)]
    for thread in workers:
        thread.start()
    deadline = time.monotonic() + 1
    while time.monotonic() < deadline:
        table.map(DmaMap(32, 3, 0, GUEST, 1 << 20, os.dup(ram)))
        table.unmap(DmaUnmap(24, 0, GUEST, 1 << 20))
    stop.set()
    for thread in workers:
        thread.join(10)
    os.close(ram)
    assert not unexpected, unexpected[0]
    assert not mapped("churned-guest-ram"), "the last holder's release unmapped it"
