"""The vfio-user codec against golden bytes written from the spec's layouts.

Every expected byte string below is spelled out by hand from QEMU's
docs/interop/vfio-user.rst and linux/vfio.h (little endian), field by field, not
produced by the code under test.  Each is checked both ways: pack() gives it, unpack()
of it gives the object.  Then the framing layer (FrameDecoder), hypothesis round trips
of every message type, and the payloads the parsers must refuse.
"""

from __future__ import annotations

import errno
import itertools
import os
import struct
from collections.abc import Callable, Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from device.errors import FramingError, MalformedMessage
from device.vfio_user.protocol import messages as m
from device.vfio_user.protocol.codec import Frame, FrameDecoder
from device.vfio_user.protocol.constants import Command


def h(text: str) -> bytes:
    """Hex with spaces and comments allowed: '01 00  # major'."""
    return bytes.fromhex("".join(line.split("#")[0] for line in text.splitlines()))


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


@pytest.fixture
def pipe_fds() -> Iterator[list[int]]:
    """Real fds for the decoder to hand out or close; whatever is left is closed."""
    fds: list[int] = []
    for _ in range(3):
        fds.extend(os.pipe())
    yield fds
    for fd in fds:
        if is_open(fd):
            os.close(fd)


# ---------------------------------------------------------------------- header


def test_header_golden() -> None:
    golden = h("""
        07 00        # msg_id 7
        09 00        # command REGION_READ (9)
        20 00 00 00  # size 32
        00 00 00 00  # flags: command
        00 00 00 00  # error
    """)
    assert m.Header(7, 9, 32).pack() == golden
    assert m.Header.unpack(golden) == m.Header(7, 9, 32, 0, 0)
    assert not m.Header.unpack(golden).is_reply


def test_error_reply_is_header_only_with_error_flag_and_errno() -> None:
    golden = h("""
        2a 00        # msg_id 42
        0a 00        # command REGION_WRITE (10)
        10 00 00 00  # size 16: an error reply has no payload
        21 00 00 00  # flags: reply (1) | error (0x20)
        16 00 00 00  # errno 22 EINVAL
    """)
    assert m.encode_message(42, Command.REGION_WRITE, reply=True, error=errno.EINVAL) == golden
    header = m.Header.unpack(golden)
    assert header.is_reply and header.is_error and header.error == errno.EINVAL
    assert not header.no_reply


def test_no_reply_flag() -> None:
    encoded = m.encode_message(1, Command.REGION_WRITE, b"", reply=False, no_reply=True)
    assert encoded == h("01 00  0a 00  10 00 00 00  10 00 00 00  00 00 00 00")
    assert m.Header.unpack(encoded).no_reply


def test_short_header_is_a_framing_error() -> None:
    with pytest.raises(FramingError):
        m.Header.unpack(bytes(15))


# ---------------------------------------------------------------------- VERSION

CAPS_JSON = b'{"capabilities":{"max_msg_fds":16,"max_data_xfer_size":1048576}}'


def test_version_request_golden_whole_message() -> None:
    caps: dict[str, object] = {"max_msg_fds": 16, "max_data_xfer_size": 1048576}
    payload = (
        h("""
        00 00  # major 0
        00 00  # minor 0
    """)
        + CAPS_JSON
        + b"\0"
    )  # the JSON capabilities, NUL-terminated
    message = (
        h("""
        01 00        # msg_id 1
        01 00        # command VERSION
        55 00 00 00  # size 85 = 16 header + 4 + 64 JSON + 1 NUL
        00 00 00 00  # flags: command
        00 00 00 00  # error
    """)
        + payload
    )
    assert m.Version(0, 0, caps).pack() == payload
    assert (
        m.encode_message(1, Command.VERSION, m.Version(0, 0, caps).pack(), reply=False) == message
    )
    assert m.Version.unpack(payload) == m.Version(0, 0, caps)


def test_version_without_json_or_with_an_empty_string() -> None:
    assert m.Version.unpack(h("00 00 02 00")) == m.Version(0, 2, {})
    assert m.Version.unpack(h("00 00 00 00 00")) == m.Version(0, 0, {})  # just the NUL


@pytest.mark.parametrize(
    "payload",
    [
        h("00 00 00 00") + b'{"capabilities":{}}',  # not NUL-terminated
        h("00 00 00 00") + b"not json\0",
        h("00 00 00 00") + b"\xff\xfe\0",  # not UTF-8
        h("00 00 00 00") + b"[1,2]\0",  # JSON, but not an object
        h("00 00 00 00") + b'{"capabilities":3}\0',
        h("00 00 00 00") + b'{"capabilities":{}}\0\0',  # a NUL inside the string
        h("00 00 00 00") + b"[" * 100_000 + b"\0",  # nested too deep for the parser
        h("00 00"),  # no minor
    ],
)
def test_version_malformed(payload: bytes) -> None:
    with pytest.raises(MalformedMessage):
        m.Version.unpack(payload)


def test_version_refuses_fds() -> None:
    with pytest.raises(MalformedMessage):
        m.Version.unpack(h("00 00 00 00") + b"{}\0", (3,))


# ---------------------------------------------------------------------- DMA_MAP / UNMAP


