"""The browser view: one page that shows every display live, over one WebSocket.

Theory of operation.  One thread runs an asyncio loop with a ``websockets`` server:
``GET /`` is the page (page.html, no other file), ``/ws`` the WebSocket it opens.
The loop owns a ``Screen`` per display of the registry (registry changes arrive
through ``call_soon_threadsafe``).  While at least one page is connected, a ticker
polls every display's ``serial`` at most ``max_fps`` times a second and wakes the
viewers when a picture changed.  Each viewer then gets, per display, the tiles it
lacks (``Have``, as the VNC server does), PNG-encoded by Pillow, as binary messages
``>IHHHH`` (display id, x, y, width, height) followed by the PNG, then a text message
``{"type": "shown", "name", "serial"}`` once the page has everything of the
source's picture at that serial.  Text
messages ``{"type": "displays", ...}`` announce the list whenever it or a mode
changes.

An update is computed and encoded without yielding (the picture cannot change under
it), then sent; a viewer that does not take it within ``stall_timeout`` is dropped,
and a slow one simply gets fewer, larger updates: nothing queues per viewer beyond
one update.  What a page sends is read and ignored (messages over 4 KiB end the
connection); ``max_viewers`` pages at once, more get HTTP 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import json
import logging
import struct
import threading
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from device.display.registry import Change, DisplayRegistry
from device.display.screendump import png_bytes
from device.display.tiles import Have, Rect, Screen

log = logging.getLogger(__name__)

VIEWER = "web"
TILE_HEADER = struct.Struct(">IHHHH")


@dataclass(frozen=True)
class WebLimits:
    max_viewers: int = 16
    max_fps: float = 20.0
    stall_timeout: float = 10.0
    max_message: int = 4096  # from a page
    # An HTTP request must arrive this soon after connecting (browsers open spare
    # connections they may never use; stopping waits for those to time out).
    open_timeout: float = 2.0


@dataclass(eq=False)
class Viewer:
    connection: ServerConnection
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    have: dict[str, Have] = field(default_factory=dict)
    told: dict[str, int | None] = field(default_factory=dict)  # the serial last shown
    announced: object = None  # the display list last sent


def page() -> bytes:
    return resources.files("device.display").joinpath("page.html").read_bytes()


class WebServer:
    def __init__(
        self,
        registry: DisplayRegistry,
        host: str = "127.0.0.1",
        port: int = 8000,
        limits: WebLimits | None = None,
    ) -> None:
        self.registry = registry
        self.host = host
        self.port = port
        self.limits = limits or WebLimits()
        self.screens: dict[str, Screen] = {}
        self.ids: dict[str, int] = {}
        self.viewers: set[Viewer] = set()
        self._page = page()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="web", daemon=True)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Serve; returns once listening (OSError if the port cannot be had)."""
        self._thread.start()
        self._ready.wait(30)
        if self._failure is not None:
            raise self._failure
        self.registry.listeners.append(self._on_change)
        self._post(self._sync)

    def stop(self) -> None:
        with contextlib.suppress(ValueError):
            self.registry.listeners.remove(self._on_change)
        if self._loop is not None and self._stop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is gone: it failed to start
                self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread.is_alive():
            self._thread.join(10)

    def __enter__(self) -> WebServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:
            self._failure = exc
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with serve(
            self._serve_viewer,
            self.host,
            self.port,
            process_request=self._http,
            max_size=self.limits.max_message,
            max_queue=4,
            open_timeout=self.limits.open_timeout,
            close_timeout=2,
        ) as server:
            self.port = self._bound_port(server)
            self._ready.set()
            ticker = asyncio.create_task(self._tick())
            await self._stop.wait()
            ticker.cancel()
            for viewer in list(self.viewers):
                viewer.connection.transport.abort()
        for name in list(self.screens):
            self.registry.set_address(name, VIEWER, None)

    @staticmethod
    def _bound_port(server: Server) -> int:
        return int(next(iter(server.sockets)).getsockname()[1])

    def _on_change(self, change: Change, name: str) -> None:
        self._post(self._sync)

    def _post(self, callback: Any) -> None:
        if self._loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: stopping
                self._loop.call_soon_threadsafe(callback)

    def _sync(self) -> None:
        """Follow the registry: a Screen per display, ids for the page."""
        names = set(self.registry.names())
        for name in set(self.screens) - names:
            del self.screens[name]
        for name in names - set(self.screens):
            source = self.registry.get(name)
            if source is not None:
                self.screens[name] = Screen(source)
                self.ids.setdefault(name, len(self.ids) + 1)
                self.registry.set_address(name, VIEWER, f"{self.url}#{name}")
        self._wake_all()

    def _wake_all(self) -> None:
        for viewer in self.viewers:
            viewer.wake.set()

    # ------------------------------------------------------------------ HTTP

    def _http(self, connection: ServerConnection, request: Request) -> Response | None:
        path = request.path.split("?", 1)[0]
        if path == "/ws":
            if len(self.viewers) >= self.limits.max_viewers:
                return connection.respond(http.HTTPStatus.SERVICE_UNAVAILABLE, "too many viewers\n")
            return None
        if path in ("/", "/index.html"):
            headers = Headers(
                [
                    ("Content-Type", "text/html; charset=utf-8"),
                    ("Content-Length", str(len(self._page))),
                    ("Cache-Control", "no-store"),
                ]
            )
            return Response(200, "OK", headers, self._page)
        if path == "/favicon.ico":
            return Response(204, "No Content", Headers([("Content-Length", "0")]), b"")
        return connection.respond(http.HTTPStatus.NOT_FOUND, "not found\n")

    # ------------------------------------------------------------------ viewers

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(1.0 / self.limits.max_fps)
            if not self.viewers:
                continue
            changed = False
            for screen in self.screens.values():
                changed |= screen.refresh()
            if changed:
                self._wake_all()

    async def _serve_viewer(self, connection: ServerConnection) -> None:
        viewer = Viewer(connection)
        self.viewers.add(viewer)
        drain = asyncio.create_task(self._drain(connection))
        drain.add_done_callback(lambda _: viewer.wake.set())
        log.info("web: viewer %s connected", connection.remote_address)
        try:
            for screen in self.screens.values():
                screen.refresh()
            viewer.wake.set()
            while not drain.done():
                await viewer.wake.wait()
                viewer.wake.clear()
                messages = self._updates(viewer)
                async with asyncio.timeout(self.limits.stall_timeout):
                    for message in messages:
                        await connection.send(message)
        except TimeoutError:
            log.warning("web: viewer %s not reading; dropped", connection.remote_address)
            connection.transport.abort()
        except ConnectionClosed:
            pass
        finally:
            self.viewers.discard(viewer)
            drain.cancel()
            log.info("web: viewer %s gone", connection.remote_address)

    async def _drain(self, connection: ServerConnection) -> None:
        """Read and ignore what the page sends (the view is read-only)."""
        with contextlib.suppress(ConnectionClosed):
            async for _ in connection:
                pass
        await asyncio.sleep(0)

    def _updates(self, viewer: Viewer) -> list[str | bytes]:
        """Everything the viewer lacks, encoded now (no await: the pictures cannot
        change meanwhile)."""
        messages: list[str | bytes] = []
        listing = self._listing()
        if listing != viewer.announced:
            messages.append(json.dumps({"type": "displays", "displays": listing}))
            viewer.announced = listing
        for name, screen in self.screens.items():
            have = viewer.have.get(name)
            if have is None:
                have = screen.unseen()
            for rect in screen.stale(have):
                messages.append(self._tile(self.ids[name], screen, rect))
            viewer.have[name] = screen.sent(have, Rect(0, 0, screen.width, screen.height))
            if viewer.told.get(name, -1) != screen.seen_serial:
                viewer.told[name] = screen.seen_serial
                shown = {"type": "shown", "name": name, "serial": screen.seen_serial}
                messages.append(json.dumps(shown))
        return messages

    @staticmethod
    def _tile(display_id: int, screen: Screen, rect: Rect) -> bytes:
        pixels = screen.rgb[rect.y : rect.y + rect.height, rect.x : rect.x + rect.width]
        return TILE_HEADER.pack(display_id, *rect) + png_bytes(pixels)

    def _listing(self) -> list[dict[str, object]]:
        return [
            {
                "id": self.ids[name],
                "name": name,
                "width": screen.width,
                "height": screen.height,
                "problem": screen.problem,
                "vnc": self.registry.addresses(name).get("vnc"),
            }
            for name, screen in sorted(self.screens.items())
        ]
