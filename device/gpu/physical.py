"""The emulated physical GPU: one pool of device memory and contexts, shared by the
GPU instances created on it.

Device memory is a memfd (sparse: untouched pages cost nothing), mapped once here and
exposed as a numpy array for the engines.  Each instance gets a contiguous partition
of the pool when it is created (its type's quota; this is the static partitioning
of the seed design, and the partition is what its BAR2 aperture maps), and returns
it when destroyed.  Freed memory is zeroed before anyone else can get it.
"""

from __future__ import annotations

import mmap
import os
import threading
from collections.abc import Iterable

import numpy as np
import numpy.typing as npt

from device.errors import CapacityError, OutOfMemory
from device.gpu.allocator import Extent, PageAllocator
from device.gpu.types import DEFAULT_TYPES, InstanceType

DEFAULT_MEMORY = 1024 * 1024 * 1024
DEFAULT_CONTEXTS = 16


class PhysicalGpu:
    def __init__(
        self,
        memory_size: int = DEFAULT_MEMORY,
        contexts: int = DEFAULT_CONTEXTS,
        types: Iterable[InstanceType] = DEFAULT_TYPES,
        name: str = "pgpu0",
    ) -> None:
        self.name = name
        self.memory_size = memory_size
        self.contexts = contexts
        self.types = {t.name: t for t in types}
        self.lock = threading.Lock()
        self.memory_fd = os.memfd_create(f"mgpu-{name}-vram", os.MFD_CLOEXEC)
        os.ftruncate(self.memory_fd, memory_size)
        self._mmap = mmap.mmap(self.memory_fd, memory_size, mmap.MAP_SHARED)
        self.memory: npt.NDArray[np.uint8] = np.frombuffer(self._mmap, dtype=np.uint8)
        self.pool = PageAllocator(0, memory_size)
        self.contexts_used = 0
        self.partitions: dict[str, tuple[Extent, InstanceType]] = {}

    # ------------------------------------------------------------------ capacity

    def available_instances(self, type_name: str) -> int:
        """How many more instances of this type fit, as mdev's available_instances."""
        itype = self._type(type_name)
        with self.lock:
            by_contexts = (self.contexts - self.contexts_used) // itype.contexts
            # Partitions are contiguous: count how many fit in the current free runs.
            by_memory = sum(size // itype.memory for size in self._free_runs())
        return max(0, min(by_contexts, by_memory))

    def _free_runs(self) -> list[int]:
        allocated = sorted(self.pool.allocated.items())
        runs, cursor = [], 0
        for offset, size in allocated:
            runs.append(offset - cursor)
            cursor = offset + size
        runs.append(self.memory_size - cursor)
        return [r for r in runs if r > 0]

    def _type(self, type_name: str) -> InstanceType:
        try:
            return self.types[type_name]
        except KeyError:
            known = ", ".join(sorted(self.types))
            raise CapacityError(f"unknown instance type {type_name!r} (known: {known})") from None

    def usage(self) -> dict[str, int]:
        """Pool and context usage, for the control plane and tests."""
        with self.lock:
            free = self.pool.free_bytes
            return {
                "memory": self.memory_size,
                "memory_used": self.memory_size - free,
                "memory_free": free,
                "contexts": self.contexts,
                "contexts_used": self.contexts_used,
                "instances": len(self.partitions),
            }

    def reserve(self, instance_name: str, type_name: str) -> tuple[Extent, InstanceType]:
        """Reserve a partition and contexts for a new instance."""
        itype = self._type(type_name)
        with self.lock:
            if instance_name in self.partitions:
                raise CapacityError(f"instance {instance_name!r} already exists")
            if self.contexts_used + itype.contexts > self.contexts:
                raise CapacityError(
                    f"{type_name} needs {itype.contexts} contexts, "
                    f"{self.contexts - self.contexts_used} of {self.contexts} are left"
                )
            try:
                extent = self.pool.allocate(itype.memory)
            except OutOfMemory as exc:
                raise CapacityError(f"{type_name} needs {itype.memory >> 20} MiB: {exc}") from None
            self.contexts_used += itype.contexts
            self.partitions[instance_name] = (extent, itype)
        return extent, itype

    def release(self, instance_name: str) -> None:
        with self.lock:
            extent, itype = self.partitions.pop(instance_name)
            self.scrub(extent.offset, extent.size)
            self.pool.free(extent)
            self.contexts_used -= itype.contexts

    def scrub(self, offset: int, size: int) -> None:
        """Zero device memory (freed memory never shows its old contents).

        Whole pages are punched out of the memfd (MADV_REMOVE): that zeroes them for
        every mapping, QEMU's included, and gives the host memory back."""
        start = (offset + mmap.PAGESIZE - 1) // mmap.PAGESIZE * mmap.PAGESIZE
        end = (offset + size) // mmap.PAGESIZE * mmap.PAGESIZE
        if end > start:
            self._mmap.madvise(mmap.MADV_REMOVE, start, end - start)
        self.memory[offset : min(start, offset + size)] = 0
        self.memory[max(end, offset) : offset + size] = 0

    def view(self, offset: int, size: int) -> memoryview:
        """A writable view of device memory (a partition, for its aperture)."""
        return memoryview(self._mmap)[offset : offset + size]

    def close(self) -> None:
        del self.memory
        try:
            self._mmap.close()
        except BufferError:
            pass  # a numpy view is still alive somewhere; the mapping goes with it
        os.close(self.memory_fd)
