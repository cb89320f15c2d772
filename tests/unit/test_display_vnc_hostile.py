"""Hostile VNC clients: each is dropped or contained, and other clients, other displays
and the server thread carry on."""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import time

import numpy as np
import pytest

from device.display.frame import PixelFormat
from device.display.registry import DisplayRegistry
from device.display.rfb import Encoding
from device.display.rfb import PixelFormat as RfbFormat
from device.display.screendump import capture
from device.display.source import Framebuffer, Scanout
from device.display.tiles import Rect
from tests.helpers import wait_until
from tests.unit.rfb_client import RfbClient
from tests.unit.test_display_vnc import ServeVnc, display, port_of, registry, serve_vnc

__all__ = ["registry", "serve_vnc"]  # fixtures


def assert_serves(port: int, fb: Framebuffer, within: float = 5.0) -> None:
    """A fresh client of ``port`` gets the whole picture of ``fb`` within ``within`` s."""
    started = time.monotonic()
    with RfbClient(port, timeout=within) as client:
        client.handshake()
        client.request()
        client.read_update()
        assert np.array_equal(client.screen, capture(fb))
    assert time.monotonic() - started < within


def test_bad_version_gets_a_reason_then_the_close(
    registry: DisplayRegistry, serve_vnc: ServeVnc
) -> None:
    display(registry, "a", 64, 64)
    other = display(registry, "b", 64, 64)
    server = serve_vnc()
    for line in (b"RFB 999.999\n", b"GET / HTTP/1.1\r\n", b"\x00" * 12):
        with RfbClient(port_of(server, "a")) as client:
            assert client.recv_exact(12) == b"RFB 003.008\n"
            client.sock.sendall(line)
            reply = client.read_to_end()
            assert reply[0] == 0  # no security types: failure, then the reason
            assert b"unsupported protocol version" in reply[5:]
    assert_serves(port_of(server, "b"), other)


def test_unoffered_security_type_is_refused(registry: DisplayRegistry, serve_vnc: ServeVnc) -> None:
    display(registry, "a", 64, 64)
    server = serve_vnc()
    with RfbClient(port_of(server, "a")) as client:
        client.recv_exact(12)
        client.sock.sendall(b"RFB 003.008\n")
        assert client.recv_exact(2) == b"\x01\x01"
        client.sock.sendall(b"\x02")  # VNC authentication: not offered
        reply = client.read_to_end()
        assert reply[:4] == b"\x00\x00\x00\x01" and b"was not offered" in reply


def test_huge_cut_text_streams_by_without_being_buffered(
    registry: DisplayRegistry, serve_vnc: ServeVnc
) -> None:
    fb = display(registry, "a", 64, 64)
    server = serve_vnc()
    port = port_of(server, "a")
    with RfbClient(port) as hostile:
        hostile.handshake()
        hostile.sock.sendall(struct.pack(">BxxxI", 6, 0xFFFFFFFF))  # 4 GiB of cut text
        chunk = b"x" * (1 << 20)
        for _ in range(16):
            hostile.sock.sendall(chunk)
            session = server.displays["a"].clients[0].session
            assert session._reader.buffered < 64
        assert_serves(port, fb)
    with RfbClient(port) as client:  # a cut text that ends is followed by what comes next
        client.handshake()
        client.sock.sendall(struct.pack(">BxxxI", 6, 3 << 20) + b"y" * (3 << 20))
        client.request()
        client.read_update()
        assert np.array_equal(client.screen, capture(fb))


def test_set_encodings_with_the_largest_count(
    registry: DisplayRegistry, serve_vnc: ServeVnc
) -> None:
    fb = display(registry, "a", 100, 80)
    server = serve_vnc()
    with RfbClient(port_of(server, "a")) as client:
        client.handshake()
        junk = list(range(1000, 1000 + 65534))
        client.set_encodings([*junk, Encoding.RAW])
        client.request()
        assert client.read_update() == [(Rect(0, 0, 100, 80), Encoding.RAW)]
        assert np.array_equal(client.screen, capture(fb))
        session = server.displays["a"].clients[0].session
        assert session._reader.buffered < 64


def test_a_client_that_never_reads_is_dropped_and_others_carry_on(
    registry: DisplayRegistry, serve_vnc: ServeVnc
) -> None:
    fb = display(registry, "a", 1024, 768)  # 3 MiB raw per update, random: no compression
    server = serve_vnc(stall_timeout=1.0)
    port = port_of(server, "a")
    hog = RfbClient(port)
    try:
        hog.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        hog.handshake()
        for _ in range(200):  # ask and ask, never read
            hog.request()
        wait_until(lambda: len(server.displays["a"].clients) == 1, 5, "the hog's session")
        hog_session = server.displays["a"].clients[0].session
        started = time.monotonic()
        while hog_session in [c.session for c in server.displays["a"].clients]:
            assert len(hog_session.out) <= 1024 * 768 * 4 + 64  # one update at most
            assert_serves(port, fb, within=3.0)
            assert time.monotonic() - started < 10, "the hog was never dropped"
    finally:
        hog.close()


