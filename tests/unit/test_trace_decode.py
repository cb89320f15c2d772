"""Traces in the driver's words: a real driver session traced and decoded from the
register and command tables, the Perfetto timeline (tracks, flows from submit to
fence), ``mgpu trace decode FILE`` and ``mgpu trace show --decode``, and records that
are not what the trace module writes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from device import trace
from device.control import cli
from device.gpu import abi
from device.gpu.engine.commands import Opcode, encode
from device.gpu.modes import DeniedPolicy, MappingMode
from device.gpu.regs import table as regs
from device.harness.driver import MgpuDriver
from device.insight import names
from device.insight.decode import Decoder, Line, RecordError
from device.insight.perfetto import chrome_trace
from device.vfio_user.client import VfioUserClient
from device.vfio_user.protocol.constants import PciRegion
from tests.helpers import wait_until
from tests.unit.conftest import ServeInstance

ROOT = Path(__file__).resolve().parents[2]
Record = dict[str, Any]


@pytest.fixture
def tracing() -> Iterator[None]:
    trace.clear()
    trace.start()
    try:
        yield
    finally:
        trace.stop()
        trace.clear()


def session(serve_instance: ServeInstance, name: str) -> list[Record]:
    """A driver's session, traced: a resource, a ring submission with a fence, a bad
    resource command, and reads of offsets no register has."""
    endpoint = serve_instance(name=name)
    with VfioUserClient.connect(endpoint.path) as client:
        driver = MgpuDriver(client)
        try:
            handle = driver.create(8192)
            driver.place(handle)
            source = driver.ram.alloc(4096)
            write = encode(
                Opcode.WRITE_RESOURCE, guest_addr=source, handle=handle, offset=0, length=4096
            )
            driver.run(write, encode(Opcode.NOP))
            driver.write("RES_HANDLE", 99)
            driver.write("RES_COMMAND", abi.ResourceCommand.DESTROY)
            driver.read("RES_STATUS")
            client.read32(PciRegion.BAR0, 0x3C)
            client.read32(PciRegion.BAR0, 0x1000)
        finally:
            driver.close()
    return [r for r in trace.records() if r["instance"] == name]


def texts(lines: list[Line]) -> list[str]:
    return [line.text for line in lines]


# ---------------------------------------------------------------------- decoding


def test_a_driver_session_reads_in_the_drivers_words(
    serve_instance: ServeInstance, tracing: None
) -> None:
    lines = Decoder().decode_all(session(serve_instance, "words"))
    said = texts(lines)
    for expected in [
        'ID -> 0x4d475055: "MGPU"',
        "CTX0_RING_CONTROL <- 0x1: enable the ring: base 0x10000000, 64 KiB",
        "CTX0_RING_STATUS -> 0x1: IDLE",
        "RES_COMMAND <- 0x1: CREATE 8 KiB",
        "RES_STATUS -> 0x0: no error",
        "RES_COMMAND <- 0x3: PLACE resource 1",
        "CTX0_RING_TAIL <- 0xc0: 3 commands queued",
        "CTX0_DOORBELL <- 0x1: run commands up to 0xc0",
        "CTX0 command @0x0 starts",
        "CTX0 fetch the command @0x0",
        "CTX0 DMA read 4 KiB from guest 0x10011000",
        "CTX0 command @0x80 done",
        "IRQ vector 0 (FENCE)",
        "INT_ACK <- 0x1: acknowledge FENCE",
        "RES_COMMAND <- 0x2: DESTROY resource 99",
        "IRQ vector 1 (ERROR)",
        "RES_STATUS -> 0x2: INVALID_HANDLE",
        "RESOURCE+0x8 (unmodeled) -> 0x0",
        "BAR0+0x1000 (unmodeled) -> 0x0",
    ]:
        assert expected in said, f"{expected!r} not in:\n" + "\n".join(said)
    queued = [line for line in lines if line.submits]
    assert [line.submits for line in queued] == [3]
    submission = queued[0].submission
    linked = [line.text for line in lines if line.submission == submission]
    assert linked[0].startswith("CTX0_RING_TAIL") and "IRQ vector 0 (FENCE)" in linked
    assert sum(1 for t in linked if t.endswith(" done")) == 3, "its three commands"


def test_a_denied_aperture_access_names_its_page_and_policy(
    serve_instance: ServeInstance, tracing: None
) -> None:
    endpoint = serve_instance(name="denied", mapping=MappingMode.TRAP, denied=DeniedPolicy.REPORT)
    with VfioUserClient.connect(endpoint.path) as client:
        assert client.read32(PciRegion.BAR2, 0x4000) == 0xFFFFFFFF
        client.read32(PciRegion.BAR0, regs.BY_NAME["FAULT_OFFSET_LO"].offset)
    said = texts(Decoder().decode_all(r for r in trace.records() if r["instance"] == "denied"))
    report = "FAULT page 0x4: unmapped, policy report (all ones, FAULT registers and interrupt)"
    assert report in said
    assert "IRQ vector 3 (FAULT)" in said
    assert "FAULT_OFFSET_LO -> 0x4000: page 0x4" in said
    assert "aperture 0x4000[4] (trapped) -> 0xffffffff" in said


def register(seq: int, name: str, value: int, write: bool = True, size: int = 4) -> Record:
    offset = regs.BY_NAME[name].offset
    return {
        "seq": seq, "ts": seq / 1000, "instance": "g", "kind": "register", "ph": "i",
        "region": 0, "offset": offset, "size": size, "value": value, "write": write,
    }  # fmt: skip


def test_a_tail_that_wraps_queues_the_commands_between() -> None:
    decoder = Decoder()
    records = [
        register(1, "CTX1_RING_SIZE", 4096),
        register(2, "CTX1_RING_CONTROL", 1),
        register(3, "CTX1_RING_TAIL", 0xFC0),
        register(4, "CTX1_RING_TAIL", 0x40),
        register(5, "CTX1_RING_TAIL", 0x40),
        register(6, "CTX1_RING_TAIL", 0x44),
        register(7, "CTX1_RING_HEAD", 0xFC0, write=False),
    ]
    said = texts(decoder.decode_all(records))
    assert said[2] == "CTX1_RING_TAIL <- 0xfc0: 63 commands queued"
    assert said[3] == "CTX1_RING_TAIL <- 0x40: 2 commands queued", "across the end of the ring"
    assert said[4] == "CTX1_RING_TAIL <- 0x40: nothing new queued"
    assert said[5] == "CTX1_RING_TAIL <- 0x44: not a whole number of commands past 0x40"
    assert said[6] == "CTX1_RING_HEAD -> 0xfc0: 2 commands pending"


def test_a_reset_or_a_disabled_ring_queues_nothing() -> None:
    records = [
        register(1, "CTX0_RING_SIZE", 4096),
        register(2, "CTX0_RING_CONTROL", 1),
        register(3, "CTX0_RING_TAIL", 0x80),
        register(4, "DEVICE_RESET", 1),
        register(5, "CTX0_RING_TAIL", 0x40),
        register(6, "CTX0_RING_CONTROL", 1),
        register(7, "CTX0_RING_TAIL", 0x40),
    ]
    said = texts(Decoder().decode_all(records))
    assert said[3] == "DEVICE_RESET <- 0x1: reset the instance"
    assert said[4] == "CTX0_RING_TAIL <- 0x40: the ring is disabled: nothing runs"
    enable = "CTX0_RING_CONTROL <- 0x1: enable the ring: base 0x0, 0 bytes"
    assert said[5] == f"{enable} (not a valid ring: it goes to ERROR)"
    assert said[6] == "CTX0_RING_TAIL <- 0x40: 1 command queued"


def test_a_trace_that_began_late_says_what_it_cannot_know() -> None:
    said = texts(Decoder().decode_all([register(1, "CTX2_RING_TAIL", 0x80)]))
    assert said == ["CTX2_RING_TAIL <- 0x80: the tail before is unknown (tracing began later)"]


def test_accesses_of_other_widths_and_regions_are_named() -> None:
    scratch = regs.BY_NAME["SCRATCH"].offset
    records = [
        {**register(1, "SCRATCH", 0xAA, size=1), "offset": scratch + 1},
        register(2, "CTX0_RING_BASE_LO", 0x1_0000_0040, size=8),
        {**register(3, "ID", 0x6, size=2), "region": 7, "offset": 4},
        {**register(4, "ID", 0, size=4), "region": 4, "offset": 0x2000, "write": False},
        {**register(5, "DEVICE_RESET", 1), "dropped": True},
    ]
    said = texts(Decoder().decode_all(records))
    assert said == [
        "SCRATCH+1[1] <- 0xaa",
        "CTX0_RING_BASE_LO[8] <- 0x100000040",
        "config COMMAND <- 0x6",
        "MSI-X PBA +0x2000 -> 0x0",
        "DEVICE_RESET <- 0x1 (dropped: the device is removed)",
    ]


def test_synthetic_fault_records_of_every_kind() -> None:
    def fault(seq: int, kind: str, name: str, **extra: object) -> Record:
        base = {"seq": seq, "ts": 0.0, "instance": "g", "kind": kind, "ph": "i"}
        return {**base, "name": name, "offset": 0x1234000, "length": 4096, **extra}

    said = texts(
        Decoder().decode_all(
            [
                fault(1, "fault", "served", handle=3, length=8192),
                fault(2, "fault", "denied", write=True),
                fault(3, "fault", "dummy"),
                fault(4, "revoke", "revoked", length=3 * 4096),
                fault(5, "writeback", "write_dropped"),
                fault(6, "page_in", "paged_in", handle=3),
            ]
        )
    )
    assert said == [
        "FAULT page 0x1234 (2 pages): served of resource 3",
        "FAULT page 0x1234 (write): unmapped, policy sigbus (refused (SIGBUS in fault mode))",
        "FAULT page 0x1234: unmapped, policy dummy (zero page, writes dropped)",
        "REVOKE page 0x1234 (3 pages)",
        "WRITE DROPPED page 0x1234: unmapped",
        "PAGE-IN page 0x1234 of resource 3",
    ]


def test_unmodeled_offsets_are_named_by_the_block_they_fall_in() -> None:
    assert names.bar0_name(regs.BY_NAME["DMA_ERROR"].offset + 4) == "DMA+0x1c (unmodeled)"
    assert names.bar0_name(abi.CONTEXT_BLOCK + abi.CONTEXT_STRIDE + 0x28) == "CTX1+0x28 (unmodeled)"
    assert names.bar0_name(abi.BAR0_SIZE - 4) == "BAR0+0xfffc (unmodeled)"


BAD_RECORDS: list[tuple[object, str]] = [
    ([1, 2], "a JSON object"),
    ({"seq": 1, "ts": 0, "instance": "g"}, "no field 'kind'"),
    ({"seq": 1, "ts": 0, "instance": "g", "kind": "nope"}, "unknown kind"),
    ({"seq": "1", "ts": 0, "instance": "g", "kind": "irq", "vectors": []}, "field 'seq'"),
    ({"seq": 1, "ts": True, "instance": "g", "kind": "irq", "vectors": []}, "field 'ts'"),
    ({"seq": 1, "ts": 0, "instance": 5, "kind": "irq", "vectors": []}, "field 'instance'"),
    ({"seq": 1, "ts": 0, "instance": "g", "kind": "irq", "vectors": ["x"]}, "not integers"),
    ({"seq": 1, "ts": 0, "instance": "g", "kind": "irq", "vectors": [], "ph": "Z"}, "phase"),
    ({**register(1, "SCRATCH", 0), "value": "0x5"}, "field 'value'"),
    ({**register(1, "SCRATCH", 0), "region": None}, "field 'region'"),
    ({"seq": 1, "ts": 0, "instance": "g", "kind": "command", "context": 9, "ring_offset": 0},
     "context 9"),
]  # fmt: skip


@pytest.mark.parametrize(("record", "reason"), BAD_RECORDS)
def test_a_record_that_is_not_one_is_a_record_error(record: object, reason: str) -> None:
    with pytest.raises(RecordError, match=reason):
        Decoder().decode(record)  # type: ignore[arg-type]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)
record_fields = st.fixed_dictionaries(
    {
        "seq": st.integers(0, 100) | json_values,
        "ts": st.floats(0, 10) | json_values,
        "instance": st.sampled_from(["a", "b"]) | json_values,
        "kind": st.sampled_from(sorted(trace.KINDS)) | json_values,
    },
    optional={
        "ph": st.sampled_from(["B", "E", "i"]) | json_values,
        "region": st.sampled_from([0, 2, 4, 7, 9]) | json_values,
        "offset": st.integers(-10, 1 << 17) | json_values,
        "size": st.sampled_from([1, 2, 4, 8]) | json_values,
        "value": st.integers(0, 1 << 64) | json_values,
        "write": st.booleans() | json_values,
        "context": st.integers(-1, 5) | json_values,
        "ring_offset": st.integers(0, 1 << 16) | json_values,
        "vectors": st.lists(st.integers(0, 9), max_size=3) | json_values,
        "name": st.sampled_from(["served", "reported", "bring-up", "ctx0"]) | json_values,
        "length": st.integers(0, 1 << 20) | json_values,
        "op": st.sampled_from(["read", "write"]) | json_values,
        "result": st.sampled_from(["done", "DMA_FAULT"]) | json_values,
        "error": st.integers(0, 200) | json_values,
        "handle": json_values,
        "opcode": st.integers(0, 12) | json_values,
    },
)


@settings(max_examples=300, deadline=None)
@given(st.lists(record_fields, max_size=12))
def test_any_json_record_decodes_or_is_a_record_error(records: list[Record]) -> None:
    decoder = Decoder()
    for record in records:
        try:
            line = decoder.decode(record)
        except RecordError:
            continue
        assert isinstance(line.text, str) and line.text


# ---------------------------------------------------------------------- Perfetto


def test_perfetto_has_named_tracks_and_a_flow_from_submit_to_fence(
    serve_instance: ServeInstance, tracing: None
) -> None:
    document = chrome_trace(session(serve_instance, "timeline"))
    events = document["traceEvents"]
    processes = [e["args"]["name"] for e in events if e["name"] == "process_name"]
    tracks = {e["args"]["name"] for e in events if e["name"] == "thread_name"}
    assert processes == ["timeline"]
    assert {"reg CTX0_RING_TAIL", "reg RES_COMMAND", "ring 0", "engine", "interrupts"} <= tracks
    assert all(e["ph"] in ("X", "M") for e in events), "begin and end records make one slice"
    flows: dict[int, list[dict[str, Any]]] = {}
    for event in events:
        if "bind_id" in event:
            flows.setdefault(event["bind_id"], []).append(event)
    (chain,) = flows.values()
    chain.sort(key=lambda e: e["ts"])
    assert chain[0]["name"] == "CTX0_RING_TAIL <- 0xc0: 3 commands queued"
    assert [e["name"] for e in chain[1:4]] == [
        "CTX0 command @0x0 done", "CTX0 command @0x40 done", "CTX0 command @0x80 done",
    ]  # fmt: skip
    assert chain[-1]["name"] == "IRQ vector 0 (FENCE)"
    assert (chain[0]["flow_in"], chain[0]["flow_out"]) == (False, True)
    assert all(e["flow_in"] and e["flow_out"] for e in chain[1:-1])
    assert (chain[-1]["flow_in"], chain[-1]["flow_out"]) == (True, False)
    command = chain[1]
    assert command["dur"] > 1.0 and command["args"]["result"] == "done"


# ---------------------------------------------------------------------- the command line


def test_mgpu_trace_decode_reads_a_saved_file(
    serve_instance: ServeInstance, short_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    saved = short_tmp / "trace.jsonl"
    trace.clear()
    trace.start(jsonl=saved)
    try:
        session(serve_instance, "saved")
    finally:
        trace.stop()
        trace.clear()
    timeline = short_tmp / "trace.json"
    assert cli.main(["trace", "decode", str(saved), "--perfetto", str(timeline)]) == 0
    out = capsys.readouterr()
    assert "CTX0_RING_TAIL <- 0xc0: 3 commands queued" in out.out
    assert out.out.splitlines()[0].split()[1] == "+0.000000"
    assert "records in" in out.err
    assert json.loads(timeline.read_text())["traceEvents"]
    assert cli.main(["trace", "decode", str(saved), "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {"seq", "ts", "instance", "kind", "track", "submission", "text"} == set(rows[0])


def test_a_corrupt_file_is_decoded_where_it_can_be_and_its_bad_lines_named(
    short_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = short_tmp / "bad.jsonl"
    good = json.dumps(register(1, "SCRATCH", 5))
    lines = [
        good,
        "{not json",
        "[1, 2]",
        json.dumps({**register(2, "SCRATCH", 0), "value": "x"}),
        "x" * (2 << 20),
        "",
        json.dumps(register(3, "SCRATCH", 6)),
    ]
    path.write_text("\n".join(lines) + "\n")
    assert cli.main(["trace", "decode", str(path)]) == 1
    out = capsys.readouterr()
    assert out.out.count("SCRATCH <- ") == 2, "both good records are decoded"
    for number, reason in ((2, "not JSON"), (3, "a JSON list"), (4, "field 'value'"),
                           (5, "longer than")):  # fmt: skip
        assert f"{path}:{number}: not a trace record: {reason}" in out.err
    assert "4 lines" in out.err
    assert cli.main(["trace", "decode", str(short_tmp / "missing.jsonl")]) == 1
    assert "cannot read" in capsys.readouterr().err


def test_mgpu_trace_show_decode_from_a_running_server(short_tmp: Path) -> None:
    control, gpu = short_tmp / "control.sock", short_tmp / "gpu.sock"
    env = {**os.environ, "MGPU_CONTROL": str(control), "PYTHONPATH": str(ROOT)}
    server = subprocess.Popen(
        [sys.executable, "-m", "device", "serve", "--control", str(control)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip

    def mgpu(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "device", *args], env=env, capture_output=True, text=True,
            timeout=60,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        return done.stdout

    try:
        wait_until(control.exists, 30, "the control socket", 0.05)
        mgpu("start", "--type", "mgpu-64", "--uuid", "live", "--socket", str(gpu))
        mgpu("trace", "start")
        with VfioUserClient.connect(gpu) as client:
            client.write32(PciRegion.BAR0, regs.BY_NAME["INT_MASK"].offset, 0x5)
            client.read32(PciRegion.BAR0, regs.BY_NAME["VERSION"].offset)
        shown = mgpu("trace", "show", "--decode")
        assert "live  INT_MASK <- 0x5: mask FENCE|DMA" in shown
        version = abi.VERSION_MAJOR << 16 | abi.VERSION_MINOR
        assert f"VERSION -> {version:#x}: {abi.VERSION_MAJOR}.{abi.VERSION_MINOR}" in shown
        decoded = json.loads(mgpu("trace", "show", "--decode", "--json"))["decoded"]
        assert decoded[0]["text"] == "INT_MASK <- 0x5: mask FENCE|DMA"
        timeline = short_tmp / "live.json"
        mgpu("trace", "stop", "--perfetto", str(timeline))
        tracks = {
            e["args"]["name"]
            for e in json.loads(timeline.read_text())["traceEvents"]
            if e["name"] == "thread_name"
        }
        assert tracks == {"reg INT_MASK", "reg VERSION"}
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(30)
