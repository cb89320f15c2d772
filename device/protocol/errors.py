"""The protocol layer's error hierarchy.

    ProtocolError                 anything the protocol layer refuses; carries an errno
     +-- FramingError             the byte stream itself is broken (bad header, size, fds
     |                            lost): nothing after it can be trusted, so the transport
     |                            must disconnect
     +-- MalformedMessage         one message is well framed but its payload is wrong:
     |                            answer it with an errno reply and carry on
     +-- UnsupportedCommand       a well framed command this server does not implement
"""

from __future__ import annotations

import errno as _errno


class ProtocolError(Exception):
    errno: int = _errno.EINVAL

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        if errno is not None:
            self.errno = errno


class FramingError(ProtocolError):
    errno = _errno.EPROTO


class MalformedMessage(ProtocolError):
    errno = _errno.EINVAL


class UnsupportedCommand(ProtocolError):
    errno = _errno.ENOTSUP


class VfioUserError(Exception):
    """Raised by a device handler to answer the current request with an errno reply."""

    def __init__(self, errno: int, message: str = "") -> None:
        super().__init__(message or _errno.errorcode.get(errno, str(errno)))
        self.errno = errno
