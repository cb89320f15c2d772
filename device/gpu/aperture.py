"""The BAR2 aperture of one instance: which pages the guest may touch now, and how.

Theory of operation.  The aperture is a window on device memory, one file offset per
byte of the window; the ``ApertureMap`` says which device memory backs each page
and whether the guest may touch it now.  A page may be touched only while a resource
covering it is *placed*; ``allow``/``deny`` keep the map current (the instance calls
them on PLACE, REMOVE, DESTROY and reset).  How a touch reaches us depends on the
mapping mode:

- ``static``: QEMU maps the whole partition of the physical GPU's memfd at realize; no
  touch is ever seen or checked (the fast baseline).
- ``fault``: QEMU maps a file on our own FUSE filesystem.  A first touch is a READ,
  answered by ``fault``: served from device memory if every page in it is allowed,
  refused with EIO if it spans several pages of which some are not (the kernel then
  asks for the touched page alone), and for a single denied page the denied-access
  policy decides.  Dirty pages come back through ``writeback``.  ``revoke`` writes
  back, drops and unmaps pages in every process, so changed permissions take effect
  at the next touch.
- ``trap``: no mapping; every access is a REGION message checked page by page.

What a denied access gets is decided in one place for both paths
(``access_policy.denied_access``); which device memory backs a page, and whether it
may be touched, in another (``ApertureMap``).

The device (engine, bring-up DMA) works on device memory directly, so in fault mode
it calls ``sync`` before and after touching placed memory: the guest's dirty pages
are written back first, and the guest refetches what the device wrote.
"""

from __future__ import annotations

import errno
from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from device.errors import VfioUserError
from device.fuse.server import FuseAperture
from device.gpu.access_policy import denied_access
from device.gpu.aperture_map import ApertureMap
from device.gpu.fault_log import FaultLog
from device.gpu.modes import DeniedPolicy, MappingMode
from device.gpu.physical import PhysicalGpu
from device.units import PAGE_SIZE


class Aperture:
    def __init__(
        self,
        name: str,
        physical: PhysicalGpu,
        pages: ApertureMap,
        mode: MappingMode,
        policy: DeniedPolicy,
        report: Callable[[int, bool], None],
    ) -> None:
        self.name = name
        self.physical = physical
        self.pages = pages
        self.size = pages.size
        self.mode = mode
        self.policy = policy
        self.report = report  # (aperture offset, is_write) -> latch registers, raise irq
        self.log = FaultLog(name)
        self.fuse: FuseAperture | None = None
        self.file_fd = -1
        if mode is MappingMode.FAULT:
            self.fuse = FuseAperture(name, self.size, self)
            self.file_fd = self.fuse.start()

    # ------------------------------------------------------------------ permissions

    def allow(self, offset: int, length: int) -> None:
        """Make pages touchable (a resource was placed there)."""
        self.pages.map(offset, length)
        self.revoke(offset, length)  # drop dummy pages cached in their place

    def deny(self, offset: int, length: int) -> None:
        """Make pages untouchable again; the guest's next touch faults."""
        self.revoke(offset, length)  # write back what the guest wrote while allowed
        self.pages.unmap(offset, length)
        self.revoke(offset, length)  # and drop anything faulted in meanwhile

    def deny_all(self) -> None:
        self.deny(0, self.size)

    def is_allowed(self, offset: int, length: int) -> bool:
        return self.pages.is_mapped(offset, length)

    def revoke(self, offset: int, length: int) -> None:
        if self.fuse is None or length <= 0:
            return
        start = offset // PAGE_SIZE * PAGE_SIZE
        end = min(self.size, (offset + length + PAGE_SIZE - 1) // PAGE_SIZE * PAGE_SIZE)
        self.fuse.invalidate(start, end - start)
        self.log.add("revoked", start, end - start)

    def sync(self, offset: int, length: int) -> None:
        """Around device access to aperture memory (fault mode): write back the guest's
        dirty pages and drop its copies, so both sides see each other's writes."""
        if self.fuse is not None and self.pages.any_mapped(offset, length):
            self.revoke(offset, length)

    def sync_device(self, start: int, end: int) -> None:
        """``sync`` for device memory [start, end), wherever the aperture shows it."""
        self.sync(self.pages.to_aperture(start), end - start)

    # ------------------------------------------------------------------ fault mode callbacks

    def _memory(self, offset: int, length: int) -> npt.NDArray[np.uint8]:
        start = self.pages.to_device(offset)
        return self.physical.memory[start : start + length]

    def fault(self, offset: int, length: int) -> bytes | int:
        """A first touch (FUSE READ) of [offset, offset+length)."""
        if self.is_allowed(offset, length):
            self.log.add("served", offset, length)
            return self._memory(offset, length).tobytes()
        if length > PAGE_SIZE:
            # Some page in this window is not allowed: refuse the window, and the kernel
            # asks again for the touched page alone.
            return errno.EIO
        data = self._denied(offset, length, write=False)
        return errno.EIO if data is None else data  # EIO: the toucher gets SIGBUS

    def writeback(self, offset: int, data: bytes) -> None:
        """Dirty pages written back (FUSE WRITE): kept where allowed, dropped elsewhere."""
        for page_offset in range(offset - offset % PAGE_SIZE, offset + len(data), PAGE_SIZE):
            lo, hi = max(offset, page_offset), min(offset + len(data), page_offset + PAGE_SIZE)
            if self.is_allowed(lo, hi - lo):
                self._memory(lo, hi - lo)[:] = np.frombuffer(data, np.uint8, hi - lo, lo - offset)
                self.log.add("written_back", lo, hi - lo)
            else:
                self.log.add("write_dropped", lo, hi - lo)

    # ------------------------------------------------------------------ REGION messages

    def read(self, offset: int, count: int) -> bytes:
        """A trapped read (trap mode, or QEMU reading an mmapped region by message)."""
        if self.mode is MappingMode.STATIC or self.is_allowed(offset, count):
            self.sync(offset, count)
            return self._memory(offset, count).tobytes()
        data = self._denied(offset, count, write=False)
        if data is None:
            raise VfioUserError(errno.EFAULT, f"aperture {offset:#x}+{count} is not allocated")
        return data

    def write(self, offset: int, data: bytes) -> None:
        if self.mode is MappingMode.STATIC or self.is_allowed(offset, len(data)):
            self.sync(offset, len(data))
            self._memory(offset, len(data))[:] = np.frombuffer(data, np.uint8)
            self.sync(offset, len(data))
            return
        if self._denied(offset, len(data), write=True) is None:
            raise VfioUserError(errno.EFAULT, f"aperture {offset:#x}+{len(data)} is not allocated")

    def _denied(self, offset: int, count: int, *, write: bool) -> bytes | None:
        """A denied access of ``count`` bytes: what reads see, or None to refuse it."""
        denial = denied_access(self.policy)
        self.log.add(denial.record, offset, count, write=write, policy=self.policy.value)
        if denial.refuse:
            return None
        if denial.report:
            self.report(offset, write)
        return bytes([denial.fill]) * count

    def close(self) -> None:
        if self.fuse is not None:
            self.fuse.close()
            self.fuse = None
            self.file_fd = -1
