"""The check table and what a check works with.

A check is one decorated function (``@check``): the message it is about, a name, a
sentence saying what the server must do, whether it is a good or a hostile client's
request, and where the rule comes from (the protocol specification, or what QEMU's
client needs).  ``CHECKS`` is the table the runner, the report and
``docs/conformance.md`` are built from.

A check gets a ``Trial``: the ``Device`` the server described when the run began
(only what DEVICE_GET_INFO, DEVICE_GET_REGION_INFO and DEVICE_GET_IRQ_INFO said:
nothing is assumed about the device behind it), and fresh connections on demand,
each negotiated like QEMU does and closed when the check ends.  A check fails by
raising ``Violation`` (``Trial.expect`` does), and says it does not apply to this
device with ``NotApplicable``.
"""

from __future__ import annotations

import enum
import errno
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TypeVar

from device.conformance.wire import HungUp, Peer, Reply, Violation
from device.errors import ProtocolError
from device.vfio_user.protocol import messages as m
from device.vfio_user.protocol.constants import (
    PCI_NUM_REGIONS,
    Command,
    DeviceFlags,
    PciRegion,
    RegionFlags,
)

# What QEMU 11 proposes (docs/qemu-notes.md), so a server is tried as QEMU tries it.
CLIENT_CAPABILITIES: dict[str, object] = {
    "max_msg_fds": 16,
    "max_data_xfer_size": 1 << 20,
    "pgsizes": 4096,
    "max_dma_maps": 65535,
    "migration": {"pgsize": 4096},
}
DEFAULT_MAX_DATA_XFER = 1 << 20  # the spec's default when the server gives none
MAX_REGION_INFO = 1 << 16  # argsz a region info may need: capabilities included
T = TypeVar("T")
RETRY_CONNECT = (errno.ECONNREFUSED, errno.EAGAIN, errno.ENOENT)
SESSION = "session"  # the "message" of checks about the stream rather than one command


class Kind(enum.Enum):
    GOOD = "good"  # what a correct client sends
    HOSTILE = "hostile"  # what a broken or malicious client sends


class Source(enum.Enum):
    SPEC = "spec"  # QEMU docs/interop/vfio-user.rst says so
    QEMU = "qemu"  # QEMU's client needs it to work (docs/qemu-notes.md, DESIGN.md)


class NotApplicable(Exception):
    """The check does not apply to this device (the reason says why)."""


@dataclass(frozen=True)
class Check:
    message: str  # a Command name, or SESSION
    name: str
    kind: Kind
    source: Source
    doc: str
    run: Callable[[Trial], None]


CHECKS: list[Check] = []


def check(
    message: Command | str, name: str, kind: Kind, source: Source, doc: str
) -> Callable[[Callable[[Trial], None]], Callable[[Trial], None]]:
    """Declare a check; ``doc`` says what the server must do, in one sentence."""
    label = message.name if isinstance(message, Command) else message

    def declare(run: Callable[[Trial], None]) -> Callable[[Trial], None]:
        if any(c.name == name for c in CHECKS):
            raise ValueError(f"check {name!r} declared twice")
        CHECKS.append(Check(label, name, kind, source, doc, run))
        return run

    return declare


def message_rank(check: Check) -> int:
    """Checks run and print in the order a client meets the messages: VERSION, the
    stream, then the commands by number."""
    if check.message == SESSION:
        return int(Command.VERSION) * 2 + 1
    return int(Command[check.message]) * 2


def put_in_order() -> None:
    CHECKS.sort(key=message_rank)


# ---------------------------------------------------------------------- the device


@dataclass(frozen=True)
class Region:
    index: int
    flags: int
    size: int
    offset: int
    sparse_areas: tuple[m.SparseArea, ...] = ()

    @property
    def readable(self) -> bool:
        return bool(self.flags & RegionFlags.READ) and self.size > 0

    @property
    def writable(self) -> bool:
        return bool(self.flags & RegionFlags.WRITE) and self.size > 0


