"""Framing: turning a byte stream plus SCM_RIGHTS fds into whole messages, sans-IO.

Theory of operation.  A unix stream socket delivers bytes in chunks that need not
line up with messages, and file descriptors arrive beside the chunk that carried
them.  Senders (QEMU, our client) write every message with one ``sendmsg`` and
attach its fds there, and the kernel never lets one ``recvmsg`` run past a chunk
that carried fds.  So the fds that come with a read belong to the message that
holds the *last* byte of that read.  ``FrameDecoder.feed`` records each group of
fds with the stream position where its read ended and hands it to the message whose
byte range covers that position.

Whole messages are parsed straight from the bytes of the read (the caller's receive
buffer): the only copy is the payload handed out.  What is left at the end of a read
is the start of one incomplete message, and only that is kept (``_partial``).  The
decoder then knows how many bytes it needs before parsing is worth trying again
(``_need``: the header's 16 until a header is in, then the size that header gives),
so later reads are appended, each byte once, up to exactly that many, and nothing is
re-parsed or re-copied however slowly a peer drips a message (before, each read
re-copied the whole partial message: quadratic in its size).  Once the partial
message is whole it becomes a frame and the rest of the read is parsed in place
again.  So the buffer never holds more than one message, and memory stays bounded
by ``max_message_size``.

A header whose size is smaller than the header or larger than the limit is a
``FramingError``: the stream cannot be resynchronised, and the caller must close
the connection and the fds it still holds (``FrameDecoder.close``).
"""

from __future__ import annotations

import os
from collections import deque
from typing import NamedTuple

from device.errors import FramingError
from device.vfio_user.protocol.constants import HEADER_SIZE
from device.vfio_user.protocol.messages import _HEADER, Header

# A message may carry up to max_data_xfer_size bytes of data plus its fixed fields.
DEFAULT_MAX_MESSAGE_SIZE = 1024 * 1024 + 4096


class Frame(NamedTuple):
    """One whole message: its header, payload bytes and the fds that came with it."""

    header: Header
    payload: bytes
    fds: tuple[int, ...] = ()


class FrameDecoder:
    def __init__(self, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> None:
        self.max_message_size = max_message_size
        self._partial = bytearray()  # the first bytes of one incomplete message, no more
        self._need = HEADER_SIZE  # how long _partial must be before parsing it again
        self._consumed = 0  # stream position of _partial[0]: the end of the last frame
        self._pending_fds: deque[tuple[int, list[int]]] = deque()  # (stream end, fds)
        # Bytes copied into _partial (payload copies aside), so tests can check that
        # a dripped message is copied once, not once per read.
        self.bytes_copied = 0

    @property
    def buffered(self) -> int:
        return len(self._partial)

    def feed(self, data: bytes | memoryview, fds: list[int] | tuple[int, ...] = ()) -> list[Frame]:
        """Add received bytes (and the fds received with them); return whole messages."""
        base = self._consumed + len(self._partial)  # stream position of data[0]
        length = len(data)
        if fds:
            self._pending_fds.append((base + length, list(fds)))
        frames: list[Frame] = []
        position = 0
        if self._partial:
            position = self._fill(data)
            if len(self._partial) < self._need:
                return frames  # all of data went into the partial message
            frames.append(self._partial_frame())
        # The common case (nothing buffered): parse straight from the receive buffer.
        while length - position >= HEADER_SIZE:
            msg_id, command, size, flags, error = _HEADER.unpack_from(data, position)
            if size < HEADER_SIZE or size > self.max_message_size:
                # Frames parsed in this call are never returned: their fds are ours to close.
                for frame in frames:
                    _close_all(frame.fds)
                self._check_size(size)
            end = position + size
            if end > length:
                self._need = size  # the header is in: wait for the whole message
                break
            payload = bytes(data[position + HEADER_SIZE : end])
            taken = self._take_fds(base + position, base + end) if self._pending_fds else ()
            frames.append(Frame(Header(msg_id, command, size, flags, error), payload, taken))
            position = end
        self._consumed = base + position
        if position < length:
            self._partial += memoryview(data)[position:]  # one copy of the tail only
            self.bytes_copied += length - position
        return frames

    def _fill(self, data: bytes | memoryview) -> int:
        """Append the bytes of ``data`` the partial message still lacks (at most up to
        its end); return how many were used.  Raises FramingError for a bad header."""
        used = 0
        while True:
            take = min(self._need - len(self._partial), len(data) - used)
            if take > 0:
                self._partial += memoryview(data)[used : used + take]
                self.bytes_copied += take
                used += take
            if len(self._partial) < self._need:
                return used
            if self._need == HEADER_SIZE:  # just completed the header: now the size is known
                size = _HEADER.unpack_from(self._partial)[2]
                self._check_size(size)
                if size > HEADER_SIZE:
                    self._need = size
                    continue
            return used

    def _partial_frame(self) -> Frame:
        """The now whole partial message as a frame; the buffer starts afresh."""
        msg_id, command, size, flags, error = _HEADER.unpack_from(self._partial)
        with memoryview(self._partial) as view:
            payload = bytes(view[HEADER_SIZE:size])
        start = self._consumed
        taken = self._take_fds(start, start + size) if self._pending_fds else ()
        self._consumed = start + size
        self._partial = bytearray()  # drop a buffer that may have grown to a whole message
        self._need = HEADER_SIZE
        return Frame(Header(msg_id, command, size, flags, error), payload, taken)

    def _check_size(self, size: int) -> None:
        if size < HEADER_SIZE:
            raise FramingError(f"message size {size} is smaller than its header")
        if size > self.max_message_size:
            raise FramingError(f"message size {size} exceeds the limit of {self.max_message_size}")

    def _take_fds(self, start: int, end: int) -> tuple[int, ...]:
        taken: list[int] = []
        while self._pending_fds and self._pending_fds[0][0] <= end:
            position, fds = self._pending_fds.popleft()
            if position <= start:  # cannot happen with well-behaved senders; never leak
                _close_all(fds)
                continue
            taken.extend(fds)
        return tuple(taken)

    def close(self) -> None:
        """Close every fd received for a message that never completed."""
        while self._pending_fds:
            _close_all(self._pending_fds.popleft()[1])
        self._partial = bytearray()
        self._need = HEADER_SIZE


def _close_all(fds: list[int] | tuple[int, ...]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


close_fds = _close_all
