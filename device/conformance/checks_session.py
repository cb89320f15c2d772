"""Checks of VERSION and of the message stream itself: ids, ordering, No_reply, and
what a hostile client does to the framing.

After every check the runner makes sure the server still serves a new client, so a
hostile check only has to send its input and say which answers are acceptable.
"""

from __future__ import annotations

import os
import struct
import time

from device.conformance.suite import (
    CLIENT_CAPABILITIES,
    SESSION,
    Kind,
    Source,
    Trial,
    check,
    errno_name,
    ok,
    parse_version_reply,
    refused,
    still_serves,
    version_payload,
)
from device.conformance.wire import HungUp, NoReply, Peer, Violation
from device.vfio_user.protocol import messages as m
from device.vfio_user.protocol.codec import close_fds
from device.vfio_user.protocol.constants import HEADER_SIZE, Command

GOOD, HOSTILE = Kind.GOOD, Kind.HOSTILE
SPEC, QEMU = Source.SPEC, Source.QEMU
SILENCE = 0.2  # seconds to wait for a message that must not come
UNKNOWN_COMMAND = 0x7FFF


def get_info_message(msg_id: int, *, no_reply: bool = False) -> bytes:
    payload = m.DeviceInfoRequest(16).pack()
    return m.encode_message(
        msg_id, Command.DEVICE_GET_INFO, payload, reply=False, no_reply=no_reply
    )


def refused_or_hung_up(peer: Peer, command: int, payload: bytes, what: str) -> str:
    """A request that must not succeed: an error reply or a hang-up; which one it was."""
    try:
        reply = peer.request(command, payload)
    except HungUp:
        return "hung up"
    assert reply is not None
    reply.close()
    if not reply.header.is_error:
        raise Violation(f"{what} was accepted")
    return errno_name(reply.error)


def anything_but_success(
    peer: Peer, data: bytes, msg_id: int, what: str, fds: tuple[int, ...] = ()
) -> None:
    """After hostile bytes: a hang-up, silence or an error reply are all fine; a
    success reply to what cannot be a valid request is not."""
    try:
        peer.send(data, fds)
        frame = peer.next_frame(time.monotonic() + SILENCE)
    except (HungUp, NoReply):
        return
    close_fds(frame.fds)
    if frame.header.is_reply and not frame.header.is_error and frame.header.msg_id == msg_id:
        raise Violation(f"{what} got a success reply")


# ---------------------------------------------------------------------- VERSION


@check(
    Command.VERSION,
    "version-negotiates",
    GOOD,
    SPEC,
    "VERSION 0.0 with QEMU's capabilities gets 0.0 and a NUL-terminated JSON object.",
)
def version_negotiates(trial: Trial) -> None:
    peer = trial.connect(negotiate=False)
    parse_version_reply(ok(peer.request(Command.VERSION, version_payload()), "VERSION 0.0"))


@check(
    Command.VERSION,
    "version-capabilities-subset",
    GOOD,
    SPEC,
    "The capabilities in the reply are a subset of those the client proposed.",
)
def version_capabilities_subset(trial: Trial) -> None:
    peer = trial.connect(negotiate=False)
    reply = ok(peer.request(Command.VERSION, version_payload()), "VERSION 0.0")
    extra = sorted(set(parse_version_reply(reply)) - set(CLIENT_CAPABILITIES))
    trial.expect(not extra, f"the reply adds capabilities nobody proposed: {', '.join(extra)}")


@check(
    Command.VERSION,
    "version-capability-values",
    GOOD,
    SPEC,
    "max_msg_fds, max_data_xfer_size, max_dma_maps and pgsizes, where given, are "
    "non-negative integers (max_data_xfer_size and pgsizes positive).",
)
def version_capability_values(trial: Trial) -> None:
    caps = trial.device.capabilities
    for name, least in (("max_msg_fds", 0), ("max_data_xfer_size", 1), ("max_dma_maps", 0),
                        ("pgsizes", 1)):  # fmt: skip
        if name in caps:
            value = caps[name]
            trial.expect(
                isinstance(value, int) and not isinstance(value, bool) and value >= least,
                f"capability {name} is {value!r}",
            )


