"""The trapped-access fast path answers exactly as the general dispatcher would.

A real server (Endpoint, whose socket thread runs the fast path) and a reference
session on an identical device (``Session.handle``: the general path) are sent the
same messages; every reply must be the same bytes, No_reply messages must get none,
and the devices must end in the same state.  Other tests check that the fast path is
really taken for what it is meant for, and never for what it is not.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from device.gpu.instance.identity import VENDOR_ID
from device.gpu.instance.instance import GpuInstance
from device.gpu.regs import table as regs
from device.vfio_user import fast_path
from device.vfio_user.client import VfioUserClient
from device.vfio_user.protocol.codec import FrameDecoder
from device.vfio_user.protocol.constants import Command, HeaderFlags, PciRegion
from device.vfio_user.server import Endpoint
from device.vfio_user.session import Session
from device.vfio_user.transport import Connection, ConnectionClosed
from tests.helpers import wait_until
from tests.unit.conftest import ServeInstance

ACCESS = struct.Struct("<HHIIIQII")
SCRATCH = regs.BY_NAME["SCRATCH"].offset
APERTURE = 1 << 20


class Twins:
    """The served device (fast path) and a reference session on its twin."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.client = VfioUserClient.connect(endpoint.path)
        self.sock = self.client.connection.sock
        self.reference_device = GpuInstance("twin", aperture_size=APERTURE)
        self.reference = Session(self.reference_device, lambda data, fds: None)
        self.reference.negotiated = True
        self.decoder = FrameDecoder()
        self.next_id = 100

    def exchange(self, message: bytes) -> tuple[bytes | None, bytes | None]:
        """(our reply, the reference's reply) to one message; None: no reply."""
        self.sock.sendall(message)
        frames = self.decoder.feed(message)
        assert len(frames) == 1
        expected = self.reference.handle(frames[0])
        ours = self._replies(1)[0] if expected is not None else None
        # Then a REGION_READ of SCRATCH: its reply must come next, so a reply to a
        # No_reply message would show up instead.
        self.next_id += 1
        sync = ACCESS.pack(self.next_id, Command.REGION_READ, 32, 0, 0, SCRATCH, 0, 4)
        self.sock.sendall(sync)
        assert self._replies(1)[0][:2] == struct.pack("<H", self.next_id), "a reply too many"
        assert self.reference.handle(self.decoder.feed(sync)[0]) is not None
        return ours, None if expected is None else expected.data

    def _replies(self, count: int) -> list[bytes]:
        """Read ``count`` whole messages (and check that nothing more came)."""
        data = b""
        out: list[bytes] = []
        self.sock.settimeout(5.0)
        while len(out) < count:
            data += self.sock.recv(65536)
            while len(data) >= 16:
                size = struct.unpack_from("<I", data, 4)[0]
                if len(data) < size:
                    break
                out.append(data[:size])
                data = data[size:]
        assert not data
        return out

    def close(self) -> None:
        self.client.close()
        self.reference.close()
        self.reference_device.close()


@pytest.fixture(params=[0.0, 200.0], ids=["blocking", "polling"])
def twins(
    serve_instance: ServeInstance, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Twins]:
    monkeypatch.setattr(fast_path, "POLL_US", request.param)  # what serve --poll-us sets
    pair = Twins(serve_instance(aperture_size=APERTURE, name="fast"))
    yield pair
    pair.close()


def session_of(endpoint: Endpoint) -> Session:
    assert endpoint.session is not None
    return endpoint.session


def test_register_reads_and_writes_take_the_fast_path(twins: Twins) -> None:
    session = session_of(twins.endpoint)
    before = session.fast_answers
    twins.client.write32(PciRegion.BAR0, SCRATCH, 0x5A5AA5A5)
    assert twins.client.read32(PciRegion.BAR0, SCRATCH) == 0x5A5AA5A5
    assert session.fast_answers == before + 2
    # Config space accesses are the same messages: fast too.
    assert twins.client.read32(PciRegion.CONFIG, 0) & 0xFFFF == VENDOR_ID
    assert session.fast_answers == before + 3


@pytest.mark.parametrize(
    "message",
    [
        ACCESS.pack(1, Command.REGION_READ, 32, 0, 0, 0, 0, 16),  # wider than 8 bytes
        ACCESS.pack(2, Command.REGION_READ, 32, 0, 0, 0, 0, 0),  # count 0
        ACCESS.pack(3, Command.REGION_WRITE, 32, 0, 0, SCRATCH, 0, 4),  # data missing
        ACCESS.pack(4, Command.DEVICE_RESET, 32, 0, 0, 0, 0, 4),  # not a region access
        ACCESS.pack(5, Command.REGION_READ, 32, HeaderFlags.ERROR, 0, 0, 0, 4),
    ],
)
def test_anything_else_goes_to_the_general_path(twins: Twins, message: bytes) -> None:
    session = session_of(twins.endpoint)
    before = session.fast_answers
    ours, expected = twins.exchange(message)
    assert ours == expected
    assert session.fast_answers == before + 1  # only the sync read after it


