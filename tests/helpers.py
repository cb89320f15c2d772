"""Helpers the unit and the integration tests share."""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


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
