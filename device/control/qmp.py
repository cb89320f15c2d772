"""The control socket: QMP's wire protocol on a unix socket, server side.

Theory of operation.  A ``ControlServer`` listens on one unix socket; each client
gets a reader thread and a writer thread.  The reader sends the greeting, then splits
the byte stream into JSON values as QEMU's JSON streamer does (``JsonSplitter``:
braces and brackets outside strings; clients need not send newlines, and
``QMPClient`` does not), parses each with ``qemu.qmp.Message`` and answers it:

    capabilities negotiation   until ``qmp_capabilities`` succeeds, every other
                               command gets CommandNotFound; after it, another
                               ``qmp_capabilities`` does too (as QEMU answers)
    command mode               ``{"execute": NAME, "arguments": {...}, "id": ID}`` runs
                               the command of ``commands.COMMANDS``; the reply is
                               ``{"return": ..., "id": ID}`` or ``{"error": {"class",
                               "desc"}, "id": ID}``; events go to negotiated clients

Everything a client sends is data: a line that is not JSON, not an object or not a
command gets a GenericError (without ``id`` when none could be read, as QEMU), and
nothing ends the threads but the client going away.  A command runs only once its
whole value has arrived, so a client that disconnects mid-message changes nothing.
Replies and events go through one queue per client to its writer thread, so a
device thread that emits an event never waits for a client; a client that does not
read loses events beyond ``EVENT_BACKLOG`` (never replies).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import socket
import threading
import time
from pathlib import Path
from typing import Any

from qemu.qmp.error import ProtocolError as QmpProtocolError
from qemu.qmp.message import Message

from device.control import commands
from device.control.commands import COMMAND_NOT_FOUND, GENERIC_ERROR, Control, QmpError
from device.vfio_user.server import bind_unix_socket

log = logging.getLogger(__name__)

MAX_MESSAGE = 1 << 20
EVENT_BACKLOG = 4096
WHITESPACE = frozenset(b" \t\r\n")


class MessageTooLong(Exception):
    pass


class JsonSplitter:
    """Split a byte stream into top-level JSON values (objects or arrays); anything
    else at the top level is returned up to the next newline, for the parser to
    refuse.  What is left when the stream ends was never complete."""

    def __init__(self, limit: int = MAX_MESSAGE) -> None:
        self.limit = limit
        self.buffer = bytearray()
        self.depth = 0
        self.in_string = False
        self.escaped = False
        self.stray = False  # collecting a top-level token that is not an object

    def feed(self, data: bytes) -> list[bytes]:
        done: list[bytes] = []
        for byte in data:
            if self._take(byte):
                done.append(bytes(self.buffer))
                self.buffer.clear()
        if len(self.buffer) > self.limit:
            raise MessageTooLong(f"QMP input longer than {self.limit} bytes")
        return done

    def _take(self, byte: int) -> bool:
        """Add one byte; True when it completes a value."""
        if self.depth == 0 and not self.stray:
            if byte in WHITESPACE:
                return False
            self.buffer.append(byte)
            if byte in b"{[":
                self.depth = 1
                return False
            self.stray = True
            return False
        if self.stray:
            if byte == 0x0A:
                self.stray = False
                return True
            self.buffer.append(byte)
            return False
        self.buffer.append(byte)
        if self.in_string:
            self._string_byte(byte)
        elif byte == 0x22:
            self.in_string = True
        elif byte in b"{[":
            self.depth += 1
        elif byte in b"}]":
            self.depth -= 1
            return self.depth == 0
        return False

    def _string_byte(self, byte: int) -> None:
        if self.escaped:
            self.escaped = False
        elif byte == 0x5C:  # backslash
            self.escaped = True
        elif byte == 0x22:  # quote
            self.in_string = False


def greeting() -> Message:
    major, minor, micro = commands.VERSION
    version = {"qemu": {"major": major, "minor": minor, "micro": micro}, "package": "mgpu"}
    return Message({"QMP": {"version": version, "capabilities": []}})


def error(error_class: str, desc: str, msg_id: object = None, has_id: bool = False) -> Message:
    reply: dict[str, object] = {"error": {"class": error_class, "desc": desc}}
    if has_id:
        reply["id"] = msg_id
    return Message(reply)


def event(name: str, data: dict[str, Any]) -> Message:
    now = time.time()
    seconds = int(now)
    return Message(
        {
            "event": name,
            "data": data,
            "timestamp": {"seconds": seconds, "microseconds": int((now - seconds) * 1e6)},
        }
    )


class _Client:
    def __init__(self, sock: socket.socket, control: Control, number: int) -> None:
        self.sock = sock
        self.control = control
        self.name = f"control-{number}"
        self.negotiated = False
        self.events_dropped = 0
        self.outgoing: queue.Queue[Message | None] = queue.Queue()
        self.closed = threading.Event()

    # ---------------------------------------------------------------- writer

    def send(self, message: Message) -> None:
        if not self.closed.is_set():
            self.outgoing.put(message)

    def send_event(self, message: Message) -> None:
        if not self.negotiated or self.closed.is_set():
            return
        if self.outgoing.qsize() >= EVENT_BACKLOG:
            self.events_dropped += 1
            return
        self.outgoing.put(message)

    def write_loop(self) -> None:
        while (message := self.outgoing.get()) is not None:
            try:
                self.sock.sendall(bytes(message) + b"\n")
            except OSError:
                self.closed.set()
                with contextlib.suppress(OSError):
                    self.sock.shutdown(socket.SHUT_RDWR)
                return

    # ---------------------------------------------------------------- reader

    def read_loop(self) -> None:
        self.send(greeting())
        splitter = JsonSplitter()
        while not self.closed.is_set():
            try:
                data = self.sock.recv(65536)
            except OSError:
                return
            if not data:
                return  # EOF; a value it cut short never runs
            try:
                values = splitter.feed(data)
            except MessageTooLong as exc:
                self.send(error(GENERIC_ERROR, str(exc)))
                return
            for value in values:
                self.answer(value)

    def answer(self, line: bytes) -> None:
        try:
            message = Message(line)
        except QmpProtocolError as exc:
            self.send(error(GENERIC_ERROR, f"JSON parse error, {exc.error_message}"))
            return
        has_id = "id" in message
        msg_id = message.get("id")
        try:
            reply = {"return": self.execute(message)}
        except QmpError as exc:
            self.send(error(exc.error_class, exc.desc, msg_id, has_id))
            return
        except Exception:  # a bug: the client gets an error, the thread lives on
            log.exception("%s: bug while answering %s", self.name, line[:200])
            self.send(error(GENERIC_ERROR, "internal error (see the server log)", msg_id, has_id))
            return
        if has_id:
            reply["id"] = msg_id
        self.send(Message(reply))

    def execute(self, message: Message) -> object:
        for key in message:
            if key not in ("execute", "arguments", "id", "control"):
                raise QmpError(GENERIC_ERROR, f"QMP input member '{key}' is unexpected")
        name = message.get("execute")
        if name is None:
            raise QmpError(GENERIC_ERROR, "QMP input lacks member 'execute'")
        if not isinstance(name, str):
            raise QmpError(GENERIC_ERROR, "QMP input member 'execute' must be a string")
        if name == "qmp_capabilities":
            return self.negotiate(message.get("arguments"))
        if not self.negotiated:
            raise QmpError(
                COMMAND_NOT_FOUND, "Expecting capabilities negotiation with 'qmp_capabilities'"
            )
        return commands.run(self.control, name, message.get("arguments"))

    def negotiate(self, arguments: object) -> object:
        if self.negotiated:
            raise QmpError(
                COMMAND_NOT_FOUND, "Capabilities negotiation is already complete, command ignored"
            )
        if arguments is not None and not isinstance(arguments, dict):
            raise QmpError(GENERIC_ERROR, "QMP input member 'arguments' must be an object")
        enable = (arguments or {}).get("enable", [])
        if not isinstance(enable, list):
            raise QmpError(GENERIC_ERROR, "Invalid parameter type for 'enable', expected: array")
        for capability in enable:
            raise QmpError(GENERIC_ERROR, f"Capability '{capability}' not available")
        self.negotiated = True
        return {}

    def close(self) -> None:
        self.closed.set()
        self.outgoing.put(None)
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)


class ControlServer:
    def __init__(self, path: Path, control: Control) -> None:
        self.path = Path(path)
        self.control = control
        self.listener = bind_unix_socket(self.path)
        os.chmod(self.path, 0o600)  # the control socket steers every instance
        self.clients: list[_Client] = []
        self._lock = threading.Lock()
        self._count = 0
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="control", daemon=True)
        control.server.listeners.append(self.broadcast)

    def start(self) -> None:
        self._thread.start()

    def broadcast(self, name: str, data: dict[str, Any]) -> None:
        """An event for every negotiated client (never blocks)."""
        with self._lock:
            clients = list(self.clients)
        if not clients:
            return
        message = event(name, json.loads(json.dumps(data, default=str)))
        for client in clients:
            client.send_event(message)

    def _serve(self) -> None:
        while not self._stopping.is_set():
            try:
                sock, _ = self.listener.accept()
            except OSError as exc:
                if self._stopping.is_set():
                    return
                log.warning("control: accept failed (%s); retrying", exc)
                self._stopping.wait(0.1)
                continue
            self._count += 1
            client = _Client(sock, self.control, self._count)
            with self._lock:
                self.clients.append(client)
            threading.Thread(target=client.write_loop, name=f"{client.name}-w", daemon=True).start()
            threading.Thread(
                target=self._run_client, args=(client,), name=client.name, daemon=True
            ).start()

    def _run_client(self, client: _Client) -> None:
        try:
            client.read_loop()
        finally:
            with self._lock:
                if client in self.clients:
                    self.clients.remove(client)
            client.close()
            client.sock.close()
            log.debug("%s: disconnected", client.name)

    def stop(self) -> None:
        self._stopping.set()
        with contextlib.suppress(ValueError):
            self.control.server.listeners.remove(self.broadcast)
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        with self._lock:
            clients = list(self.clients)
        for client in clients:
            client.close()
        if self._thread.is_alive():
            self._thread.join(5)
        self.listener.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def __enter__(self) -> ControlServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
