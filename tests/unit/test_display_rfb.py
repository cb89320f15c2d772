"""The RFB codec and one client's state machine against arbitrary input: whatever a
client sends either works or raises RfbError (the server then drops that client)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from device.display.rfb import ClientReader, RfbError
from device.display.source import Framebuffer
from device.display.tiles import Screen
from device.display.vnc_session import Phase, VncSession

HANDSHAKE = b"RFB 003.008\n\x01\x01"


@settings(max_examples=300, deadline=None)
@given(chunks=st.lists(st.binary(max_size=64), max_size=20))
def test_reader_parses_or_refuses_and_holds_little(chunks: list[bytes]) -> None:
    reader = ClientReader()
    try:
        for chunk in chunks:
            reader.feed(chunk)
            assert reader.buffered < 20  # never more than one fixed part
    except RfbError:
        pass


@settings(max_examples=300, deadline=None)
@given(
    prefix=st.sampled_from([b"", HANDSHAKE, b"RFB 003.003\n\x01", b"RFB 003.007\n\x01\x01"]),
    chunks=st.lists(st.binary(max_size=64), max_size=20),
)
def test_session_takes_any_bytes_and_its_output_stays_one_update(
    prefix: bytes, chunks: list[bytes]
) -> None:
    screen = Screen(Framebuffer("fuzz", 100, 70))
    screen.refresh()
    session = VncSession(screen)
    try:
        for chunk in [prefix, *chunks]:
            session.receive(chunk)
            if session.phase is Phase.NORMAL:
                session.out.clear()  # as if sent
                session.update()
            assert len(session.out) <= 100 * 70 * 4 + 1024
    except RfbError:
        pass


def test_an_unknown_message_after_a_whole_one_is_a_protocol_error() -> None:
    # Found by the fuzz test: the buffer could not shrink while the error's traceback
    # held a view of it, and a BufferError came out instead.
    reader = ClientReader()
    try:
        reader.feed(b"\x05\x00\x00\x00\x00\x00\x01")  # a pointer event, then type 1
    except RfbError as exc:
        assert "unknown client message type 1" in str(exc)
    else:
        raise AssertionError("no RfbError")