DMA_MAP = h("""
    20 00 00 00              # argsz 32
    03 00 00 00              # flags READ|WRITE
    00 10 00 00 00 00 00 00  # offset 0x1000 into the fd
    00 00 00 40 00 00 00 00  # address 0x40000000
    00 00 20 00 00 00 00 00  # size 0x200000
""")


def test_dma_map_golden_with_and_without_fd() -> None:
    message = m.DmaMap(32, 3, 0x1000, 0x4000_0000, 0x20_0000)
    assert message.pack() == DMA_MAP
    assert m.DmaMap.unpack(DMA_MAP) == m.DmaMap(32, 3, 0x1000, 0x4000_0000, 0x20_0000, None)
    # The fd travels beside the payload (SCM_RIGHTS): the bytes are the same.
    with_fd = m.DmaMap(32, 3, 0x1000, 0x4000_0000, 0x20_0000, 9)
    assert with_fd.pack() == DMA_MAP
    assert m.DmaMap.unpack(DMA_MAP, (9,)) == with_fd


def test_dma_unmap_golden() -> None:
    one = h("""
        18 00 00 00              # argsz 24
        00 00 00 00              # flags
        00 00 10 00 00 00 00 00  # address 0x100000
        00 10 00 00 00 00 00 00  # size 0x1000
    """)
    assert m.DmaUnmap(24, 0, 0x10_0000, 0x1000).pack() == one
    assert m.DmaUnmap.unpack(one) == m.DmaUnmap(24, 0, 0x10_0000, 0x1000)
    every = h("""
        18 00 00 00              # argsz 24
        02 00 00 00              # flags: VFIO_DMA_UNMAP_FLAG_ALL
        00 00 00 00 00 00 00 00  # address
        00 00 00 00 00 00 00 00  # size
    """)
    assert m.DmaUnmap(24, 2, 0, 0).pack() == every
    assert m.DmaUnmap.unpack(every) == m.DmaUnmap(24, 2, 0, 0)


# ---------------------------------------------------------------------- DEVICE_GET_INFO


def test_device_info_golden() -> None:
    request = h("""
        10 00 00 00  # argsz 16
        00 00 00 00  # flags
        00 00 00 00  # num_regions
        00 00 00 00  # num_irqs
    """)
    assert m.DeviceInfoRequest(16).pack() == request
    assert m.DeviceInfoRequest.unpack(request) == m.DeviceInfoRequest(16)
    reply = h("""
        10 00 00 00  # argsz 16
        03 00 00 00  # flags VFIO_DEVICE_FLAGS_RESET (1) | PCI (2)
        09 00 00 00  # num_regions 9
        05 00 00 00  # num_irqs 5
    """)
    assert m.DeviceInfo(3, 9, 5).pack() == reply
    assert m.DeviceInfo.unpack(reply) == m.DeviceInfo(3, 9, 5, 16)


# ---------------------------------------------------------------------- REGION_INFO


def test_region_info_request_golden() -> None:
    golden = h("""
        20 00 00 00              # argsz 32
        00 00 00 00              # flags
        02 00 00 00              # index 2 (BAR2)
        00 00 00 00              # cap_offset
        00 00 00 00 00 00 00 00  # size
        00 00 00 00 00 00 00 00  # offset
    """)
    assert m.RegionInfoRequest(32, 2).pack() == golden
    assert m.RegionInfoRequest.unpack(golden) == m.RegionInfoRequest(32, 2)
    # QEMU's second request sends its whole, larger buffer: only the head counts.
    bigger = h("40 00 00 00") + golden[4:] + bytes(32)
    assert m.RegionInfoRequest.unpack(bigger) == m.RegionInfoRequest(64, 2)


SPARSE = m.RegionInfo(2, 0xF, 0x1000_0000, 0x2000, (m.SparseArea(0, 0x1000_0000),))

REGION_INFO_TRUNCATED = h("""
    40 00 00 00              # argsz 64 = 32 + cap header 8 + nr_areas/reserved 8 + area 16
    0f 00 00 00              # flags READ|WRITE|MMAP|CAPS
    02 00 00 00              # index 2
    20 00 00 00              # cap_offset 32: the capability starts after this struct
    00 00 00 10 00 00 00 00  # size 256 MiB
    00 20 00 00 00 00 00 00  # offset 0x2000 (where to mmap the fd)
""")

REGION_INFO_FULL = REGION_INFO_TRUNCATED + h("""
    01 00                    # cap id 1: VFIO_REGION_INFO_CAP_SPARSE_MMAP
    01 00                    # version 1
    00 00 00 00              # next: none
    01 00 00 00              # nr_areas 1
    00 00 00 00              # reserved
    00 00 00 00 00 00 00 00  # area offset 0
    00 00 00 10 00 00 00 00  # area size 256 MiB
""")


def test_region_info_reply_truncated_for_a_32_byte_request() -> None:
    assert SPARSE.pack_reply(32) == REGION_INFO_TRUNCATED
    info, wanted = m.RegionInfo.unpack(REGION_INFO_TRUNCATED)
    assert wanted == 64, "the reply says how big a buffer to ask with next"
    assert (info.index, info.flags, info.size, info.offset) == (2, 0xF, 0x1000_0000, 0x2000)
    assert info.sparse_areas == ()


