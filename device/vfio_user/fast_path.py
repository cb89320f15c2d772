"""The trapped-access fast path: a small REGION_READ or REGION_WRITE answered straight
from the receive buffer.

Theory of operation.  QEMU turns each trapped guest access (a register read or write)
into one message and, posted writes aside, waits for the reply before it sends the
next; so nearly every read of the socket holds exactly one whole REGION_READ or
REGION_WRITE of 1 to 8 bytes.  ``FastPath.receive`` reads the socket itself
(``Connection.read``).  When a read is exactly one such message, with no fds, nothing
buffered before it and VERSION negotiated, it is decoded with one ``struct`` call,
handed to the device, and the reply is packed into a buffer kept for the connection
and sent at once: no frame, no typed message, no dispatch table, no reply bytes built
per message.  Every other read (another command, a larger access, fds, a partial
message or several at once) goes to the frame decoder and comes back as frames for
the session's general dispatcher, exactly as before.

The answers are the session's: the same device calls, errors as errno replies through
``Session.failed``, No_reply honoured, ``messages_handled`` counted.  A message is
answered here only if the general path would have answered it the same way, so the
fast path is an optimisation, never a second protocol.

Adaptive polling.  On these VMs a vCPU that goes idle takes tens of microseconds to
wake, which is more than a register access costs.  So after answering, the thread may
poll the socket (non-blocking reads) for a short while before it blocks, but only
while polling pays: it keeps the gap it saw between its replies and the next requests
(an exponential average) and polls only when that gap is shorter than the poll
budget; a miss (the budget ran out) makes the average grow, so a peer that pauses
stops the polling soon.  Off by default (``POLL_US`` 0): a spinning thread costs CPU
that others on a shared machine want, and on one CPU it delays the very client it
waits for (measured: 14.6 -> 15.5 us per round trip pinned to one CPU, 17.4 -> 16.8 us
with client and server free to move, for 60 % more server CPU per message);
``serve --poll-us`` turns it on where a client's wake-up is slow.
"""

from __future__ import annotations

import socket
import struct
import threading
import time

from device.vfio_user.protocol import messages as m
from device.vfio_user.protocol.codec import Frame
from device.vfio_user.protocol.constants import Command, HeaderFlags
from device.vfio_user.session import Session
from device.vfio_user.transport import (
    ANCILLARY_SIZE,
    MSG_CMSG_CLOEXEC,
    MSG_CTRUNC,
    Connection,
    ConnectionClosed,
)

# Header (id, command, size, flags, error), then the access (offset, region, count).
_ACCESS = struct.Struct("<HHIIIQII")
_ACCESS_SIZE = _ACCESS.size  # 32
_MAX_COUNT = 8  # the widest trapped access a CPU makes
_READ = int(Command.REGION_READ)
_WRITE = int(Command.REGION_WRITE)
_NO_REPLY = int(HeaderFlags.NO_REPLY)
_REPLY = int(HeaderFlags.TYPE_REPLY)
_DONTWAIT = int(socket.MSG_DONTWAIT)
_NO_FDS: list[int] = []  # never appended to


# The poll budget of every fast path made from now on (``serve --poll-us``).
POLL_US = 0.0


