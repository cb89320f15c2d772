"""The vfio-user protocol, sans-IO: constants, typed messages, framing, errors."""

from device.errors import (
    FramingError,
    MalformedMessage,
    ProtocolError,
    UnsupportedCommand,
    VfioUserError,
)
from device.vfio_user.protocol.codec import Frame, FrameDecoder
from device.vfio_user.protocol.constants import Command, HeaderFlags, PciIrq, PciRegion
from device.vfio_user.protocol.messages import Header, encode_message

__all__ = [
    "Command",
    "Frame",
    "FrameDecoder",
    "FramingError",
    "Header",
    "HeaderFlags",
    "MalformedMessage",
    "PciIrq",
    "PciRegion",
    "ProtocolError",
    "UnsupportedCommand",
    "VfioUserError",
    "encode_message",
]
