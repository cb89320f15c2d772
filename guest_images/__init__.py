"""The guest runtime: QEMU >= 10.1, a guest kernel and an initramfs with our programs.

    from guest_images import ensure_runtime
    runtime = ensure_runtime(progress=print)   # builds (cached) what is missing

Results that guest programs print as ``MGPU-RESULT key=value`` lines are read back
with ``parse_results``, the GPUs ``mgpu-probe find`` lists with ``parse_bdfs``;
``pattern_bytes`` is the test pattern ``mgpu-probe fill``
writes.
"""

from __future__ import annotations

import re

import numpy as np

from guest_images.build import BuildError, Runtime, cache_dir, ensure_runtime

__all__ = [
    "BuildError",
    "Runtime",
    "cache_dir",
    "ensure_runtime",
    "parse_bdfs",
    "parse_results",
    "pattern_bytes",
]

_RESULT = re.compile(r"^MGPU-RESULT (\w+)=(.*?)\s*$", re.MULTILINE)
_BDF = re.compile(r"^([0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7])$", re.MULTILINE)


def parse_results(text: str) -> dict[str, str]:
    """The ``MGPU-RESULT key=value`` lines of a guest program's output, as a dict."""
    return dict(_RESULT.findall(text))


def parse_bdfs(text: str) -> list[str]:
    """The PCI addresses ``mgpu-probe find`` prints, one a line (its details, on stderr,
    start with ``mgpu-probe:``)."""
    return _BDF.findall(text)


def pattern_bytes(length: int, seed: int) -> bytes:
    """What ``mgpu-probe fill`` writes: u32 word i = seed ^ (i * 2654435761) mod 2**32."""
    index = np.arange(length // 4, dtype=np.uint64)
    words = np.uint64(seed) ^ ((index * np.uint64(2654435761)) & np.uint64(0xFFFFFFFF))
    return words.astype("<u4").tobytes()