class FastPath:
    def __init__(
        self, connection: Connection, session: Session, send_lock: threading.Lock,
        poll_us: float | None = None,
    ) -> None:  # fmt: skip
        self.connection = connection
        self.session = session
        self.device = session.device
        self.send_lock = send_lock
        self.buffer = connection.buffer
        self._reply = bytearray(_ACCESS_SIZE + _MAX_COUNT)
        whole = memoryview(self._reply)
        # The reply of each size, sliced once: slicing per message costs more than the send.
        self._replies = [whole[: _ACCESS_SIZE + n] for n in range(_MAX_COUNT + 1)]
        self.poll_ns = int((POLL_US if poll_us is None else poll_us) * 1000)
        self._gap_ns = self.poll_ns  # average wait for the next request after a reply
        self.polled_hits = 0
        self._send = connection.sock.send

    def receive(self) -> list[Frame]:
        """Answer fast-path messages as they come; return the first frames that need the
        general dispatcher.  Raises what ``Connection.read`` raises."""
        connection = self.connection
        decoder = connection.decoder
        polling = bool(self.poll_ns)
        # The plain socket call, not Connection.read: a wrapper costs a tenth of the
        # round trip.  Anything unusual (fds, a cut-off read, end of stream) goes
        # through Connection.checked, as Connection.read would.
        recvmsg_into, views = connection.sock.recvmsg_into, [memoryview(self.buffer)]
        empty = not decoder.buffered
        try:
            while True:
                if polling:
                    size, fds = self._read_polling()
                else:
                    size, ancdata, flags, _ = recvmsg_into(views, ANCILLARY_SIZE, MSG_CMSG_CLOEXEC)
                    if ancdata or flags & MSG_CTRUNC or not size:
                        size, fds = connection.checked(size, ancdata, flags)
                    else:
                        fds = _NO_FDS
                if empty and not fds and size >= _ACCESS_SIZE and self._answer(size):
                    continue
                frames = decoder.feed(memoryview(self.buffer)[:size], fds)
                empty = not decoder.buffered
                if frames:
                    return frames
        except (ConnectionResetError, BrokenPipeError) as exc:
            raise ConnectionClosed(str(exc)) from None

    def _answer(self, size: int) -> bool:
        """Answer the one message in the buffer if it is a fast-path one; False if not."""
        buffer = self.buffer
        msg_id, command, msg_size, flags, _, offset, region, count = _ACCESS.unpack_from(buffer)
        if msg_size != size or flags & ~_NO_REPLY or not 0 < count <= _MAX_COUNT:
            return False
        if command == _READ:
            if size != _ACCESS_SIZE:
                return False
        elif command != _WRITE or size != _ACCESS_SIZE + count:
            return False
        session = self.session
        if not session.negotiated:
            return False  # the general path refuses it, with the reason logged
        reply: bytes | memoryview
        try:
            if command == _READ:
                data = self.device.region_read(region, offset, count)
                if len(data) != count:
                    raise RuntimeError(f"the device read {len(data)} bytes for {count}")
                self._reply[_ACCESS_SIZE : _ACCESS_SIZE + count] = data
                reply = self._replies[count]
            else:
                self.device.region_write(region, offset, bytes(buffer[_ACCESS_SIZE:size]))
                reply = self._replies[0]
            _ACCESS.pack_into(
                self._reply, 0, msg_id, command, len(reply), _REPLY, 0, offset, region, count
            )
        except Exception as exc:
            reply = session.failed(m.Header(msg_id, command, size, flags), exc).data
        session.messages_handled += 1
        session.fast_answers += 1
        if not flags:  # NO_REPLY: never answered, not even with an error
            try:
                with self.send_lock:
                    sent = self._send(reply)
                    if sent < len(reply):
                        self.connection.sock.sendall(reply[sent:])
            except OSError as exc:
                raise ConnectionClosed(f"sending a reply: {exc}") from None
        return True

    def _read_polling(self) -> tuple[int, list[int]]:
        """One read of the socket: non-blocking reads first, for at most the poll budget,
        if the peer has lately sent its next request within it."""
        connection, clock = self.connection, time.perf_counter_ns
        start = clock()
        if self._gap_ns < self.poll_ns:
            deadline = start + self.poll_ns
            while True:
                try:
                    got = connection.read(_DONTWAIT)
                except BlockingIOError:
                    if clock() < deadline:
                        continue
                    break
                self.polled_hits += 1
                self._gap_ns = (3 * self._gap_ns + clock() - start) // 4
                return got
        got = connection.read()
        self._gap_ns = (3 * self._gap_ns + clock() - start) // 4
        return got
