"""What every benchmark here shares: percentiles, rows, the table, JSON and the reference.

A *row* is one figure of the performance table: its median and p99, the median of a
baseline measured in the same run (the ratio between the two is what is compared from
run to run: absolute times on these shared 2-core machines move with load), and its
target.  ``bench.__main__`` runs the groups of rows, prints them in one table, compares
each with ``bench/reference.json`` (the figures of the last accepted change) and flags
any that got more than ``WORSE_FACTOR`` worse.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
REFERENCE = ROOT / "bench" / "reference.json"
WORSE_FACTOR = 1.3  # a row this much worse than the reference is flagged


def percentile(samples: Sequence[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def publish(results: Mapping[str, object], path: Path) -> None:
    """Write the results as JSON and print them on one line (after the table)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results))


@dataclass
class Row:
    """One figure: ``median``/``p99`` in ``unit``, against ``baseline`` (same unit, same
    run) when there is one.  ``target`` is the ratio to reach (``lower`` is better
    unless ``higher_is_better``), or ``target_value`` an absolute bound in ``unit``."""

    key: str
    label: str
    unit: str
    median: float
    p99: float | None = None
    baseline_label: str = ""
    baseline: float | None = None
    target: float | None = None  # on the ratio
    target_value: float | None = None  # on the median, where there is no baseline
    higher_is_better: bool = False
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.baseline is None or not self.baseline or not self.median:
            return None
        return self.median / self.baseline

    @property
    def compared(self) -> float:
        """What is compared with the reference: the ratio where there is one."""
        ratio = self.ratio
        return ratio if ratio is not None else self.median

    def met(self) -> bool | None:
        ratio = self.ratio
        if self.target is not None and ratio is not None:
            return ratio >= self.target if self.higher_is_better else ratio <= self.target
        if self.target_value is not None:
            if self.higher_is_better:
                return self.median >= self.target_value
            return self.median <= self.target_value
        return None

    def change(self, reference: Mapping[str, Any] | None) -> float | None:
        """How much worse (> 1) or better (< 1) than the reference row, as a factor."""
        if not reference:
            return None
        then = reference.get("compared")
        if not isinstance(then, int | float) or not then or not self.compared:
            return None
        factor = self.compared / then
        return 1 / factor if self.higher_is_better else factor

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["ratio"] = _round(self.ratio)
        data["compared"] = _round(self.compared)
        data["met"] = self.met()
        return data


def row_from(
    key: str,
    label: str,
    unit: str,
    samples: Sequence[float],
    baseline: Sequence[float] | None = None,
    **kwargs: Any,
) -> Row:
    """A row from raw samples (and the baseline's samples)."""
    return Row(
        key,
        label,
        unit,
        statistics.median(samples),
        percentile(samples, 0.99),
        baseline=statistics.median(baseline) if baseline else None,
        **kwargs,
    )


def _round(value: float | None, digits: int = 4) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return round(value, digits - max(0, int(math.log10(abs(value) or 1)) + 1) + 1)


def _number(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) >= 1000:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _target(row: Row) -> str:
    sign = ">=" if row.higher_is_better else "<="
    if row.target is not None:
        return f"{sign}{row.target:g}x"
    if row.target_value is not None:
        return f"{sign}{row.target_value:g}"
    return ""


def table(rows: Iterable[Row], reference: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """The table's lines, and the keys of rows worse than the reference by WORSE_FACTOR."""
    lines = [
        f"{'row':<36}{'unit':>8}{'median':>8}{'p99':>8}  {'baseline':<15}{'ratio':>7}"
        f"{'target':>8} {'vs ref':>7}"
    ]
    worse: list[str] = []
    for row in rows:
        ratio = f"{row.ratio:.2f}x" if row.ratio is not None else "-"
        met = row.met()
        mark = "" if met is None else (" " if met else "!")
        change = row.change(reference.get(row.key))
        if change is None:
            versus = "new"
        else:
            versus = f"{100 * (change - 1):+.0f}%"
            if change > WORSE_FACTOR:
                versus += " WORSE"
                worse.append(row.key)
        base = f"{row.baseline_label} {_number(row.baseline)}" if row.baseline_label else ""
        lines.append(
            f"{row.label[:36]:<36}{row.unit[:8]:>8}{_number(row.median):>8}"
            f"{_number(row.p99):>8}  {base[:15]:<15}{ratio:>7}{_target(row) + mark:>8} {versus}"
        )
    return lines, worse
