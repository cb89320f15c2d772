"""The VNC server with a real client (vncdotool) and a raw RFB client for the corners.

Frames come from ``Framebuffer``s this test draws into: the real objects the server
reads (the device's display engine will be another ``FrameSource``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import numpy as np
import pytest
from vncdotool import api
from vncdotool import rfb as vnc_rfb
from vncdotool.client import VNCDoToolClient, VNCDoToolFactory

from device.display.frame import Cursor, PixelFormat
from device.display.registry import DisplayRegistry
from device.display.rfb import Encoding
from device.display.rfb import PixelFormat as RfbFormat
from device.display.screendump import capture
from device.display.source import Framebuffer
from device.display.tiles import TILE, Rect
from device.display.vnc import VncLimits, VncServer
from tests.helpers import wait_until
from tests.unit.rfb_client import RfbClient

RGB = np.ndarray[Any, np.dtype[np.uint8]]


@pytest.fixture(scope="session", autouse=True)
def _twisted_reactor() -> Iterator[None]:
    """vncdotool runs Twisted's reactor in a thread, once per process."""
    yield
    api.shutdown()


@pytest.fixture
def registry() -> DisplayRegistry:
    return DisplayRegistry()


ServeVnc = Callable[..., VncServer]


@pytest.fixture
def serve_vnc(registry: DisplayRegistry) -> Iterator[ServeVnc]:
    servers: list[VncServer] = []

    def serve(**limits: Any) -> VncServer:
        server = VncServer(registry, "127.0.0.1", 0, VncLimits(**limits))
        server.start()
        servers.append(server)
        return server

    yield serve
    for server in servers:
        server.stop()


def port_of(server: VncServer, name: str) -> int:
    wait_until(lambda: server.port_of(name) is not None, 5, f"a VNC port for {name}")
    port = server.port_of(name)
    assert port is not None
    return port


def pattern(width: int, height: int, seed: int = 1) -> RGB:
    rgb: RGB = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return rgb


def display(registry: DisplayRegistry, name: str, width: int, height: int,
            fmt: PixelFormat = PixelFormat.XRGB8888, seed: int = 1) -> Framebuffer:  # fmt: skip
    fb = Framebuffer(name, width, height, fmt)
    fb.draw_rgb(pattern(width, height, seed))
    fb.present()
    registry.add(fb)
    return fb


def factory(encoding: Encoding) -> type[VNCDoToolFactory]:
    """A vncdotool factory whose client offers ``encoding`` and records each update's
    rectangles in ``factory.updates``."""

    class Recording(VNCDoToolClient):  # type: ignore[misc]
        def commitUpdate(self, rectangles: list[Any] | None = None) -> None:
            self.factory.updates.append(list(rectangles or []))
            super().commitUpdate(rectangles)

    Recording.encoding = vnc_rfb.Encoding(int(encoding))

    class Factory(VNCDoToolFactory):  # type: ignore[misc]
        protocol = Recording
        updates: ClassVar[list[list[tuple[int, int, int, int]]]] = []

    Factory.updates = []
    return Factory


def screen_of(client: Any) -> RGB:
    image: RGB = np.asarray(client.screen.convert("RGB"))
    return image


# ---------------------------------------------------------------------- a real client


@pytest.mark.parametrize("encoding", [Encoding.RAW, Encoding.ZRLE])
@pytest.mark.parametrize("fmt", list(PixelFormat))
def test_vncdotool_capture_equals_the_frame_pixel_for_pixel(
    registry: DisplayRegistry, serve_vnc: ServeVnc, encoding: Encoding, fmt: PixelFormat
) -> None:
    fb = display(registry, "gpu0", 300, 170, fmt)
    cursor = bytes([0, 0, 255, 255]) * 32 * 64 + bytes([10, 20, 30, 60]) * 32 * 64
    fb.set_cursor(Cursor(280, 150, cursor))  # half off screen
    server = serve_vnc()
    cls = factory(encoding)
    client = api.connect(f"127.0.0.1::{port_of(server, 'gpu0')}", factory_class=cls, timeout=20)
    try:
        client.refreshScreen()
        assert np.array_equal(screen_of(client), capture(fb))
        assert cls.updates[-1] == [(0, 0, 300, 170)]
    finally:
        client.disconnect()


@pytest.mark.parametrize("encoding", [Encoding.RAW, Encoding.ZRLE])
def test_incremental_update_sends_only_the_changed_tile(
    registry: DisplayRegistry, serve_vnc: ServeVnc, encoding: Encoding
) -> None:
    fb = display(registry, "gpu0", 320, 200)
    server = serve_vnc()
    cls = factory(encoding)
    client = api.connect(f"127.0.0.1::{port_of(server, 'gpu0')}", factory_class=cls, timeout=20)
    try:
        client.refreshScreen()
        fb.draw_rgb(np.full((3, 5, 3), 7, dtype=np.uint8), x=2 * TILE + 10, y=TILE + 20)
        fb.present()
        client.refreshScreen(incremental=True)
        assert cls.updates[-1] == [(2 * TILE, TILE, TILE, TILE)]
        assert np.array_equal(screen_of(client), capture(fb))
    finally:
        client.disconnect()


