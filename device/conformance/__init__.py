"""A vfio-user conformance suite that runs against any server by its socket path.

    python -m device.conformance --socket PATH [--json] [--timeout S] [--launch CMD]

It is a client of the protocol and nothing else: it imports only the protocol codec,
and knows of the device only what the server says in VERSION, DEVICE_GET_INFO,
DEVICE_GET_REGION_INFO and DEVICE_GET_IRQ_INFO.  Its checks (``suite.CHECKS``, listed
in ``docs/conformance.md``) come from the protocol specification (QEMU's
``docs/interop/vfio-user.rst``) and from what QEMU's client needs; each is a good or a
hostile client's request, grouped by the message it is about.

    wire             one connection where every wait has a deadline
    suite            the check table, the device description, a check's Trial
    checks_session   VERSION, message ids, ordering, No_reply, broken framing
    checks_device    DEVICE_GET_INFO, REGION_INFO, IRQ_INFO, SET_IRQS
    checks_access    REGION_READ/WRITE(_MULTI), DMA_MAP/UNMAP, DEVICE_RESET
    runner           isolated, bounded runs; a server that dies is reported
    report           per message, text or JSON
"""

from device.conformance import checks_access, checks_device, checks_session
from device.conformance.runner import LaunchedTarget, Outcome, Report, SocketTarget, run
from device.conformance.suite import CHECKS, Check, put_in_order

put_in_order()

__all__ = [
    "CHECKS",
    "Check",
    "LaunchedTarget",
    "Outcome",
    "Report",
    "SocketTarget",
    "checks_access",
    "checks_device",
    "checks_session",
    "run",
]
