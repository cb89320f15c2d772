"""One connection to the server under test, where every wait has a deadline.

The client library (``vfio_user/client.py``) trusts its server: it blocks on the
socket's timeout per read and loops until a whole reply is in.  A conformance suite
cannot: a server that drips a byte just before each timeout, floods requests of its
own or never answers must cost the suite a bounded time.  So ``Peer`` reads with the
time left to one deadline per wait, parses with the protocol's own ``FrameDecoder``,
and turns whatever the server does wrong into a ``Violation`` that names it.

Every reply is checked against the rules that hold for all messages (its id and
command echo the request, it is typed Reply, an error reply is a bare header), so
each check enforces them without saying so.  Requests the server sends on its own
(DMA_READ/DMA_WRITE) are refused with EFAULT, as a client with no such memory would.
"""

from __future__ import annotations

import array
import errno
import itertools
import socket
import time
from collections import deque
from dataclasses import dataclass

from device.errors import FramingError
from device.vfio_user.protocol import messages as m
from device.vfio_user.protocol.codec import Frame, FrameDecoder, close_fds
from device.vfio_user.protocol.constants import HEADER_SIZE, Command

# A reply carries at most the server's max_data_xfer_size (1 MiB unless it says
# otherwise) plus its fixed fields; anything larger is the server's mistake.
MAX_REPLY = (1 << 20) + 4096
RECEIVE_CHUNK = 256 * 1024
MAX_FDS = 64
_FD_SIZE = array.array("i").itemsize
_ANCILLARY = socket.CMSG_SPACE(MAX_FDS * _FD_SIZE)
# A server that sends requests of its own without end must not keep a wait alive.
MAX_SERVER_REQUESTS_PER_WAIT = 1000


class Violation(Exception):
    """The server broke a rule; the message says which, in the reader's terms."""


class NoReply(Violation):
    """Nothing (or not all of it) arrived before the deadline."""


class HungUp(Violation):
    """The server closed the connection."""


def command_name(command: int) -> str:
    try:
        return Command(command).name
    except ValueError:
        return f"command {command}"


@dataclass
class Reply:
    """A reply frame; ``fds`` are ours to close (``close``)."""

    header: m.Header
    payload: bytes
    fds: tuple[int, ...] = ()

    @property
    def error(self) -> int:
        """The errno of an error reply (EIO for an error reply that gives none), else 0."""
        if not self.header.is_error:
            return 0
        return self.header.error or errno.EIO

    def close(self) -> None:
        close_fds(self.fds)
        self.fds = ()


