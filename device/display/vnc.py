"""The VNC server: every display of a registry on its own TCP port, one thread for all.

Theory of operation.  One thread runs a ``selectors`` loop over non-blocking sockets:
a listening socket per display, the clients of each, and a wake-up socket other
threads write to when the registry changes.  Nothing in the loop waits on a client:
reads take what is there, writes send what the socket takes, and a ``VncSession``
(vnc_session.py) turns bytes into protocol state.  While some client of a display
has an update request pending, the loop polls that display's ``serial`` at most
``max_fps`` times a second (``Screen.refresh``); with no request pending it sleeps
until a socket speaks, so an idle server costs nothing.

Ports.  Displays get ports in the order they appear, each the lowest free port from
``base_port`` up (``base_port`` 5900 gives the first display 5900, like QEMU's
``-vnc :0``, the next 5901, ...); a port another process holds is skipped, and a
display that leaves frees its port.  ``base_port`` 0 lets the kernel choose.  The
port of each display is in the registry (``query-displays``: ``vnc``).

Limits, each against one hostile client: ``max_clients`` per display (more are
accepted and closed at once, so a flood of connections to one display leaves the
others alone), ``handshake_timeout`` to reach the NORMAL phase, ``stall_timeout``
for a client that stops reading while an update is queued (the queue holds one
update at most), and the RFB reader's own bounds on what it buffers.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import selectors
import socket
import threading
import time
from dataclasses import dataclass, field

from device.display.registry import Change, DisplayRegistry
from device.display.rfb import RfbError
from device.display.tiles import Screen
from device.display.vnc_session import Phase, VncSession

log = logging.getLogger(__name__)

VIEWER = "vnc"
RECV_SIZE = 65536
MAX_ACCEPTS_PER_WAKE = 64


@dataclass(frozen=True)
class VncLimits:
    max_displays: int = 64  # ports base_port .. base_port + max_displays - 1
    max_clients: int = 8  # per display
    max_fps: float = 30.0
    handshake_timeout: float = 10.0
    stall_timeout: float = 10.0


@dataclass(eq=False)
class Client:
    sock: socket.socket
    session: VncSession
    peer: str
    connected_at: float
    last_progress: float  # last time output moved (or was empty)


@dataclass(eq=False)
class DisplayPort:
    name: str
    screen: Screen
    listener: socket.socket
    port: int
    clients: list[Client] = field(default_factory=list)
    next_poll: float = 0.0


class VncServer:
    def __init__(
        self,
        registry: DisplayRegistry,
        host: str = "127.0.0.1",
        base_port: int = 5900,
        limits: VncLimits | None = None,
    ) -> None:
        self.registry = registry
        self.host = host
        self.base_port = base_port
        self.limits = limits or VncLimits()
        self.displays: dict[str, DisplayPort] = {}
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        for end in (self._wake_r, self._wake_w):
            end.setblocking(False)
        self._changes: collections.deque[tuple[Change, str]] = collections.deque()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="vnc", daemon=True)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Serve; OSError if ``host`` is no address of this machine."""
        with socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET) as probe:
            probe.bind((self.host, 0))
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self.registry.listeners.append(self._on_change)
        for name in self.registry.names():  # before the thread runs: ports known on return
            self._changes.append((Change.ADDED, name))
        self._apply_changes()
        self._thread.start()

    def stop(self) -> None:
        with contextlib.suppress(ValueError):
            self.registry.listeners.remove(self._on_change)
        self._stopping = True
        self._wake()
        if self._thread.is_alive():
            self._thread.join(10)
        for name in list(self.displays):
            self._remove(name)
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()

    def __enter__(self) -> VncServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def port_of(self, name: str) -> int | None:
        display = self.displays.get(name)
        return display.port if display is not None else None

    def _on_change(self, change: Change, name: str) -> None:
        self._changes.append((change, name))
        self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            self._wake_w.send(b"\x00")

    # ------------------------------------------------------------------ the loop

    def _run(self) -> None:
        while not self._stopping:
            try:
                self._step()
            except Exception:  # a bug must not end the thread that serves every display
                log.exception("vnc: unexpected error in the serving loop; carrying on")
                time.sleep(0.1)

    def _step(self) -> None:
        for key, mask in self._selector.select(self._timeout()):
            try:
                self._dispatch(key, mask)
            except Exception:  # a bug with one socket: that client goes, the rest stay
                log.exception("vnc: unexpected error; closing that socket")
                if isinstance(key.data, Client):
                    self._close(key.data, "server error")
        self._apply_changes()
        self._serve_updates()
        self._expire()

    def _timeout(self) -> float | None:
        now = time.monotonic()
        deadlines: list[float] = []
        for display in self.displays.values():
            if any(c.session.waiting and not c.session.out for c in display.clients):
                deadlines.append(display.next_poll)
            for client in display.clients:
                if client.session.phase is not Phase.NORMAL:
                    deadlines.append(client.connected_at + self.limits.handshake_timeout)
                elif client.session.out:
                    deadlines.append(client.last_progress + self.limits.stall_timeout)
        return max(0.0, min(deadlines) - now) if deadlines else None

    def _dispatch(self, key: selectors.SelectorKey, mask: int) -> None:
        if key.data is None:
            with contextlib.suppress(BlockingIOError):
                while self._wake_r.recv(4096):
                    pass
        elif isinstance(key.data, DisplayPort):
            self._accept(key.data)
        elif isinstance(key.data, Client):
            if mask & selectors.EVENT_READ:
                self._read(key.data)
            if mask & selectors.EVENT_WRITE and key.data.sock.fileno() >= 0:
                self._write(key.data)

    def _apply_changes(self) -> None:
        while self._changes:
            change, name = self._changes.popleft()
            if change is Change.REMOVED:
                self._remove(name)
            elif name not in self.displays:
                self._add(name)

    # ------------------------------------------------------------------ displays

    def _add(self, name: str) -> None:
        source = self.registry.get(name)
        if source is None:
            return
        try:
            listener = self._listen()
        except OSError as exc:
            log.error("vnc: cannot listen for display %s: %s", name, exc)
            return
        if listener is None:
            log.error("vnc: no free port for display %s (%d displays at most)", name,
                      self.limits.max_displays)  # fmt: skip
            return
        port = listener.getsockname()[1]
        display = DisplayPort(name, Screen(source), listener, port)
        self.displays[name] = display
        self._selector.register(listener, selectors.EVENT_READ, display)
        self.registry.set_address(name, VIEWER, f"{self.host}:{port}")
        log.info("vnc: display %s on %s:%d", name, self.host, port)

    def _listen(self) -> socket.socket | None:
        taken = {d.port for d in self.displays.values()}
        ports = [0] if self.base_port == 0 else [
            p for p in range(self.base_port, self.base_port + self.limits.max_displays)
            if p not in taken and p < 65536
        ]  # fmt: skip
        for port in ports:
            sock = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((self.host, port))
                sock.listen(64)
            except OSError as exc:
                sock.close()
                if exc.errno == errno.EADDRINUSE:
                    continue
                raise
            sock.setblocking(False)
            return sock
        return None

    def _remove(self, name: str) -> None:
        display = self.displays.pop(name, None)
        if display is None:
            return
        for client in list(display.clients):
            self._close(client, "display removed")
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(display.listener)
        display.listener.close()
        self.registry.set_address(name, VIEWER, None)
        log.info("vnc: display %s closed (port %d)", name, display.port)

    def _display_of(self, client: Client) -> DisplayPort | None:
        for display in self.displays.values():
            if client in display.clients:
                return display
        return None

    # ------------------------------------------------------------------ clients

    def _accept(self, display: DisplayPort) -> None:
        for _ in range(MAX_ACCEPTS_PER_WAKE):
            try:
                sock, peer = display.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: try again on the next wake
                log.warning("vnc: %s: accept failed: %s", display.name, exc)
                return
            if len(display.clients) >= self.limits.max_clients:
                log.warning("vnc: %s: refused %s (%d clients already)", display.name, peer,
                            len(display.clients))  # fmt: skip
                sock.close()
                continue
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            now = time.monotonic()
            client = Client(sock, VncSession(display.screen), f"{peer[0]}:{peer[1]}", now, now)
            display.clients.append(client)
            self._selector.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, client)
            log.info("vnc: %s: client %s connected", display.name, client.peer)

    def _read(self, client: Client) -> None:
        try:
            data = client.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._close(client, f"receive failed: {exc}")
            return
        if not data:
            self._close(client, "client closed the connection")
            return
        try:
            client.session.receive(data)
        except RfbError as exc:
            self._close(client, f"protocol error: {exc}")
            return
        self._want_write(client)

    def _write(self, client: Client) -> None:
        session = client.session
        if session.out:
            try:
                sent = client.sock.send(session.out)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._close(client, f"send failed: {exc}")
                return
            del session.out[:sent]
            client.last_progress = time.monotonic()
        if not session.out and session.phase is Phase.CLOSING:
            self._close(client, session.close_reason or "closing")
            return
        self._want_write(client)

    def _want_write(self, client: Client) -> None:
        if client.sock.fileno() < 0:
            return
        events = selectors.EVENT_READ
        if client.session.out:
            events |= selectors.EVENT_WRITE
        else:
            client.last_progress = time.monotonic()
        with contextlib.suppress(KeyError, ValueError):
            self._selector.modify(client.sock, events, client)

    def _close(self, client: Client, reason: str) -> None:
        display = self._display_of(client)
        if display is not None:
            display.clients.remove(client)
        if client.sock.fileno() >= 0:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(client.sock)
            client.sock.close()
        log.info("vnc: %s: client %s gone: %s", display.name if display else "?", client.peer,
                 reason)  # fmt: skip

    # ------------------------------------------------------------------ updates

    def _serve_updates(self) -> None:
        now = time.monotonic()
        for display in list(self.displays.values()):
            waiting = [c for c in display.clients if c.session.waiting and not c.session.out]
            if not waiting:
                continue
            if now >= display.next_poll:
                display.screen.refresh()
                display.next_poll = now + 1.0 / self.limits.max_fps
            for client in waiting:
                try:
                    updated = client.session.update()
                except Exception:  # a bug with one client's update: that client goes
                    log.exception("vnc: %s: update failed", display.name)
                    self._close(client, "server error")
                    continue
                if updated or client.session.phase is Phase.CLOSING:
                    self._write(client)

    def _expire(self) -> None:
        now = time.monotonic()
        for display in list(self.displays.values()):
            for client in list(display.clients):
                session = client.session
                if (
                    session.phase is not Phase.NORMAL
                    and now - client.connected_at > self.limits.handshake_timeout
                ):
                    self._close(client, "handshake timed out")
                elif session.out and now - client.last_progress > self.limits.stall_timeout:
                    self._close(client, f"not reading for {self.limits.stall_timeout:.0f} s")
