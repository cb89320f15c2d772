"""One client's vfio-user session and the dispatcher that answers its messages.

Theory of operation.  A session starts un-negotiated: the only command accepted is
VERSION.  After it, every command is decoded into its typed message and handed to
the device model.  Whatever goes wrong while handling one message (a malformed
payload, a device refusal, a bug) becomes an errno reply to that message, and the
session goes on; only a broken byte stream (``FramingError``) ends it.  A message
flagged No_reply is never answered, not even with an error, because QEMU does not
expect one and an unexpected reply desynchronises its stream.  File descriptors that
come with a message are closed unless a handler took them.

The server also sends requests of its own: DMA_READ/DMA_WRITE for guest memory
that came without an fd.  Those are issued from a device worker thread, never from
the thread that reads the socket, because that thread must keep reading to see the
reply (and QEMU may be waiting on one of our replies while it holds the lock its DMA
handler needs).  Replies from the client are routed to the waiting request by id.
"""

from __future__ import annotations

import errno
import io
import itertools
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

from device.errors import ProtocolError, UnsupportedCommand, VfioUserError
from device.vfio_user.dma import MAX_DMA_MAPS_PER_SESSION, DmaTable
from device.vfio_user.irq import IrqLines
from device.vfio_user.protocol import messages as m
from device.vfio_user.protocol.codec import Frame, close_fds
from device.vfio_user.protocol.constants import (
    HEADER_TYPE_MASK,
    PROTOCOL_MAJOR,
    PROTOCOL_MINOR,
    Command,
    HeaderFlags,
)

log = logging.getLogger(__name__)

SERVER_MAX_DATA_XFER = 1024 * 1024
# The smallest max_data_xfer_size a client may ask for: one page.  Below it a guest
# buffer takes more messages than bytes are worth (at 1 byte, a 2 MiB DMA was two
# million round trips); QEMU proposes 1 MiB.
SERVER_MIN_DATA_XFER = 4096
SERVER_MAX_MSG_FDS = 16
# QEMU's VERSION receive buffer is its own request: a reply must never be longer.
SERVER_CAPABILITIES: dict[str, object] = {
    "max_msg_fds": SERVER_MAX_MSG_FDS,
    "max_data_xfer_size": SERVER_MAX_DATA_XFER,
    "pgsizes": 4096,
    # What DmaTable enforces: a client that believes it may map more fails in ways
    # nobody can diagnose.
    "max_dma_maps": MAX_DMA_MAPS_PER_SESSION,
}


class DeviceModel(Protocol):
    """What a session needs from the device it serves."""

    def connect(self, dma: DmaTable, irqs: IrqLines) -> None: ...
    def disconnect(self) -> None: ...
    def device_info(self) -> m.DeviceInfo: ...
    def region_info(self, index: int) -> tuple[m.RegionInfo, int | None]: ...
    def irq_infos(self) -> list[m.IrqInfo]: ...
    def region_read(self, index: int, offset: int, count: int) -> bytes: ...
    def region_write(self, index: int, offset: int, data: bytes) -> None: ...
    def reset(self) -> None: ...


class Reply(NamedTuple):
    payload: bytes = b""
    fds: tuple[int, ...] = ()


class Incoming:
    """A frame being handled; a handler that keeps the fds calls ``take_fds``."""

    __slots__ = ("fds_taken", "frame")

    def __init__(self, frame: Frame) -> None:
        self.frame = frame
        self.fds_taken = False

    def take_fds(self) -> tuple[int, ...]:
        self.fds_taken = True
        return self.frame.fds


class Outgoing(NamedTuple):
    """An encoded message ready for the transport."""

    data: bytes
    fds: tuple[int, ...] = ()


_EMPTY_REPLY = Reply()


Sender = Callable[[bytes, tuple[int, ...]], None]
PEER_REPLY_TIMEOUT = 10.0


@dataclass
class _Waiter:
    done: threading.Event = field(default_factory=threading.Event)
    reply: Frame | None = None
    error: int = 0


