"""Checks of what a server says about its device: DEVICE_GET_INFO,
DEVICE_GET_REGION_INFO (two-step replies, fds, sparse mmap areas),
DEVICE_GET_IRQ_INFO, and DEVICE_SET_IRQS with real eventfds."""

from __future__ import annotations

import mmap
import os
import select
import struct

from device.conformance.suite import (
    MAX_REGION_INFO,
    Kind,
    NotApplicable,
    Region,
    Source,
    Trial,
    check,
    ok,
    refused,
    still_serves,
)
from device.conformance.wire import Peer, Reply, Violation
from device.errors import ProtocolError
from device.vfio_user.protocol import messages as m
from device.vfio_user.protocol.constants import (
    PCI_NUM_REGIONS,
    Command,
    DeviceFlags,
    IrqInfoFlags,
    IrqSetFlags,
    RegionFlags,
)

GOOD, HOSTILE = Kind.GOOD, Kind.HOSTILE
SPEC, QEMU = Source.SPEC, Source.QEMU
PAGE = 4096
KNOWN_REGION_FLAGS = RegionFlags.READ | RegionFlags.WRITE | RegionFlags.MMAP | RegionFlags.CAPS
KNOWN_IRQ_FLAGS = (
    IrqInfoFlags.EVENTFD | IrqInfoFlags.MASKABLE | IrqInfoFlags.AUTOMASKED | IrqInfoFlags.NORESIZE
)
FULL_ARGSZ = 4096  # room for any reasonable capability list in one go
QEMU_MIN_IRQ_INDEXES = 3  # INTx, MSI, MSI-X: QEMU's vfio-pci asks for each


def region_request(peer: Peer, index: int, argsz: int) -> Reply:
    payload = m.RegionInfoRequest(argsz, index).pack() + bytes(argsz - m.REGION_INFO_SIZE)
    return ok(peer.request(Command.DEVICE_GET_REGION_INFO, payload), f"REGION_INFO {index}")


def full_region_reply(peer: Peer, index: int) -> Reply:
    """The whole reply (fd included), asking again if 4 KiB was not room enough."""
    reply = region_request(peer, index, FULL_ARGSZ)
    _, wanted = parse_region(reply, index)
    if wanted <= FULL_ARGSZ:
        return reply
    reply.close()
    if wanted > MAX_REGION_INFO:
        raise Violation(f"region {index}: the reply wants an argsz of {wanted}")
    return region_request(peer, index, wanted)


def parse_region(reply: Reply, index: int) -> tuple[m.RegionInfo, int]:
    try:
        return m.RegionInfo.unpack(reply.payload)
    except ProtocolError as exc:
        raise Violation(f"region {index}: the reply does not parse: {exc}") from None


# ---------------------------------------------------------------------- DEVICE_GET_INFO


@check(
    Command.DEVICE_GET_INFO,
    "device-info",
    GOOD,
    SPEC,
    "The reply is 16 bytes with argsz 16 or more; the device is PCI (the only kind "
    "this protocol version has) with at least the 9 PCI region indexes.",
)
def device_info(trial: Trial) -> None:
    peer = trial.connect()
    reply = ok(peer.request(Command.DEVICE_GET_INFO, m.DeviceInfoRequest(16).pack()), "GET_INFO")
    trial.expect(len(reply.payload) == 16, f"the reply is {len(reply.payload)} bytes, not 16")
    argsz, flags, regions, _irqs = struct.unpack("<IIII", reply.payload)
    trial.expect(argsz >= 16, f"the reply's argsz is {argsz}")
    trial.expect(flags & DeviceFlags.PCI, f"flags {flags:#x} lack VFIO_DEVICE_FLAGS_PCI")
    trial.expect(regions >= PCI_NUM_REGIONS, f"{regions} regions: a PCI device has 9 or more")


