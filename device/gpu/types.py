"""Instance types, in the manner of mdev types: what one GPU instance may use.

A type fixes an instance's device-memory *limit* (its quota: what its resources may
take from the shared pool at any time), its context (command ring) count, and the
size of its BAR2 aperture, which may be smaller than the quota (the driver then
windows through its memory by remapping, as with a small BAR1) or larger.
``available_instances`` follows from the limits, the contexts and the physical GPU's
overcommit ratio, as mdev's sysfs ``available_instances`` does.
"""

from __future__ import annotations

from dataclasses import dataclass

from device.units import PAGE_SIZE, MiB

MAX_CONTEXTS_PER_INSTANCE = 4


def _power_of_two(size: int) -> bool:
    return size >= PAGE_SIZE and not size & (size - 1)


@dataclass(frozen=True)
class InstanceType:
    name: str
    memory: int  # bytes of device memory the instance may hold at once (its quota)
    contexts: int  # command rings
    description: str
    aperture: int | None = None  # BAR2 size, a power of two; None: the quota

    def __post_init__(self) -> None:
        if not _power_of_two(self.memory):
            raise ValueError(f"type {self.name}: memory must be a power of two >= 4 KiB")
        if self.aperture is not None and not _power_of_two(self.aperture):
            raise ValueError(f"type {self.name}: the aperture must be a power of two >= 4 KiB")
        if not 1 <= self.contexts <= MAX_CONTEXTS_PER_INSTANCE:
            raise ValueError(f"type {self.name}: contexts must be 1..{MAX_CONTEXTS_PER_INSTANCE}")

    @property
    def aperture_size(self) -> int:
        return self.aperture if self.aperture is not None else self.memory


DEFAULT_TYPES: tuple[InstanceType, ...] = (
    InstanceType("mgpu-64", 64 * MiB, 1, "64 MiB of device memory, 1 context"),
    InstanceType("mgpu-256", 256 * MiB, 2, "256 MiB of device memory, 2 contexts"),
    InstanceType("mgpu-1024", 1024 * MiB, 4, "1 GiB of device memory, 4 contexts"),
    InstanceType(
        "mgpu-256-win64",
        256 * MiB,
        2,
        "256 MiB of device memory seen through a 64 MiB aperture window, 2 contexts",
        aperture=64 * MiB,
    ),
)