class Peer:
    def __init__(self, path: str, timeout: float) -> None:
        self.timeout = timeout
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
        except OSError:
            self.sock.close()
            raise
        self.decoder = FrameDecoder(MAX_REPLY)
        self.frames: deque[Frame] = deque()
        self.ids = itertools.count(1)
        self.server_requests = 0
        self.closed = False

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for frame in self.frames:
            close_fds(frame.fds)
        self.frames.clear()
        self.decoder.close()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes a thread waiting on it
        except OSError:
            pass
        try:
            self.sock.close()
        except OSError:
            pass

    # ------------------------------------------------------------------ raw

    def send(self, data: bytes, fds: tuple[int, ...] = ()) -> None:
        """Send bytes (and fds with them); a server that hung up is ``HungUp``."""
        self.sock.settimeout(self.timeout)
        try:
            if fds:
                rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
                sent = self.sock.sendmsg([data], rights)
                if sent < len(data):
                    self.sock.sendall(data[sent:])
            else:
                self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise HungUp(f"the server closed the connection ({exc.strerror})") from None
        except TimeoutError:
            raise NoReply(f"the server took no data for {self.timeout:g} s") from None

    def next_frame(self, deadline: float) -> Frame:
        """The next whole message from the server, before ``deadline`` (monotonic)."""
        while not self.frames:
            left = deadline - time.monotonic()
            if left <= 0:
                partial = self.decoder.buffered
                raise NoReply("nothing" if not partial else f"only {partial} bytes of a message")
            self.sock.settimeout(left)
            try:
                data, ancillary, flags, _ = self.sock.recvmsg(
                    RECEIVE_CHUNK, _ANCILLARY, socket.MSG_CMSG_CLOEXEC
                )
            except TimeoutError:
                continue  # the loop head reports it
            except (ConnectionResetError, BrokenPipeError):
                raise HungUp("the server reset the connection") from None
            fds = _fds(ancillary)
            if flags & socket.MSG_CTRUNC:
                close_fds(fds)
                raise Violation(f"the server sent more than {MAX_FDS} file descriptors at once")
            if not data:
                close_fds(fds)
                raise HungUp("the server closed the connection")
            try:
                self.frames.extend(self.decoder.feed(data, fds))
            except FramingError as exc:
                raise Violation(f"the server sent a broken message: {exc}") from None
        return self.frames.popleft()

    # ------------------------------------------------------------------ exchanges

    def request(
        self,
        command: int,
        payload: bytes = b"",
        fds: tuple[int, ...] = (),
        *,
        msg_id: int | None = None,
        no_reply: bool = False,
    ) -> Reply | None:
        """Send one command and wait for its reply (none for ``no_reply``)."""
        ident = msg_id if msg_id is not None else next(self.ids) & 0xFFFF
        self.send(m.encode_message(ident, command, payload, reply=False, no_reply=no_reply), fds)
        if no_reply:
            return None
        return self.reply_to(ident, command)

    def reply_to(self, msg_id: int, command: int) -> Reply:
        """Wait for the reply to ``msg_id``, checking the rules every reply obeys."""
        deadline = time.monotonic() + self.timeout
        for _ in range(MAX_SERVER_REQUESTS_PER_WAIT):
            try:
                frame = self.next_frame(deadline)
            except NoReply as exc:
                raise NoReply(
                    f"no reply to {command_name(command)} (id {msg_id}) within "
                    f"{self.timeout:g} s: {exc} arrived"
                ) from None
            if not frame.header.is_reply:
                self.serve_request(frame)
                continue
            reply = Reply(frame.header, frame.payload, frame.fds)
            try:
                check_reply(reply, msg_id, command)
            except Violation:
                reply.close()
                raise
            return reply
        raise Violation(f"the server sent {MAX_SERVER_REQUESTS_PER_WAIT} requests, no reply")

    def expect_silence(self, window: float, what: str) -> None:
        """Nothing may arrive within ``window`` seconds (a hang-up is fine)."""
        deadline = time.monotonic() + window
        try:
            frame = self.next_frame(deadline)
        except (NoReply, HungUp):
            return
        close_fds(frame.fds)
        raise Violation(f"{what}, yet the server sent {describe(frame.header)}")

    def serve_request(self, frame: Frame) -> None:
        """A request of the server's own: refused (this client maps no memory)."""
        close_fds(frame.fds)
        self.server_requests += 1
        header = frame.header
        if not header.no_reply:
            self.send(
                m.encode_message(header.msg_id, header.command, reply=True, error=errno.EFAULT)
            )


def describe(header: m.Header) -> str:
    """``an error reply (EINVAL) to DMA_READ id 7``, ``a request REGION_READ id 3``."""
    name = f"{command_name(header.command)} id {header.msg_id}"
    if not header.is_reply:
        return f"a request {name}"
    if header.is_error:
        return f"an error reply ({errno.errorcode.get(header.error, header.error)}) to {name}"
    return f"a reply to {name}"


def check_reply(reply: Reply, msg_id: int, command: int) -> None:
    header = reply.header
    name = command_name(command)
    if header.msg_id != msg_id:
        raise Violation(f"a reply with id {header.msg_id} came for {name} id {msg_id}")
    if header.command != command:
        raise Violation(f"the reply to {name} names {command_name(header.command)}")
    if header.flags & 0xF != 1:
        raise Violation(f"the reply to {name} has message type {header.flags & 0xF}, not 1")
    if header.is_error and header.size != HEADER_SIZE:
        raise Violation(
            f"the error reply to {name} carries {header.size - HEADER_SIZE} payload bytes "
            "(the spec: an error reply is only the header)"
        )


def _fds(ancillary: list[tuple[int, int, bytes]]) -> list[int]:
    found: list[int] = []
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % _FD_SIZE
            found.extend(array.array("i", data[:usable]))
    return found
