"""What every benchmark here shares: percentiles and writing the results."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def publish(results: Mapping[str, object], path: Path) -> None:
    """Write the results as JSON and print them on one line (after the table)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results))