@dataclass
class Device:
    """What the server said about itself when the run began."""

    capabilities: dict[str, object] = field(default_factory=dict)
    flags: int = 0
    num_regions: int = 0
    num_irqs: int = 0
    regions: list[Region] = field(default_factory=list)
    irqs: list[m.IrqInfo] = field(default_factory=list)

    @property
    def max_data_xfer(self) -> int:
        value = self.capabilities.get("max_data_xfer_size", DEFAULT_MAX_DATA_XFER)
        return value if isinstance(value, int) and value > 0 else DEFAULT_MAX_DATA_XFER

    @property
    def is_pci(self) -> bool:
        return bool(self.flags & DeviceFlags.PCI)

    def readable(self) -> list[Region]:
        return [r for r in self.regions if r.readable]

    def config(self) -> Region:
        """The PCI config space region (index 7), or NotApplicable."""
        if self.is_pci and len(self.regions) > PciRegion.CONFIG:
            region = self.regions[PciRegion.CONFIG]
            if region.readable and region.size >= 64:
                return region
        raise NotApplicable("the device has no readable PCI config space region")

    def to_json(self) -> dict[str, object]:
        return {
            "capabilities": self.capabilities,
            "flags": self.flags,
            "num_regions": self.num_regions,
            "num_irqs": self.num_irqs,
            "regions": [
                {"index": r.index, "flags": r.flags, "size": r.size, "areas": len(r.sparse_areas)}
                for r in self.regions
            ],
            "irqs": [{"index": i.index, "flags": i.flags, "count": i.count} for i in self.irqs],
        }


# ---------------------------------------------------------------------- one check's run


class Trial:
    """What one check works with; ``close`` ends every connection it opened."""

    def __init__(self, path: str, device: Device, timeout: float) -> None:
        self.path = path
        self.device = device
        self.timeout = timeout
        self.peers: list[Peer] = []

    def connect(self, negotiate: bool = True) -> Peer:
        """A new connection; a server between two clients (not listening yet, or its
        backlog full) gets until the timeout to take it."""
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                peer = Peer(self.path, self.timeout)
                break
            except OSError as exc:
                if exc.errno not in RETRY_CONNECT or time.monotonic() > deadline:
                    raise Violation(
                        f"cannot connect to {self.path}: {exc.strerror or exc}"
                    ) from None
                time.sleep(0.01)
        self.peers.append(peer)
        if negotiate:
            negotiate_version(peer)
        return peer

    def close(self) -> None:
        for peer in self.peers:
            peer.close()
        self.peers.clear()

    @staticmethod
    def expect(condition: object, message: str) -> None:
        if not condition:
            raise Violation(message)

    @staticmethod
    def each(cases: Iterable[T], run: Callable[[T], object]) -> None:
        """``run`` every case, then fail with every violation found, not just the first
        (a hang-up ends the loop: nothing more can be asked on that connection)."""
        found: list[str] = []
        for case in cases:
            try:
                run(case)
            except HungUp:
                raise
            except Violation as exc:
                found.append(str(exc))
        if found:
            raise Violation("; ".join(found))


def version_payload(capabilities: dict[str, object] | None = None) -> bytes:
    return m.Version(0, 0, CLIENT_CAPABILITIES if capabilities is None else capabilities).pack()


def negotiate_version(peer: Peer) -> dict[str, object]:
    """VERSION as QEMU sends it; the server's capabilities, or Violation."""
    reply = ok(peer.request(Command.VERSION, version_payload()), "VERSION 0.0")
    return parse_version_reply(reply)


def parse_version_reply(reply: Reply) -> dict[str, object]:
    payload = reply.payload
    if len(payload) < 4:
        raise Violation(f"the VERSION reply has {len(payload)} payload bytes, needs 4")
    major, minor = int.from_bytes(payload[0:2], "little"), int.from_bytes(payload[2:4], "little")
    if (major, minor) != (0, 0):
        raise Violation(f"the VERSION reply says {major}.{minor} to a proposal of 0.0")
    text = payload[4:]
    if not text:
        return {}
    if not text.endswith(b"\0"):
        raise Violation("the VERSION reply's JSON is not NUL-terminated")
    try:
        parsed = json.loads(text[:-1].decode())
    except (ValueError, UnicodeDecodeError) as exc:
        raise Violation(f"the VERSION reply's JSON does not parse: {exc}") from None
    if not isinstance(parsed, dict):
        raise Violation("the VERSION reply's JSON is not an object")
    caps = parsed.get("capabilities", {})
    if not isinstance(caps, dict):
        raise Violation("the VERSION reply's 'capabilities' is not an object")
    return caps


