"""Instance types, in the manner of mdev types: what one GPU instance may use.

A type fixes an instance's device-memory quota and its context (command ring)
quota.  Creating an instance reserves both from the physical GPU, so
``available_instances`` of a type is what the pool has left divided by the type's
needs, as mdev's sysfs ``available_instances`` is.
"""

from __future__ import annotations

from dataclasses import dataclass

MiB = 1024 * 1024


@dataclass(frozen=True)
class InstanceType:
    name: str
    memory: int  # bytes of device memory, a power of two: the BAR2 aperture size too
    contexts: int  # command rings
    description: str

    def __post_init__(self) -> None:
        if self.memory < 4096 or self.memory & (self.memory - 1):
            raise ValueError(f"type {self.name}: memory must be a power of two >= 4 KiB")
        if not 1 <= self.contexts <= MAX_CONTEXTS_PER_INSTANCE:
            raise ValueError(f"type {self.name}: contexts must be 1..{MAX_CONTEXTS_PER_INSTANCE}")


MAX_CONTEXTS_PER_INSTANCE = 4

DEFAULT_TYPES: tuple[InstanceType, ...] = (
    InstanceType("mgpu-64", 64 * MiB, 1, "64 MiB of device memory, 1 context"),
    InstanceType("mgpu-256", 256 * MiB, 2, "256 MiB of device memory, 2 contexts"),
    InstanceType("mgpu-1024", 1024 * MiB, 4, "1 GiB of device memory, 4 contexts"),
)
