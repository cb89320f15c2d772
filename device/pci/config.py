"""A PCI Express function's 4 KiB configuration space, emulated byte by byte.

Every byte has a value, a write mask (bits software may change) and a
write-1-to-clear mask, as in QEMU's PCIDevice.  BARs follow the standard sizing
protocol: their writable bits are those above the BAR size, so writing all ones
reads back the size mask.  QEMU also emulates BARs, MSI-X and the command register
on its side, but forwards the writes; answering them like hardware keeps both views
identical.
"""

from __future__ import annotations

import enum
import errno
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

from device.errors import VfioUserError

if TYPE_CHECKING:
    from device.pci.capabilities import Capability

CONFIG_SPACE_SIZE = 4096
LEGACY_CONFIG_SIZE = 256

# Standard header offsets.
VENDOR_ID = 0x00
DEVICE_ID = 0x02
COMMAND = 0x04
STATUS = 0x06
REVISION = 0x08
CLASS_PROG = 0x09
CACHE_LINE_SIZE = 0x0C
LATENCY_TIMER = 0x0D
HEADER_TYPE = 0x0E
BAR0 = 0x10
SUBSYSTEM_VENDOR_ID = 0x2C
SUBSYSTEM_ID = 0x2E
ROM_ADDRESS = 0x30
CAPABILITIES_POINTER = 0x34
INTERRUPT_LINE = 0x3C
INTERRUPT_PIN = 0x3D

COMMAND_IO = 1 << 0
COMMAND_MEMORY = 1 << 1
COMMAND_MASTER = 1 << 2
COMMAND_SERR = 1 << 8
COMMAND_INTX_DISABLE = 1 << 10
STATUS_CAP_LIST = 1 << 4
STATUS_W1C = 0xF900  # parity, signalled/received aborts, SERR, detected parity


class CapabilityId(enum.IntEnum):
    POWER_MANAGEMENT = 0x01
    MSI = 0x05
    PCI_EXPRESS = 0x10
    MSIX = 0x11


class BarKind(enum.Enum):
    MEM32 = 0x0
    MEM64 = 0x4


@dataclass(frozen=True)
class Bar:
    index: int
    size: int  # a power of two, at least 16 bytes
    kind: BarKind = BarKind.MEM32
    prefetchable: bool = False

    @property
    def flag_bits(self) -> int:
        return self.kind.value | (0x8 if self.prefetchable else 0)