def test_region_info_full_reply_with_the_sparse_mmap_capability() -> None:
    assert SPARSE.full_size() == 64
    assert SPARSE.pack_reply(64) == REGION_INFO_FULL
    assert SPARSE.pack_reply(4096) == REGION_INFO_FULL, "a bigger buffer gets the same bytes"
    assert m.RegionInfo.unpack(REGION_INFO_FULL) == (SPARSE, 64)


def test_region_info_with_two_sparse_areas() -> None:
    two = m.RegionInfo(2, 0xF, 0x4000, 0, (m.SparseArea(0, 0x1000), m.SparseArea(0x3000, 0x1000)))
    golden = h("""
        50 00 00 00  0f 00 00 00  02 00 00 00  20 00 00 00  # argsz 80, flags, index, caps at 32
        00 40 00 00 00 00 00 00  00 00 00 00 00 00 00 00    # size 0x4000, offset 0
        01 00 01 00 00 00 00 00                             # sparse mmap v1, no next
        02 00 00 00 00 00 00 00                             # nr_areas 2, reserved
        00 00 00 00 00 00 00 00  00 10 00 00 00 00 00 00    # area 0: 0 + 0x1000
        00 30 00 00 00 00 00 00  00 10 00 00 00 00 00 00    # area 1: 0x3000 + 0x1000
    """)
    assert two.pack_reply(80) == golden
    assert m.RegionInfo.unpack(golden) == (two, 80)


def test_region_info_without_caps_golden() -> None:
    golden = h("""
        20 00 00 00              # argsz 32: nothing more to ask for
        03 00 00 00              # flags READ|WRITE
        07 00 00 00              # index 7 (config)
        00 00 00 00              # cap_offset: none
        00 10 00 00 00 00 00 00  # size 4096
        00 00 00 00 00 00 00 00  # offset 0
    """)
    assert m.RegionInfo(7, 3, 4096).pack_reply(32) == golden
    assert m.RegionInfo(7, 3, 4096).pack_reply(64) == golden
    assert m.RegionInfo.unpack(golden) == (m.RegionInfo(7, 3, 4096), 32)


def test_region_info_reply_with_a_capability_loop_is_refused() -> None:
    looped = bytearray(REGION_INFO_FULL)
    looped[36:40] = h("20 00 00 00")  # next points back at itself
    with pytest.raises(MalformedMessage):
        m.RegionInfo.unpack(bytes(looped))


# ---------------------------------------------------------------------- IRQ_INFO / SET_IRQS


def test_irq_info_golden() -> None:
    request = h("""
        10 00 00 00  # argsz 16
        00 00 00 00  # flags
        02 00 00 00  # index 2 (MSI-X)
        00 00 00 00  # count
    """)
    assert m.IrqInfoRequest(16, 2).pack() == request
    assert m.IrqInfoRequest.unpack(request) == m.IrqInfoRequest(16, 2)
    reply = h("""
        10 00 00 00  # argsz 16
        09 00 00 00  # flags EVENTFD (1) | NORESIZE (8)
        02 00 00 00  # index 2 (MSI-X)
        08 00 00 00  # count 8
    """)
    assert m.IrqInfo(2, 9, 8).pack() == reply
    assert m.IrqInfo.unpack(reply) == m.IrqInfo(2, 9, 8)


SET_IRQS_EVENTFD = h("""
    14 00 00 00  # argsz 20: the fds travel as SCM_RIGHTS, not in the payload
    24 00 00 00  # flags DATA_EVENTFD (4) | ACTION_TRIGGER (0x20)
    02 00 00 00  # index 2 (MSI-X)
    00 00 00 00  # start 0
    02 00 00 00  # count 2
""")


def test_set_irqs_eventfd_golden() -> None:
    assert m.SetIrqs(0x24, 2, 0, 2).pack() == SET_IRQS_EVENTFD
    assert m.SetIrqs(0x24, 2, 0, 2, fds=(5, 6)).pack() == SET_IRQS_EVENTFD
    assert m.SetIrqs.unpack(SET_IRQS_EVENTFD, (5, 6)) == m.SetIrqs(0x24, 2, 0, 2, b"", (5, 6))
    assert m.SetIrqs.unpack(SET_IRQS_EVENTFD).fds == (), "no fds: de-assign"


def test_set_irqs_data_bool_golden() -> None:
    golden = h("""
        17 00 00 00  # argsz 23 = 20 + 3 bool bytes
        22 00 00 00  # flags DATA_BOOL (2) | ACTION_TRIGGER (0x20)
        02 00 00 00  # index 2
        01 00 00 00  # start 1
        03 00 00 00  # count 3
        01 00 01     # fire vectors 1 and 3, not 2
    """)
    message = m.SetIrqs(0x22, 2, 1, 3, b"\x01\x00\x01")
    assert message.argsz == 23
    assert message.pack() == golden
    assert m.SetIrqs.unpack(golden) == message


