"""The browser view in a real headless Chromium: the page loads, shows every display,
follows changes, and each display's canvas is the screendump pixel for pixel.  Its
server's limits are checked with websockets' own client."""

from __future__ import annotations

import io
import json
import socket
import time
from collections.abc import Iterator

import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image
from playwright.sync_api import Page
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from device.display.frame import Cursor, PixelFormat
from device.display.registry import DisplayRegistry
from device.display.screendump import capture, png_bytes
from device.display.source import Framebuffer
from device.display.web import WebLimits, WebServer
from tests.helpers import wait_until
from tests.unit.browser import chromium_page


def framebuffer(name: str, width: int, height: int, fmt: PixelFormat, seed: int) -> Framebuffer:
    fb = Framebuffer(name, width, height, fmt)
    fb.draw_rgb(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))
    fb.present()
    return fb


def screendump_png(fb: Framebuffer) -> npt.NDArray[np.uint8]:
    """The display's screendump, as the PNG the control socket returns, decoded."""
    return np.asarray(Image.open(io.BytesIO(png_bytes(capture(fb)))))


@pytest.fixture(scope="module")
def page() -> Iterator[Page]:
    with chromium_page() as page:
        yield page


def shown(page: Page, fb: Framebuffer) -> npt.NDArray[np.uint8]:
    """The display's canvas once the page has drawn the source's current picture."""
    page.wait_for_function(
        "([name, serial]) => (window.mgpu.shown[name] ?? -1) >= serial",
        arg=[fb.name, fb.serial],
        timeout=20000,
    )
    shot = page.locator(f"canvas[data-name='{fb.name}']").screenshot()
    return np.asarray(Image.open(io.BytesIO(shot)).convert("RGB"))


def test_the_page_shows_every_display_as_the_screendump_does(page: Page) -> None:
    registry = DisplayRegistry()
    first = framebuffer("gpu0", 640, 480, PixelFormat.XRGB8888, 1)
    first.set_cursor(Cursor(600, 440, bytes([40, 80, 160, 200]) * 64 * 64))
    second = framebuffer("gpu1", 300, 200, PixelFormat.RGB565, 2)
    registry.add(first)
    registry.add(second)
    with WebServer(registry, port=0) as web:
        page.goto(web.url)
        for fb in (first, second):
            assert np.array_equal(shown(page, fb), screendump_png(fb))
        assert page.locator("#status").inner_text() == "live"
        assert "gpu1: 300\u00d7200" in page.locator("#display-gpu1 figcaption").inner_text()

        # A change in one tile, then a mode change: the page follows both.
        first.draw_rgb(np.zeros((10, 10, 3), dtype=np.uint8), x=100, y=100)
        first.present()
        assert np.array_equal(shown(page, first), capture(first))
        second.set_mode(256, 160, PixelFormat.ARGB8888)
        second.draw_rgb(np.full((160, 256, 3), 99, dtype=np.uint8))
        second.present()
        assert np.array_equal(shown(page, second), capture(second))

        # Displays come and go.
        third = framebuffer("gpu2", 128, 64, PixelFormat.XRGB8888, 3)
        registry.add(third)
        assert np.array_equal(shown(page, third), capture(third))
        registry.remove("gpu0")
        page.wait_for_selector("#display-gpu0", state="detached", timeout=20000)
        assert page.locator("canvas").count() == 2


def test_the_page_says_so_when_a_display_is_off(page: Page) -> None:
    registry = DisplayRegistry()
    fb = framebuffer("gpu0", 64, 64, PixelFormat.XRGB8888, 4)
    registry.add(fb)
    with WebServer(registry, port=0) as web:
        page.goto(web.url)
        shown(page, fb)
        fb.set_enabled(False)
        page.wait_for_function(
            "() => document.querySelector('#display-gpu0 .problem')?.textContent.includes('off')",
            timeout=20000,
        )
        assert int(np.asarray(shown(page, fb)).max()) == 0


def test_viewers_are_bounded_and_a_stalled_one_is_dropped() -> None:
    registry = DisplayRegistry()
    fb = framebuffer("gpu0", 1024, 768, PixelFormat.XRGB8888, 5)
    registry.add(fb)
    with WebServer(registry, port=0, limits=WebLimits(max_viewers=2, stall_timeout=1.0)) as web:
        url = f"ws://127.0.0.1:{web.port}/ws"
        # A viewer that never reads, behind a tiny receive buffer.
        hog = socket.create_connection(("127.0.0.1", web.port))
        hog.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        hog.sendall(
            b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        with connect(url, max_size=None) as good:
            with pytest.raises(InvalidStatus) as refused:
                connect(url)
            assert refused.value.response.status_code == 503
            first = json.loads(good.recv(timeout=10))
            assert first["type"] == "displays" and first["displays"][0]["name"] == "gpu0"
            for _ in range(5):  # the good viewer keeps getting frames while the hog stalls
                fb.draw_rgb(
                    np.random.default_rng().integers(0, 256, (768, 1024, 3), dtype=np.uint8)
                )
                fb.present()
                deadline = time.monotonic() + 5
                while True:
                    message = good.recv(timeout=5)
                    if isinstance(message, str) and json.loads(message).get("serial") == fb.serial:
                        break
                    assert time.monotonic() < deadline
            wait_until(lambda: len(web.viewers) == 1, 10, "the stalled viewer dropped")
        hog.close()


def test_a_page_that_sends_too_much_is_dropped() -> None:
    registry = DisplayRegistry()
    registry.add(framebuffer("gpu0", 64, 64, PixelFormat.XRGB8888, 6))
    with WebServer(registry, port=0) as web:
        with connect(f"ws://127.0.0.1:{web.port}/ws", max_size=None) as rude:
            rude.recv(timeout=10)
            rude.send("x" * 10000)
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    rude.recv(timeout=10)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
        wait_until(lambda: not web.viewers, 10, "the viewer gone")
