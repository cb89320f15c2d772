"""Serving device models on unix sockets.

Theory of operation.  An ``Endpoint`` owns one listening socket and one device. Its
thread accepts a client, runs a ``Session`` for it (receive, dispatch, reply) until
the client disconnects or breaks the stream, then closes the session (its DMA
mappings and eventfds go, the device state stays) and accepts the next client. One
client at a time, as the protocol has it.  Each endpoint has its own thread, so one
device's slow request never holds up another's replies.  ``stop()`` shuts the
sockets down, which wakes the blocked thread, joins it and removes the socket file.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import stat
import threading
from collections.abc import Callable
from pathlib import Path

from device.errors import FramingError, SetupError
from device.vfio_user.fast_path import FastPath
from device.vfio_user.session import DeviceModel, Session
from device.vfio_user.transport import Connection, ConnectionClosed

log = logging.getLogger(__name__)


class SocketPathError(SetupError):
    """The socket path cannot be used; the message says why and what to do."""


def bind_unix_socket(path: Path) -> socket.socket:
    """A listening socket at ``path``; refuses a path that is in use or unusable."""
    if not path.parent.is_dir():
        raise SocketPathError(f"directory {path.parent} does not exist: create it first")
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise SocketPathError(f"{path} exists and is not a socket: choose another path")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except ConnectionRefusedError:
            log.warning("removing stale socket %s (nobody is listening on it)", path)
            path.unlink()
        except OSError as exc:
            raise SocketPathError(f"cannot probe existing socket {path}: {exc}") from None
        else:
            raise SocketPathError(
                f"{path} is in use by another server: stop it or choose another path"
            )
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(str(path))
    except OSError as exc:
        sock.close()
        raise SocketPathError(f"cannot bind {path}: {exc.strerror}") from None
    sock.listen(4)
    return sock


class Endpoint:
    def __init__(self, path: Path, device: DeviceModel, name: str = "gpu") -> None:
        self.path = Path(path)
        self.device = device
        self.name = name
        self._send_lock = threading.Lock()
        self.listener = bind_unix_socket(self.path)
        self.connection: Connection | None = None
        self.session: Session | None = None
        self.clients_served = 0
        # Told True when a client connects, False when it has gone (the control plane).
        self.on_client: Callable[[bool], None] | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._serve, name=f"vfio-user-{name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _serve(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError as exc:
                if self._stopping.is_set():
                    return
                # EMFILE and friends pass: keep serving this device once they do.
                log.warning("%s: accept failed (%s); retrying", self.name, exc)
                self._stopping.wait(0.1)
                continue
            with self._lock:
                if self._stopping.is_set():
                    client.close()
                    return
                connection = Connection(client)
                self.connection = connection
                self.session = Session(self.device, self._sender(connection))
                self.session.protocol_thread = threading.get_ident()
            log.info("%s: client connected", self.name)
            self._tell(True)
            try:
                self._run_session(self.connection, self.session)
            finally:
                with self._lock:
                    self.session.close()
                    self.connection.close()
                    self.session = None
                    self.connection = None
                self.clients_served += 1
                log.info("%s: client disconnected", self.name)
                self._tell(False)

    def _tell(self, connected: bool) -> None:
        if self.on_client is not None:
            try:
                self.on_client(connected)
            except Exception:
                log.exception("%s: client listener failed", self.name)

    def _sender(self, connection: Connection) -> Callable[[bytes, tuple[int, ...]], None]:
        # Replies (socket thread) and DMA requests (device workers) share the socket.
        def send(data: bytes, fds: tuple[int, ...]) -> None:
            with self._send_lock:
                connection.send(data, fds)

        return send

    def _run_session(self, connection: Connection, session: Session) -> None:
        fast = FastPath(connection, session, self._send_lock)  # answers trapped accesses
        while True:
            try:
                frames = fast.receive()
            except ConnectionClosed:
                return
            except FramingError as exc:
                log.warning("%s: disconnecting a client that broke the stream: %s", self.name, exc)
                return
            except OSError as exc:
                if not self._stopping.is_set():
                    log.warning("%s: socket error: %s", self.name, exc)
                return
            for frame in frames:
                outgoing = session.handle(frame)
                if outgoing is None:
                    continue
                try:
                    with self._send_lock:
                        connection.send(outgoing.data, outgoing.fds)
                except (ConnectionClosed, OSError):
                    return

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        with self._lock:
            with contextlib.suppress(OSError):
                self.listener.shutdown(socket.SHUT_RDWR)
            if self.connection is not None:
                with contextlib.suppress(OSError):
                    self.connection.sock.shutdown(socket.SHUT_RDWR)
        if self._thread.is_alive():
            self._thread.join(timeout)
        self.listener.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def __enter__(self) -> Endpoint:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


__all__ = ["Endpoint", "SocketPathError", "bind_unix_socket", "errno"]
