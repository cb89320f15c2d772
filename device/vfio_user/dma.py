"""The DMA map table of one client session: guest memory the device may access.

Ranges come from DMA_MAP.  A range without an fd (ROM, the device's own BARs, RAM
that is not fd-backed) is only recorded, and accesses to it go over the socket as
DMA_READ/DMA_WRITE messages.  Ranges never overlap.

Which fds are mapped.  The fd is the client's, so it is untrusted: touching a
mapping of a file the client controls can fault forever (a FUSE file it serves; the
fault is taken with the GIL held, freezing every instance), raise SIGBUS (a memfd
it truncates after the map kills the whole process) or deadlock (our own FUSE
aperture file mapped back to us).  Only memory that cannot go away under us is
mapped: a tmpfs memfd sealed with F_SEAL_SHRINK whose size covers the range (what
QEMU's memory-backend-memfd gives by default).  Any other fd is closed and its range
is served by messages, like a range without fd: slower, but it cannot hurt anyone
but its client.  Hugetlbfs memfds are not mapped either: a hole punched in them
(which F_SEAL_SHRINK allows) faults in a new huge page, and SIGBUS when the pool is
empty.

Mapping lifetime.  A mapping keeps no fd (mmap through libc, the fd closed at once:
one client must not be able to eat the process's fds), and it is munmapped only
when the client has unmapped the range *and* no access holds it: every access holds
its region (``DmaRegion.held``) for the time it touches the memory, so a DMA_UNMAP
while a device worker copies defers the munmap to the end of the copy.  A numpy
array from ``DmaTable.view`` holds its region for as long as the array (or any view
derived from it) is alive, so it never points at unmapped memory; it can however
keep a range the client unmapped in our address space, so users keep views short.
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import errno
import fcntl
import logging
import mmap
import os
import threading
import weakref
from collections.abc import Iterator
from typing import Protocol

import numpy as np
import numpy.typing as npt

from device.errors import VfioUserError
from device.units import PAGE_SIZE
from device.vfio_user.protocol.constants import DmaMapFlags, DmaUnmapFlags
from device.vfio_user.protocol.messages import DmaMap, DmaUnmap

log = logging.getLogger(__name__)

# The DMA mappings one session may hold (advertised as max_dma_maps in VERSION, and
# enforced by DmaTable.map).  Each fd-backed one is a VMA, and vm.max_map_count
# (65530 by default) counts the VMAs of the whole process: all instances together.
# QEMU needs one map per RAM section (tens, a few hundred with memory hotplug), and
# 1024 per session lets the 16 instances of the default physical GPU (and three
# times as many) map their limit without leaving the process short of VMAs for its
# own heap, threads and libraries.
MAX_DMA_MAPS_PER_SESSION = 1024

_F_GET_SEALS: int = getattr(fcntl, "F_GET_SEALS", 1034)
_F_SEAL_SHRINK: int = getattr(fcntl, "F_SEAL_SHRINK", 0x0002)
_TMPFS_MAGIC = 0x01021994  # memfds (without MFD_HUGETLB) live on the internal tmpfs
_STATFS_SIZE = 256  # at least sizeof(struct statfs); f_type is its first field (a long)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_libc.mmap.restype = ctypes.c_void_p
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.munmap.restype = ctypes.c_int
_libc.fstatfs.argtypes = [ctypes.c_int, ctypes.c_void_p]
_libc.fstatfs.restype = ctypes.c_int
_MAP_FAILED = ctypes.c_void_p(-1).value


class DmaRegion:
    """One mapped range; ``mapping`` is the address of our mmap of it (None: messages).

    The mmap is released when the region is closed and the last holder lets go.
    """

    def __init__(
        self, address: int, size: int, flags: int, file_offset: int, mapping: int | None
    ) -> None:
        self.address = address
        self.size = size
        self.flags = flags
        self.file_offset = file_offset
        self.mapping = mapping
        # An RLock: a view's finalizer (which releases) may run wherever the view's last
        # reference drops, including in a thread that is inside one of these methods.
        self._lock = threading.RLock()
        self._holders = 0
        self._closed = False

    @property
    def end(self) -> int:
        return self.address + self.size

    @property
    def readable(self) -> bool:
        return bool(self.flags & DmaMapFlags.READ)

    @property
    def writable(self) -> bool:
        return bool(self.flags & DmaMapFlags.WRITE)

    @property
    def holders(self) -> int:
        return self._holders

    def acquire(self) -> bool:
        """Hold the mapping; False when the region is already closed (unmapped)."""
        with self._lock:
            if self._closed:
                return False
            self._holders += 1
            return True

    def release(self) -> None:
        with self._lock:
            self._holders -= 1
            unmap = self._closed and self._holders == 0
        if unmap:
            self._munmap()

    @contextlib.contextmanager
    def held(self) -> Iterator[int | None]:
        """Hold the region while touching it; yields the mapping's address (or None)."""
        if not self.acquire():
            raise VfioUserError(errno.EFAULT, f"guest range {self.address:#x} was unmapped")
        try:
            yield self.mapping
        finally:
            self.release()

    def close(self) -> None:
        """The client unmapped the range: munmap now, or when the last holder releases."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            unmap = self._holders == 0
        if unmap:
            self._munmap()

    def _munmap(self) -> None:
        with self._lock:
            address, self.mapping = self.mapping, None
        if address is not None:
            _libc.munmap(address, self.size)


class MessageDma(Protocol):
    """Guest memory access over the socket (DMA_READ/DMA_WRITE), for ranges without fd."""

    def dma_read_messages(self, address: int, length: int) -> bytes: ...
    def dma_write_messages(self, address: int, data: bytes) -> None: ...
    def block_requests(self) -> None:
        """Fail every request waiting for the client, and every new one, until unblocked."""

    def unblock_requests(self) -> None: ...


def _map_fd(request: DmaMap) -> tuple[int | None, str]:
    """mmap the request's fd if it is memory that cannot shrink under us.

    Returns the mapping's address, or None and why not.  Nothing here may block on
    the client: F_GET_SEALS answers without asking the file system, so a FUSE file is
    turned away before anything (fstat, mmap) could send it a request.
    """
    fd = request.fd
    assert fd is not None
    try:
        seals = fcntl.fcntl(fd, _F_GET_SEALS)
    except OSError:
        return None, "the fd is not a memfd"
    if not seals & _F_SEAL_SHRINK:
        return None, "the memfd is not sealed with F_SEAL_SHRINK (it could be truncated)"
    statfs = ctypes.create_string_buffer(_STATFS_SIZE)
    if _libc.fstatfs(fd, statfs) != 0:
        return None, f"fstatfs failed: {os.strerror(ctypes.get_errno())}"
    if ctypes.c_long.from_buffer(statfs).value != _TMPFS_MAGIC:
        return None, "the memfd is not on tmpfs (hugetlbfs pages can fail with SIGBUS)"
    size = os.fstat(fd).st_size
    if request.offset + request.size > size:
        return None, f"the memfd has {size} bytes, the range needs {request.offset + request.size}"
    prot = 0
    if request.flags & DmaMapFlags.READ:
        prot |= mmap.PROT_READ
    if request.flags & DmaMapFlags.WRITE:
        prot |= mmap.PROT_WRITE
    address = _libc.mmap(
        None, request.size, prot or mmap.PROT_READ, mmap.MAP_SHARED, fd, request.offset
    )
    if address is None or address == _MAP_FAILED:
        return None, f"mmap failed: {os.strerror(ctypes.get_errno())}"
    return int(address), ""


class DmaTable:
    def __init__(self, max_maps: int = MAX_DMA_MAPS_PER_SESSION) -> None:
        self.max_maps = max_maps
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
        """Record (and mmap, when its fd is safe to map) a range.  Takes ownership of the
        fd and always closes it: a mapping keeps no fd."""
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
        self._check_room()
        mapping = None
        if request.fd is not None:
            if request.offset % PAGE_SIZE:
                raise VfioUserError(errno.EINVAL, "DMA file offset is not page aligned")
            mapping, why_not = _map_fd(request)
            if mapping is None:
                log.info(
                    "DMA range %#x+%#x is not mapped: %s; the device reaches it by "
                    "DMA_READ/DMA_WRITE messages",
                    request.address,
                    request.size,
                    why_not,
                )
        region = DmaRegion(request.address, request.size, request.flags, request.offset, mapping)
        try:
            self._insert(region)
        except BaseException:
            region.close()
            raise
        return region

    def _check_room(self) -> None:
        if len(self._regions) >= self.max_maps:
            raise VfioUserError(
                errno.ENOSPC, f"too many DMA mappings: {len(self._regions)} of {self.max_maps}"
            )

    def _insert(self, region: DmaRegion) -> None:
        with self._lock:
            self._check_room()
            i = bisect.bisect_left(self._starts, region.address)
            overlaps_next = i < len(self._regions) and self._regions[i].address < region.end
            overlaps_prev = i > 0 and self._regions[i - 1].end > region.address
            if overlaps_next or overlaps_prev:
                raise VfioUserError(errno.EEXIST, "DMA range overlaps an existing mapping")
            self._starts.insert(i, region.address)
            self._regions.insert(i, region)

    def unmap(self, request: DmaUnmap) -> None:
        """Forget a range; its mmap goes when no access holds it any more."""
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
            region = self._find_locked(address, length)
        if region is None:
            raise _unmapped(address, length)
        return region

    def _find_locked(self, address: int, length: int) -> DmaRegion | None:
        i = bisect.bisect_right(self._starts, address) - 1
        if i >= 0:
            region = self._regions[i]
            if address + length <= region.end:
                return region
        return None

    @contextlib.contextmanager
    def hold(self, address: int, length: int) -> Iterator[DmaRegion]:
        """The region containing the range, held (not munmapped) for the ``with`` body."""
        with self._lock:
            # Under the table lock: an unmap cannot close the region between the
            # lookup and the acquire.
            region = self._find_locked(address, length)
            if region is None or not region.acquire():
                raise _unmapped(address, length)
        try:
            yield region
        finally:
            region.release()

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
        with self.hold(address, length) as region:
            if not region.readable:
                raise VfioUserError(errno.EPERM, f"guest range {address:#x} is not readable")
            if region.mapping is not None:
                return ctypes.string_at(region.mapping + address - region.address, length)
        return self._read_messages(address, length)

    def read_into(self, address: int, out: npt.NDArray[np.uint8]) -> None:
        """Read guest memory into a numpy array (one copy when fd-backed)."""
        with self.hold(address, len(out)) as region:
            if region.mapping is not None and region.readable:
                out[:] = np.frombuffer(
                    memoryview(_buffer(region, address, len(out))), dtype=np.uint8
                )
                return
            if not region.readable:
                raise VfioUserError(errno.EPERM, f"guest range {address:#x} is not readable")
        out[:] = np.frombuffer(self._read_messages(address, len(out)), dtype=np.uint8)

    def write(self, address: int, data: bytes | memoryview) -> None:
        """Write guest memory: directly where mapped, else by DMA_WRITE messages."""
        with self.hold(address, len(data)) as region:
            if not region.writable:
                raise VfioUserError(errno.EPERM, f"guest range {address:#x} is not writable")
            if region.mapping is not None:
                target = np.frombuffer(
                    memoryview(_buffer(region, address, len(data))), dtype=np.uint8
                )
                target[:] = np.frombuffer(data, dtype=np.uint8)
                return
        if self.message_dma is None:
            raise VfioUserError(errno.EFAULT, f"guest range {address:#x} has no fd and no socket")
        self.message_dma.dma_write_messages(address, bytes(data))

    def view(self, address: int, length: int) -> npt.NDArray[np.uint8]:
        """A numpy view of fd-backed guest memory (no copy); EFAULT for message-only ranges.

        The array holds its region: the memory stays mapped while the array (or an
        array derived from it) is alive, even after the client unmaps the range.
        """
        with self.hold(address, length) as region:
            if region.mapping is None:
                raise VfioUserError(errno.EFAULT, f"guest range {address:#x} is not fd-backed")
            buffer = _buffer(region, address, length)
            region.acquire()  # cannot fail: held; released when the buffer dies
            weakref.finalize(buffer, region.release)
            array = np.frombuffer(memoryview(buffer), dtype=np.uint8)
        if not region.writable:
            array.flags.writeable = False
        return array

    def _read_messages(self, address: int, length: int) -> bytes:
        if self.message_dma is None:
            raise VfioUserError(errno.EFAULT, f"guest range {address:#x} has no fd and no socket")
        return self.message_dma.dma_read_messages(address, length)


def _buffer(region: DmaRegion, address: int, length: int) -> ctypes.Array[ctypes.c_char]:
    """The bytes [address, address+length) of a held, mapped region as a ctypes array."""
    assert region.mapping is not None
    return (ctypes.c_char * length).from_address(region.mapping + address - region.address)


def _unmapped(address: int, length: int) -> VfioUserError:
    return VfioUserError(errno.EFAULT, f"guest address {address:#x}+{length:#x} is not mapped")