def test_mode_change_reaches_the_client_as_desktop_size(
    registry: DisplayRegistry, serve_vnc: ServeVnc
) -> None:
    fb = display(registry, "gpu0", 200, 100)
    server = serve_vnc()
    client = api.connect(f"127.0.0.1::{port_of(server, 'gpu0')}", timeout=20)
    try:
        client.refreshScreen()
        fb.set_mode(333, 222, PixelFormat.RGB565)
        fb.draw_rgb(pattern(333, 222, seed=5))
        fb.present()
        client.refreshScreen(incremental=True)
        assert client.screen.size == (333, 222)
        assert np.array_equal(screen_of(client), capture(fb))
    finally:
        client.disconnect()


# ---------------------------------------------------------------------- the protocol's corners


def test_update_covers_only_the_region_asked_for(
    registry: DisplayRegistry, serve_vnc: ServeVnc
) -> None:
    fb = display(registry, "gpu0", 200, 150)
    server = serve_vnc()
    with RfbClient(port_of(server, "gpu0")) as client:
        client.handshake()
        assert (client.width, client.height, client.name) == (200, 150, "gpu0")
        client.request(rect=Rect(10, 20, 30, 40))
        assert client.read_update() == [(Rect(10, 20, 30, 40), Encoding.RAW)]
        assert np.array_equal(client.screen[20:60, 10:40], capture(fb)[20:60, 10:40])
        client.request()
        assert client.read_update() == [(Rect(0, 0, 200, 150), Encoding.RAW)]
        # Incremental: held while nothing changes, then only the changed tiles it asked for.
        client.request(incremental=True, rect=Rect(0, 0, 100, 100))
        client.sock.settimeout(0.3)
        with pytest.raises(TimeoutError):
            client.sock.recv(1)
        client.sock.settimeout(10)
        fb.draw_rgb(np.zeros((150, 200, 3), dtype=np.uint8))
        fb.present()
        rects = client.read_update()
        assert sorted(r for r, _ in rects) == [Rect(0, 0, 100, 100)]


@pytest.mark.parametrize("version", [b"RFB 003.003\n", b"RFB 003.007\n", b"RFB 003.008\n"])
def test_protocol_versions_3_3_to_3_8(
    registry: DisplayRegistry, serve_vnc: ServeVnc, version: bytes
) -> None:
    fb = display(registry, "gpu0", 64, 64)
    server = serve_vnc()
    with RfbClient(port_of(server, "gpu0")) as client:
        client.handshake(version)
        client.request()
        client.read_update()
        assert np.array_equal(client.screen, capture(fb))


@pytest.mark.parametrize(
    "fmt",
    [
        RfbFormat(32, 24, True, True, 255, 255, 255, 0, 8, 16),  # big endian, R low
        RfbFormat(16, 16, False, True, 31, 63, 31, 11, 5, 0),  # RGB565
        RfbFormat(16, 15, True, True, 31, 31, 31, 10, 5, 0),  # RGB555 big endian
        RfbFormat(8, 8, False, True, 7, 7, 3, 0, 3, 6),  # BGR233
    ],
)
def test_client_pixel_formats(
    registry: DisplayRegistry, serve_vnc: ServeVnc, fmt: RfbFormat
) -> None:
    fb = display(registry, "gpu0", 100, 70)
    server = serve_vnc()
    with RfbClient(port_of(server, "gpu0")) as client:
        client.handshake()
        client.set_pixel_format(fmt)
        client.request()
        client.read_update()
        want = capture(fb).astype(np.int64)
        tops = np.array([fmt.red_max, fmt.green_max, fmt.blue_max])
        quantised = (want * tops + 127) // 255 * 255 // tops  # what fits, back to 8 bits
        assert np.abs(client.screen.astype(np.int64) - quantised).max() <= 1


def test_a_display_that_grows_drops_clients_without_desktop_size(
    registry: DisplayRegistry, serve_vnc: ServeVnc
) -> None:
    fb = display(registry, "gpu0", 64, 64)
    server = serve_vnc()
    with RfbClient(port_of(server, "gpu0")) as client:
        client.handshake()
        client.set_encodings([Encoding.RAW])
        client.request()
        client.read_update()
        fb.set_mode(128, 64, PixelFormat.XRGB8888)
        client.request(incremental=True)
        assert client.read_to_end() == b""
