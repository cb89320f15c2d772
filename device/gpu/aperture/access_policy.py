"""The one decision of what a denied aperture access gets, for the fault path (a first
touch served by the FUSE file) and the trapped path (a REGION message) alike.

``sigbus`` refuses (in fault mode QEMU gets SIGBUS and the VM dies, as on real
hardware; in trap mode the access fails and QEMU reads all ones), ``dummy`` gives
zeros and drops writes, ``report`` gives all ones, drops writes, and reports the
access to the driver through the FAULT registers and interrupt.
"""

from __future__ import annotations

from typing import NamedTuple

from device.gpu.modes import DeniedPolicy


class Denial(NamedTuple):
    refuse: bool  # the access fails (SIGBUS for a fault, an errno reply for a message)
    fill: int  # otherwise reads see this byte everywhere; writes are dropped
    report: bool  # latch the FAULT registers and raise the FAULT interrupt
    record: str  # the fault log's kind for this outcome


_DECISIONS = {
    DeniedPolicy.SIGBUS: Denial(refuse=True, fill=0, report=False, record="denied"),
    DeniedPolicy.DUMMY: Denial(refuse=False, fill=0x00, report=False, record="dummy"),
    DeniedPolicy.REPORT: Denial(refuse=False, fill=0xFF, report=True, record="reported"),
}


def denied_access(policy: DeniedPolicy) -> Denial:
    return _DECISIONS[policy]