def test_set_irqs_data_none_disable_golden() -> None:
    golden = h("14 00 00 00  21 00 00 00  02 00 00 00  00 00 00 00  00 00 00 00")
    assert m.SetIrqs(0x21, 2, 0, 0).pack() == golden  # DATA_NONE|TRIGGER, count 0
    assert m.SetIrqs.unpack(golden) == m.SetIrqs(0x21, 2, 0, 0)


# ---------------------------------------------------------------------- REGION_READ/WRITE

REGION_READ = h("""
    08 00 00 00 00 00 00 00  # offset 8
    00 00 00 00              # region 0 (BAR0)
    04 00 00 00              # count 4
""")


def test_region_read_request_and_reply_golden() -> None:
    assert m.RegionAccess(8, 0, 4).pack() == REGION_READ
    assert m.pack_region_access(8, 0, 4) == REGION_READ
    assert m.RegionAccess.unpack(REGION_READ, with_data=False) == m.RegionAccess(8, 0, 4)
    reply = REGION_READ + h("55 50 47 4d")  # the reply repeats the request, then the data
    assert m.RegionAccess(8, 0, 4, b"UPGM").pack() == reply
    assert m.RegionAccess.unpack(reply, with_data=True) == m.RegionAccess(8, 0, 4, b"UPGM")


def test_region_write_request_and_reply_golden() -> None:
    request = h("""
        04 00 00 00 00 00 00 00  # offset 4
        07 00 00 00              # region 7 (config)
        02 00 00 00              # count 2
        06 01                    # data
    """)
    assert m.RegionAccess(4, 7, 2, b"\x06\x01").pack() == request
    assert m.RegionAccess.unpack(request, with_data=True) == m.RegionAccess(4, 7, 2, b"\x06\x01")
    reply = h("""
        04 00 00 00 00 00 00 00  # offset 4
        07 00 00 00              # region 7
        02 00 00 00              # count 2 written; no data follows
    """)
    assert m.pack_region_access(4, 7, 2) == reply
    assert m.RegionAccess.unpack(reply, with_data=False) == m.RegionAccess(4, 7, 2)


REGION_WRITE_MULTI = h("""
    02 00 00 00 00 00 00 00   # wr_cnt 2
    10 00 00 00 00 00 00 00   # [0] offset 16
    00 00 00 00               #     region 0
    04 00 00 00               #     count 4
    aa bb cc dd 00 00 00 00   #     8 data bytes, 4 used
    08 00 00 00 00 00 00 00   # [1] offset 8
    04 00 00 00               #     region 4
    01 00 00 00               #     count 1
    ee 00 00 00 00 00 00 00   #     8 data bytes, 1 used
""")


def test_region_write_multi_decoded() -> None:
    assert m.unpack_region_write_multi(REGION_WRITE_MULTI) == (
        m.RegionAccess(16, 0, 4, h("aa bb cc dd")),
        m.RegionAccess(8, 4, 1, h("ee")),
    )
    assert m.unpack_region_write_multi(bytes(8)) == ()  # wr_cnt 0


# ---------------------------------------------------------------------- DMA_READ/WRITE, RESET


def test_dma_read_golden() -> None:
    request = h("""
        00 10 00 00 00 00 00 00  # address 0x1000
        04 00 00 00 00 00 00 00  # count 4
    """)
    assert m.DmaAccess(0x1000, 4).pack() == request
    assert m.DmaAccess.unpack(request) == m.DmaAccess(0x1000, 4)
    reply = request + h("de ad be ef")  # address, count, then the data read
    assert m.DmaAccess(0x1000, 4, h("de ad be ef")).pack() == reply
    assert m.DmaAccess.unpack(reply) == m.DmaAccess(0x1000, 4, h("de ad be ef"))


def test_dma_write_golden() -> None:
    request = h("""
        00 00 00 00 01 00 00 00  # address 0x100000000
        02 00 00 00 00 00 00 00  # count 2
        ca fe                    # data
    """)
    assert m.DmaAccess(1 << 32, 2, h("ca fe")).pack() == request
    assert m.DmaAccess.unpack(request) == m.DmaAccess(1 << 32, 2, h("ca fe"))
    message = m.encode_message(0x1234, Command.DMA_WRITE, request, reply=False)
    assert message[:16] == h("34 12  0c 00  22 00 00 00  00 00 00 00  00 00 00 00")


def test_device_reset_has_no_payload() -> None:
    assert m.encode_message(3, Command.DEVICE_RESET, reply=False) == h("""
        03 00        # msg_id 3
        0d 00        # command DEVICE_RESET (13)
        10 00 00 00  # size 16: header only
        00 00 00 00  # flags
        00 00 00 00  # error
    """)
    assert m.encode_message(3, Command.DEVICE_RESET, reply=True) == h(
        "03 00  0d 00  10 00 00 00  01 00 00 00  00 00 00 00"
    )
    assert m.Empty().pack() == b""
    assert m.Empty.unpack(b"") == m.Empty()


# ---------------------------------------------------------------------- malformed payloads

Parser = Callable[[bytes, tuple[int, ...]], object]


def region_read(payload: bytes, fds: tuple[int, ...]) -> object:
    return m.RegionAccess.unpack(payload, fds, with_data=False)


def region_write(payload: bytes, fds: tuple[int, ...]) -> object:
    return m.RegionAccess.unpack(payload, fds, with_data=True)


