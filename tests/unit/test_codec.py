"""The vfio-user codec against golden bytes written from the spec's layouts.

Every expected byte string below is spelled out by hand from QEMU's
docs/interop/vfio-user.rst (little endian), field by field, not produced by the code
under test.  Each is checked both ways: pack() gives it, unpack() of it gives the
object.
"""

from __future__ import annotations

import errno
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from device.protocol import messages as m
from device.protocol.codec import Frame, FrameDecoder
from device.protocol.constants import Command
from device.protocol.errors import FramingError, MalformedMessage


def h(text: str) -> bytes:
    """Hex with spaces and comments allowed: '01 00  # major'."""
    return bytes.fromhex("".join(line.split("#")[0] for line in text.splitlines()))


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


def test_no_reply_flag() -> None:
    encoded = m.encode_message(1, Command.REGION_WRITE, b"", reply=False, no_reply=True)
    assert encoded[8:12] == h("10 00 00 00")
    assert m.Header.unpack(encoded).no_reply


# ---------------------------------------------------------------------- VERSION


def test_version_golden() -> None:
    caps = {"max_msg_fds": 8}
    text = b'{"capabilities":{"max_msg_fds":8}}'
    golden = h("00 00  00 00") + text + b"\0"  # major 0, minor 0, JSON, NUL
    assert m.Version(0, 0, caps).pack() == golden
    assert m.Version.unpack(golden) == m.Version(0, 0, caps)


@pytest.mark.parametrize("payload", [
    h("00 00 00 00") + b'{"capabilities":{}}',  # no NUL
    h("00 00 00 00") + b"not json\0",
    h("00 00 00 00") + b"[1,2]\0",
    h("00 00 00 00") + b'{"capabilities":3}\0',
    h("00 00"),
])
def test_version_malformed(payload: bytes) -> None:
    with pytest.raises(MalformedMessage):
        m.Version.unpack(payload)


# ---------------------------------------------------------------------- DMA_MAP / UNMAP


DMA_MAP = h("""
    20 00 00 00              # argsz 32
    03 00 00 00              # flags READ|WRITE
    00 10 00 00 00 00 00 00  # offset 0x1000 into the fd
    00 00 00 40 00 00 00 00  # address 0x40000000
    00 00 20 00 00 00 00 00  # size 0x200000
""")


def test_dma_map_golden_with_and_without_fd() -> None:
    assert m.DmaMap(32, 3, 0x1000, 0x4000_0000, 0x20_0000).pack() == DMA_MAP
    assert m.DmaMap.unpack(DMA_MAP) == m.DmaMap(32, 3, 0x1000, 0x4000_0000, 0x20_0000, None)
    assert m.DmaMap.unpack(DMA_MAP, (9,)).fd == 9
    with pytest.raises(MalformedMessage):
        m.DmaMap.unpack(DMA_MAP, (9, 10))
    with pytest.raises(MalformedMessage):
        m.DmaMap.unpack(h("1f 00 00 00") + DMA_MAP[4:])  # wrong argsz
    with pytest.raises(MalformedMessage):
        m.DmaMap.unpack(DMA_MAP[:-1])


def test_dma_unmap_golden() -> None:
    golden = h("""
        18 00 00 00              # argsz 24
        02 00 00 00              # flags: unmap all
        00 00 00 00 00 00 00 00  # address
        00 00 00 00 00 00 00 00  # size
    """)
    assert m.DmaUnmap(24, 2, 0, 0).pack() == golden
    assert m.DmaUnmap.unpack(golden) == m.DmaUnmap(24, 2, 0, 0)
    with pytest.raises(MalformedMessage):
        m.DmaUnmap.unpack(golden, (3,))


# ---------------------------------------------------------------------- DEVICE_GET_INFO


def test_device_info_golden() -> None:
    request = h("10 00 00 00  00 00 00 00  00 00 00 00  00 00 00 00")  # argsz 16, zeros
    assert m.DeviceInfoRequest(16).pack() == request
    assert m.DeviceInfoRequest.unpack(request) == m.DeviceInfoRequest(16)
    reply = h("""
        10 00 00 00  # argsz 16
        03 00 00 00  # flags RESET|PCI
        09 00 00 00  # num_regions 9
        05 00 00 00  # num_irqs 5
    """)
    assert m.DeviceInfo(3, 9, 5).pack() == reply
    assert m.DeviceInfo.unpack(reply) == m.DeviceInfo(3, 9, 5, 16)
    with pytest.raises(MalformedMessage):
        m.DeviceInfoRequest.unpack(h("08 00 00 00") + request[4:])  # argsz too small


