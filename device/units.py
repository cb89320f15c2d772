"""Sizes used at every layer, defined once."""

from __future__ import annotations

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

PAGE_SIZE = 4 * KiB  # the host page, the guest page, the FUSE fault granule and the GPU page


def page_align_up(size: int) -> int:
    return (size + PAGE_SIZE - 1) // PAGE_SIZE * PAGE_SIZE


def page_align_down(offset: int) -> int:
    return offset // PAGE_SIZE * PAGE_SIZE