MALFORMED: list[tuple[str, Parser, bytes, tuple[int, ...]]] = [
    ("dma_map short", m.DmaMap.unpack, DMA_MAP[:-1], ()),
    ("dma_map long", m.DmaMap.unpack, DMA_MAP + b"\0", ()),
    ("dma_map argsz 31", m.DmaMap.unpack, h("1f 00 00 00") + DMA_MAP[4:], ()),
    ("dma_map argsz 40", m.DmaMap.unpack, h("28 00 00 00") + DMA_MAP[4:], ()),
    ("dma_map two fds", m.DmaMap.unpack, DMA_MAP, (9, 10)),
    ("dma_unmap short", m.DmaUnmap.unpack, bytes(23), ()),
    ("dma_unmap argsz", m.DmaUnmap.unpack, h("20 00 00 00") + bytes(20), ()),
    ("dma_unmap fd", m.DmaUnmap.unpack, h("18 00 00 00") + bytes(20), (3,)),
    ("device_info short", m.DeviceInfoRequest.unpack, h("10 00 00 00") + bytes(8), ()),
    ("device_info long", m.DeviceInfoRequest.unpack, h("10 00 00 00") + bytes(16), ()),
    ("device_info argsz", m.DeviceInfoRequest.unpack, h("08 00 00 00") + bytes(12), ()),
    ("device_info fd", m.DeviceInfoRequest.unpack, h("10 00 00 00") + bytes(12), (3,)),
    ("device_info reply short", m.DeviceInfo.unpack, bytes(12), ()),
    ("region_info short", m.RegionInfoRequest.unpack, h("20 00 00 00") + bytes(27), ()),
    ("region_info argsz", m.RegionInfoRequest.unpack, h("10 00 00 00") + bytes(28), ()),
    ("region_info fd", m.RegionInfoRequest.unpack, h("20 00 00 00") + bytes(28), (3,)),
    ("region_info reply short", lambda p, f: m.RegionInfo.unpack(p), bytes(31), ()),
    (
        "region_info reply caps cut",
        lambda p, f: m.RegionInfo.unpack(p),
        h("28 00 00 00") + REGION_INFO_FULL[4:40],
        (),
    ),  # says 40, has a cap header only
    ("irq_info short", m.IrqInfoRequest.unpack, h("10 00 00 00") + bytes(8), ()),
    ("irq_info argsz", m.IrqInfoRequest.unpack, h("0c 00 00 00") + bytes(12), ()),
    ("irq_info fd", m.IrqInfoRequest.unpack, h("10 00 00 00") + bytes(12), (3,)),
    ("irq_info reply long", m.IrqInfo.unpack, bytes(20), ()),
    ("set_irqs short", m.SetIrqs.unpack, SET_IRQS_EVENTFD[:-1], ()),
    ("set_irqs argsz", m.SetIrqs.unpack, h("18 00 00 00") + SET_IRQS_EVENTFD[4:], ()),
    ("set_irqs fds != count", m.SetIrqs.unpack, SET_IRQS_EVENTFD, (5,)),
    (
        "set_irqs fds without DATA_EVENTFD",
        m.SetIrqs.unpack,
        h("14 00 00 00  21 00 00 00  02 00 00 00  00 00 00 00  01 00 00 00"),
        (5,),
    ),
    (
        "set_irqs DATA_BOOL too few",
        m.SetIrqs.unpack,
        h("16 00 00 00  22 00 00 00  02 00 00 00  00 00 00 00  03 00 00 00  01 01"),
        (),
    ),
    (
        "set_irqs DATA_BOOL too many",
        m.SetIrqs.unpack,
        h("16 00 00 00  22 00 00 00  02 00 00 00  00 00 00 00  01 00 00 00  01 01"),
        (),
    ),
    (
        "set_irqs data without DATA_BOOL",
        m.SetIrqs.unpack,
        h("15 00 00 00  21 00 00 00  02 00 00 00  00 00 00 00  01 00 00 00  01"),
        (),
    ),
    ("region_read short", region_read, REGION_READ[:-1], ()),
    ("region_read with data", region_read, REGION_READ + b"x", ()),
    ("region_read fd", region_read, REGION_READ, (3,)),
    ("region_write missing data", region_write, REGION_READ + b"abc", ()),
    ("region_write extra data", region_write, REGION_READ + b"abcde", ()),
    (
        "write_multi short",
        lambda p, f: m.unpack_region_write_multi(p, f),
        REGION_WRITE_MULTI[:-1],
        (),
    ),
    (
        "write_multi count too big",
        lambda p, f: m.unpack_region_write_multi(p, f),
        h("03 00 00 00 00 00 00 00") + REGION_WRITE_MULTI[8:],
        (),
    ),
    (
        "write_multi entry count 9",
        lambda p, f: m.unpack_region_write_multi(p, f),
        h("01 00 00 00 00 00 00 00  00 00 00 00 00 00 00 00  00 00 00 00  09 00 00 00") + bytes(8),
        (),
    ),
    ("write_multi fd", lambda p, f: m.unpack_region_write_multi(p, f), REGION_WRITE_MULTI, (3,)),
    ("write_multi empty", lambda p, f: m.unpack_region_write_multi(p, f), bytes(7), ()),
    ("dma access short", m.DmaAccess.unpack, bytes(15), ()),
    ("dma access fd", m.DmaAccess.unpack, bytes(16), (3,)),
    ("reset with payload", m.Empty.unpack, b"\0", ()),
    ("reset with fd", m.Empty.unpack, b"", (3,)),
]