@check(
    Command.VERSION,
    "version-reply-fits-request",
    GOOD,
    QEMU,
    "The VERSION reply is no longer than the request (QEMU receives it into the "
    "buffer of its own request).",
)
def version_reply_fits_request(trial: Trial) -> None:
    peer = trial.connect(negotiate=False)
    request = version_payload()
    reply = ok(peer.request(Command.VERSION, request), "VERSION 0.0")
    trial.expect(
        len(reply.payload) <= len(request),
        f"the reply is {len(reply.payload)} bytes long, the request {len(request)}",
    )


@check(
    Command.VERSION,
    "version-other-major-refused",
    HOSTILE,
    SPEC,
    "VERSION 1.0 is refused (an error reply or a hang-up): the major in a reply must "
    "be the one proposed.",
)
def version_other_major_refused(trial: Trial) -> None:
    peer = trial.connect(negotiate=False)
    refused_or_hung_up(peer, Command.VERSION, m.Version(1, 0, {}).pack(), "VERSION 1.0")


@check(
    Command.VERSION,
    "version-bad-json-refused",
    HOSTILE,
    SPEC,
    "VERSION whose capabilities are not JSON is refused (an error reply or a hang-up).",
)
def version_bad_json_refused(trial: Trial) -> None:
    peer = trial.connect(negotiate=False)
    payload = struct.pack("<HH", 0, 0) + b"{not json\0"
    refused_or_hung_up(peer, Command.VERSION, payload, "VERSION with broken JSON")


@check(
    Command.VERSION,
    "version-first",
    HOSTILE,
    SPEC,
    "A command before VERSION is refused (an error reply or a hang-up).",
)
def version_first(trial: Trial) -> None:
    peer = trial.connect(negotiate=False)
    payload = m.DeviceInfoRequest(16).pack()
    refused_or_hung_up(peer, Command.DEVICE_GET_INFO, payload, "DEVICE_GET_INFO before VERSION")


# ---------------------------------------------------------------------- the stream


@check(
    SESSION,
    "message-ids-echoed",
    GOOD,
    SPEC,
    "Every reply carries its request's id, whatever the id (0, 0xFFFF, one used twice).",
)
def message_ids_echoed(trial: Trial) -> None:
    peer = trial.connect()
    for msg_id in (0, 0xFFFF, 0xBEEF, 0xBEEF):
        peer.send(get_info_message(msg_id))
        ok(peer.reply_to(msg_id, Command.DEVICE_GET_INFO), f"GET_INFO id {msg_id:#x}")


@check(
    SESSION,
    "pipelined-in-order",
    GOOD,
    SPEC,
    "Requests sent back to back without waiting are answered in the order sent.",
)
def pipelined_in_order(trial: Trial) -> None:
    peer = trial.connect()
    ids = (7, 8, 9, 10)
    peer.send(b"".join(get_info_message(i) for i in ids))
    for msg_id in ids:
        ok(peer.reply_to(msg_id, Command.DEVICE_GET_INFO), f"pipelined GET_INFO id {msg_id}")


@check(
    SESSION,
    "no-reply-honoured",
    GOOD,
    SPEC,
    "A command flagged No_reply gets no reply; the next request gets its own.",
)
def no_reply_honoured(trial: Trial) -> None:
    peer = trial.connect()
    peer.send(get_info_message(21, no_reply=True))
    peer.expect_silence(SILENCE, "GET_INFO was flagged No_reply")
    peer.send(get_info_message(22))
    ok(peer.reply_to(22, Command.DEVICE_GET_INFO), "GET_INFO after a No_reply one")


@check(
    SESSION,
    "no-reply-even-when-refused",
    HOSTILE,
    SPEC,
    "A refused command flagged No_reply gets no reply either (QEMU's stream "
    "desynchronises on an answer it did not ask for).",
)
def no_reply_even_when_refused(trial: Trial) -> None:
    peer = trial.connect()
    bad_read = m.pack_region_access(0, 0xFFFF, 4)
    peer.send(m.encode_message(31, Command.REGION_READ, bad_read, reply=False, no_reply=True))
    peer.send(m.encode_message(32, UNKNOWN_COMMAND, b"", reply=False, no_reply=True))
    peer.expect_silence(SILENCE, "both refused commands were flagged No_reply")
    still_serves(trial, peer)


@check(
    SESSION,
    "unknown-command",
    HOSTILE,
    SPEC,
    "An unknown command gets an error reply (header only, its id) and the session goes on.",
)
def unknown_command(trial: Trial) -> None:
    peer = trial.connect()
    refused(peer, UNKNOWN_COMMAND, b"junk", f"command {UNKNOWN_COMMAND:#x}")
    still_serves(trial, peer)


