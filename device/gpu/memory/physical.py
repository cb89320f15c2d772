"""The emulated physical GPU: one pool of device memory and contexts, shared at run time
by the GPU instances created on it.

Theory of operation.  Device memory is one sealed memfd (``DeviceMemory``), allocated
page by page when a resource is created; an instance type's memory quota is a limit,
not a reservation, and the limits of all instances may exceed the pool by the
``overcommit`` ratio (default 1: never).  When the pool runs short, an idle resource
of any instance is *evicted*: its owner's window fences and revokes the aperture
pages that map it (the guest's dirty bytes land in device memory first), its bytes
are copied to host memory, and its pages are scrubbed and reused.  Whoever needs an
evicted resource again *pins* it, which pages it back in (evicting another one if
need be); a fault on an evicted page asks the pager thread to do that, because a
FUSE serving thread must never revoke.  A ``static`` instance gets a private memory
instead (the fd QEMU maps must reach nothing else), reserved from the pool's
capacity; its resources are never evicted.

Every resource's residency, pins and lifetime are guarded by ``lock`` (with
``changed``, a condition on it); the instance locks are never taken under it, and it
is never held across a revocation.  Whoever calls ``allocate``, ``pin`` or
``page_in`` holds no instance lock: those may evict, which waits for another
instance's writebacks.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from device.errors import CapacityError, DeviceError, OutOfMemory
from device.gpu.abi import ErrorCode
from device.gpu.memory.allocator import Extent
from device.gpu.memory.device_memory import DeviceMemory
from device.gpu.memory.resources import Resource
from device.gpu.types import DEFAULT_TYPES, InstanceType
from device.units import GiB

log = logging.getLogger(__name__)

DEFAULT_MEMORY = 1 * GiB
DEFAULT_CONTEXTS = 16
PIN_WAIT = 30.0  # seconds a pin waits for an eviction or page-in by another thread


class ResidencyHost(Protocol):
    """What the physical GPU needs from an instance to move its resources."""

    def fence_resource(self, resource: Resource) -> None:
        """Park faults on the aperture pages mapping it and revoke the guest's copies."""

    def unfence_resource(self, resource: Resource) -> None: ...
    def resource_moved(self, resource: Resource, kind: str) -> None:
        """Record an eviction or page-in (``kind``) in the instance's fault log."""

    def resource_freed(self, resource: Resource) -> None:
        """A removed resource's memory went back to the pool (takes the instance lock)."""


@dataclass
class _Account:
    itype: InstanceType
    private: DeviceMemory | None  # a static instance's memory
    reservation: list[Extent]  # pool capacity held for a static instance
    host: ResidencyHost | None = None


