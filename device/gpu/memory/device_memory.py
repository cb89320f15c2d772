"""Device memory: a memfd mapped into this process, with a page allocator.

The physical GPU's shared pool is one of these; a ``static`` instance gets a private
one (the fd QEMU maps must reach nothing but the instance's own memory).  The memfd
is sparse, so untouched pages cost no host memory, and it is sealed against
shrinking and growing before any fd of it is handed out: a client can neither
truncate it under us (the server would die of SIGBUS) nor grow it.
"""

from __future__ import annotations

import fcntl
import mmap
import os

import numpy as np
import numpy.typing as npt

from device.gpu.memory.allocator import Extent, PageAllocator
from device.units import PAGE_SIZE

_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


class DeviceMemory:
    def __init__(self, name: str, size: int) -> None:
        self.name = name
        self.size = size
        self.fd = os.memfd_create(f"mgpu-{name}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(self.fd, size)
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, _SEALS)
            self._mmap = mmap.mmap(self.fd, size, mmap.MAP_SHARED)
        except BaseException:
            os.close(self.fd)
            raise
        self.array: npt.NDArray[np.uint8] = np.frombuffer(self._mmap, dtype=np.uint8)
        self.allocator = PageAllocator(0, size)

    def view(self, offset: int, length: int) -> memoryview:
        return memoryview(self._mmap)[offset : offset + length]

    def scrub(self, extent: Extent) -> None:
        """Zero pages (freed memory never shows its old contents).  Whole pages are
        punched out of the memfd (MADV_REMOVE): that zeroes them for every mapping,
        QEMU's included, and gives the host memory back."""
        start = (extent.offset + PAGE_SIZE - 1) // PAGE_SIZE * PAGE_SIZE
        end = (extent.offset + extent.size) // PAGE_SIZE * PAGE_SIZE
        if end > start:
            self._mmap.madvise(mmap.MADV_REMOVE, start, end - start)
        self.array[extent.offset : min(start, extent.end)] = 0
        self.array[max(end, extent.offset) : extent.end] = 0

    def close(self) -> None:
        del self.array
        try:
            self._mmap.close()
        except BufferError:
            pass  # a numpy view is still alive somewhere; the mapping goes with it
        os.close(self.fd)
