"""Interrupt lines of one client session: the eventfds set by DEVICE_SET_IRQS.

vfio semantics (linux/vfio.h, struct vfio_irq_set): for an IRQ index, ACTION_TRIGGER
with DATA_EVENTFD assigns eventfds to vectors [start, start+count) (QEMU sends no fds
to de-assign them); DATA_NONE with count 0 disables the whole index; DATA_NONE or
DATA_BOOL with a count fires the vectors (as if the device raised them).
ACTION_MASK/UNMASK mask vectors; an interrupt raised while masked stays pending and
fires on unmask.

Theory of operation.  A SET_IRQS is checked whole (flags, index, vector range, and
that every fd really is an eventfd) before anything changes, so a refused request
leaves the table as it was and has all its fds closed.  Raising a vector writes 1 to
its eventfd.  That write comes from device threads and from the socket thread (a
DATA_BOOL fire), with the table lock held, so it must never block or raise whatever
the client did to its eventfd: the eventfds are made non-blocking when accepted, a
saturated counter (EAGAIN) means the interrupt is already pending (counted as
coalesced), and any other failure is counted and logged once per vector.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import threading
from collections.abc import Sequence

from device.errors import VfioUserError
from device.vfio_user.protocol.constants import IRQ_SET_ACTION_MASK, IRQ_SET_DATA_MASK, IrqSetFlags
from device.vfio_user.protocol.messages import IrqInfo, SetIrqs

log = logging.getLogger(__name__)

_ONE = (1).to_bytes(8, "little")
_EVENTFD_LINK = "anon_inode:[eventfd]"  # what /proc/self/fd/N reads for an eventfd

Key = tuple[int, int]  # (IRQ index, vector)


class IrqLines:
    def __init__(self, infos: Sequence[IrqInfo]) -> None:
        self._lock = threading.Lock()
        self._counts = {info.index: info.count for info in infos}
        self._eventfds: dict[Key, int] = {}
        self._masked: set[Key] = set()
        self._pending: set[Key] = set()
        # Counters, for tests and tracing: eventfd writes done, raises that found the
        # counter saturated (the interrupt was pending already), writes that failed.
        self.fired: dict[Key, int] = {}
        self.coalesced: dict[Key, int] = {}
        self.failed: dict[Key, int] = {}
        self._failure_logged: set[Key] = set()

    def eventfd(self, index: int, vector: int) -> int | None:
        with self._lock:
            return self._eventfds.get((index, vector))

    def assigned(self, index: int) -> list[int]:
        with self._lock:
            return sorted(v for (i, v) in self._eventfds if i == index)

    def set_irqs(self, request: SetIrqs) -> None:
        """Apply a DEVICE_SET_IRQS.  Takes ownership of ``request.fds``."""
        fds = list(request.fds)
        try:
            self._apply(request, fds)
        finally:
            for fd in fds:  # whatever was not kept
                os.close(fd)

    def _apply(self, request: SetIrqs, fds: list[int]) -> None:
        data_type, action = self._check(request)
        vectors = range(request.start, request.start + request.count)
        if fds:
            _accept_eventfds(fds)
        with self._lock:
            if action != IrqSetFlags.ACTION_TRIGGER:
                self._set_mask_locked(request, vectors, action == IrqSetFlags.ACTION_MASK)
            elif data_type == IrqSetFlags.DATA_EVENTFD:
                self._assign_locked(request.index, vectors, fds)
            elif data_type == IrqSetFlags.DATA_NONE and request.count == 0:
                self._disable_locked(request.index)
            else:
                for vector in self._selected(request, vectors):
                    self._raise_locked(request.index, vector)

    def _check(self, request: SetIrqs) -> tuple[int, int]:
        """Refuse a request this device cannot apply; return its data type and action."""
        data_type = request.flags & IRQ_SET_DATA_MASK
        action = request.flags & IRQ_SET_ACTION_MASK
        if request.flags & ~(IRQ_SET_DATA_MASK | IRQ_SET_ACTION_MASK):
            raise VfioUserError(errno.EINVAL, f"unknown SET_IRQS flags {request.flags:#x}")
        if bin(data_type).count("1") != 1 or bin(action).count("1") != 1:
            raise VfioUserError(errno.EINVAL, "SET_IRQS needs exactly one data and one action")
        count = self._counts.get(request.index)
        if count is None:
            raise VfioUserError(errno.EINVAL, f"no IRQ index {request.index}")
        if request.start + request.count > count or request.start > count:
            raise VfioUserError(
                errno.EINVAL,
                f"vectors {request.start}+{request.count} beyond index {request.index}'s {count}",
            )
        if data_type == IrqSetFlags.DATA_EVENTFD and action != IrqSetFlags.ACTION_TRIGGER:
            # Resample/unmask eventfds are an INTx+KVM feature this device does not offer.
            raise VfioUserError(errno.ENOTSUP, "eventfds are only accepted for ACTION_TRIGGER")
        return data_type, action

    def _assign_locked(self, index: int, vectors: range, fds: list[int]) -> None:
        """ACTION_TRIGGER|DATA_EVENTFD: take ``fds`` for ``vectors``; none de-assigns."""
        for n, vector in enumerate(vectors):
            key = (index, vector)
            old = self._eventfds.pop(key, None)
            if old is not None:
                os.close(old)
            self._failure_logged.discard(key)  # a new eventfd gets its own warning
            if fds:
                self._eventfds[key] = fds[n]
        fds.clear()  # now owned by the table

    def _set_mask_locked(self, request: SetIrqs, vectors: range, masking: bool) -> None:
        """ACTION_MASK/UNMASK; unmasking fires what was raised while masked."""
        for vector in self._selected(request, vectors):
            key = (request.index, vector)
            if masking:
                self._masked.add(key)
                continue
            self._masked.discard(key)
            if key in self._pending:
                self._pending.discard(key)
                self._raise_locked(*key)

    @staticmethod
    def _selected(request: SetIrqs, vectors: range) -> list[int]:
        if request.flags & IrqSetFlags.DATA_BOOL:
            return [v for v, flag in zip(vectors, request.data, strict=True) if flag]
        return list(vectors)

    def raise_irq(self, index: int, vector: int = 0) -> bool:
        """Signal a vector's eventfd; returns False when it has none, is masked or the
        signal failed.  Never raises and never blocks, whatever the client did."""
        with self._lock:
            return self._raise_locked(index, vector)

    def _raise_locked(self, index: int, vector: int) -> bool:
        key = (index, vector)
        if key in self._masked:
            self._pending.add(key)
            return False
        fd = self._eventfds.get(key)
        if fd is None:
            return False
        try:
            os.write(fd, _ONE)
        except BlockingIOError:
            # The counter is saturated: the client has not read it since, so the
            # interrupt is pending already and this one coalesces with it.
            self.coalesced[key] = self.coalesced.get(key, 0) + 1
            return True
        except OSError as exc:
            self.failed[key] = self.failed.get(key, 0) + 1
            if key not in self._failure_logged:
                self._failure_logged.add(key)
                log.warning("IRQ %d vector %d: signalling its eventfd failed: %s", *key, exc)
            return False
        self.fired[key] = self.fired.get(key, 0) + 1
        return True

    def _disable_locked(self, index: int) -> None:
        for key in [k for k in self._eventfds if k[0] == index]:
            os.close(self._eventfds.pop(key))
        self._masked = {k for k in self._masked if k[0] != index}
        self._pending = {k for k in self._pending if k[0] != index}

    def close(self) -> None:
        with self._lock:
            for fd in self._eventfds.values():
                os.close(fd)
            self._eventfds.clear()
            self._masked.clear()
            self._pending.clear()


def _accept_eventfds(fds: list[int]) -> None:
    """Refuse the request unless every fd is an eventfd; make them all non-blocking.

    Checked for all fds before any is changed or kept, so a refusal changes nothing
    (the caller closes them all).  O_NONBLOCK is a flag of the open file description,
    which SCM_RIGHTS shares with the client: setting it changes QEMU's side too.
    That is fine: QEMU's event notifiers are created non-blocking anyway, and a
    blocking write here could hang a device thread or the socket thread for good on
    a counter the client never reads."""
    for n, fd in enumerate(fds):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError as exc:
            raise VfioUserError(
                errno.EINVAL, f"SET_IRQS fd #{n}: cannot inspect it: {exc}"
            ) from None
        if target != _EVENTFD_LINK:
            raise VfioUserError(errno.EINVAL, f"SET_IRQS fd #{n} is not an eventfd but {target!r}")
    for n, fd in enumerate(fds):
        try:
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)
        except OSError as exc:
            raise VfioUserError(
                errno.EINVAL, f"SET_IRQS fd #{n}: cannot make it non-blocking: {exc}"
            ) from None