# ---------------------------------------------------------------------- REGION_INFO


def test_region_info_request_golden() -> None:
    golden = h("""
        20 00 00 00  # argsz 32
        00 00 00 00  # flags
        02 00 00 00  # index 2
        00 00 00 00  # cap_offset
        00 00 00 00 00 00 00 00  # size
        00 00 00 00 00 00 00 00  # offset
    """)
    assert m.RegionInfoRequest(32, 2).pack() == golden
    assert m.RegionInfoRequest.unpack(golden) == m.RegionInfoRequest(32, 2)


SPARSE = m.RegionInfo(2, 0xF, 0x1000_0000, 0x2000, (m.SparseArea(0, 0x1000_0000),))


def test_region_info_reply_truncated_then_full_with_sparse_mmap_capability() -> None:
    truncated = h("""
        40 00 00 00              # argsz 64 = 32 + cap header 8 + 8 + one area 16
        0f 00 00 00              # flags READ|WRITE|MMAP|CAPS
        02 00 00 00              # index 2
        20 00 00 00              # cap_offset 32
        00 00 00 10 00 00 00 00  # size 256 MiB
        00 20 00 00 00 00 00 00  # offset 0x2000 (for mmap)
    """)
    assert SPARSE.pack_reply(32) == truncated
    full = truncated + h("""
        01 00                    # cap id: sparse mmap
        01 00                    # version 1
        00 00 00 00              # next: none
        01 00 00 00              # nr_areas 1
        00 00 00 00              # reserved
        00 00 00 00 00 00 00 00  # area offset 0
        00 00 00 10 00 00 00 00  # area size 256 MiB
    """)
    assert SPARSE.pack_reply(64) == full
    assert m.RegionInfo.unpack(full) == (SPARSE, 64)
    info, wanted = m.RegionInfo.unpack(truncated)
    assert wanted == 64 and info.sparse_areas == ()


def test_region_info_without_caps_golden() -> None:
    golden = h("""
        20 00 00 00  03 00 00 00  07 00 00 00  00 00 00 00  # argsz, RW, index 7, no caps
        00 10 00 00 00 00 00 00  00 00 00 00 00 00 00 00    # size 4096, offset 0
    """)
    assert m.RegionInfo(7, 3, 4096).pack_reply(32) == golden


# ---------------------------------------------------------------------- IRQ_INFO / SET_IRQS


def test_irq_info_golden() -> None:
    request = h("10 00 00 00  00 00 00 00  02 00 00 00  00 00 00 00")
    assert m.IrqInfoRequest(16, 2).pack() == request
    assert m.IrqInfoRequest.unpack(request) == m.IrqInfoRequest(16, 2)
    reply = h("""
        10 00 00 00  # argsz
        09 00 00 00  # flags EVENTFD|NORESIZE
        02 00 00 00  # index 2 (MSI-X)
        08 00 00 00  # count 8
    """)
    assert m.IrqInfo(2, 9, 8).pack() == reply
    assert m.IrqInfo.unpack(reply) == m.IrqInfo(2, 9, 8)


def test_set_irqs_eventfd_golden() -> None:
    golden = h("""
        14 00 00 00  # argsz 20: the fds travel as SCM_RIGHTS, not in the payload
        24 00 00 00  # flags DATA_EVENTFD | ACTION_TRIGGER
        02 00 00 00  # index MSI-X
        00 00 00 00  # start 0
        02 00 00 00  # count 2
    """)
    assert m.SetIrqs(0x24, 2, 0, 2).pack() == golden
    assert m.SetIrqs.unpack(golden, (5, 6)) == m.SetIrqs(0x24, 2, 0, 2, b"", (5, 6))
    assert m.SetIrqs.unpack(golden).fds == ()  # no fds: de-assign
    with pytest.raises(MalformedMessage):
        m.SetIrqs.unpack(golden, (5,))  # fds must match count