@check(
    SESSION,
    "stray-reply-ignored",
    HOSTILE,
    SPEC,
    "A reply from the client that answers nothing gets no answer (the server may hang "
    "up, having nothing to answer).",
)
def stray_reply_ignored(trial: Trial) -> None:
    peer = trial.connect()
    try:
        peer.send(m.encode_message(0x7777, Command.DMA_READ, b"stray", reply=True))
        peer.send(m.encode_message(0x7778, Command.REGION_READ, b"", reply=True, error=5))
    except HungUp:
        return
    peer.expect_silence(SILENCE, "only replies were sent")


@check(
    SESSION,
    "dripped-request",
    HOSTILE,
    SPEC,
    "A request that arrives a few bytes at a time is answered once it is whole.",
)
def dripped_request(trial: Trial) -> None:
    peer = trial.connect()
    message = get_info_message(41)
    for start in range(0, len(message), 3):
        peer.send(message[start : start + 3])
        time.sleep(0.002)
    ok(peer.reply_to(41, Command.DEVICE_GET_INFO), "a dripped GET_INFO")


@check(
    SESSION,
    "size-below-header",
    HOSTILE,
    SPEC,
    "A header whose size is below 16 bytes gets no success; the server survives.",
)
def size_below_header(trial: Trial) -> None:
    peer = trial.connect()
    data = struct.pack("<HHIII", 51, Command.DEVICE_GET_INFO, 8, 0, 0) + bytes(16)
    anything_but_success(peer, data, 51, "a message of size 8")


@check(
    SESSION,
    "size-huge",
    HOSTILE,
    SPEC,
    "A header announcing 4 GiB gets no success and costs the server no such buffer; "
    "the server survives.",
)
def size_huge(trial: Trial) -> None:
    peer = trial.connect()
    data = struct.pack("<HHIII", 52, Command.REGION_WRITE, 0xFFFFFFFF, 0, 0) + bytes(64)
    anything_but_success(peer, data, 52, "a message of size 4 GiB")


@check(
    SESSION,
    "cut-short",
    HOSTILE,
    SPEC,
    "A client that leaves halfway through a message leaves the server serving.",
)
def cut_short(trial: Trial) -> None:
    peer = trial.connect()
    message = m.encode_message(53, Command.REGION_READ, m.pack_region_access(0, 7, 4), reply=False)
    peer.send(message[: HEADER_SIZE + 5])
    peer.close()


@check(
    SESSION,
    "garbage",
    HOSTILE,
    SPEC,
    "256 bytes of noise get no success reply; the server survives.",
)
def garbage(trial: Trial) -> None:
    peer = trial.connect()
    noise = bytes((i * 167 + 13) & 0xFF for i in range(256))
    anything_but_success(peer, noise, int.from_bytes(noise[:2], "little"), "noise")


@check(
    SESSION,
    "fds-where-none-belong",
    HOSTILE,
    SPEC,
    "File descriptors sent with a command that takes none do not break the session "
    "(any reply, or a hang-up).",
)
def fds_where_none_belong(trial: Trial) -> None:
    peer = trial.connect()
    fds = tuple(os.eventfd(0, os.EFD_CLOEXEC) for _ in range(3))
    try:
        peer.send(get_info_message(61), fds)
        reply = peer.reply_to(61, Command.DEVICE_GET_INFO)
        reply.close()
    except HungUp:
        return
    finally:
        for fd in fds:
            os.close(fd)
    still_serves(trial, peer)


@check(
    SESSION,
    "many-fds",
    HOSTILE,
    SPEC,
    "A message with 100 file descriptors gets no success and the server survives.",
)
def many_fds(trial: Trial) -> None:
    peer = trial.connect()
    fds = tuple(os.eventfd(0, os.EFD_CLOEXEC) for _ in range(100))
    try:
        payload = m.SetIrqs(0x24, 0, 0, len(fds)).pack()
        message = m.encode_message(62, Command.DEVICE_SET_IRQS, payload, reply=False)
        anything_but_success(peer, message, 62, "DEVICE_SET_IRQS with 100 eventfds", fds)
    finally:
        for fd in fds:
            os.close(fd)