@pytest.mark.parametrize("name,parse,payload,fds", MALFORMED, ids=[c[0] for c in MALFORMED])
def test_malformed_payloads_raise_malformed_message(
    name: str, parse: Parser, payload: bytes, fds: tuple[int, ...]
) -> None:
    with pytest.raises(MalformedMessage) as exc:
        parse(payload, fds)
    assert exc.value.errno == errno.EINVAL


# ---------------------------------------------------------------------- framing


def region_read_message(msg_id: int) -> bytes:
    return m.encode_message(msg_id, Command.REGION_READ, REGION_READ, reply=False)


def reset_message(msg_id: int) -> bytes:
    return m.encode_message(msg_id, Command.DEVICE_RESET, reply=False)


def two_messages() -> bytes:
    return region_read_message(1) + reset_message(2)  # 32 + 16 bytes


EXPECTED = [
    Frame(m.Header(1, Command.REGION_READ, 32), REGION_READ, ()),
    Frame(m.Header(2, Command.DEVICE_RESET, 16), b"", ()),
]


def test_two_messages_in_one_chunk() -> None:
    decoder = FrameDecoder()
    assert decoder.feed(two_messages()) == EXPECTED
    assert decoder.buffered == 0


def test_stream_split_at_every_byte_gives_the_same_frames() -> None:
    stream = two_messages()
    for cut in range(len(stream) + 1):
        decoder = FrameDecoder()
        frames = decoder.feed(stream[:cut]) + decoder.feed(stream[cut:])
        assert frames == EXPECTED, cut
        assert decoder.buffered == 0
    for first in range(len(stream) + 1):
        for second in range(first, len(stream) + 1):
            decoder = FrameDecoder()
            chunks = (stream[:first], stream[first:second], stream[second:])
            assert [f for c in chunks for f in decoder.feed(c)] == EXPECTED, (first, second)
    decoder = FrameDecoder()
    one_by_one = [f for i in range(len(stream)) for f in decoder.feed(stream[i : i + 1])]
    assert one_by_one == EXPECTED


def test_a_partial_message_stays_buffered() -> None:
    decoder = FrameDecoder()
    assert decoder.feed(two_messages()[:40]) == EXPECTED[:1]
    assert decoder.buffered == 8
    assert decoder.feed(two_messages()[40:]) == EXPECTED[1:]


def test_fds_belong_to_the_message_holding_the_last_byte_of_their_read() -> None:
    stream = two_messages()
    decoder = FrameDecoder()
    assert decoder.feed(stream[:10]) == []  # a read ending inside the first message
    # The read that carried fds ended in the second message: they are its fds.
    frames = decoder.feed(stream[10:], [7, 8])
    assert [f.fds for f in frames] == [(), (7, 8)]
    # A read that ends exactly at the end of the first message: its fds.
    decoder = FrameDecoder()
    frames = decoder.feed(stream[:32], [9]) + decoder.feed(stream[32:])
    assert [f.fds for f in frames] == [(9,), ()]
    # A read that ends one byte into the second message: the second's.
    decoder = FrameDecoder()
    frames = decoder.feed(stream[:33], [9]) + decoder.feed(stream[33:])
    assert [f.fds for f in frames] == [(), (9,)]
    # fds that came with the first, partial read of a message wait for its end.
    decoder = FrameDecoder()
    assert decoder.feed(stream[:5], [4]) == []
    frames = decoder.feed(stream[5:20]) + decoder.feed(stream[20:])
    assert [f.fds for f in frames] == [(4,), ()]


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_fds_follow_their_message_however_the_stream_is_cut(data: st.DataObject) -> None:
    """Messages A, B, C; B was sent with fds.  The kernel ends the read that brings
    B's fds somewhere inside B; other reads end anywhere."""
    a, b, c = region_read_message(1), reset_message(2), region_read_message(3)
    stream = a + b + c
    b_start, b_end = len(a), len(a) + len(b)
    fd_cut = data.draw(st.integers(b_start + 1, b_end), label="read with fds ends at")
    others = data.draw(st.lists(st.integers(0, len(stream)), max_size=6), label="other cuts")
    cuts = sorted({0, fd_cut, len(stream), *others})
    decoder = FrameDecoder()
    frames: list[Frame] = []
    for start, end in itertools.pairwise(cuts):
        frames += decoder.feed(stream[start:end], [50, 51] if end == fd_cut else [])
    assert [f.header.msg_id for f in frames] == [1, 2, 3]
    assert [f.fds for f in frames] == [(), (50, 51), ()]
    assert decoder.buffered == 0


@pytest.mark.parametrize("size", [0, 1, 15])
def test_a_size_smaller_than_the_header_is_a_framing_error(size: int) -> None:
    header = m.Header(1, Command.REGION_READ, size).pack()
    with pytest.raises(FramingError):
        FrameDecoder().feed(header)