def test_set_irqs_data_bool_golden() -> None:
    golden = h("""
        17 00 00 00  # argsz 23 = 20 + 3 bool bytes
        22 00 00 00  # flags DATA_BOOL | ACTION_TRIGGER
        02 00 00 00  01 00 00 00  03 00 00 00  # index 2, start 1, count 3
        01 00 01     # fire vectors 1 and 3
    """)
    assert m.SetIrqs(0x22, 2, 1, 3, b"\x01\x00\x01").pack() == golden
    assert m.SetIrqs.unpack(golden).data == b"\x01\x00\x01"
    with pytest.raises(MalformedMessage):
        m.SetIrqs.unpack(golden[:-1])  # argsz no longer matches
    with pytest.raises(MalformedMessage):
        m.SetIrqs.unpack(h("16 00 00 00") + golden[4:-1])  # 2 bools for count 3


# ---------------------------------------------------------------------- REGION_READ/WRITE


def test_region_read_golden() -> None:
    request = h("""
        08 00 00 00 00 00 00 00  # offset 8
        00 00 00 00              # region 0 (BAR0)
        04 00 00 00              # count 4
    """)
    assert m.RegionAccess(8, 0, 4).pack() == request
    assert m.RegionAccess.unpack(request, with_data=False) == m.RegionAccess(8, 0, 4)
    reply = request + h("55 50 47 4d")  # the data
    assert m.RegionAccess(8, 0, 4, b"UPGM").pack() == reply
    assert m.RegionAccess.unpack(reply, with_data=True).data == b"UPGM"
    with pytest.raises(MalformedMessage):
        m.RegionAccess.unpack(reply, with_data=False)
    with pytest.raises(MalformedMessage):
        m.RegionAccess.unpack(request, (4,), with_data=False)


def test_region_write_golden() -> None:
    request = h("""
        04 00 00 00 00 00 00 00  # offset 4
        07 00 00 00              # region 7 (config)
        02 00 00 00              # count 2
        06 01                    # data
    """)
    assert m.RegionAccess(4, 7, 2, b"\x06\x01").pack() == request
    assert m.RegionAccess.unpack(request, with_data=True) == m.RegionAccess(4, 7, 2, b"\x06\x01")
    with pytest.raises(MalformedMessage):
        m.RegionAccess.unpack(request[:-1], with_data=True)  # count says 2, one byte


def test_region_write_multi_decoded() -> None:
    golden = h("""
        02 00 00 00 00 00 00 00                        # wr_cnt 2
        10 00 00 00 00 00 00 00  00 00 00 00  04 00 00 00  # offset 16, region 0, count 4
        aa bb cc dd 00 00 00 00                        # 8 data bytes, 4 used
        08 00 00 00 00 00 00 00  00 00 00 00  01 00 00 00  # offset 8, region 0, count 1
        ee 00 00 00 00 00 00 00
    """)
    writes = m.unpack_region_write_multi(golden)
    assert writes == (m.RegionAccess(16, 0, 4, h("aa bb cc dd")), m.RegionAccess(8, 0, 1, b"\xee"))
    with pytest.raises(MalformedMessage):
        m.unpack_region_write_multi(golden[:-1])


# ---------------------------------------------------------------------- DMA_READ/WRITE, RESET


def test_dma_read_write_golden() -> None:
    read_request = h("""
        00 10 00 00 00 00 00 00  # address 0x1000
        04 00 00 00 00 00 00 00  # count 4
    """)
    assert m.DmaAccess(0x1000, 4).pack() == read_request
    write = read_request + h("de ad be ef")
    assert m.DmaAccess(0x1000, 4, h("de ad be ef")).pack() == write
    assert m.DmaAccess.unpack(write) == m.DmaAccess(0x1000, 4, h("de ad be ef"))


def test_device_reset_has_no_payload() -> None:
    assert m.encode_message(3, Command.DEVICE_RESET, reply=False) == h(
        "03 00 0d 00 10 00 00 00 00 00 00 00 00 00 00 00")
    assert m.Empty.unpack(b"") == m.Empty()
    with pytest.raises(MalformedMessage):
        m.Empty.unpack(b"\0")


# ---------------------------------------------------------------------- framing


def two_messages() -> bytes:
    first = m.encode_message(1, Command.REGION_READ, m.RegionAccess(0, 0, 4).pack(), reply=False)
    second = m.encode_message(2, Command.DEVICE_RESET, reply=False)
    return first + second