def test_a_connection_flood_is_bounded_per_display(
    registry: DisplayRegistry, serve_vnc: ServeVnc
) -> None:
    display(registry, "a", 64, 64)
    other = display(registry, "b", 64, 64)
    server = serve_vnc(max_clients=4, handshake_timeout=30)
    port = port_of(server, "a")
    fds_before = len(os.listdir("/proc/self/fd"))
    flood: list[socket.socket] = []
    try:
        for _ in range(2000):
            flood.append(socket.create_connection(("127.0.0.1", port)))
        assert_serves(port_of(server, "b"), other)
        wait_until(lambda: len(server.displays["a"].clients) == 4, 5, "4 clients of a")
        # The server holds 4 of the flood's connections; the rest it closed.
        wait_until(
            lambda: len(os.listdir("/proc/self/fd")) <= fds_before + 2000 + 4 + 8,
            10, "the refused connections closed on the server's side",
        )  # fmt: skip
    finally:
        for sock in flood:
            sock.close()
    wait_until(lambda: not server.displays["a"].clients, 5, "the flood's sessions gone")
    assert_serves(port, server.displays["a"].screen.source)  # type: ignore[arg-type]


def test_silent_client_is_dropped_after_the_handshake_timeout(
    registry: DisplayRegistry, serve_vnc: ServeVnc
) -> None:
    display(registry, "a", 64, 64)
    server = serve_vnc(handshake_timeout=0.5)
    with RfbClient(port_of(server, "a")) as client:
        started = time.monotonic()
        assert client.read_to_end() == b"RFB 003.008\n"
        assert time.monotonic() - started < 5


@pytest.mark.parametrize(
    "message",
    [
        b"\x09junk",  # an unknown message type
        b"\x00\x00\x00\x00" + RfbFormat(32, 24, False, False).pack(),  # a colour map
        b"\x00\x00\x00\x00" + RfbFormat(24, 24).pack(),  # 24 bpp
        b"\x00\x00\x00\x00" + RfbFormat(16, 16, red_shift=12).pack(),  # red past 16 bits
    ],
)
def test_protocol_errors_drop_that_client_only(
    registry: DisplayRegistry, serve_vnc: ServeVnc, message: bytes
) -> None:
    fb = display(registry, "a", 64, 64)
    server = serve_vnc()
    port = port_of(server, "a")
    with RfbClient(port) as bystander, RfbClient(port) as client:
        bystander.handshake()
        client.handshake()
        client.sock.sendall(message)
        assert client.read_to_end() == b""
        bystander.request()
        bystander.read_update()
        assert np.array_equal(bystander.screen, capture(fb))


def test_input_is_ignored(registry: DisplayRegistry, serve_vnc: ServeVnc) -> None:
    fb = display(registry, "a", 64, 64)
    server = serve_vnc()
    with RfbClient(port_of(server, "a")) as client:
        client.handshake()
        serial = fb.serial
        client.sock.sendall(struct.pack(">BBxxI", 4, 1, 0x61) + struct.pack(">BBHH", 5, 1, 10, 10))
        client.request()
        client.read_update()
        assert np.array_equal(client.screen, capture(fb)) and fb.serial == serial


class BrokenSource:
    """A display whose scanout fails (a device bug): its viewers see black."""

    name = "broken"
    serial = 1

    def scanout(self) -> Scanout | None:
        raise RuntimeError("scanout exploded")


def test_a_broken_display_shows_black_and_others_carry_on(
    registry: DisplayRegistry, serve_vnc: ServeVnc
) -> None:
    registry.add(BrokenSource())
    fb = display(registry, "good", 64, 64, PixelFormat.RGB565)
    server = serve_vnc()
    with RfbClient(port_of(server, "broken")) as client:
        client.handshake()
        client.request()
        client.read_update()
        assert client.screen.max() == 0
    assert_serves(port_of(server, "good"), fb)


def test_displays_come_and_go_with_their_ports(
    registry: DisplayRegistry, serve_vnc: ServeVnc
) -> None:
    server = serve_vnc()
    fb = display(registry, "late", 64, 64)
    port = port_of(server, "late")
    assert registry.addresses("late") == {"vnc": f"127.0.0.1:{port}"}
    with RfbClient(port) as client:
        client.handshake()
        registry.remove("late")
        assert client.read_to_end() == b""
    wait_until(lambda: server.port_of("late") is None, 5, "the display forgotten")

    def refused() -> bool:
        with contextlib.closing(socket.socket()) as probe:
            return probe.connect_ex(("127.0.0.1", port)) != 0

    wait_until(refused, 5, "the port closed")
    assert registry.addresses("late") == {}
    del fb