def test_a_size_over_the_limit_is_a_framing_error_the_limit_itself_is_not() -> None:
    limit = 4096
    with pytest.raises(FramingError):
        FrameDecoder(max_message_size=limit).feed(m.Header(1, 10, limit + 1).pack())
    with pytest.raises(FramingError):
        FrameDecoder().feed(m.Header(1, 10, 0xFFFFFFFF).pack())
    whole = m.Header(1, 10, limit).pack() + bytes(limit - 16)
    assert len(FrameDecoder(max_message_size=limit).feed(whole)) == 1


def test_a_bad_header_after_good_messages_in_one_chunk_is_still_an_error() -> None:
    with pytest.raises(FramingError):
        FrameDecoder().feed(two_messages() + m.Header(3, 9, 8).pack())


def test_close_closes_fds_of_an_unfinished_message(pipe_fds: list[int]) -> None:
    decoder = FrameDecoder()
    assert decoder.feed(two_messages()[:20], pipe_fds[:2]) == []
    decoder.close()
    assert not is_open(pipe_fds[0]) and not is_open(pipe_fds[1])
    assert decoder.buffered == 0


def test_close_leaves_the_fds_of_delivered_frames_alone(pipe_fds: list[int]) -> None:
    decoder = FrameDecoder()
    frames = decoder.feed(two_messages()[:32], pipe_fds[:1])
    assert frames[0].fds == (pipe_fds[0],)
    decoder.feed(two_messages()[32:40], pipe_fds[1:2])
    decoder.close()
    assert is_open(pipe_fds[0]), "the frame's owner closes it"
    assert not is_open(pipe_fds[1])


def test_framing_error_after_a_frame_with_fds_leaks_nothing(pipe_fds: list[int]) -> None:
    message = region_read_message(1)
    decoder = FrameDecoder()
    # The message's first read brought fds; its rest comes with a broken header.
    assert decoder.feed(message[:10], pipe_fds[:2]) == []
    with pytest.raises(FramingError):
        decoder.feed(message[10:] + m.Header(2, 9, 4).pack())
    decoder.close()  # what the transport does on a FramingError
    assert not is_open(pipe_fds[0]) and not is_open(pipe_fds[1])


# ---------------------------------------------------------------------- round trips

u16 = st.integers(0, 2**16 - 1)
u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
fd_numbers = st.integers(0, 2**31 - 1)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)


@settings(max_examples=200, deadline=None)
@given(u16, u16, u32, u32, u32)
def test_header_round_trip(msg_id: int, command: int, size: int, flags: int, error: int) -> None:
    header = m.Header(msg_id, command, size, flags, error)
    assert m.Header.unpack(header.pack()) == header


@settings(max_examples=200, deadline=None)
@given(u16, u16, st.binary(max_size=64), st.booleans(), st.booleans(), u32)
def test_encode_message_round_trip(
    msg_id: int, command: int, payload: bytes, reply: bool, no_reply: bool, error: int
) -> None:
    encoded = m.encode_message(
        msg_id, command, payload, reply=reply, error=error, no_reply=no_reply
    )
    (frame,) = FrameDecoder().feed(encoded)
    assert frame.payload == payload
    header = frame.header
    assert (header.msg_id, header.command, header.size) == (msg_id, command, 16 + len(payload))
    assert (header.is_reply, header.no_reply, header.is_error) == (reply, no_reply, bool(error))
    assert header.error == error


@settings(max_examples=100, deadline=None)
@given(u16, u16, st.dictionaries(st.text(max_size=12), json_values, max_size=4))
def test_version_round_trip(major: int, minor: int, caps: dict[str, object]) -> None:
    version = m.Version(major, minor, caps)
    assert m.Version.unpack(version.pack()) == version


@settings(max_examples=100, deadline=None)
@given(u32, u64, u64, u64, st.none() | fd_numbers)
def test_dma_map_round_trip(
    flags: int, offset: int, address: int, size: int, fd: int | None
) -> None:
    message = m.DmaMap(32, flags, offset, address, size, fd)
    assert m.DmaMap.unpack(message.pack(), () if fd is None else (fd,)) == message


@settings(max_examples=100, deadline=None)
@given(u32, u64, u64)
def test_dma_unmap_round_trip(flags: int, address: int, size: int) -> None:
    message = m.DmaUnmap(24, flags, address, size)
    assert m.DmaUnmap.unpack(message.pack()) == message


@settings(max_examples=100, deadline=None)
@given(st.integers(16, 2**32 - 1), u32, u32, u32)
def test_device_info_round_trip(argsz: int, flags: int, regions: int, irqs: int) -> None:
    assert m.DeviceInfoRequest.unpack(m.DeviceInfoRequest(argsz).pack()).argsz == argsz
    info = m.DeviceInfo(flags, regions, irqs, argsz)
    assert m.DeviceInfo.unpack(info.pack()) == info


