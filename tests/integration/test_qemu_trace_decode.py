"""A real guest driver's session, traced and read back in the driver's words: its
ring submissions, the commands they queued and the fence interrupt that ended each,
linked in the Perfetto timeline."""

from __future__ import annotations

from typing import Any

import pytest

from device import trace
from device.harness.pytest_plugin import CreateGuest
from device.insight.decode import Decoder
from device.insight.perfetto import chrome_trace
from guest_images import parse_results
from tests.integration.conftest import CreateInstance

pytestmark = pytest.mark.qemu


def test_a_guest_drivers_ring_work_decodes_into_submissions_commands_and_fences(
    instance: CreateInstance, mgpu_vm: CreateGuest
) -> None:
    served = instance("traced")
    with mgpu_vm([served]) as vm:
        vm.check("modprobe mgpu")
        trace.clear()
        trace.start(instances=["traced"])
        try:
            result = parse_results(vm.check("mgpu-ring 0", timeout=120))
        finally:
            trace.stop()
        records = trace.records()
        trace.clear()
        assert result["fence"] == "42", result
        vm.check("rmmod mgpu")
        assert vm.quit() == 0
    lines = Decoder().decode_all(records)
    said = [line.text for line in lines]
    assert any(t.startswith("CTX0_RING_CONTROL <- 0x1: enable the ring: base 0x") for t in said)
    submits = [line for line in lines if line.submits]
    assert sum(line.submits for line in submits) == 8, "the 8 commands mgpu-ring runs"
    assert sum(1 for t in said if t.startswith("CTX0 command @") and t.endswith(" done")) == 8
    assert "IRQ vector 0 (FENCE)" in said
    assert any(t.startswith("RES_COMMAND <- 0x1: CREATE ") for t in said)
    fenced = {line.submission for line in lines if line.text == "IRQ vector 0 (FENCE)"}
    assert fenced and fenced <= {line.submission for line in submits}, "each fence ends a submit"
    events = chrome_trace(records)["traceEvents"]
    flows: dict[int, list[dict[str, Any]]] = {}
    for event in events:
        if "bind_id" in event:
            flows.setdefault(event["bind_id"], []).append(event)
    ends = [e["name"] for chain in flows.values() for e in chain if not e["flow_out"]]
    assert "IRQ vector 0 (FENCE)" in ends, "a flow runs from a submit to its fence"
