"""The BAR2 window of one instance: what a guest touch of an aperture page gets, now.

Theory of operation.  How a touch reaches us is the mapping mode:

- ``static``: QEMU maps the instance's private, sealed memory 1:1 at realize; no touch
  is seen or checked (the fast baseline, the seed's "no validate_map_request").
- ``fault``: QEMU maps a file on our own FUSE filesystem, and the first touch of a
  page is a READ: ``fault`` calls ``validate_map_request`` with the page table *as
  it is at that moment*, and serves the resource pages mapped there (gathered from
  wherever they live), refuses a multi-page window that is not wholly servable (the
  kernel then asks for the touched page alone), applies the denied-access policy to
  an unmapped page, or *parks* the fault: its reply is sent later, from another
  thread, once the page can be served (a page-table change or a device access in
  progress, or an evicted resource being paged back in), so no serving thread ever
  waits.  Dirty pages come back as ``writeback``: each page goes to what was served
  for it (``served``), which is what was mapped when the guest wrote it, or nowhere
  for a dummy page.
- ``trap``: no mapping; every access is a REGION message translated page by page.

Coherency.  The guest's copies live in the page cache, the device's bytes in device
memory.  Whoever changes what a page shows, or touches a resource's memory from the
device side, first *fences* it: faults on fenced pages (a page-table change) or on
pages of a fenced resource (the engine, the bring-up DMA, an eviction) park, and the
guest's cached copies are revoked, which writes their dirty bytes back to where they
were served from.  Then nothing but the fencer touches those bytes until it
unfences and the parked faults are answered with the new contents: the guest and
the device see each other's writes at byte granularity, and concurrent writes to the
same bytes end with one of the two values.  A resource page is never mapped at two
aperture pages (the page table refuses), so there is only ever one cached copy.

Locks: ``lock`` guards the page table, ``served``, the fences and the parked faults.
It is taken before the physical GPU's lock, never after, and never held across a
revocation (which waits for writebacks that need it).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator

import numpy as np

from device.errors import DeviceError, VfioUserError
from device.fuse.server import FuseAperture, Reply
from device.gpu import inject
from device.gpu.abi import ErrorCode
from device.gpu.aperture.access_policy import denied_access
from device.gpu.aperture.fault_log import FaultLog
from device.gpu.memory.device_memory import DeviceMemory
from device.gpu.memory.page_table import ApertureTable, Entry
from device.gpu.memory.physical import PhysicalGpu
from device.gpu.memory.resources import Resource
from device.gpu.modes import DeniedPolicy, MappingMode
from device.units import PAGE_SIZE

log = logging.getLogger(__name__)

DUMMY = "dummy"  # ``served`` for a page answered by the denied-access policy
Served = Entry | str | None


def _runs(pages: Iterable[int]) -> list[tuple[int, int]]:
    """Sorted pages as (first, count) runs."""
    runs: list[tuple[int, int]] = []
    for page in sorted(pages):
        if runs and runs[-1][0] + runs[-1][1] == page:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((page, 1))
    return runs


class Aperture:
    def __init__(
        self,
        name: str,
        physical: PhysicalGpu,
        table: ApertureTable,
        private: DeviceMemory | None,
        mode: MappingMode,
        policy: DeniedPolicy,
        report: Callable[[int, bool], None],
    ) -> None:
        self.name = name
        self.physical = physical
        self.table = table
        self.private = private  # static mode: the memory QEMU maps
        self.size = table.size
        self.mode = mode
        self.policy = policy
        self.report = report  # (aperture offset, is_write) -> latch registers, raise irq
        self.log = FaultLog(name)
        self.lock = threading.Lock()
        self.served: list[Served] = [None] * table.page_count
        self.fenced = [0] * table.page_count  # page-table changes in progress
        self.parked: dict[int, list[Reply]] = {}
        self._reports: list[tuple[int, bool]] = []  # denied accesses to report
        self.fuse: FuseAperture | None = None
        self.file_fd = -1
        if mode is MappingMode.STATIC and private is None:
            raise ValueError("static mode needs the instance's private memory")
        if mode is MappingMode.FAULT:
            self.fuse = FuseAperture(name, self.size, self)
            self.file_fd = self.fuse.start()
            # The page-cache granularity the mount measured (and pinned, if it had to).
            if self.fuse.unpinned_granularity != self.fuse.granularity:
                self.log.add("pinned_4k", 0, self.fuse.unpinned_granularity)
            self.log.add("mounted", 0, self.fuse.granularity)

    # ------------------------------------------------------------------ validate_map_request

    def fault(self, offset: int, length: int, later: Reply) -> bytes | int | None:
        """A first touch (FUSE READ) of [offset, offset+length): data, an errno, or None
        (parked: ``later`` gets the answer)."""
        delay = inject.fault_delay(self.name)  # an injected slow fault
        if delay:
            time.sleep(delay)
        try:
            return self._fault(offset, length, later)
        finally:
            self._flush_reports()

    def _fault(self, offset: int, length: int, later: Reply) -> bytes | int | None:
        first, count = offset // PAGE_SIZE, -(-length // PAGE_SIZE)
        with self.lock:
            # A READ means the kernel holds no valid copy of these pages (it locks them
            # until we answer): forget what was served, so that no revocation waits on a
            # page whose READ is parked behind that very revocation.
            for page in range(first, first + count):
                self.served[page] = None
            decision = self._validate(first, count)
            if isinstance(decision, list):
                data = self._gather(decision)
                if data is not None:
                    for n, entry in enumerate(decision):
                        self.served[first + n] = entry
                    head = decision[0]
                    self.log.add(
                        "served", offset, length,
                        device_page=self._device_page(head), handle=head.resource.handle,
                    )  # fmt: skip
                    return data[:length]
                decision = "evicted"
            if count > 1:
                return errno.EIO  # not wholly servable now: the kernel retries the one page
            if decision == "denied":
                return self._deny_fault(first, length)
            self.parked.setdefault(first, []).append(later)
            parked_on = self.table.lookup(first)
        if decision == "evicted" and parked_on is not None:
            entry = parked_on
            self.physical.request_page_in(entry.resource, lambda ok: self._paged_in(entry, ok))
        return None

    def _validate(self, first: int, count: int) -> list[Entry] | str:
        """The entries to serve, or why not: "denied", "parked" or "evicted" (lock held)."""
        entries: list[Entry] = []
        for page in range(first, first + count):
            entry = self.table.lookup(page)
            if self.fenced[page] or (entry is not None and entry.resource.fences):
                return "parked"
            if entry is None:
                return "denied"
            entries.append(entry)
        return entries

    def _gather(self, entries: list[Entry]) -> bytes | None:
        """The bytes of the mapped resource pages; None if one is not resident."""
        with self.physical.lock:
            if not all(e.resource.resident and not e.resource.evicting for e in entries):
                return None
            for entry in entries:
                self.physical.touch(entry.resource)
            return b"".join(e.resource.read(e.page * PAGE_SIZE, PAGE_SIZE) for e in entries)

    @staticmethod
    def _device_page(entry: Entry) -> int | None:
        resource = entry.resource
        return resource.device_page(entry.page) if resource.resident else None

    def _deny_fault(self, page: int, length: int) -> bytes | int:
        """The denied-access policy for one page (lock held)."""
        data = self._denied(page * PAGE_SIZE, length, write=False)
        if data is None:
            # The toucher gets SIGBUS: QEMU, and the VM, die.  Say so where a person looks.
            log.error(
                "%s: denied aperture access at offset %#x (a page that maps no resource), "
                "policy %s: QEMU gets SIGBUS and the VM dies; serve with --denied report "
                "(or dummy) to keep it alive", self.name, page * PAGE_SIZE, self.policy.value,
            )  # fmt: skip
            return errno.EIO
        self.served[page] = DUMMY  # its writebacks are dropped, whatever is mapped later
        return data

    def _paged_in(self, entry: Entry, ok: bool) -> None:
        """The pager is done with a resource: answer the faults parked on its pages."""
        if ok:
            self._wake(self.table.pages_of(entry.resource))
            return
        with self.lock:
            pages = [
                p
                for p in self.parked
                if (e := self.table.lookup(p)) and e.resource is entry.resource
            ]
            waiting = [reply for p in pages for reply in self.parked.pop(p)]
        for reply in waiting:
            reply(errno.EIO)

    def _wake(self, pages: Iterable[int]) -> None:
        """Answer the faults parked on ``pages`` that can be answered now."""
        with self.lock:
            waiting = [(p, self.parked.pop(p)) for p in pages if p in self.parked]
        for page, replies in waiting:
            for reply in replies:
                answer = self.fault(page * PAGE_SIZE, PAGE_SIZE, reply)
                if answer is not None:
                    reply(answer)

    # ------------------------------------------------------------------ writeback

    def writeback(self, offset: int, data: bytes) -> None:
        """Dirty pages written back (FUSE WRITE): each to where its copy was served from."""
        for page_offset in range(offset - offset % PAGE_SIZE, offset + len(data), PAGE_SIZE):
            lo, hi = max(offset, page_offset), min(offset + len(data), page_offset + PAGE_SIZE)
            page = page_offset // PAGE_SIZE
            with self.lock:
                # A dirty cached page goes back to what it was served from; a write
                # through (pwrite on the file, no cached copy) goes where the table
                # points now.
                target = self.served[page]
                if target is None:
                    target = self.table.lookup(page)
                    # A write through leaves the page in the page cache: revoke it
                    # like a served one from now on.
                    self.served[page] = target
            chunk = memoryview(data)[lo - offset : hi - offset]
            if isinstance(target, Entry) and self._store(target, lo - page_offset, chunk):
                self.log.add("written_back", lo, hi - lo, write=True, handle=target.resource.handle)
            else:
                self.log.add("write_dropped", lo, hi - lo, write=True)

    def _store(self, entry: Entry, in_page: int, chunk: memoryview) -> bool:
        resource = entry.resource
        with self.physical.lock:
            if resource.freed or resource.removed:
                return False
            resource.write(entry.page * PAGE_SIZE + in_page, chunk)
            return True

    # ------------------------------------------------------------------ fences and revocation

    def revoke_pages(self, pages: Iterable[int]) -> None:
        """Write back, drop and unmap the guest's copies of aperture pages."""
        if self.fuse is None:
            return
        for first, count in _runs(pages):
            self.fuse.invalidate(first * PAGE_SIZE, count * PAGE_SIZE)
            self.log.add("revoked", first * PAGE_SIZE, count * PAGE_SIZE)

    def _revoke_cached(self, pages: Iterable[int], resource: Resource | None = None) -> None:
        """Revoke the pages the guest may hold a copy of, then forget what was served."""
        with self.lock:
            cached = [p for p in pages if self.served[p] is not None]
        self.revoke_pages(cached)
        with self.lock:
            for page in cached:
                served = self.served[page]
                if resource is None or (isinstance(served, Entry) and served.resource is resource):
                    self.served[page] = None

    @contextlib.contextmanager
    def changing(self, pages: list[int]) -> Iterator[None]:
        """Around a page-table change of ``pages``: faults on them park, the guest's
        copies are revoked (written back to what they were served from) first, and the
        parked faults see the new table afterwards.  The caller changes the table in
        the block, holding ``lock`` only while it does."""
        with self.lock:
            for page in pages:
                self.fenced[page] += 1
        try:
            self._revoke_cached(pages)
            yield
        finally:
            with self.lock:
                for page in pages:
                    self.fenced[page] -= 1
            self._wake(pages)

    def fence_resource(self, resource: Resource) -> None:
        """The device is about to use (or move) a resource's memory: faults on its
        pages park and the guest's copies are written back and dropped."""
        if self.mode is MappingMode.STATIC:
            return  # one shared mapping: coherent by construction
        with self.lock:
            resource.fences += 1
            pages = self.table.pages_of(resource)
        self._revoke_cached(pages, resource)

    def unfence_resource(self, resource: Resource) -> None:
        if self.mode is MappingMode.STATIC:
            return
        with self.lock:
            resource.fences -= 1
            pages = self.table.pages_of(resource) if not resource.fences else []
        self._wake(pages)

    def deny_all(self) -> None:
        """Revoke every page the guest holds (reset, destruction)."""
        self._revoke_cached(range(self.table.page_count))

    # ------------------------------------------------------------------ REGION messages

    def read(self, offset: int, count: int, *, device: bool = False) -> bytes:
        """A trapped read (trap mode, or QEMU reading an mmapped region by message), or
        with ``device`` a read by the device itself (bring-up DMA: no policy, EFAULT)."""
        if self.private is not None:  # static: the private memory, 1:1
            return self.private.array[offset : offset + count].tobytes()
        return b"".join(self._access(offset, count, None, device))

    def write(self, offset: int, data: bytes, *, device: bool = False) -> None:
        if self.private is not None:
            self.private.array[offset : offset + len(data)] = np.frombuffer(data, np.uint8)
            return
        self._access(offset, len(data), data, device)

    def _access(self, offset: int, count: int, data: bytes | None, device: bool) -> list[bytes]:
        """An access through the page table, one run of one resource at a time."""
        delay = 0.0 if device else inject.fault_delay(self.name)  # an injected slow fault
        if delay:
            time.sleep(delay)
        parts: list[bytes] = []
        for entry, at, length in self._runs_of(offset, count):
            chunk = None if data is None else data[at - offset : at - offset + length]
            if entry is None:
                parts.append(self._unmapped(at, length, chunk, device))
            else:
                parts.append(self._resource_access(entry, at, length, chunk, device))
        return parts

    def _runs_of(self, offset: int, count: int) -> list[tuple[Entry | None, int, int]]:
        """[offset, offset+count) as runs mapping consecutive pages of one resource (or
        nothing): (first entry, aperture offset, length)."""
        runs: list[tuple[Entry | None, int, int]] = []
        with self.lock:
            position = offset
            while position < offset + count:
                page = position // PAGE_SIZE
                end = min(offset + count, (page + 1) * PAGE_SIZE)
                entry = self.table.lookup(page)
                if runs:
                    last, start, length = runs[-1]
                    same = (last is None and entry is None) or (
                        last is not None and entry is not None
                        and last.resource is entry.resource
                        and entry.page - last.page == page - start // PAGE_SIZE
                    )  # fmt: skip
                    if same:
                        runs[-1] = (last, start, length + end - position)
                        position = end
                        continue
                runs.append((entry, position, end - position))
                position = end
        return runs

    def _unmapped(self, offset: int, length: int, data: bytes | None, device: bool) -> bytes:
        if device:
            raise VfioUserError(errno.EFAULT, f"aperture {offset:#x}+{length} is not mapped")
        with self.lock:
            denied = self._denied(offset, length, write=data is not None)
        self._flush_reports()
        if denied is None:
            raise VfioUserError(errno.EFAULT, f"aperture {offset:#x}+{length} is not mapped")
        return b"" if data is not None else denied

    def _resource_access(
        self, entry: Entry, offset: int, length: int, data: bytes | None, device: bool
    ) -> bytes:
        resource = entry.resource
        try:
            self.physical.pin(resource)  # pages it in if it was evicted
        except DeviceError as exc:
            if exc.code == ErrorCode.INVALID_HANDLE:  # destroyed meanwhile: as if unmapped
                return self._unmapped(offset, length, data, device)
            raise VfioUserError(errno.ENOMEM, f"aperture {offset:#x}: {exc}") from None
        try:
            self.fence_resource(resource)  # the guest's cached copies first (fault mode)
            try:
                at = entry.page * PAGE_SIZE + offset % PAGE_SIZE
                with self.physical.lock:
                    if data is not None:
                        resource.write(at, data)
                        return b""
                    return resource.read(at, length)
            finally:
                self.unfence_resource(resource)
        finally:
            self.physical.unpin(resource)

    def _denied(self, offset: int, count: int, *, write: bool) -> bytes | None:
        """A denied access of ``count`` bytes: what reads see, or None to refuse it."""
        denial = denied_access(self.policy)
        self.log.add(denial.record, offset, count, write=write, policy=self.policy.value)
        if denial.refuse:
            return None
        if denial.report:
            # The instance latches it under its own lock, which is taken before ours
            # elsewhere: queued here, reported by ``_flush_reports`` after ``lock``.
            self._reports.append((offset, write))
        return bytes([denial.fill]) * count

    def _flush_reports(self) -> None:
        """Report the denied accesses queued meanwhile (``lock`` not held)."""
        while self._reports:
            try:
                offset, write = self._reports.pop(0)
            except IndexError:  # another thread flushed it
                return
            self.report(offset, write)

    def close(self) -> None:
        if self.fuse is not None:
            self.fuse.close()
            self.fuse = None
            self.file_fd = -1
        with self.lock:
            waiting = [reply for replies in self.parked.values() for reply in replies]
            self.parked.clear()
        for reply in waiting:
            reply(errno.EIO)


__all__ = ["DUMMY", "Aperture"]
