"""Unix-socket transport: whole messages out, frames in, fds over SCM_RIGHTS."""

from __future__ import annotations

import array
import os
import resource
import socket

from device.errors import FramingError
from device.vfio_user.protocol.codec import DEFAULT_MAX_MESSAGE_SIZE, Frame, FrameDecoder, close_fds

RECV_CHUNK = 256 * 1024
# The most fds one read may bring.  More are cut off by the kernel (MSG_CTRUNC), and
# a message whose fds were lost cannot be answered correctly, so that disconnects.
# The kernel also sets MSG_CTRUNC when it could not install the fds that came (EMFILE:
# the process is at its fd limit), which is the likelier cause with our peers.
MAX_FDS_PER_READ = 64
_FD_SIZE = array.array("i").itemsize
ANCILLARY_SIZE = socket.CMSG_SPACE(MAX_FDS_PER_READ * _FD_SIZE)
# Plain ints: the socket module's flag enums cost microseconds per operation.
MSG_CTRUNC = int(socket.MSG_CTRUNC)
MSG_CMSG_CLOEXEC = int(socket.MSG_CMSG_CLOEXEC)
_SOL_SOCKET = int(socket.SOL_SOCKET)
_SCM_RIGHTS = int(socket.SCM_RIGHTS)
_NO_FDS: list[int] = []  # never appended to: read() hands it out for fd-less reads


class ConnectionClosed(ConnectionError):
    """The peer closed the connection (or it was reset)."""


class Connection:
    """A connected vfio-user socket.  Not thread-safe for concurrent senders: the
    owner serialises sends (see ``send_lock`` users)."""

    def __init__(self, sock: socket.socket, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE):
        self.sock = sock
        self.decoder = FrameDecoder(max_message_size)
        # One receive buffer for the connection's life: recvmsg() would allocate (and
        # for this size mmap) a fresh one per call, which costs more than the message.
        self.buffer = bytearray(RECV_CHUNK)
        self._view = memoryview(self.buffer)

    def fileno(self) -> int:
        return self.sock.fileno()

    def receive(self) -> list[Frame]:
        """Block until at least one byte arrives; return the whole frames now complete."""
        while True:
            size, fds = self.read()
            frames = self.decoder.feed(self._view[:size], fds)
            if frames:
                return frames

    def read(self, flags: int = 0) -> tuple[int, list[int]]:
        """One read of the socket into ``buffer``: how many bytes came, and the fds that
        came with them.  The bytes are the caller's to parse or to hand to ``decoder``
        before the next read; raises ConnectionClosed at end of stream (and, with
        MSG_DONTWAIT in ``flags``, BlockingIOError when nothing is there)."""
        try:
            size, ancdata, msg_flags, _ = self.sock.recvmsg_into(
                [self._view], ANCILLARY_SIZE, MSG_CMSG_CLOEXEC | flags
            )
        except (ConnectionResetError, BrokenPipeError) as exc:
            raise ConnectionClosed(str(exc)) from None
        return self.checked(size, ancdata, msg_flags)

    def checked(
        self, size: int, ancdata: list[tuple[int, int, bytes]], msg_flags: int
    ) -> tuple[int, list[int]]:
        """What one ``recvmsg_into`` of ours returned, checked: (size, fds)."""
        fds = _fds_from_ancillary(ancdata) if ancdata else _NO_FDS
        if msg_flags & MSG_CTRUNC:
            close_fds(fds)
            raise FramingError(_fds_lost_reason(len(fds)))
        if not size:
            close_fds(fds)
            raise ConnectionClosed("peer closed the connection")
        return size, fds

    def send(self, data: bytes | memoryview, fds: tuple[int, ...] | list[int] = ()) -> None:
        try:
            if fds:
                ancillary = [(_SOL_SOCKET, _SCM_RIGHTS, array.array("i", fds).tobytes())]
                sent = self.sock.sendmsg([data], ancillary)
            else:
                sent = self.sock.send(data)
            if sent < len(data):
                self.sock.sendall(memoryview(data)[sent:])
        except (ConnectionResetError, BrokenPipeError) as exc:
            raise ConnectionClosed(str(exc)) from None

    def close(self) -> None:
        self.decoder.close()
        try:
            self.sock.close()
        except OSError:
            pass


def _fds_lost_reason(received: int) -> str:
    """Why MSG_CTRUNC probably happened, with the numbers that tell the causes apart."""
    try:
        # After close_fds above: the fds that did arrive are free again for listdir.
        open_fds = str(len(os.listdir("/proc/self/fd")))
    except OSError as exc:
        open_fds = f"unknown ({exc.strerror})"
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return (
        f"file descriptors were lost (MSG_CTRUNC; {received} arrived): the process may "
        f"have hit its fd limit ({open_fds} fds open, RLIMIT_NOFILE soft limit {soft}), "
        f"or the peer sent more than {MAX_FDS_PER_READ} fds in one message"
    )


def _fds_from_ancillary(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(payload) - len(payload) % _FD_SIZE
            fds.extend(array.array("i", payload[:usable]))
    return fds
