"""Every error mgpu raises on purpose, in one tree.

    MgpuError                     base of everything below
     +-- ProtocolError            the vfio-user protocol was broken; carries an errno
     |    +-- RemoteProtocolError the *peer* broke it (what it sent cannot be accepted)
     |    |    +-- FramingError        the byte stream itself is broken (bad header size,
     |    |    |                       fds lost): nothing after it can be trusted, so the
     |    |    |                       transport disconnects
     |    |    +-- MalformedMessage    one well-framed message has a bad payload: answer
     |    |    |                       it with an errno reply and carry on
     |    |    +-- UnsupportedCommand  a well-framed command this side does not implement
     |    +-- LocalProtocolError  *we* were about to break it (a caller of our client
     |                            asked for something the protocol cannot carry): a bug
     |                            on this side, never the peer's fault
     +-- VfioUserError            one request refused with an errno reply: the device
     |                            model said no (bad region access, bad DMA map), or the
     |                            peer refused one of our requests
     +-- DeviceError              a value the guest driver programmed was refused; its
     |                            ``code`` (an ErrorCode) is what the registers report,
     |                            so it never leaves the device model as an exception
     +-- CapacityError            the control plane cannot host what was asked (an
     |                            unknown type, not enough memory or contexts, a name
     |                            in use); the message says what is left
     |    +-- OutOfMemory         an allocator has no run large enough (internal: the
     |                            device model turns it into DeviceError or CapacityError)
     +-- SetupError               this machine cannot do what was asked; the message says
     |                            what to do (FuseUnavailable, SocketPathError,
     |                            guest_images.BuildError, harness.vm.GuestError)
     +-- FrameError               a display's frame cannot be shown (stride too small, a
                                  short buffer, an unknown pixel format, a bad cursor, no
                                  picture at all); the message says which and why

The split between remote and local protocol errors follows h11: the same codec
decodes what the peer sent (remote errors) and encodes what we send (local errors),
so a server answers a RemoteProtocolError with an errno reply or a disconnect and
treats a LocalProtocolError as its own bug.
"""

from __future__ import annotations

import errno as _errno


class MgpuError(Exception):
    """Base of every error mgpu raises on purpose."""


class ProtocolError(MgpuError):
    errno: int = _errno.EINVAL

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        if errno is not None:
            self.errno = errno


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol does not allow."""


class FramingError(RemoteProtocolError):
    errno = _errno.EPROTO


class MalformedMessage(RemoteProtocolError):
    errno = _errno.EINVAL


class UnsupportedCommand(RemoteProtocolError):
    errno = _errno.ENOTSUP


class LocalProtocolError(ProtocolError):
    """We were asked to send something the protocol does not allow."""


class VfioUserError(MgpuError):
    """Raised by a device handler to answer the current request with an errno reply."""

    def __init__(self, errno: int, message: str = "") -> None:
        super().__init__(message or _errno.errorcode.get(errno, str(errno)))
        self.errno = errno


class DeviceError(MgpuError):
    """A guest-supplied value was refused; ``code`` is what the registers report."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code  # an ErrorCode of device.gpu.regs.table


class CapacityError(MgpuError):
    """The physical GPU cannot host what was asked (the message says what is left)."""


class OutOfMemory(CapacityError):
    """No free run is large enough (the message tells how much is free)."""


class SetupError(MgpuError):
    """This machine cannot do what was asked; the message says what to do."""


class FrameError(MgpuError):
    """A frame (or cursor) a display handed over cannot be shown; the message says why."""
