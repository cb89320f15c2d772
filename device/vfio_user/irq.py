"""Interrupt lines of one client session: the eventfds set by DEVICE_SET_IRQS.

vfio semantics (linux/vfio.h, struct vfio_irq_set): for an IRQ index, ACTION_TRIGGER
with DATA_EVENTFD assigns eventfds to vectors [start, start+count) (QEMU sends no fds
to de-assign them); DATA_NONE with count 0 disables the whole index; DATA_NONE or
DATA_BOOL with a count fires the vectors (as if the device raised them).
ACTION_MASK/UNMASK mask vectors; an interrupt raised while masked stays pending and
fires on unmask.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Sequence

from device.errors import VfioUserError
from device.vfio_user.protocol.constants import IRQ_SET_ACTION_MASK, IRQ_SET_DATA_MASK, IrqSetFlags
from device.vfio_user.protocol.messages import IrqInfo, SetIrqs

_ONE = (1).to_bytes(8, "little")


class IrqLines:
    def __init__(self, infos: Sequence[IrqInfo]) -> None:
        self._lock = threading.Lock()
        self._counts = {info.index: info.count for info in infos}
        self._eventfds: dict[tuple[int, int], int] = {}
        self._masked: set[tuple[int, int]] = set()
        self._pending: set[tuple[int, int]] = set()
        self.fired: dict[tuple[int, int], int] = {}  # counters, for tests and tracing

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
        vectors = range(request.start, request.start + request.count)
        with self._lock:
            if action == IrqSetFlags.ACTION_TRIGGER:
                if data_type == IrqSetFlags.DATA_EVENTFD:
                    for n, vector in enumerate(vectors):
                        old = self._eventfds.pop((request.index, vector), None)
                        if old is not None:
                            os.close(old)
                        if fds:
                            self._eventfds[(request.index, vector)] = fds[n]
                    if fds:
                        fds.clear()  # now owned by the table
                elif data_type == IrqSetFlags.DATA_NONE and request.count == 0:
                    self._disable_locked(request.index)
                else:
                    fire = self._selected(request, vectors)
                    for vector in fire:
                        self._raise_locked(request.index, vector)
            else:
                masking = action == IrqSetFlags.ACTION_MASK
                for vector in self._selected(request, vectors):
                    key = (request.index, vector)
                    if masking:
                        self._masked.add(key)
                    else:
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
        """Signal a vector's eventfd; returns False when it has none or is masked."""
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
        os.write(fd, _ONE)
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