def ok(reply: Reply | None, what: str) -> Reply:
    """The reply, which must be a success."""
    if reply is None:
        raise Violation(f"{what}: no reply")
    if reply.header.is_error:
        raise Violation(f"{what} was refused with {errno_name(reply.error)}")
    return reply


def refused(peer: Peer, command: int, payload: bytes, what: str, fds: tuple[int, ...] = ()) -> int:
    """Send a request the server must refuse: an error reply (its errno), never a success.

    A hang-up is not accepted here: the checks that allow one say so themselves."""
    reply = peer.request(command, payload, fds)
    assert reply is not None
    reply.close()
    if not reply.header.is_error:
        raise Violation(f"{what} was accepted; it must be refused with an error reply")
    return reply.error


def errno_name(code: int) -> str:
    return errno.errorcode.get(code, str(code))


def still_serves(trial: Trial, peer: Peer | None = None) -> None:
    """The session (or a new one) still answers a plain request correctly."""
    if peer is None:
        peer = trial.connect()
    reply = ok(
        peer.request(Command.DEVICE_GET_INFO, m.DeviceInfoRequest(16).pack()), "then GET_INFO"
    )
    info = m.DeviceInfo.unpack(reply.payload)
    trial.expect(
        (info.num_regions, info.num_irqs) == (trial.device.num_regions, trial.device.num_irqs),
        "DEVICE_GET_INFO answers differently than when the run began",
    )


def discover(path: str, timeout: float) -> Device:
    """Ask the server what it is: VERSION, DEVICE_GET_INFO, every region and IRQ index."""
    trial = Trial(path, Device(), timeout)
    try:
        peer = trial.connect(negotiate=False)
        device = Device(capabilities=negotiate_version(peer))
        reply = ok(
            peer.request(Command.DEVICE_GET_INFO, m.DeviceInfoRequest(16).pack()), "GET_INFO"
        )
        try:
            info = m.DeviceInfo.unpack(reply.payload)
        except ProtocolError as exc:
            raise Violation(f"DEVICE_GET_INFO reply: {exc}") from None
        device.flags, device.num_regions, device.num_irqs = (
            info.flags,
            info.num_regions,
            info.num_irqs,
        )
        for index in range(min(info.num_regions, 64)):
            device.regions.append(region_info(peer, index))
        for index in range(min(info.num_irqs, 64)):
            reply = ok(
                peer.request(Command.DEVICE_GET_IRQ_INFO, m.IrqInfoRequest(16, index).pack()),
                f"DEVICE_GET_IRQ_INFO {index}",
            )
            try:
                device.irqs.append(m.IrqInfo.unpack(reply.payload))
            except ProtocolError as exc:
                raise Violation(f"DEVICE_GET_IRQ_INFO {index} reply: {exc}") from None
        return device
    finally:
        trial.close()


def region_info(peer: Peer, index: int) -> Region:
    """One region's full description, asking twice when the first answer is truncated."""
    argsz = m.REGION_INFO_SIZE
    for _ in range(2):
        request = m.RegionInfoRequest(argsz, index).pack() + bytes(argsz - m.REGION_INFO_SIZE)
        reply = ok(peer.request(Command.DEVICE_GET_REGION_INFO, request), f"REGION_INFO {index}")
        reply.close()
        try:
            info, wanted = m.RegionInfo.unpack(reply.payload)
        except ProtocolError as exc:
            raise Violation(f"DEVICE_GET_REGION_INFO {index} reply: {exc}") from None
        if wanted <= argsz:
            return Region(index, info.flags, info.size, info.offset, info.sparse_areas)
        if wanted > MAX_REGION_INFO:
            raise Violation(f"DEVICE_GET_REGION_INFO {index} asks for an argsz of {wanted}")
        argsz = wanted
    raise Violation(f"DEVICE_GET_REGION_INFO {index}: the server keeps asking for more room")


def regions_below(device: Device, limit: int = PCI_NUM_REGIONS) -> list[Region]:
    return device.regions[:limit]
