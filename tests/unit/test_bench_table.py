"""The benchmark table flags what got worse against the reference, by ratio."""

from __future__ import annotations

from bench.common import Row, table


def test_rows_worse_than_the_reference_by_30_percent_are_flagged() -> None:
    reference = {
        "a": {"compared": 1.0},  # ratio 1.0 then
        "b": {"compared": 1.0},
        "c": {"compared": 2.0},  # higher is better: 2.0 then
        "d": {"compared": 5.0},  # no baseline: the median is compared
    }
    rows = [
        Row("a", "lower is better, 40% worse", "us", 14.0, baseline=10.0),
        Row("b", "lower is better, 20% worse", "us", 12.0, baseline=10.0),
        Row("c", "higher is better, halved", "MB/s", 10.0, baseline=10.0, higher_is_better=True),
        Row("d", "absolute, better", "MiB", 4.0),
        Row("e", "new row", "us", 1.0),
    ]
    lines, worse = table(rows, reference)
    assert worse == ["a", "c"]
    assert len(lines) == 1 + len(rows)
    assert lines[1].endswith("+40% WORSE") and lines[5].endswith("new")
    assert lines[4].endswith("-20%")


def test_targets_are_met_on_the_ratio_or_the_value() -> None:
    assert Row("t", "", "us", 11.0, baseline=10.0, target=1.2).met()
    assert not Row("t", "", "us", 13.0, baseline=10.0, target=1.2).met()
    assert not Row("t", "", "MB/s", 7.0, baseline=10.0, target=0.8, higher_is_better=True).met()
    assert Row("t", "", "us", 2.0, target_value=3.0).met()
    assert Row("t", "", "us", 2.0).met() is None
