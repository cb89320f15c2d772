"""Checks of region accesses, DMA maps and reset.

The suite knows nothing of the device, so it writes only where PCI says a write is
harmless: the config space COMMAND register, with the value it just read.  It reads
the PCI header of config space and offset 0 of each readable region; a device may
refuse a read of a width it does not support, so for BARs only the form of the answer
is checked.  DMA maps name guest memory the suite owns (a sealed memfd, or none), and
the device is never asked to use it.  DEVICE_RESET resets the device (when it offers
reset): the suite is for a server no guest is using.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct

from device.conformance.suite import (
    Kind,
    NotApplicable,
    Region,
    Source,
    Trial,
    check,
    errno_name,
    ok,
    refused,
    still_serves,
)
from device.conformance.wire import Peer, Violation
from device.vfio_user.protocol import messages as m
from device.vfio_user.protocol.constants import Command, DeviceFlags, DmaMapFlags

GOOD, HOSTILE = Kind.GOOD, Kind.HOSTILE
SPEC, QEMU = Source.SPEC, Source.QEMU
PCI_HEADER = 64
PCI_COMMAND = 0x04
READ_WIDTHS = (4, 8, 2, 1)
DMA_BASE = 0x4000_0000  # guest addresses the suite names in DMA maps
DMA_SIZE = 1 << 20
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


def read(peer: Peer, region: int, offset: int, count: int) -> bytes | None:
    """A REGION_READ: its data (checked against the request), or None if refused."""
    reply = peer.request(Command.REGION_READ, m.pack_region_access(offset, region, count))
    assert reply is not None
    reply.close()
    if reply.header.is_error:
        return None
    payload = reply.payload
    if len(payload) < m.REGION_RW_SIZE:
        raise Violation(f"REGION_READ reply of {len(payload)} bytes, needs 16")
    echoed = struct.unpack_from("<QII", payload)
    if echoed != (offset, region, count):
        raise Violation(f"REGION_READ of ({offset:#x}, {region}, {count}) echoes {echoed}")
    data = payload[m.REGION_RW_SIZE :]
    if len(data) != count:
        raise Violation(f"REGION_READ of {count} bytes returned {len(data)}")
    return data


def write(peer: Peer, region: int, offset: int, data: bytes) -> bool:
    """A REGION_WRITE: True if accepted (its reply checked), False if refused."""
    payload = m.pack_region_access(offset, region, len(data), data)
    reply = peer.request(Command.REGION_WRITE, payload)
    assert reply is not None
    reply.close()
    if reply.header.is_error:
        return False
    if len(reply.payload) != m.REGION_RW_SIZE:
        raise Violation(f"REGION_WRITE reply of {len(reply.payload)} bytes, must be 16 (no data)")
    echoed = struct.unpack("<QII", reply.payload)
    if echoed != (offset, region, len(data)):
        raise Violation(f"REGION_WRITE of ({offset:#x}, {region}, {len(data)}) echoes {echoed}")
    return True


# ---------------------------------------------------------------------- REGION_READ


@check(
    Command.REGION_READ,
    "read-config-header",
    GOOD,
    SPEC,
    "The 64-byte PCI header reads back whole with offset, region and count echoed; its "
    "vendor ID is a real one; 4-byte reads of the IDs agree with it.",
)
def read_config_header(trial: Trial) -> None:
    config = trial.device.config()
    peer = trial.connect()
    header = read(peer, config.index, 0, PCI_HEADER)
    trial.expect(header is not None, "reading the PCI header was refused")
    assert header is not None
    vendor = int.from_bytes(header[0:2], "little")
    trial.expect(vendor not in (0, 0xFFFF), f"vendor ID {vendor:#06x}")
    for offset in (0, 8):
        word = read(peer, config.index, offset, 4)
        trial.expect(word == header[offset : offset + 4], f"config {offset:#x} reads differently")


@check(
    Command.REGION_READ,
    "read-each-region",
    GOOD,
    SPEC,
    "A read at offset 0 of every readable region is answered with exactly the bytes "
    "asked for and the request echoed (a device may refuse a width it lacks).",
)
def read_each_region(trial: Trial) -> None:
    peer = trial.connect()
    regions = trial.device.readable()
    if not regions:
        raise NotApplicable("no readable region")
    for region in regions:
        for width in READ_WIDTHS:
            if width <= region.size and read(peer, region.index, 0, width) is not None:
                break


@check(
    Command.REGION_READ,
    "read-out-of-bounds",
    HOSTILE,
    SPEC,
    "Reads at the end of a region, across its end, wrapping the 64-bit offset, and of "
    "a region the device does not have each get an error reply.",
)
def read_out_of_bounds(trial: Trial) -> None:
    peer = trial.connect()
    cases = [(r.index, r.size, 4) for r in trial.device.readable()]
    cases += [(r.index, r.size - 1, 2) for r in trial.device.readable()]
    cases += [(0, (1 << 64) - 2, 4), (trial.device.num_regions, 0, 4), (0xFFFFFFFF, 0, 4)]
    trial.each(cases, lambda case: refused(
        peer, Command.REGION_READ, m.pack_region_access(case[1], case[0], case[2]),
        f"REGION_READ of region {case[0]:#x} at {case[1]:#x}+{case[2]}",
    ))  # fmt: skip
    still_serves(trial, peer)


@check(
    Command.REGION_READ,
    "read-over-max-xfer",
    HOSTILE,
    SPEC,
    "A read of more than the server's max_data_xfer_size gets an error reply.",
)
def read_over_max_xfer(trial: Trial) -> None:
    peer = trial.connect()
    limit = trial.device.max_data_xfer
    big = [r for r in trial.device.readable() if r.size > limit]
    region: Region = big[0] if big else trial.device.config()
    refused(
        peer, Command.REGION_READ, m.pack_region_access(0, region.index, limit + 1),
        f"REGION_READ of {limit + 1} bytes (max_data_xfer_size {limit})",
    )  # fmt: skip
    still_serves(trial, peer)


@check(
    Command.REGION_READ,
    "read-malformed",
    HOSTILE,
    SPEC,
    "A REGION_READ whose payload is cut short gets an error reply.",
)
def read_malformed(trial: Trial) -> None:
    config = trial.device.config()
    peer = trial.connect()
    short = m.pack_region_access(0, config.index, 4)[:12]
    refused(peer, Command.REGION_READ, short, "a 12-byte REGION_READ")
    still_serves(trial, peer)


# ---------------------------------------------------------------------- REGION_WRITE


@check(
    Command.REGION_WRITE,
    "write-config-command",
    GOOD,
    SPEC,
    "Writing the config COMMAND register with the value it holds is accepted; the "
    "reply echoes offset, region and count and carries no data.",
)
def write_config_command(trial: Trial) -> None:
    config = trial.device.config()
    peer = trial.connect()
    value = read(peer, config.index, PCI_COMMAND, 2)
    trial.expect(value is not None, "reading COMMAND was refused")
    assert value is not None
    trial.expect(write(peer, config.index, PCI_COMMAND, value), "writing COMMAND was refused")
    trial.expect(read(peer, config.index, PCI_COMMAND, 2) == value, "COMMAND changed")


@check(
    Command.REGION_WRITE,
    "write-refused",
    HOSTILE,
    SPEC,
    "Writes across the end of config space, to an absent region, and with fewer data "
    "bytes than their count each get an error reply.",
)
def write_refused(trial: Trial) -> None:
    config = trial.device.config()
    peer = trial.connect()
    cases = [
        ("across the end", m.pack_region_access(config.size - 1, config.index, 2, b"\0\0")),
        ("to an absent region", m.pack_region_access(0, trial.device.num_regions, 2, b"\0\0")),
        ("short of data", m.pack_region_access(PCI_COMMAND, config.index, 4, b"\0\0")),
    ]
    trial.each(cases, lambda c: refused(peer, Command.REGION_WRITE, c[1], f"a REGION_WRITE {c[0]}"))
    still_serves(trial, peer)


@check(
    Command.REGION_WRITE_MULTI,
    "write-multi",
    GOOD,
    SPEC,
    "When the server offers write_multiple, a REGION_WRITE_MULTI rewriting COMMAND is accepted.",
)
def write_multi(trial: Trial) -> None:
    if trial.device.capabilities.get("write_multiple") is not True:
        raise NotApplicable("the server does not offer write_multiple")
    config = trial.device.config()
    peer = trial.connect()
    value = read(peer, config.index, PCI_COMMAND, 2)
    assert value is not None
    entry = struct.pack("<QII8s", PCI_COMMAND, config.index, 2, value)
    payload = struct.pack("<Q", 1) + entry
    ok(peer.request(Command.REGION_WRITE_MULTI, payload), "REGION_WRITE_MULTI")


# ---------------------------------------------------------------------- DMA


def sealed_memfd(size: int) -> int:
    fd = os.memfd_create("conformance-guest-ram", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
    return fd


def dma_map(address: int, size: int, flags: int = DmaMapFlags.READ | DmaMapFlags.WRITE) -> bytes:
    return m.DmaMap(32, flags, 0, address, size).pack()


def dma_unmap(address: int, size: int) -> bytes:
    return m.DmaUnmap(24, 0, address, size).pack()


@check(
    Command.DMA_MAP,
    "dma-map-unmap",
    GOOD,
    SPEC,
    "A map without an fd and one with a memfd are accepted; unmapping each is accepted "
    "and its reply echoes the request.",
)
def dma_map_unmap(trial: Trial) -> None:
    peer = trial.connect()
    memory = sealed_memfd(DMA_SIZE)
    try:
        ok(peer.request(Command.DMA_MAP, dma_map(DMA_BASE, DMA_SIZE)), "DMA_MAP without an fd")
        second = DMA_BASE + 2 * DMA_SIZE
        ok(
            peer.request(Command.DMA_MAP, dma_map(second, DMA_SIZE), (memory,)),
            "DMA_MAP of a memfd",
        )
    finally:
        os.close(memory)
    for address in (DMA_BASE, DMA_BASE + 2 * DMA_SIZE):
        request = dma_unmap(address, DMA_SIZE)
        reply = ok(peer.request(Command.DMA_UNMAP, request), f"DMA_UNMAP of {address:#x}")
        trial.expect(reply.payload == request, "the DMA_UNMAP reply is not the original DMA entry")


@check(
    Command.DMA_MAP,
    "dma-map-overlap",
    HOSTILE,
    SPEC,
    "A map over an existing one fails with EEXIST.",
)
def dma_map_overlap(trial: Trial) -> None:
    peer = trial.connect()
    ok(peer.request(Command.DMA_MAP, dma_map(DMA_BASE, DMA_SIZE)), "DMA_MAP")

    def overlap(address: int) -> None:
        code = refused(peer, Command.DMA_MAP, dma_map(address, DMA_SIZE), f"a map at {address:#x}")
        trial.expect(
            code == errno.EEXIST,
            f"a map at {address:#x} failed with {errno_name(code)}, not EEXIST",
        )

    trial.each((DMA_BASE, DMA_BASE + DMA_SIZE // 2, DMA_BASE - 4096), overlap)
    ok(peer.request(Command.DMA_UNMAP, dma_unmap(DMA_BASE, DMA_SIZE)), "DMA_UNMAP")


@check(
    Command.DMA_UNMAP,
    "dma-unmap-unknown",
    HOSTILE,
    SPEC,
    "Unmapping what was never mapped, or part of a mapping, gets an error reply.",
)
def dma_unmap_unknown(trial: Trial) -> None:
    peer = trial.connect()
    ok(peer.request(Command.DMA_MAP, dma_map(DMA_BASE, DMA_SIZE)), "DMA_MAP")
    refused(peer, Command.DMA_UNMAP, dma_unmap(DMA_BASE + 8 * DMA_SIZE, 4096), "an unknown unmap")
    refused(peer, Command.DMA_UNMAP, dma_unmap(DMA_BASE, 4096), "unmapping part of a map")
    ok(peer.request(Command.DMA_UNMAP, dma_unmap(DMA_BASE, DMA_SIZE)), "DMA_UNMAP")


@check(
    Command.DMA_MAP,
    "dma-map-malformed",
    HOSTILE,
    SPEC,
    "A DMA_MAP with a wrong argsz or cut short gets an error reply.",
)
def dma_map_malformed(trial: Trial) -> None:
    peer = trial.connect()
    wrong = m.DmaMap(40, 3, 0, DMA_BASE, DMA_SIZE).pack()
    refused(peer, Command.DMA_MAP, wrong, "DMA_MAP with argsz 40")
    refused(peer, Command.DMA_MAP, dma_map(DMA_BASE, DMA_SIZE)[:20], "a 20-byte DMA_MAP")
    still_serves(trial, peer)


# ---------------------------------------------------------------------- DEVICE_RESET


@check(
    Command.DEVICE_RESET,
    "device-reset",
    GOOD,
    SPEC,
    "A device that offers reset accepts DEVICE_RESET (no payload either way) and "
    "goes on answering.",
)
def device_reset(trial: Trial) -> None:
    if not trial.device.flags & DeviceFlags.RESET:
        raise NotApplicable("the device does not offer reset")
    peer = trial.connect()
    reply = ok(peer.request(Command.DEVICE_RESET), "DEVICE_RESET")
    trial.expect(not reply.payload, f"the reply carries {len(reply.payload)} bytes")
    still_serves(trial, peer)