class PhysicalGpu:
    def __init__(
        self,
        memory_size: int = DEFAULT_MEMORY,
        contexts: int = DEFAULT_CONTEXTS,
        types: Iterable[InstanceType] = DEFAULT_TYPES,
        name: str = "pgpu0",
        overcommit: float = 1.0,
    ) -> None:
        if overcommit < 1.0:
            raise ValueError("overcommit is a ratio of at least 1 (1: no overcommit)")
        self.name = name
        self.memory_size = memory_size
        self.contexts = contexts
        self.overcommit = overcommit
        self.types = {t.name: t for t in types}
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        self.pool = DeviceMemory(f"{name}-vram", memory_size)
        self.memory_fd = self.pool.fd
        self.contexts_used = 0
        self.instances: dict[str, _Account] = {}
        self._resident: set[Resource] = set()  # evictable and resident
        self._clock = 0
        self.evictions = 0
        self.page_ins = 0
        self._pager_jobs: queue.Queue[tuple[Resource, Callable[[bool], None]] | None] = (
            queue.Queue()
        )
        self._pager = threading.Thread(target=self._page_in_worker, name=f"{name}-pager")
        self._pager.daemon = True
        self._pager.start()

    # ---------------------------------------------------------------- capacity

    def _type(self, type_name: str) -> InstanceType:
        try:
            return self.types[type_name]
        except KeyError:
            known = ", ".join(sorted(self.types))
            raise CapacityError(f"unknown instance type {type_name!r} (known: {known})") from None

    def _limits_room(self) -> int:
        """Memory limits that may still be handed to new instances (lock held)."""
        limits = sum(account.itype.memory for account in self.instances.values())
        return int(self.memory_size * self.overcommit) - limits

    def available_instances(self, type_name: str) -> int:
        """How many more instances of this type fit, as mdev's available_instances."""
        itype = self._type(type_name)
        with self.lock:
            by_contexts = (self.contexts - self.contexts_used) // itype.contexts
            by_memory = self._limits_room() // itype.memory
        return max(0, min(by_contexts, by_memory))

    def reserve(
        self, instance_name: str, type_name: str, *, static: bool = False
    ) -> tuple[InstanceType, DeviceMemory | None]:
        """Admit a new instance: its contexts, its memory limit, and for a static one
        its private memory (reserved from the pool's capacity)."""
        itype = self._type(type_name)
        if static and itype.aperture_size != itype.memory:
            raise CapacityError(
                f"{type_name}: static mode maps an instance's whole memory, so its aperture "
                f"({itype.aperture_size >> 20} MiB) must be its quota ({itype.memory >> 20} MiB)"
            )
        with self.lock:
            if instance_name in self.instances:
                raise CapacityError(f"instance {instance_name!r} already exists")
            if self.contexts_used + itype.contexts > self.contexts:
                left = self.contexts - self.contexts_used
                raise CapacityError(
                    f"{type_name} needs {itype.contexts} contexts, {left} of {self.contexts} "
                    "are left"
                )
            if itype.memory > self._limits_room():
                raise CapacityError(
                    f"{type_name} needs {itype.memory >> 20} MiB of device memory, "
                    f"{max(0, self._limits_room()) >> 20} MiB are left to hand out "
                    f"(pool {self.memory_size >> 20} MiB, overcommit {self.overcommit:g})"
                )
            reservation: list[Extent] = []
            if static:
                try:
                    reservation = self.pool.allocator.allocate_pages(itype.memory)
                except OutOfMemory as exc:
                    raise CapacityError(
                        f"a static {type_name} needs its memory now: {exc}"
                    ) from None
            self.contexts_used += itype.contexts
            self.instances[instance_name] = _Account(itype, None, reservation)
        private = DeviceMemory(f"{instance_name}-vram", itype.memory) if static else None
        self.instances[instance_name].private = private
        return itype, private

    def attach(self, instance_name: str, host: ResidencyHost) -> None:
        with self.lock:
            self.instances[instance_name].host = host

    def release(self, instance_name: str) -> None:
        """The instance is gone (its resources were freed first)."""
        with self.lock:
            account = self.instances.pop(instance_name)
            self.contexts_used -= account.itype.contexts
            for extent in account.reservation:
                self.pool.allocator.free(extent)
        if account.private is not None:
            account.private.close()

    @property
    def free_bytes(self) -> int:
        with self.lock:
            return self.pool.allocator.free_bytes

    def usage(self) -> dict[str, int | float]:
        """Pool, limits and context usage, for the control plane and tests."""
        with self.lock:
            free = self.pool.allocator.free_bytes
            return {
                "memory": self.memory_size,
                "memory_used": self.memory_size - free,
                "memory_free": free,
                "overcommit": self.overcommit,
                "limits": sum(a.itype.memory for a in self.instances.values()),
                "contexts": self.contexts,
                "contexts_used": self.contexts_used,
                "instances": len(self.instances),
                "resident_resources": len(self._resident),
                "evictions": self.evictions,
                "page_ins": self.page_ins,
            }

    # ---------------------------------------------------------------- allocation

    def allocate(self, owner: str, handle: int, size: int) -> Resource:
        """A new resource of ``size`` bytes for ``owner`` (evicting if the pool is short).

        Raises DeviceError(NO_MEMORY) when nothing can be evicted."""
        with self.lock:
            private = self.instances[owner].private
        if private is not None:  # static: contiguous, at its aperture offset for good
            with self.lock:
                try:
                    runs = [private.allocator.allocate(size)]
                except OutOfMemory as exc:
                    raise DeviceError(ErrorCode.NO_MEMORY, str(exc)) from None
            return Resource(handle, size, owner, private, runs, evictable=False)
        runs = self._allocate_pool(size, exclude=None)
        resource = Resource(handle, size, owner, self.pool, runs, evictable=True)
        with self.lock:
            resource.last_used = self._tick()
            self._resident.add(resource)
        return resource

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def _allocate_pool(self, size: int, exclude: Resource | None) -> list[Extent]:
        deadline = time.monotonic() + PIN_WAIT
        while True:
            with self.lock:
                try:
                    return self.pool.allocator.allocate_pages(size)
                except OutOfMemory as exc:
                    victim = self._pick_victim(exclude)
                    if victim is None:
                        # Resources in use now (pinned, moving) become idle soon: wait
                        # for one, for a while, before giving up.
                        busy = any(r is not exclude and not r.removed for r in self._resident)
                        if not busy or time.monotonic() > deadline:
                            raise DeviceError(
                                ErrorCode.NO_MEMORY, f"{exc}, and no idle resource to evict"
                            ) from None
                        self.changed.wait(0.05)
                        continue
                    victim.evicting = True
            self._evict(victim)

    def _pick_victim(self, exclude: Resource | None) -> Resource | None:
        """The least recently used idle resident resource (lock held)."""
        idle = [
            r
            for r in self._resident
            if r is not exclude and not r.pins and not r.evicting and not r.paging_in
            and not r.removed
        ]  # fmt: skip
        return min(idle, key=lambda r: r.last_used, default=None)

    def evict(self, resource: Resource) -> bool:
        """Evict one resource now (tests, the control plane); False if it is busy."""
        with self.lock:
            if resource not in self._resident or resource.pins or resource.evicting:
                return False
            resource.evicting = True
        self._evict(resource)
        return True

    def _evict(self, victim: Resource) -> None:
        """Move a resource (``evicting`` set by the caller) out to host memory."""
        host = self._host(victim.owner)
        try:
            if host is not None:
                host.fence_resource(victim)  # the guest's dirty bytes land in device memory
            with self.lock:
                saved = np.empty(victim.page_count * 4096, dtype=np.uint8)
                saved[: victim.size] = np.frombuffer(victim.read(0, victim.size), np.uint8)
                runs, victim.runs = victim.runs, []
                victim.saved = saved
                self._resident.discard(victim)
                self.evictions += 1
            self._give_back(victim.backing, runs)
        finally:
            with self.lock:
                victim.evicting = False
                self.changed.notify_all()
            if host is not None:
                host.unfence_resource(victim)
        if host is not None:
            host.resource_moved(victim, "evicted")
        self.release_if_unused(victim)

    def _give_back(self, backing: DeviceMemory, runs: list[Extent]) -> None:
        """Scrub pages, then return them (scrubbed before anyone else can have them)."""
        for run in runs:
            backing.scrub(run)
        with self.lock:
            for run in runs:
                backing.allocator.free(run)
            self.changed.notify_all()

    def _host(self, owner: str) -> ResidencyHost | None:
        with self.lock:
            account = self.instances.get(owner)
            return account.host if account is not None else None

    # ---------------------------------------------------------------- residency

    def page_in(self, resource: Resource) -> None:
        """Make an evicted resource resident again (evicting others if need be)."""
        while True:
            with self.lock:
                if resource.removed:
                    raise DeviceError(
                        ErrorCode.INVALID_HANDLE, f"resource {resource.handle:#x} is gone"
                    )
                if resource.resident and not resource.evicting:
                    return
                if resource.evicting or resource.paging_in:
                    self.changed.wait(PIN_WAIT)
                    continue
                resource.paging_in = True
            try:
                runs = self._allocate_pool(resource.size, exclude=resource)
            except BaseException:
                with self.lock:
                    resource.paging_in = False
                    self.changed.notify_all()
                raise
            with self.lock:
                saved, resource.saved = resource.saved, None
                resource.runs = runs
                assert saved is not None
                resource.write(0, saved[: resource.size].data)
                resource.paging_in = False
                resource.last_used = self._tick()
                self._resident.add(resource)
                self.page_ins += 1
                self.changed.notify_all()
            host = self._host(resource.owner)
            if host is not None:
                host.resource_moved(resource, "paged_in")
            self.release_if_unused(resource)  # removed while it was paged in
            return

    def request_page_in(self, resource: Resource, done: Callable[[bool], None]) -> None:
        """Page a resource in on the pager thread, then call ``done(succeeded)``."""
        self._pager_jobs.put((resource, done))

    def _page_in_worker(self) -> None:
        while (job := self._pager_jobs.get()) is not None:
            resource, done = job
            try:
                self.page_in(resource)
                ok = True
            except Exception as exc:
                log.warning("%s: cannot page in resource %#x of %s: %s", self.name,
                            resource.handle, resource.owner, exc)  # fmt: skip
                ok = False
            try:
                done(ok)
            except Exception:
                log.exception("%s: page-in completion failed", self.name)

    def pin(self, resource: Resource) -> None:
        """Hold a resource resident (paging it in first) until ``unpin``."""
        while True:
            with self.lock:
                if resource.removed:
                    raise DeviceError(ErrorCode.INVALID_HANDLE, f"no resource {resource.handle:#x}")
                if resource.resident and not resource.evicting and not resource.paging_in:
                    resource.pins += 1
                    resource.last_used = self._tick()
                    return
            self.page_in(resource)

    def unpin(self, resource: Resource) -> None:
        with self.lock:
            resource.pins -= 1
            if not resource.pins:
                self.changed.notify_all()  # an allocation may be waiting for an idle one
        self.release_if_unused(resource)

    def touch(self, resource: Resource) -> None:
        """Note a use (for LRU eviction), lock held by the caller."""
        resource.last_used = self._tick()

    def remove(self, resource: Resource) -> None:
        """Its handle is gone: free its memory once nothing uses it."""
        with self.lock:
            resource.removed = True
        self.release_if_unused(resource)

    def release_if_unused(self, resource: Resource) -> None:
        with self.lock:
            if (
                not resource.removed or resource.freed or resource.pins
                or resource.evicting or resource.paging_in
            ):  # fmt: skip
                return
            resource.freed = True
            runs, resource.runs = resource.runs, []
            resource.saved = None
            self._resident.discard(resource)
        self._give_back(resource.backing, runs)
        host = self._host(resource.owner)
        if host is not None:
            host.resource_freed(resource)

    # ---------------------------------------------------------------- close

    def close(self) -> None:
        self._pager_jobs.put(None)
        self._pager.join(5)
        for account in list(self.instances.values()):
            if account.private is not None:
                account.private.close()
        self.pool.close()