@check(
    Command.DEVICE_GET_INFO,
    "device-info-for-qemu",
    GOOD,
    QEMU,
    "What QEMU's vfio-user-pci needs to realize the device: a config space region "
    "(index 7) of 256 bytes or more and at least 3 IRQ indexes.",
)
def device_info_for_qemu(trial: Trial) -> None:
    device = trial.device
    config = device.config()
    trial.expect(config.size >= 256, f"config space is {config.size} bytes")
    trial.expect(
        device.num_irqs >= QEMU_MIN_IRQ_INDEXES, f"{device.num_irqs} IRQ indexes, QEMU needs 3"
    )


@check(
    Command.DEVICE_GET_INFO,
    "device-info-small-argsz",
    HOSTILE,
    SPEC,
    "An argsz too small for the reply gets an error, or a reply whose argsz names the "
    "size needed; never a malformed one.",
)
def device_info_small_argsz(trial: Trial) -> None:
    peer = trial.connect()
    reply = peer.request(Command.DEVICE_GET_INFO, struct.pack("<IIII", 4, 0, 0, 0))
    assert reply is not None
    if reply.header.is_error:
        return
    trial.expect(len(reply.payload) >= 4, "the reply has no argsz")
    (argsz,) = struct.unpack_from("<I", reply.payload)
    trial.expect(argsz >= 16, f"the reply's argsz is {argsz}, the reply needs 16")


# ---------------------------------------------------------------------- REGION_INFO


@check(
    Command.DEVICE_GET_REGION_INFO,
    "region-info-each",
    GOOD,
    SPEC,
    "Every region index is answered: its index echoed, only known flags, an fd with "
    "(and only with) an MMAP region's full reply, sparse areas page aligned and inside "
    "the region.",
)
def region_info_each(trial: Trial) -> None:
    peer = trial.connect()
    for region in trial.device.regions:
        reply = full_region_reply(peer, region.index)
        try:
            info, wanted = parse_region(reply, region.index)
            check_region_reply(trial, region, info, wanted, reply)
        finally:
            reply.close()


def check_region_reply(
    trial: Trial, region: Region, info: m.RegionInfo, wanted: int, reply: Reply
) -> None:
    where = f"region {region.index}"
    trial.expect(info.index == region.index, f"{where}: the reply names region {info.index}")
    trial.expect(wanted >= m.REGION_INFO_SIZE, f"{where}: argsz {wanted} is below 32")
    trial.expect(not info.flags & ~KNOWN_REGION_FLAGS, f"{where}: unknown flags {info.flags:#x}")
    mappable = bool(info.flags & RegionFlags.MMAP) and info.size > 0
    trial.expect(len(reply.fds) <= 1, f"{where}: {len(reply.fds)} fds with one region")
    trial.expect(mappable or not reply.fds, f"{where}: an fd for a region without MMAP")
    trial.expect(not mappable or reply.fds, f"{where}: MMAP region without an fd")
    for area in info.sparse_areas:
        trial.expect(
            area.offset % PAGE == 0 and area.size % PAGE == 0,
            f"{where}: sparse area {area.offset:#x}+{area.size:#x} is not page aligned",
        )
        trial.expect(
            area.offset + area.size <= info.size,
            f"{where}: sparse area {area.offset:#x}+{area.size:#x} is outside its "
            f"{info.size:#x} bytes",
        )


@check(
    Command.DEVICE_GET_REGION_INFO,
    "region-info-two-step",
    GOOD,
    QEMU,
    "Asked with argsz 32, a region with capabilities answers the bare 32 bytes with the "
    "argsz it needs and no fd; asked again with that argsz, the whole reply.",
)
def region_info_two_step(trial: Trial) -> None:
    peer = trial.connect()
    with_caps = [r for r in trial.device.regions if r.sparse_areas]
    if not with_caps:
        raise NotApplicable("no region has capabilities")
    for region in with_caps:
        first = region_request(peer, region.index, m.REGION_INFO_SIZE)
        first.close()
        _, wanted = parse_region(first, region.index)
        trial.expect(
            len(first.payload) == m.REGION_INFO_SIZE and wanted > m.REGION_INFO_SIZE,
            f"region {region.index}: {len(first.payload)} bytes and argsz {wanted} for argsz 32",
        )
        trial.expect(not first.fds, f"region {region.index}: an fd with the truncated reply")
        second = region_request(peer, region.index, wanted)
        second.close()
        info, _ = parse_region(second, region.index)
        trial.expect(len(second.payload) == wanted, f"region {region.index}: not the full reply")
        trial.expect(info.sparse_areas, f"region {region.index}: capabilities went missing")