def test_stream_split_at_every_byte_gives_the_same_frames() -> None:
    stream = two_messages()
    expected = FrameDecoder().feed(stream)
    assert [f.header.msg_id for f in expected] == [1, 2]
    for cut in range(len(stream) + 1):
        decoder = FrameDecoder()
        frames = decoder.feed(stream[:cut]) + decoder.feed(stream[cut:])
        assert frames == expected, cut
    decoder = FrameDecoder()
    one_by_one = [f for i in range(len(stream)) for f in decoder.feed(stream[i : i + 1])]
    assert one_by_one == expected


def test_fds_belong_to_the_message_holding_the_last_byte_of_their_read() -> None:
    stream = two_messages()
    split = 10  # a read ending inside the first message brings no fds
    decoder = FrameDecoder()
    assert decoder.feed(stream[:split]) == []
    # The read that carried fds ended in the second message: they are its fds.
    frames = decoder.feed(stream[split:], [7, 8])
    assert [f.fds for f in frames] == [(), (7, 8)]
    # A read that ends exactly at the end of the first message: its fds.
    decoder = FrameDecoder()
    first_size = len(stream) - 16
    frames = decoder.feed(stream[:first_size], [9]) + decoder.feed(stream[first_size:])
    assert [f.fds for f in frames] == [(9,), ()]


@pytest.mark.parametrize("size", [0, 15, 64 << 20])
def test_impossible_sizes_are_framing_errors(size: int) -> None:
    header = m.Header(1, Command.REGION_READ, size).pack()
    with pytest.raises(FramingError):
        FrameDecoder(max_message_size=1 << 20).feed(header)


def test_close_closes_fds_of_an_unfinished_message() -> None:
    read_end, write_end = os.pipe()
    decoder = FrameDecoder()
    assert decoder.feed(two_messages()[:20], [write_end]) == []
    decoder.close()
    with pytest.raises(OSError):
        os.fstat(write_end)
    os.close(read_end)


# ---------------------------------------------------------------------- round trips

u16, u32, u64 = (st.integers(0, 2**16 - 1), st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1))


@settings(max_examples=200, deadline=None)
@given(u16, u16, u32, u32, u32)
def test_header_round_trip(msg_id: int, command: int, size: int, flags: int, error: int) -> None:
    header = m.Header(msg_id, command, size, flags, error)
    assert m.Header.unpack(header.pack()) == header


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.sampled_from(["max_msg_fds", "pgsizes", "x"]), st.integers(0, 2**40)),
       u16)
def test_version_round_trip(caps: dict[str, object], minor: int) -> None:
    version = m.Version(0, minor, caps)
    assert m.Version.unpack(version.pack()) == version


@settings(max_examples=100, deadline=None)
@given(u32, u64, u64, u64)
def test_dma_map_round_trip(flags: int, offset: int, address: int, size: int) -> None:
    message = m.DmaMap(32, flags, offset, address, size)
    assert m.DmaMap.unpack(message.pack()) == message


@settings(max_examples=100, deadline=None)
@given(u64, u32, st.binary(max_size=64))
def test_region_access_round_trip(offset: int, region: int, data: bytes) -> None:
    access = m.RegionAccess(offset, region, len(data), data)
    assert m.RegionAccess.unpack(access.pack(), with_data=True) == access


@settings(max_examples=100, deadline=None)
@given(u32, u32, st.lists(st.booleans(), max_size=16))
def test_set_irqs_bool_round_trip(index: int, start: int, bools: list[bool]) -> None:
    message = m.SetIrqs(0x22, index, start, len(bools), bytes(bools))
    assert m.SetIrqs.unpack(message.pack()) == message


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(u64, u64), max_size=4), u32, u64, u64)
def test_region_info_round_trip(areas: list[tuple[int, int]], flags: int, size: int,
                                offset: int) -> None:
    info = m.RegionInfo(2, flags, size, offset, tuple(m.SparseArea(*a) for a in areas))
    assert m.RegionInfo.unpack(info.pack_reply(1 << 16)) == (info, info.full_size())


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
        for parse in (m.Version.unpack, m.DmaMap.unpack, m.DmaUnmap.unpack,
                      m.DeviceInfoRequest.unpack, m.RegionInfoRequest.unpack,
                      m.IrqInfoRequest.unpack, m.SetIrqs.unpack, m.Empty.unpack,
                      m.unpack_region_write_multi):
            try:
                parse(frame.payload)
            except MalformedMessage:
                pass
