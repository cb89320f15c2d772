"""The report of a run, per message: text for people, JSON for scripts."""

from __future__ import annotations

from typing import Any

from device.conformance.runner import Outcome, Report, Result
from device.conformance.suite import Device
from device.vfio_user.protocol.constants import DeviceFlags

MARKS = {Outcome.PASS: "pass", Outcome.FAIL: "FAIL", Outcome.SKIP: "skip", Outcome.NOT_RUN: "----"}


def by_message(results: list[Result]) -> dict[str, list[Result]]:
    grouped: dict[str, list[Result]] = {}
    for result in results:
        grouped.setdefault(result.check.message, []).append(result)
    return grouped


def summary(report: Report) -> str:
    counts = ", ".join(
        f"{report.count(o)} {word}"
        for o, word in ((Outcome.PASS, "passed"), (Outcome.FAIL, "failed"),
                        (Outcome.SKIP, "skipped"), (Outcome.NOT_RUN, "not run"))
        if report.count(o)
    )  # fmt: skip
    noun = "check" if len(report.results) == 1 else "checks"
    return f"{len(report.results)} {noun}: {counts or 'none'}"


def describe(device: Device) -> str:
    flags = [
        n for n, f in (("PCI", DeviceFlags.PCI), ("reset", DeviceFlags.RESET)) if device.flags & f
    ]
    return (
        f"{', '.join(flags) or 'no flags'}; {device.num_regions} regions, "
        f"{device.num_irqs} IRQ indexes; max_data_xfer_size {device.max_data_xfer}"
    )


def text(report: Report, verbose: bool = False) -> str:
    lines = [f"vfio-user conformance of {report.socket}: {summary(report)}"]
    if report.device is not None:
        lines.append(f"device: {describe(report.device)}")
    if report.problem:
        lines.append(f"run stopped: {report.problem}")
    if all(r.outcome is Outcome.NOT_RUN for r in report.results):
        return "\n".join(lines)  # nothing ran: the reason above is the whole story
    for message, results in by_message(report.results).items():
        passed = sum(1 for r in results if r.outcome is Outcome.PASS)
        lines += ["", f"{message}  ({passed}/{len(results)} passed)"]
        width = max(len(r.check.name) for r in results) + 8
        for result in results:
            name = f"{result.check.name} [{result.check.kind.value}]"
            line = f"  {MARKS[result.outcome]}  {name:<{width}}"
            if result.detail and result.outcome is not Outcome.NOT_RUN:
                line += f"  {result.detail}"
            lines.append(line.rstrip())
            if verbose or result.outcome is Outcome.FAIL:
                lines.append(f"        {result.check.source.value}: {result.check.doc}")
    return "\n".join(lines)


def to_json(report: Report) -> dict[str, Any]:
    return {
        "socket": report.socket,
        "passed": report.passed,
        "summary": {o.value: report.count(o) for o in Outcome},
        "problem": report.problem or None,
        "device": report.device.to_json() if report.device is not None else None,
        "messages": {
            message: [
                {
                    "check": r.check.name,
                    "kind": r.check.kind.value,
                    "source": r.check.source.value,
                    "outcome": r.outcome.value,
                    "detail": r.detail,
                    "seconds": round(r.seconds, 4),
                    "rule": r.check.doc,
                }
                for r in results
            ]
            for message, results in by_message(report.results).items()
        },
    }
