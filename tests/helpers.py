"""Helpers the unit and the integration tests share."""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from device.gpu import abi
from device.gpu.regs import table as regs
from device.vfio_user.client import VfioUserClient
from device.vfio_user.protocol.constants import PciRegion


@contextmanager
def short_tmp_dir(prefix: str = "mgpu-") -> Iterator[Path]:
    """A fresh directory under the system temp dir, removed with all it holds at the end.

    Unix socket paths are limited to 107 bytes; pytest's tmp paths can be longer."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def wait_until(
    predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.002
) -> float:
    """Poll ``predicate`` until it is true; returns the seconds that took.

    Raises AssertionError naming ``what`` it waited for if ``timeout`` seconds pass
    first.  ``interval=0`` polls without sleeping (for a predicate that itself waits,
    or whose polling is what makes progress)."""
    start = time.monotonic()
    deadline = start + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        if interval:
            time.sleep(interval)
    return time.monotonic() - start


def dma_register(name: str) -> int:
    return regs.BY_NAME[name].offset


def run_copy(client: VfioUserClient, command: int, guest: int, offset: int, length: int) -> int:
    """One bring-up DMA copy; polling its status lets the client answer DMA messages."""
    client.write32(PciRegion.BAR0, dma_register("DMA_GUEST_ADDR_LO"), guest & 0xFFFFFFFF)
    client.write32(PciRegion.BAR0, dma_register("DMA_GUEST_ADDR_HI"), guest >> 32)
    client.write32(PciRegion.BAR0, dma_register("DMA_APERTURE_OFFSET"), offset)
    client.write32(PciRegion.BAR0, dma_register("DMA_LENGTH"), length)
    client.write32(PciRegion.BAR0, dma_register("DMA_CONTROL"), command)
    for _ in range(100_000):
        status = client.read32(PciRegion.BAR0, dma_register("DMA_STATUS"))
        if status != abi.DmaStatus.BUSY:
            return status
    raise AssertionError("DMA never completed")
