"""The vfio-user protocol, sans-IO: constants, typed messages, framing, errors."""

from .codec import Frame, FrameDecoder
from .constants import Command, HeaderFlags, PciIrq, PciRegion
from .errors import FramingError, MalformedMessage, ProtocolError, UnsupportedCommand, VfioUserError
from .messages import Header, encode_message

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