def test_two_messages_in_one_read_go_to_the_general_path(twins: Twins) -> None:
    session = session_of(twins.endpoint)
    before = session.fast_answers
    two = [ACCESS.pack(n, Command.REGION_READ, 32, 0, 0, SCRATCH, 0, 4) for n in (6, 7)]
    twins.sock.sendall(two[0] + two[1])
    replies = twins._replies(2)
    assert [r[:2] for r in replies] == [b"\x06\x00", b"\x07\x00"]
    assert session.fast_answers == before


def test_before_version_the_general_path_refuses(serve_instance: ServeInstance) -> None:
    endpoint = serve_instance(aperture_size=APERTURE, name="early")
    with VfioUserClient.connect(endpoint.path, negotiate=False) as client:
        sock = client.connection.sock
        sock.sendall(ACCESS.pack(9, Command.REGION_READ, 32, 0, 0, 0, 0, 4))
        reply = sock.recv(4096)
        msg_id, _, size, flags, error = struct.unpack_from("<HHIII", reply)
        assert (msg_id, size, error) == (9, 16, 22)  # EINVAL: VERSION must come first
        assert flags & HeaderFlags.ERROR
        assert session_of(endpoint).fast_answers == 0


region = st.sampled_from([int(r) for r in PciRegion] + [3, 9, 99])
offset = st.one_of(
    st.sampled_from([0, SCRATCH, 4, 2, 0x1000, APERTURE - 4, APERTURE]), st.integers(0, 1 << 40)
)
count = st.sampled_from([1, 2, 4, 8, 3])
flags = st.sampled_from([0, int(HeaderFlags.NO_REPLY)])


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    write=st.booleans(), region=region, offset=offset, count=count, flags=flags,
    value=st.binary(min_size=8, max_size=8),
)  # fmt: skip
def test_replies_are_those_of_the_general_path(
    twins: Twins, write: bool, region: int, offset: int, count: int, flags: int, value: bytes
) -> None:
    twins.next_id += 1
    command = Command.REGION_WRITE if write else Command.REGION_READ
    data = value[:count] if write else b""
    message = (
        ACCESS.pack(twins.next_id, command, 32 + len(data), flags, 0, offset, region, count) + data
    )
    ours, expected = twins.exchange(message)
    assert ours == expected
    device = twins.endpoint.device
    assert isinstance(device, GpuInstance)
    assert device.registers.values == twins.reference_device.registers.values


def test_a_peer_that_closes_ends_the_session_quietly(twins: Twins) -> None:
    endpoint = twins.endpoint
    served = endpoint.clients_served
    twins.sock.sendall(ACCESS.pack(1, Command.REGION_READ, 32, 0, 0, SCRATCH, 0, 4))
    twins.sock.shutdown(socket.SHUT_RDWR)
    twins.client.close()
    wait_until(lambda: endpoint.clients_served > served, 5.0, "the session to end")


def test_polling_catches_a_quick_client_and_stops_for_a_slow_one() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    device = GpuInstance("poll", aperture_size=APERTURE)
    connection = Connection(ours)
    session = Session(device, lambda data, fds: None)
    session.negotiated = True
    fast = fast_path.FastPath(connection, session, threading.Lock(), poll_us=20_000)
    ended: list[BaseException] = []

    def serve() -> None:
        try:
            fast.receive()
        except ConnectionClosed as exc:  # the end of the test closes the socket
            ended.append(exc)

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        read = ACCESS.pack(1, Command.REGION_READ, 32, 0, 0, SCRATCH, 0, 4)
        for _ in range(50):  # quicker than the 20 ms budget: the reads are polled ones
            theirs.sendall(read)
            assert len(theirs.recv(64)) == 36
        assert fast.polled_hits > 25
        hits = fast.polled_hits
        for _ in range(3):  # slower than the budget: it goes back to sleeping in recv
            time.sleep(0.05)
            theirs.sendall(read)
            assert len(theirs.recv(64)) == 36
        assert fast.polled_hits <= hits + 1
        assert session.fast_answers == 53
    finally:
        theirs.close()
        thread.join(5)
        connection.close()
        session.close()
        device.close()
    assert not thread.is_alive() and ended