@check(
    Command.DEVICE_GET_REGION_INFO,
    "region-info-mmap",
    GOOD,
    SPEC,
    "The fd of an MMAP region can be mapped shared at the region's offset, over each "
    "sparse area (or the whole region); the suite maps without touching a page.",
)
def region_info_mmap(trial: Trial) -> None:
    peer = trial.connect()
    mappable = [r for r in trial.device.regions if r.flags & RegionFlags.MMAP and r.size]
    if not mappable:
        raise NotApplicable("no region is mappable")
    for region in mappable:
        reply = full_region_reply(peer, region.index)
        try:
            trial.expect(reply.fds, f"region {region.index}: MMAP without an fd")
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if region.writable else 0)
            areas = region.sparse_areas or (m.SparseArea(0, region.size),)
            for area in areas:
                try:
                    mapping = mmap.mmap(
                        reply.fds[0],
                        area.size,
                        mmap.MAP_SHARED,
                        prot,
                        offset=region.offset + area.offset,
                    )
                except (OSError, ValueError) as exc:
                    raise Violation(
                        f"region {region.index}: mmap of {area.offset:#x}+{area.size:#x} "
                        f"failed: {exc}"
                    ) from None
                mapping.close()
        finally:
            reply.close()


@check(
    Command.DEVICE_GET_REGION_INFO,
    "region-info-bad-index",
    HOSTILE,
    SPEC,
    "A region index the device does not have gets an error reply.",
)
def region_info_bad_index(trial: Trial) -> None:
    peer = trial.connect()
    trial.each((trial.device.num_regions, 0xFFFFFFFF), lambda index: refused(
        peer, Command.DEVICE_GET_REGION_INFO, m.RegionInfoRequest(32, index).pack(),
        f"REGION_INFO for index {index:#x}",
    ))  # fmt: skip
    still_serves(trial, peer)


@check(
    Command.DEVICE_GET_REGION_INFO,
    "region-info-huge-argsz",
    HOSTILE,
    SPEC,
    "An argsz of 4 GiB gets an error or a reply no longer than the region info needs.",
)
def region_info_huge_argsz(trial: Trial) -> None:
    peer = trial.connect()
    reply = peer.request(Command.DEVICE_GET_REGION_INFO, m.RegionInfoRequest(0xFFFFFFFF, 0).pack())
    assert reply is not None
    reply.close()
    if not reply.header.is_error:
        trial.expect(
            len(reply.payload) <= MAX_REGION_INFO,
            f"a reply of {len(reply.payload)} bytes for region 0",
        )
    still_serves(trial, peer)


# ---------------------------------------------------------------------- IRQ_INFO


@check(
    Command.DEVICE_GET_IRQ_INFO,
    "irq-info-each",
    GOOD,
    SPEC,
    "Every IRQ index is answered with its index echoed, argsz 16 and known flags only.",
)
def irq_info_each(trial: Trial) -> None:
    peer = trial.connect()
    for index in range(trial.device.num_irqs):
        reply = ok(
            peer.request(Command.DEVICE_GET_IRQ_INFO, m.IrqInfoRequest(16, index).pack()),
            f"IRQ_INFO {index}",
        )
        trial.expect(len(reply.payload) == 16, f"IRQ_INFO {index}: {len(reply.payload)} bytes")
        argsz, flags, echoed, _count = struct.unpack("<IIII", reply.payload)
        trial.expect(echoed == index, f"IRQ_INFO {index}: the reply names index {echoed}")
        trial.expect(argsz >= 16, f"IRQ_INFO {index}: argsz {argsz}")
        trial.expect(not flags & ~KNOWN_IRQ_FLAGS, f"IRQ_INFO {index}: unknown flags {flags:#x}")


