"""One VNC client of one display: the RFB 3.8 state machine, without sockets.

Theory of operation.  The server thread gives a session the bytes its client sent
(``receive``) and sends what the session queued (``out``); the session never blocks
and never reads a socket itself.  Phases:

    VERSION      we sent "RFB 003.008"; the client answers with its version (3.3, 3.7
                 or 3.8; anything else gets a failure reason, then the close)
    SECURITY     we offered security type None (1); 3.8 clients get SecurityResult OK
                 (3.3 is told None without a choice, 3.7 gets no result)
    CLIENT_INIT  the client's shared flag (every client shares); we answer ServerInit
                 (size, our pixel format XRGB8888, the display's name)
    NORMAL       client messages: SetPixelFormat, SetEncodings, FramebufferUpdateRequest
                 (remembered, merged), key, pointer and cut text (read and ignored:
                 view-only)
    CLOSING      a failure reason is queued; the server closes once it is sent

Flow control.  ``update(screen)`` builds one FramebufferUpdate only when the client
has a request pending *and* everything queued before has been sent, so the output
queue holds at most one update, whatever the client does; a client that stops
reading is dropped by the server after its stall timeout.  An incremental request is
answered with the tiles the client lacks in the region it asked for (``Have``), and
held until there are some; a non-incremental one with the whole region.  A new size
goes as a DesktopSize rectangle to clients that announced it; a client that did not
cannot follow and is disconnected, saying why.
"""

from __future__ import annotations

import enum
import struct

from device.display import rfb
from device.display.rfb import Encoding, UpdateRequest
from device.display.tiles import Rect, Screen

MAX_VERSION_LINE = 12


class Phase(enum.Enum):
    VERSION = "version"
    SECURITY = "security"
    CLIENT_INIT = "client-init"
    NORMAL = "normal"
    CLOSING = "closing"


def _reason(text: str) -> bytes:
    data = text.encode()
    return struct.pack(">I", len(data)) + data