@settings(max_examples=100, deadline=None)
@given(st.integers(32, 2**32 - 1), u32)
def test_region_info_request_round_trip(argsz: int, index: int) -> None:
    request = m.RegionInfoRequest(argsz, index)
    assert m.RegionInfoRequest.unpack(request.pack()) == request


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(u64, u64), max_size=4), u32, u32, u64, u64)
def test_region_info_round_trip(
    areas: list[tuple[int, int]], index: int, flags: int, size: int, offset: int
) -> None:
    info = m.RegionInfo(index, flags, size, offset, tuple(m.SparseArea(*a) for a in areas))
    assert m.RegionInfo.unpack(info.pack_reply(1 << 16)) == (info, info.full_size())
    truncated, wanted = m.RegionInfo.unpack(info.pack_reply(32))
    assert wanted == info.full_size()
    assert truncated == m.RegionInfo(index, flags, size, offset)


@settings(max_examples=100, deadline=None)
@given(st.integers(16, 2**32 - 1), u32, u32, u32)
def test_irq_info_round_trip(argsz: int, index: int, flags: int, count: int) -> None:
    request = m.IrqInfoRequest(argsz, index)
    assert m.IrqInfoRequest.unpack(request.pack()) == request
    info = m.IrqInfo(index, flags, count)
    assert m.IrqInfo.unpack(info.pack()) == info


@settings(max_examples=100, deadline=None)
@given(u32, u32, st.lists(st.booleans(), max_size=16), st.sampled_from([0x22, 0x2A, 0x32]))
def test_set_irqs_bool_round_trip(index: int, start: int, bools: list[bool], flags: int) -> None:
    message = m.SetIrqs(flags, index, start, len(bools), bytes(bools))
    assert m.SetIrqs.unpack(message.pack()) == message


@settings(max_examples=100, deadline=None)
@given(u32, u32, st.lists(fd_numbers, max_size=8), st.booleans())
def test_set_irqs_eventfd_round_trip(
    index: int, start: int, fds: list[int], deassign: bool
) -> None:
    count = len(fds)
    sent = () if deassign else tuple(fds)
    message = m.SetIrqs(0x24, index, start, count, b"", sent)
    assert m.SetIrqs.unpack(message.pack(), sent) == message


@settings(max_examples=100, deadline=None)
@given(u64, u32, st.binary(max_size=64))
def test_region_access_round_trip(offset: int, region: int, data: bytes) -> None:
    write = m.RegionAccess(offset, region, len(data), data)
    assert m.RegionAccess.unpack(write.pack(), with_data=True) == write
    read = m.RegionAccess(offset, region, len(data))
    assert m.RegionAccess.unpack(read.pack(), with_data=False) == read
    assert m.parse_region_access(write.pack(), with_data=True) == (offset, region, len(data), data)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(u64, u32, st.binary(max_size=8)), max_size=10))
def test_region_write_multi_round_trip(entries: list[tuple[int, int, bytes]]) -> None:
    # Built with struct here, from the spec layout (no packer exists: only QEMU sends it).
    payload = struct.pack("<Q", len(entries)) + b"".join(
        struct.pack("<QII", offset, region, len(data)) + data.ljust(8, b"\0")
        for offset, region, data in entries
    )
    assert m.unpack_region_write_multi(payload) == tuple(
        m.RegionAccess(offset, region, len(data), data) for offset, region, data in entries
    )


@settings(max_examples=100, deadline=None)
@given(u64, st.binary(max_size=64), st.booleans())
def test_dma_access_round_trip(address: int, data: bytes, is_read_request: bool) -> None:
    access = m.DmaAccess(address, len(data), b"" if is_read_request else data)
    assert m.DmaAccess.unpack(access.pack()) == access


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_parse_or_raise_a_protocol_error(data: bytes) -> None:
    """The h11 invariant: random input either decodes or raises the protocol's own
    errors, nothing else."""
    decoder = FrameDecoder(max_message_size=4096)
    try:
        frames: list[Frame] = decoder.feed(data)
    except FramingError:
        return
    for frame in frames:
        parsers: list[Callable[[bytes], object]] = [
            m.Version.unpack,
            m.DmaMap.unpack,
            m.DmaUnmap.unpack,
            m.DeviceInfoRequest.unpack,
            m.RegionInfoRequest.unpack,
            m.IrqInfoRequest.unpack,
            m.SetIrqs.unpack,
            m.Empty.unpack,
            m.unpack_region_write_multi,
            m.DmaAccess.unpack,
            m.DeviceInfo.unpack,
            m.IrqInfo.unpack,
            m.RegionInfo.unpack,
            lambda p: m.RegionAccess.unpack(p, with_data=True),
            lambda p: m.RegionAccess.unpack(p, with_data=False),
        ]
        for parse in parsers:
            try:
                parse(frame.payload)
            except MalformedMessage:
                pass


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_random_payloads_raise_only_malformed_message(payload: bytes) -> None:
    prefixes = [b"", h("00 00 00 00"), h("20 00 00 00"), h("14 00 00 00 22 00 00 00")]
    for prefix in prefixes:
        for parse in (
            m.Version.unpack,
            m.SetIrqs.unpack,
            m.unpack_region_write_multi,
            m.DmaUnmap.unpack,
            m.RegionInfoRequest.unpack,
        ):
            try:
                parse(prefix + payload)
            except MalformedMessage:
                pass
        try:
            m.RegionInfo.unpack(prefix + payload)
        except MalformedMessage:
            pass
