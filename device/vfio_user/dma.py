"""The DMA map table of one client session: guest memory the device may access.

Ranges come from DMA_MAP.  A range sent with an fd is mmapped here and read and
written directly; one without an fd (ROM, the device's own BARs, RAM that is not
fd-backed) is only recorded, and accesses to it must go over the socket as
DMA_READ/DMA_WRITE messages (a later layer).  Ranges never overlap.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import mmap
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from device.errors import VfioUserError
from device.vfio_user.protocol.constants import DmaMapFlags, DmaUnmapFlags
from device.vfio_user.protocol.messages import DmaMap, DmaUnmap

PAGE_SIZE = 4096
MAX_DMA_MAPS = 65535


@dataclass
class DmaRegion:
    address: int
    size: int
    flags: int
    file_offset: int
    mapping: mmap.mmap | None

    @property
    def end(self) -> int:
        return self.address + self.size

    @property
    def readable(self) -> bool:
        return bool(self.flags & DmaMapFlags.READ)

    @property
    def writable(self) -> bool:
        return bool(self.flags & DmaMapFlags.WRITE)

    def close(self) -> None:
        if self.mapping is not None:
            try:
                self.mapping.close()
            except BufferError:
                # A numpy view still exports the buffer; the mmap goes with its last user.
                pass
            self.mapping = None


class MessageDma(Protocol):
    """Guest memory access over the socket (DMA_READ/DMA_WRITE), for ranges without fd."""

    def dma_read_messages(self, address: int, length: int) -> bytes: ...
    def dma_write_messages(self, address: int, data: bytes) -> None: ...
    def block_requests(self) -> None:
        """Fail every request waiting for the client, and every new one, until unblocked."""

    def unblock_requests(self) -> None: ...


class DmaTable:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._starts: list[int] = []
        self._regions: list[DmaRegion] = []
        self.message_dma: MessageDma | None = None

    def __len__(self) -> int:
        return len(self._regions)

    @property
    def regions(self) -> list[DmaRegion]:
        with self._lock:
            return list(self._regions)

    def map(self, request: DmaMap) -> DmaRegion:
        """Record (and mmap, when it has an fd) a range.  Takes ownership of the fd."""
        try:
            return self._map(request)
        finally:
            if request.fd is not None:
                os.close(request.fd)

    def _map(self, request: DmaMap) -> DmaRegion:
        if request.size == 0 or request.address % PAGE_SIZE or request.size % PAGE_SIZE:
            raise VfioUserError(errno.EINVAL, "DMA range must be non-empty and page aligned")
        if request.address + request.size > 1 << 64:
            raise VfioUserError(errno.EINVAL, "DMA range wraps the address space")
        if request.flags & ~(DmaMapFlags.READ | DmaMapFlags.WRITE):
            raise VfioUserError(errno.EINVAL, f"unknown DMA_MAP flags {request.flags:#x}")
        mapping = None
        if request.fd is not None:
            if request.offset % PAGE_SIZE:
                raise VfioUserError(errno.EINVAL, "DMA file offset is not page aligned")
            prot = 0
            if request.flags & DmaMapFlags.READ:
                prot |= mmap.PROT_READ
            if request.flags & DmaMapFlags.WRITE:
                prot |= mmap.PROT_WRITE
            try:
                mapping = mmap.mmap(
                    request.fd,
                    request.size,
                    mmap.MAP_SHARED,
                    prot or mmap.PROT_READ,
                    offset=request.offset,
                )
            except (OSError, ValueError, OverflowError) as exc:
                raise VfioUserError(errno.EINVAL, f"cannot mmap DMA fd: {exc}") from None
        region = DmaRegion(request.address, request.size, request.flags, request.offset, mapping)
        with self._lock:
            if len(self._regions) >= MAX_DMA_MAPS:
                region.close()
                raise VfioUserError(errno.ENOSPC, "too many DMA mappings")
            i = bisect.bisect_left(self._starts, region.address)
            overlaps_next = i < len(self._regions) and self._regions[i].address < region.end
            overlaps_prev = i > 0 and self._regions[i - 1].end > region.address
            if overlaps_next or overlaps_prev:
                region.close()
                raise VfioUserError(errno.EEXIST, "DMA range overlaps an existing mapping")
            self._starts.insert(i, region.address)
            self._regions.insert(i, region)
        return region

    def unmap(self, request: DmaUnmap) -> None:
        if request.flags & DmaUnmapFlags.GET_DIRTY_BITMAP:
            raise VfioUserError(errno.ENOTSUP, "dirty page tracking is not supported")
        if request.flags & ~(DmaUnmapFlags.ALL | DmaUnmapFlags.GET_DIRTY_BITMAP):
            raise VfioUserError(errno.EINVAL, f"unknown DMA_UNMAP flags {request.flags:#x}")
        if request.flags & DmaUnmapFlags.ALL:
            if request.address or request.size:
                raise VfioUserError(errno.EINVAL, "unmap-all needs address and size 0")
            self.clear()
            return
        with self._lock:
            i = bisect.bisect_left(self._starts, request.address)
            if (
                i == len(self._regions)
                or self._regions[i].address != request.address
                or self._regions[i].size != request.size
            ):
                raise VfioUserError(errno.ENOENT, "no DMA mapping with that address and size")
            del self._starts[i]
            region = self._regions.pop(i)
        region.close()

    def clear(self) -> None:
        with self._lock:
            regions, self._regions, self._starts = self._regions, [], []
        for region in regions:
            region.close()

    def find(self, address: int, length: int) -> DmaRegion:
        """The region that wholly contains [address, address+length)."""
        with self._lock:
            i = bisect.bisect_right(self._starts, address) - 1
            if i >= 0:
                region = self._regions[i]
                if address + length <= region.end:
                    return region
        raise VfioUserError(errno.EFAULT, f"guest address {address:#x}+{length:#x} is not mapped")

    @contextlib.contextmanager
    def requests_cancelled(self) -> Iterator[None]:
        """Inside the block, message DMA fails at once with ECANCELED, including the
        requests already waiting: a device reset or destruction must not wait for a
        client that may itself be waiting for the reset's reply."""
        message_dma = self.message_dma
        if message_dma is None:
            yield
            return
        message_dma.block_requests()
        try:
            yield
        finally:
            message_dma.unblock_requests()

    # ------------------------------------------------------------------ device access

    def read(self, address: int, length: int) -> bytes:
        """Read guest memory: directly where mapped, else by DMA_READ messages."""
        region = self.find(address, length)
        if not region.readable:
            raise VfioUserError(errno.EPERM, f"guest range {address:#x} is not readable")
        if region.mapping is not None:
            start = address - region.address
            return region.mapping[start : start + length]
        if self.message_dma is None:
            raise VfioUserError(errno.EFAULT, f"guest range {address:#x} has no fd and no socket")
        return self.message_dma.dma_read_messages(address, length)

    def read_into(self, address: int, out: npt.NDArray[np.uint8]) -> None:
        """Read guest memory into a numpy array (one copy when fd-backed)."""
        region = self.find(address, len(out))
        if region.mapping is not None and region.readable:
            start = address - region.address
            out[:] = np.frombuffer(region.mapping, dtype=np.uint8, count=len(out), offset=start)
            return
        out[:] = np.frombuffer(self.read(address, len(out)), dtype=np.uint8)

    def write(self, address: int, data: bytes | memoryview) -> None:
        """Write guest memory: directly where mapped, else by DMA_WRITE messages."""
        region = self.find(address, len(data))
        if not region.writable:
            raise VfioUserError(errno.EPERM, f"guest range {address:#x} is not writable")
        if region.mapping is not None:
            start = address - region.address
            region.mapping[start : start + len(data)] = data
            return
        if self.message_dma is None:
            raise VfioUserError(errno.EFAULT, f"guest range {address:#x} has no fd and no socket")
        self.message_dma.dma_write_messages(address, bytes(data))

    def view(self, address: int, length: int) -> npt.NDArray[np.uint8]:
        """A numpy view of fd-backed guest memory (no copy); EFAULT for message-only ranges."""
        region = self.find(address, length)
        if region.mapping is None:
            raise VfioUserError(errno.EFAULT, f"guest range {address:#x} is not fd-backed")
        start = address - region.address
        array = np.frombuffer(region.mapping, dtype=np.uint8, count=length, offset=start)
        if not region.writable:
            array.flags.writeable = False
        return array
