"""Framing: turning a byte stream plus SCM_RIGHTS fds into whole messages, sans-IO.

Theory of operation.  A unix stream socket delivers bytes in chunks that need not
line up with messages, and file descriptors arrive beside the chunk that carried
them.  Senders (QEMU, our client) write every message with one ``sendmsg`` and
attach its fds there, and the kernel never lets one ``recvmsg`` run past a chunk
that carried fds.  So the fds that come with a read belong to the message that
holds the *last* byte of that read.  ``FrameDecoder.feed`` records each group of
fds with the stream position where its read ended and hands it to the message whose
byte range covers that position.

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
        self._buffer = bytearray()
        self._consumed = 0  # stream position of _buffer[0]
        self._pending_fds: deque[tuple[int, list[int]]] = deque()  # (stream end, fds)

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def feed(self, data: bytes | memoryview, fds: list[int] | tuple[int, ...] = ()) -> list[Frame]:
        """Add received bytes (and the fds received with them); return whole messages."""
        base = self._consumed  # stream position of chunk[0]
        if self._buffer:
            self._buffer += data
            chunk: bytes | memoryview = bytes(self._buffer)
            self._buffer.clear()
        else:
            chunk = data  # the common case: parse straight from the receive buffer
        length = len(chunk)
        if fds:
            self._pending_fds.append((base + length, list(fds)))
        frames: list[Frame] = []
        position = 0
        while length - position >= HEADER_SIZE:
            msg_id, command, size, flags, error = _HEADER.unpack_from(chunk, position)
            if size < HEADER_SIZE or size > self.max_message_size:
                # Frames parsed in this call are never returned: their fds are ours to close.
                for frame in frames:
                    _close_all(frame.fds)
                if size < HEADER_SIZE:
                    raise FramingError(f"message size {size} is smaller than its header")
                raise FramingError(
                    f"message size {size} exceeds the limit of {self.max_message_size}"
                )
            end = position + size
            if end > length:
                break
            payload = bytes(chunk[position + HEADER_SIZE : end])
            taken = self._take_fds(base + position, base + end) if self._pending_fds else ()
            frames.append(Frame(Header(msg_id, command, size, flags, error), payload, taken))
            position = end
        self._consumed = base + position
        if position < length:
            self._buffer += chunk[position:]
        return frames

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
        self._buffer.clear()


def _close_all(fds: list[int] | tuple[int, ...]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


close_fds = _close_all