@check(
    Command.DEVICE_GET_IRQ_INFO,
    "irq-info-bad-index",
    HOSTILE,
    SPEC,
    "An IRQ index the device does not have gets an error reply.",
)
def irq_info_bad_index(trial: Trial) -> None:
    peer = trial.connect()
    index = trial.device.num_irqs
    refused(peer, Command.DEVICE_GET_IRQ_INFO, m.IrqInfoRequest(16, index).pack(), f"IRQ {index}")
    still_serves(trial, peer)


# ---------------------------------------------------------------------- SET_IRQS


def eventfd_irq(trial: Trial) -> m.IrqInfo:
    for info in trial.device.irqs:
        if info.count and info.flags & IrqInfoFlags.EVENTFD:
            return info
    raise NotApplicable("no IRQ index takes eventfds")


def signalled(fd: int, timeout: float) -> bool:
    readable, _, _ = select.select([fd], [], [], timeout)
    if readable:
        os.eventfd_read(fd)
    return bool(readable)


@check(
    Command.DEVICE_SET_IRQS,
    "set-irqs-eventfd",
    GOOD,
    SPEC,
    "An eventfd assigned to an interrupt is accepted; a trigger the client sends, if "
    "accepted, signals it; de-assigning it and disabling the index are accepted.",
)
def set_irqs_eventfd(trial: Trial) -> None:
    info = eventfd_irq(trial)
    peer = trial.connect()
    vector = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        trigger = IrqSetFlags.ACTION_TRIGGER
        assign = m.SetIrqs(IrqSetFlags.DATA_EVENTFD | trigger, info.index, 0, 1).pack()
        ok(peer.request(Command.DEVICE_SET_IRQS, assign, (vector,)), "assigning an eventfd")
        fire = m.SetIrqs(IrqSetFlags.DATA_NONE | trigger, info.index, 0, 1).pack()
        reply = peer.request(Command.DEVICE_SET_IRQS, fire)
        if reply is not None and not reply.header.is_error:
            trial.expect(signalled(vector, trial.timeout), "an accepted trigger left it silent")
        deassign = m.SetIrqs(IrqSetFlags.DATA_EVENTFD | trigger, info.index, 0, 1).pack()
        ok(peer.request(Command.DEVICE_SET_IRQS, deassign), "de-assigning it (no fd)")
        disable = m.SetIrqs(IrqSetFlags.DATA_NONE | trigger, info.index, 0, 0).pack()
        ok(peer.request(Command.DEVICE_SET_IRQS, disable), "disabling the index (count 0)")
    finally:
        os.close(vector)


@check(
    Command.DEVICE_SET_IRQS,
    "set-irqs-refused",
    HOSTILE,
    SPEC,
    "Sub-indexes past the count, an absent index, two data types, two actions and an "
    "argsz that is not the payload's size each get an error reply; the session goes on.",
)
def set_irqs_refused(trial: Trial) -> None:
    info = eventfd_irq(trial)
    peer = trial.connect()
    trigger = IrqSetFlags.DATA_EVENTFD | IrqSetFlags.ACTION_TRIGGER
    vector = os.eventfd(0, os.EFD_CLOEXEC)
    try:
        cases = [
            ("sub-index past the count", m.SetIrqs(trigger, info.index, info.count, 1).pack()),
            ("an absent index", m.SetIrqs(trigger, trial.device.num_irqs, 0, 1).pack()),
            ("two data types", m.SetIrqs(trigger | IrqSetFlags.DATA_BOOL, info.index, 0, 1).pack()),
            ("two actions", m.SetIrqs(trigger | IrqSetFlags.ACTION_MASK, info.index, 0, 1).pack()),
            ("argsz 99", struct.pack("<IIIII", 99, trigger, info.index, 0, 1)),
        ]
        trial.each(cases, lambda c: refused(
            peer, Command.DEVICE_SET_IRQS, c[1], f"SET_IRQS with {c[0]}", (vector,)
        ))  # fmt: skip
    finally:
        os.close(vector)
    still_serves(trial, peer)
