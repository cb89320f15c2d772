"""How an instance is configured, as enums every layer shares (CLI, launcher, control
plane, device model): its interrupt mode, its aperture mapping mode and what a
denied aperture access gets."""

from __future__ import annotations

import enum


class _Choice(enum.Enum):
    """An enum whose members print as their value (argparse shows them so)."""

    def __str__(self) -> str:
        return str(self.value)


class InterruptMode(_Choice):
    """MSI-X (8 vectors, as on real GPUs) or MSI (4 vectors).  QEMU 11.1.3 aborts when it
    hot-unplugs a vfio-user device that has MSI-X, so instances meant to be
    hot-unplugged use MSI."""

    MSIX = "msix"
    MSI = "msi"


class MappingMode(_Choice):
    """How the guest reaches the BAR2 aperture (see ``device.gpu.aperture.window``)."""

    STATIC = "static"  # QEMU maps the private memory at realize; no touch is seen
    FAULT = "fault"  # QEMU maps our FUSE file: each first touch is a fault callback
    TRAP = "trap"  # no mapping: every access is a REGION message


class DeniedPolicy(_Choice):
    """What a touch of an aperture page that backs no placed resource gets."""

    SIGBUS = "sigbus"  # refused: the VM dies (fault mode), the access fails (trap mode)
    DUMMY = "dummy"  # a zero page; writes are dropped
    REPORT = "report"  # all ones, writes dropped, and the FAULT registers and interrupt