class VncSession:
    def __init__(self, screen: Screen) -> None:
        self.screen = screen
        self.phase = Phase.VERSION
        self.version = (3, 8)
        self.out = bytearray(rfb.VERSION_3_8)
        self._handshake = bytearray()
        self._reader = rfb.ClientReader()
        self.format = rfb.NATIVE
        self.encoding = Encoding.RAW
        self.desktop_size = False
        self._zrle = rfb.ZrleEncoder()
        self.pending: UpdateRequest | None = None
        self.have = screen.unseen()
        self.client_size = (screen.width, screen.height)
        self.close_reason: str | None = None
        self.updates_sent = 0

    # ------------------------------------------------------------------ input

    def receive(self, data: bytes) -> None:
        """Take bytes from the client; RfbError if it broke the protocol."""
        if self.phase is Phase.CLOSING:
            return
        if self.phase is not Phase.NORMAL:
            self._handshake += data
            data = self._shake()
            if not self.handshaken:
                return
        for message in self._reader.feed(data):
            self._handle(message)

    @property
    def handshaken(self) -> bool:
        return self.phase is Phase.NORMAL

    def _shake(self) -> bytes:
        """Advance the handshake; the bytes left over once it is done."""
        while self.phase not in (Phase.NORMAL, Phase.CLOSING):
            need = MAX_VERSION_LINE if self.phase is Phase.VERSION else 1
            if len(self._handshake) < need:
                return b""
            chunk = bytes(self._handshake[:need])
            del self._handshake[:need]
            {
                Phase.VERSION: self._on_version,
                Phase.SECURITY: self._on_security,
                Phase.CLIENT_INIT: self._on_client_init,
            }[self.phase](chunk)
        rest = bytes(self._handshake)
        self._handshake.clear()
        return rest

    def _on_version(self, line: bytes) -> None:
        version = rfb.VERSIONS.get(line)
        if version is None:
            self._fail(f"unsupported protocol version {line!r} (this server speaks 3.3-3.8)")
            self.out += b"\x00" + _reason(self.close_reason or "")
            return
        self.version = version
        if version == (3, 3):
            self.out += struct.pack(">I", rfb.SECURITY_NONE)
            self.phase = Phase.CLIENT_INIT
        else:
            self.out += bytes((1, rfb.SECURITY_NONE))
            self.phase = Phase.SECURITY

    def _on_security(self, choice: bytes) -> None:
        if choice[0] != rfb.SECURITY_NONE:
            self._fail(f"security type {choice[0]} was not offered (None only)")
            if self.version == (3, 8):
                self.out += struct.pack(">I", 1) + _reason(self.close_reason or "")
            return
        if self.version == (3, 8):
            self.out += struct.pack(">I", 0)
        self.phase = Phase.CLIENT_INIT

    def _on_client_init(self, _shared: bytes) -> None:
        self.screen.refresh()  # announce the size the display has now
        self.client_size = (self.screen.width, self.screen.height)
        self.out += rfb.server_init(*self.client_size, self.screen.source.name)
        self.phase = Phase.NORMAL

    def _fail(self, reason: str) -> None:
        self.close_reason = reason
        self.phase = Phase.CLOSING

    def _handle(self, message: rfb.ClientMessage) -> None:
        if isinstance(message, rfb.SetPixelFormat):
            self.format = message.format
            self.have = self.screen.unseen()  # what the client has is in the old format
        elif isinstance(message, rfb.SetEncodings):
            offered = [e for e in message.encodings if e in rfb.PIXEL_ENCODINGS]
            self.encoding = Encoding(offered[0]) if offered else Encoding.RAW
            self.desktop_size = Encoding.DESKTOP_SIZE in message.encodings
        elif isinstance(message, UpdateRequest):
            self._request(message)

    def _request(self, request: UpdateRequest) -> None:
        if self.pending is None:
            self.pending = request
            return
        a, b = self.pending.rect, request.rect
        left, top = min(a.x, b.x), min(a.y, b.y)
        right = max(a.x + a.width, b.x + b.width)
        bottom = max(a.y + a.height, b.y + b.height)
        merged = Rect(left, top, right - left, bottom - top)
        self.pending = UpdateRequest(self.pending.incremental and request.incremental, merged)

    # ------------------------------------------------------------------ output

    @property
    def waiting(self) -> bool:
        """A request is pending: the server should watch the display for it."""
        return self.phase is Phase.NORMAL and self.pending is not None

    def update(self) -> bool:
        """Queue a FramebufferUpdate if one is due and the queue is empty; whether it did."""
        if not self.waiting or self.out:
            return False
        assert self.pending is not None
        screen = self.screen
        size = (screen.width, screen.height)
        parts: list[bytes] = []
        whole = Rect(0, 0, *size)
        if size != self.client_size:
            if not self.desktop_size:
                self._fail(
                    f"the display changed size to {size[0]}x{size[1]} and this client does "
                    "not support the DesktopSize pseudo-encoding"
                )
                return False
            parts.append(rfb.desktop_size(*size))
            self.client_size = size
            self.have = screen.unseen()
            region = whole
            rects = screen.stale(self.have, region)
        elif self.pending.incremental:
            region = self.pending.rect
            rects = screen.stale(self.have, region)
        else:
            region = self.pending.rect
            clipped = region.clip(whole)
            rects = [clipped] if clipped is not None else []
        if not rects and not parts and self.pending.incremental:
            return False  # nothing new: hold the request until something changes
        for rect in rects:
            parts.append(self._encode(rect))
        self.out += rfb.update_header(len(parts))
        self.out += b"".join(parts)
        self.have = screen.sent(self.have, region)
        self.pending = None
        self.updates_sent += 1
        return True

    def _encode(self, rect: Rect) -> bytes:
        pixels = self.screen.rgb[rect.y : rect.y + rect.height, rect.x : rect.x + rect.width]
        if self.encoding is Encoding.ZRLE:
            return rfb.rect_header(rect, Encoding.ZRLE) + self._zrle.encode(self.format, pixels)
        return rfb.rect_header(rect, Encoding.RAW) + rfb.encode_raw(self.format, pixels)