class Session:
    def __init__(self, device: DeviceModel, send: Sender | None = None) -> None:
        self.device = device
        self.send = send
        self.protocol_thread: int | None = None  # ident of the socket-reading thread
        self._peer_ids = itertools.count(1)
        self._waiters: dict[int, _Waiter] = {}
        self._waiters_lock = threading.Lock()
        self._closed = False
        self._blocked = 0  # block_requests() in force; guarded by _waiters_lock
        self.negotiated = False
        self.client_capabilities: dict[str, object] = {}
        self.max_data_xfer = SERVER_MAX_DATA_XFER
        self.client_max_fds = 1
        self.dma = DmaTable()
        self.irqs = IrqLines(device.irq_infos())
        self.messages_handled = 0
        self.fast_answers = 0  # of them, answered by the fast path (fast_path.py)
        self.errors_replied = 0
        self._handlers: dict[int, Callable[[Incoming], Reply]] = {
            Command.VERSION: self._version,
            Command.DMA_MAP: self._dma_map,
            Command.DMA_UNMAP: self._dma_unmap,
            Command.DEVICE_GET_INFO: self._device_info,
            Command.DEVICE_GET_REGION_INFO: self._region_info,
            Command.DEVICE_GET_IRQ_INFO: self._irq_info,
            Command.DEVICE_SET_IRQS: self._set_irqs,
            Command.REGION_READ: self._region_read,
            Command.REGION_WRITE: self._region_write,
            Command.REGION_WRITE_MULTI: self._region_write_multi,
            Command.DEVICE_RESET: self._device_reset,
        }
        self.dma.message_dma = self
        device.connect(self.dma, self.irqs)

    def close(self) -> None:
        """The client went away: drop its DMA mappings and eventfds; the device stays."""
        with self._waiters_lock:
            self._closed = True
            waiters, self._waiters = self._waiters, {}
        for waiter in waiters.values():
            waiter.error = errno.ENOTCONN
            waiter.done.set()
        self.device.disconnect()
        self.dma.clear()
        self.irqs.close()

    # ------------------------------------------------------------------ requests to the client

    def block_requests(self) -> None:
        """Cancel every request waiting for the client, and refuse new ones until
        ``unblock_requests`` (a device reset must not wait for a reply that the client
        may send only after it has ours)."""
        with self._waiters_lock:
            self._blocked += 1
            waiters, self._waiters = self._waiters, {}
        for waiter in waiters.values():
            waiter.error = errno.ECANCELED
            waiter.done.set()

    def unblock_requests(self) -> None:
        with self._waiters_lock:
            self._blocked -= 1

    def deliver_reply(self, frame: Frame) -> None:
        """A reply from the client: wake the request waiting for it, or drop it."""
        with self._waiters_lock:
            waiter = self._waiters.pop(frame.header.msg_id, None)
        if waiter is None:
            close_fds(frame.fds)
            log.warning(
                "dropping reply id=%d command=%d that answers no request",
                frame.header.msg_id,
                frame.header.command,
            )
            return
        waiter.reply = frame
        waiter.done.set()

    def request_peer(
        self, command: Command, payload: bytes, timeout: float = PEER_REPLY_TIMEOUT
    ) -> Frame:
        """Send a request to the client and wait for its reply (not from the socket thread)."""
        if threading.get_ident() == self.protocol_thread:
            raise RuntimeError("a request to the client from the socket thread would deadlock")
        if self.send is None:
            raise VfioUserError(errno.ENOTCONN, "session has no connection to send on")
        waiter = _Waiter()
        with self._waiters_lock:
            if self._closed:
                raise VfioUserError(errno.ENOTCONN, "client disconnected")
            if self._blocked:
                raise VfioUserError(errno.ECANCELED, f"{command.name}: the device is resetting")
            msg_id = next(self._peer_ids) & 0xFFFF
            self._waiters[msg_id] = waiter
        try:
            try:
                self.send(m.encode_message(msg_id, command, payload, reply=False), ())
            except OSError as exc:
                raise VfioUserError(errno.ENOTCONN, f"{command.name}: {exc}") from None
            if not waiter.done.wait(timeout):
                raise VfioUserError(errno.ETIMEDOUT, f"client did not answer {command.name}")
        finally:
            with self._waiters_lock:
                self._waiters.pop(msg_id, None)
        if waiter.error == errno.ECANCELED:
            raise VfioUserError(waiter.error, f"{command.name}: cancelled by a device reset")
        if waiter.error:
            raise VfioUserError(waiter.error, f"{command.name}: client disconnected")
        reply = waiter.reply
        assert reply is not None
        close_fds(reply.fds)
        if reply.header.is_error:
            raise VfioUserError(reply.header.error or errno.EIO, f"client refused {command.name}")
        return reply

    def _dma_chunks(self, length: int) -> Iterator[tuple[int, int]]:
        """(offset, length) of each message of a transfer, made as they are sent: a
        list of them cost more than the data with small max_data_xfer sizes."""
        step = self.max_data_xfer
        for offset in range(0, length, step):
            yield offset, min(step, length - offset)

    def dma_read_messages(self, address: int, length: int) -> bytes:
        # Each reply is written at its offset into one buffer of the final size.  On
        # CPython a BytesIO made from a bytes object nobody else holds writes into it
        # in place and getvalue() hands that very object back: no join, no copy (on
        # another runtime it is one copy more, still correct).
        out = io.BytesIO(bytes(length))
        for offset, chunk_length in self._dma_chunks(length):
            request = m.DmaAccess(address + offset, chunk_length).pack()
            reply = self.request_peer(Command.DMA_READ, request)
            if len(reply.payload) != 16 + chunk_length:
                raise VfioUserError(
                    errno.EIO, f"DMA_READ reply of {len(reply.payload)} bytes for {chunk_length}"
                )
            out.write(memoryview(reply.payload)[16:])
        return out.getvalue()

    def dma_write_messages(self, address: int, data: bytes) -> None:
        view = memoryview(data)  # slices of it are not copies: the message is the only one
        for offset, chunk_length in self._dma_chunks(len(data)):
            request = m.DmaAccess(address + offset, chunk_length).pack()
            request += view[offset : offset + chunk_length]
            self.request_peer(Command.DMA_WRITE, request)

    # ------------------------------------------------------------------ dispatch

    def handle(self, frame: Frame) -> Outgoing | None:
        """Answer one message.  Never raises for anything the peer sent."""
        header = frame.header
        if header.flags & HEADER_TYPE_MASK == HeaderFlags.TYPE_REPLY:
            self.deliver_reply(frame)
            return None
        incoming = Incoming(frame)
        try:
            handler = self._handlers.get(header.command)
            if handler is None or not self.negotiated:
                handler = self._refuse
            reply = handler(incoming)
            result = Outgoing(
                m.encode_message(header.msg_id, header.command, reply.payload, reply=True),
                reply.fds,
            )
        except Exception as exc:
            result = self.failed(header, exc)
        finally:
            if frame.fds and not incoming.fds_taken:
                close_fds(frame.fds)
            self.messages_handled += 1
        if header.no_reply:
            return None
        return result

    def failed(self, header: m.Header, exc: Exception) -> Outgoing:
        """The error reply to a message whose handling raised ``exc`` (logged): the
        errno of a refusal, EIO for anything else (a bug)."""
        if isinstance(exc, ProtocolError | VfioUserError):
            log.info(
                "command %s id=%d refused: %s (errno %d)",
                _command_name(header.command), header.msg_id, exc, exc.errno,
            )  # fmt: skip
            return self._error(header, exc.errno)
        log.error(
            "bug while handling command %s id=%d",
            _command_name(header.command), header.msg_id, exc_info=exc,
        )  # fmt: skip
        return self._error(header, errno.EIO)

    def _error(self, header: m.Header, error: int) -> Outgoing:
        self.errors_replied += 1
        return Outgoing(m.encode_message(header.msg_id, header.command, reply=True, error=error))

    def _refuse(self, incoming: Incoming) -> Reply:
        command = incoming.frame.header.command
        if command not in self._handlers:
            raise UnsupportedCommand(f"command {_command_name(command)} is not supported")
        if command == Command.VERSION:
            return self._version(incoming)
        raise VfioUserError(errno.EINVAL, "VERSION must be negotiated first")

    # ------------------------------------------------------------------ handlers

    def _version(self, incoming: Incoming) -> Reply:
        frame = incoming.frame
        request = m.Version.unpack(frame.payload, frame.fds)
        if self.negotiated:
            raise VfioUserError(errno.EINVAL, "VERSION already negotiated")
        if request.major != PROTOCOL_MAJOR:
            raise VfioUserError(errno.ENOTSUP, f"protocol major {request.major} not supported")
        caps = request.capabilities
        xfer = caps.get("max_data_xfer_size", SERVER_MAX_DATA_XFER)
        fds = caps.get("max_msg_fds", 1)
        if not isinstance(xfer, int) or isinstance(xfer, bool) or xfer <= 0:
            raise VfioUserError(errno.EINVAL, "max_data_xfer_size must be a positive integer")
        if xfer < SERVER_MIN_DATA_XFER:
            raise VfioUserError(
                errno.EINVAL,
                f"max_data_xfer_size {xfer} is below the minimum of {SERVER_MIN_DATA_XFER}",
            )
        if not isinstance(fds, int) or isinstance(fds, bool) or fds < 0:
            raise VfioUserError(errno.EINVAL, "max_msg_fds must be a non-negative integer")
        self.client_capabilities = caps
        self.max_data_xfer = min(xfer, SERVER_MAX_DATA_XFER)
        self.client_max_fds = fds
        self.negotiated = True
        return Reply(_fit_version_reply(caps, len(frame.payload)))

    def _dma_map(self, incoming: Incoming) -> Reply:
        request = m.DmaMap.unpack(incoming.frame.payload, incoming.frame.fds)
        incoming.take_fds()
        self.dma.map(request)
        return Reply()

    def _dma_unmap(self, incoming: Incoming) -> Reply:
        request = m.DmaUnmap.unpack(incoming.frame.payload, incoming.frame.fds)
        self.dma.unmap(request)
        return Reply(request.pack())

    def _device_info(self, incoming: Incoming) -> Reply:
        m.DeviceInfoRequest.unpack(incoming.frame.payload, incoming.frame.fds)
        return Reply(self.device.device_info().pack())

    def _region_info(self, incoming: Incoming) -> Reply:
        request = m.RegionInfoRequest.unpack(incoming.frame.payload, incoming.frame.fds)
        info, fd = self.device.region_info(request.index)
        payload = info.pack_reply(request.argsz)
        # QEMU takes the fd only with the complete reply (the second, larger request).
        complete = request.argsz >= info.full_size()
        return Reply(payload, (fd,) if fd is not None and complete else ())

    def _irq_info(self, incoming: Incoming) -> Reply:
        request = m.IrqInfoRequest.unpack(incoming.frame.payload, incoming.frame.fds)
        for info in self.device.irq_infos():
            if info.index == request.index:
                return Reply(info.pack())
        raise VfioUserError(errno.EINVAL, f"no IRQ index {request.index}")

    def _set_irqs(self, incoming: Incoming) -> Reply:
        request = m.SetIrqs.unpack(incoming.frame.payload, incoming.frame.fds)
        incoming.take_fds()
        self.irqs.set_irqs(request)
        return Reply()

    def _region_read(self, incoming: Incoming) -> Reply:
        frame = incoming.frame
        offset, region, count, _ = m.parse_region_access(frame.payload, frame.fds, with_data=False)
        if count > self.max_data_xfer:
            self._refuse_xfer(count)
        data = self.device.region_read(region, offset, count)
        return Reply(m.pack_region_access(offset, region, len(data), data))

    def _region_write(self, incoming: Incoming) -> Reply:
        frame = incoming.frame
        offset, region, count, data = m.parse_region_access(
            frame.payload, frame.fds, with_data=True
        )
        if count > self.max_data_xfer:
            self._refuse_xfer(count)
        self.device.region_write(region, offset, data)
        return Reply(m.pack_region_access(offset, region, count))

    def _region_write_multi(self, incoming: Incoming) -> Reply:
        for write in m.unpack_region_write_multi(incoming.frame.payload, incoming.frame.fds):
            self.device.region_write(write.region, write.offset, write.data)
        return Reply()

    def _device_reset(self, incoming: Incoming) -> Reply:
        m.Empty.unpack(incoming.frame.payload, incoming.frame.fds)
        self.device.reset()
        return Reply()

    def _refuse_xfer(self, count: int) -> None:
        raise VfioUserError(errno.EINVAL, f"transfer of {count} bytes exceeds {self.max_data_xfer}")


def _fit_version_reply(proposed: dict[str, object], request_payload_size: int) -> bytes:
    """Our VERSION reply: the spec wants a subset of the client's capabilities, and QEMU
    a reply no longer than its request, so optional capabilities go until it fits."""
    caps = {k: v for k, v in SERVER_CAPABILITIES.items() if k in proposed}
    while True:
        payload = m.Version(PROTOCOL_MAJOR, PROTOCOL_MINOR, caps).pack()
        if len(payload) <= request_payload_size or not caps:
            return payload
        caps.popitem()


def _command_name(command: int) -> str:
    try:
        return Command(command).name
    except ValueError:
        return str(command)
