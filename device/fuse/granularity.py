"""Which page-cache granularity the running kernel gives our FUSE files, found by trying.

Why.  The aperture's fault path relies on the kernel caching these files in 4 KiB
folios: a multi-page READ it cannot serve whole is refused, and the kernel then asks
for the touched page alone; revocation drops exactly the pages asked.  Kernels with
FUSE large folios ("fuse: enable large folios", 7.x) may cache a file in larger
folios: the fallback READ then grows to the folio size and invalidation becomes
folio-granular, which would serve (or revoke) pages the page table does not allow.
The folio order is capped by ``min(max_read, max_write) / PAGE_SIZE`` and by
``max_pages`` (DESIGN.md section 7), so pinning those to one page gives 4 KiB folios
back, at the price of one READ per page for a sequential first touch.

How.  The mount holds a small scratch file beside the aperture.  ``measure`` maps it
as QEMU maps the aperture (MAP_SHARED, MADV_HUGEPAGE) and touches one byte; the
server refuses the first READ that covers the byte if it is longer than a page (as
the aperture refuses an unservable window) and serves whatever comes after.  The
size of the READ that completes the touch is the granularity: one page where folios
are small, the folio (or ``max_read``) where they are large.  The touch is made
through ctypes, which releases the GIL, because the serving threads need it.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import threading

PAGE = 4096
PROBE_SIZE = 4 << 20  # two hugepage windows: the touched byte sits in the second
PROBE_OFFSET = 3 << 20  # the byte touched, away from both ends


class Probe:
    """The server side of the test: what the scratch file's READs get and show."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.refused = False  # the first READ covering PROBE_OFFSET, if multi-page
        self.completing: int | None = None  # size of the READ served for PROBE_OFFSET

    def read(self, offset: int, size: int) -> bytes | int:
        """Zeros, or EIO once, for a READ of the scratch file."""
        covers = offset <= PROBE_OFFSET < offset + size
        with self.lock:
            if covers and size > PAGE and not self.refused:
                self.refused = True
                return 5  # EIO: the kernel falls back to its smallest read
            if covers and self.completing is None:
                self.completing = size
        return bytes(size)


def measure(path: str, probe: Probe) -> int:
    """Touch the scratch file at ``path`` as QEMU would; the granularity in bytes."""
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        mapping = mmap.mmap(fd, PROBE_SIZE, mmap.MAP_SHARED)
    finally:
        os.close(fd)
    try:
        if hasattr(mmap, "MADV_HUGEPAGE"):
            mapping.madvise(mmap.MADV_HUGEPAGE)
        window = ctypes.c_char.from_buffer(mapping)
        byte = ctypes.c_char()
        # A foreign call releases the GIL: the serving threads answer the fault meanwhile.
        ctypes.memmove(ctypes.addressof(byte), ctypes.addressof(window) + PROBE_OFFSET, 1)
        del window
    finally:
        mapping.close()
    if probe.completing is None:
        raise RuntimeError("the scratch file's touch completed without a READ")
    return probe.completing