class ConfigSpace:
    def __init__(self) -> None:
        self.data = bytearray(CONFIG_SPACE_SIZE)
        self.wmask = bytearray(CONFIG_SPACE_SIZE)
        self.w1cmask = bytearray(CONFIG_SPACE_SIZE)
        self._reset_image = b""
        self._last_cap = 0
        self._next_cap_offset = 0x40
        self.bars: dict[int, Bar] = {}

    # ---------------------------------------------------------------- building

    def set16(self, offset: int, value: int) -> None:
        struct.pack_into("<H", self.data, offset, value)

    def set32(self, offset: int, value: int) -> None:
        struct.pack_into("<I", self.data, offset, value)

    def get16(self, offset: int) -> int:
        return int(struct.unpack_from("<H", self.data, offset)[0])

    def get32(self, offset: int) -> int:
        return int(struct.unpack_from("<I", self.data, offset)[0])

    def set_wmask(self, offset: int, mask: int, width: int) -> None:
        self.wmask[offset : offset + width] = mask.to_bytes(width, "little")

    def set_w1cmask(self, offset: int, mask: int, width: int) -> None:
        self.w1cmask[offset : offset + width] = mask.to_bytes(width, "little")

    def init_header(
        self,
        *,
        vendor: int,
        device: int,
        class_code: int,
        revision: int,
        subsystem_vendor: int,
        subsystem: int,
    ) -> None:
        self.set16(VENDOR_ID, vendor)
        self.set16(DEVICE_ID, device)
        self.data[REVISION] = revision
        self.data[CLASS_PROG : CLASS_PROG + 3] = class_code.to_bytes(3, "little")
        self.set16(SUBSYSTEM_VENDOR_ID, subsystem_vendor)
        self.set16(SUBSYSTEM_ID, subsystem)
        self.data[HEADER_TYPE] = 0x00
        self.set_wmask(
            COMMAND,
            COMMAND_IO | COMMAND_MEMORY | COMMAND_MASTER | COMMAND_SERR | COMMAND_INTX_DISABLE,
            2,
        )
        self.set_w1cmask(STATUS, STATUS_W1C, 2)
        self.wmask[CACHE_LINE_SIZE] = 0xFF
        self.wmask[LATENCY_TIMER] = 0xFF
        self.wmask[INTERRUPT_LINE] = 0xFF
        self.data[INTERRUPT_PIN] = 0  # no INTx: QEMU drops BAR mmaps while INTx is active

    def add_bar(self, bar: Bar) -> None:
        if bar.size < 16 or bar.size & (bar.size - 1):
            raise ValueError(f"BAR{bar.index} size {bar.size:#x} is not a power of two >= 16")
        offset = BAR0 + 4 * bar.index
        self.bars[bar.index] = bar
        self.set32(offset, bar.flag_bits)
        mask = ~(bar.size - 1) & 0xFFFFFFFF & ~0xF
        self.set_wmask(offset, mask, 4)
        if bar.kind is BarKind.MEM64:
            high_mask = (~(bar.size - 1) >> 32) & 0xFFFFFFFF
            self.set_wmask(offset + 4, high_mask, 4)

    def add_capability(
        self, cap_id: int, body: bytes, *, wmask: bytes = b"", w1cmask: bytes = b""
    ) -> int:
        """Append a standard capability (ID and next pointer are filled in); returns its
        offset.  ``body`` starts at capability byte 2."""
        offset = self._next_cap_offset
        length = 2 + len(body)
        if offset + length > LEGACY_CONFIG_SIZE:
            raise ValueError("standard capabilities overflow the first 256 bytes")
        self.data[offset] = cap_id
        self.data[offset + 1] = 0
        self.data[offset + 2 : offset + length] = body
        if wmask:
            self.wmask[offset + 2 : offset + 2 + len(wmask)] = wmask
        if w1cmask:
            self.w1cmask[offset + 2 : offset + 2 + len(w1cmask)] = w1cmask
        if self._last_cap:
            self.data[self._last_cap + 1] = offset
        else:
            self.data[CAPABILITIES_POINTER] = offset
            self.set16(STATUS, self.get16(STATUS) | STATUS_CAP_LIST)
        self._last_cap = offset
        self._next_cap_offset = (offset + length + 3) & ~3
        return offset

    def add(self, capability: Capability) -> int:
        """Append a capability made by ``device.pci.capabilities``; returns its offset."""
        return self.add_capability(
            capability.cap_id,
            capability.body,
            wmask=capability.wmask,
            w1cmask=capability.w1cmask,
        )

    def seal(self) -> None:
        """Remember the current image as the power-on state."""
        self._reset_image = bytes(self.data)

    def reset(self) -> None:
        self.data[:] = self._reset_image

    # ---------------------------------------------------------------- access

    def read(self, offset: int, count: int) -> bytes:
        _check_range(offset, count)
        return bytes(self.data[offset : offset + count])

    def write(self, offset: int, data: bytes) -> None:
        _check_range(offset, len(data))
        for i, value in enumerate(data):
            pos = offset + i
            wmask, w1c = self.wmask[pos], self.w1cmask[pos]
            old = self.data[pos]
            new = (old & ~wmask) | (value & wmask)
            new &= ~(value & w1c)
            self.data[pos] = new & 0xFF


def _check_range(offset: int, count: int) -> None:
    if count <= 0 or offset < 0 or offset + count > CONFIG_SPACE_SIZE:
        raise VfioUserError(
            errno.EINVAL, f"config access {offset:#x}+{count} outside {CONFIG_SPACE_SIZE:#x}"
        )
