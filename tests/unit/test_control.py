"""The control socket through the real socket, with qemu.qmp's own clients: protocol,
error classes, queries, events, tracing and every injectable fault, observed by the
reference driver the way a guest driver would see it."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import ExecuteError, QMPClient
from qemu.qmp.legacy import QEMUMonitorProtocol

from device import trace
from device.control.commands import COMMANDS, Control
from device.control.manager import GpuServer, ServedInstance
from device.control.qmp import ControlServer, JsonSplitter
from device.gpu import abi, inject
from device.gpu.engine.commands import Opcode, encode
from device.gpu.memory.physical import PhysicalGpu
from device.harness.driver import DriverError, MgpuDriver
from device.vfio_user.client import VfioUserClient
from device.vfio_user.protocol.constants import PciRegion
from tests.helpers import wait_until


class Plane:
    def __init__(self, server: GpuServer, control: ControlServer, workdir: Path) -> None:
        self.server, self.control, self.workdir = server, control, workdir
        self.path = str(control.path)

    def qmp(self) -> QEMUMonitorProtocol:
        client = QEMUMonitorProtocol(self.path)
        client.connect()
        return client

    def add(self, name: str = "g0", **options: Any) -> ServedInstance:
        with self.qmp() as client:
            call(client, "instance-add", name=name, type="mgpu-64", **options)
        return self.server.instances[name]


@pytest.fixture
def plane(short_tmp: Path) -> Iterator[Plane]:
    with GpuServer(PhysicalGpu(256 << 20)) as server:
        control = ControlServer(short_tmp / "control.sock", Control(server, short_tmp))
        control.start()
        try:
            yield Plane(server, control, short_tmp)
        finally:
            control.stop()
            trace.stop()
            trace.clear()


@pytest.fixture
def driven(plane: Plane) -> Iterator[tuple[Plane, QEMUMonitorProtocol, MgpuDriver]]:
    served = plane.add("g0")
    client = VfioUserClient.connect(served.endpoint.path)
    driver = MgpuDriver(client)
    qmp = plane.qmp()
    try:
        yield plane, qmp, driver
    finally:
        qmp.close()
        driver.close()
        client.close()


def call(client: QEMUMonitorProtocol, command: str, **args: Any) -> Any:
    return client.cmd(command, **args)


def error_of(client: QEMUMonitorProtocol, command: str, **args: Any) -> tuple[str, str]:
    with pytest.raises(ExecuteError) as info:
        call(client, command, **args)
    return info.value.error_class, str(info.value)


# ---------------------------------------------------------------------- protocol


def test_qmp_client_negotiates_lists_commands_and_gets_events(plane: Plane) -> None:
    async def session() -> list[dict[str, Any]]:
        client = QMPClient("test")
        await client.connect(plane.path)
        assert client.greeting is not None
        assert client.greeting.QMP.version["package"] == "mgpu"
        listed: Any = await client.execute("query-commands")
        names = {c["name"] for c in listed}
        assert names == {"qmp_capabilities", *COMMANDS}
        seen: list[dict[str, Any]] = []
        with client.listener() as listener:
            await client.execute("instance-add", {"name": "a", "type": "mgpu-64"})
            vfio = await asyncio.to_thread(
                VfioUserClient.connect, plane.server.instances["a"].endpoint.path
            )
            await asyncio.to_thread(vfio.close)
            await client.execute("instance-del", {"name": "a"})
            while len(seen) < 4:
                event = await asyncio.wait_for(listener.get(), 5)
                seen.append(dict(event))
        await client.disconnect()
        return seen

    events = asyncio.run(session())
    assert [e["event"] for e in events] == [
        "INSTANCE_ADDED", "CLIENT_CONNECTED", "CLIENT_DISCONNECTED", "INSTANCE_DELETED",
    ]  # fmt: skip
    assert all(e["data"]["instance"] == "a" and "seconds" in e["timestamp"] for e in events)


def test_bad_input_gets_qmp_error_classes(plane: Plane) -> None:
    plane.add("g0")
    with plane.qmp() as client:
        assert error_of(client, "no-such-command")[0] == "CommandNotFound"
        assert error_of(client, "qmp_capabilities")[0] == "CommandNotFound"
        cls, desc = error_of(client, "instance-add", name=5, type="mgpu-64")
        assert (cls, desc) == (
            "GenericError",
            "Invalid parameter type for 'name', expected: string",
        )
        assert error_of(client, "instance-add", name="x") == (
            "GenericError", "Parameter 'type' is missing",
        )  # fmt: skip
        assert error_of(client, "query-resources", name="g0", bogus=1) == (
            "GenericError", "Parameter 'bogus' is unexpected",
        )  # fmt: skip
        cls, desc = error_of(client, "instance-add", name="g0", type="mgpu-64")
        assert cls == "GenericError" and "already exists" in desc
        cls, desc = error_of(client, "instance-add", name="g9", type="huge")
        assert cls == "GenericError" and "unknown instance type 'huge'" in desc
        cls, desc = error_of(client, "instance-add", name="g9", type="mgpu-64", mapping="x")
        assert cls == "GenericError" and "static" in desc
        assert error_of(client, "query-resources", name="nope")[0] == "DeviceNotFound"
        cls, desc = error_of(client, "inject-fault", name="g0", fault="irq-delay")
        assert cls == "GenericError" and "needs parameter 'delay'" in desc
        cls, desc = error_of(client, "inject-fault", name="g0", fault="engine-hang", count=2)
        assert cls == "GenericError" and "no parameter 'count'" in desc
        cls, desc = error_of(client, "inject-fault", name="g0", fault="bit-flip", handle=77)
        assert cls == "GenericError" and "no resource" in desc
        assert sorted(plane.server.instances) == ["g0"]  # nothing was half-made


def raw_session(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(5)
    sock.connect(path)
    assert b'"QMP"' in sock.recv(4096)
    return sock


def receive(sock: socket.socket) -> dict[str, Any]:
    data = b""
    while not data.endswith(b"\n"):
        data += sock.recv(4096)
    return dict(json.loads(data.splitlines()[0]))


def test_raw_protocol_errors_and_the_threads_survive(plane: Plane) -> None:
    sock = raw_session(plane.path)
    sock.sendall(b'{"execute": "query-version", "id": 1}')
    reply = receive(sock)
    assert reply["error"]["class"] == "CommandNotFound" and reply["id"] == 1
    assert "qmp_capabilities" in reply["error"]["desc"]
    sock.sendall(b'{"execute": "qmp_capabilities"}')
    assert receive(sock) == {"return": {}}
    for junk, expected in (
        (b"not json\n", "JSON parse error"),
        (b"[1, 2]", "JSON parse error"),
        (b'{"arguments": {}}', "lacks member 'execute'"),
        (b'{"execute": 5}', "must be a string"),
        (b'{"execute": "query-types", "arguments": []}', "must be an object"),
        (b'{"execute": "query-types", "extra": 1}', "is unexpected"),
    ):
        sock.sendall(junk)
        reply = receive(sock)
        assert reply["error"]["class"] == "GenericError", (junk, reply)
        assert expected in reply["error"]["desc"], (junk, reply)
    # Strings with braces and escapes do not confuse the splitter; ids come back as given.
    sock.sendall(b'{"execute": "query-faults", "arguments": {"name": "a}\\"{"}, "id": [1]}')
    reply = receive(sock)
    assert reply["error"]["class"] == "DeviceNotFound" and reply["id"] == [1]
    sock.close()
    with plane.qmp() as client:
        assert call(client, "query-physical")["instances"] == 0


def test_a_client_that_disconnects_mid_command_changes_nothing(plane: Plane) -> None:
    sock = raw_session(plane.path)
    sock.sendall(b'{"execute": "qmp_capabilities"}')
    receive(sock)
    sock.sendall(b'{"execute": "instance-add", "arguments": {"name": "half", "type": "mg')
    sock.close()
    time.sleep(0.1)
    assert plane.server.instances == {}
    # A client gone before its reply: the command is whole, the server serves on.
    sock = raw_session(plane.path)
    sock.sendall(b'{"execute": "qmp_capabilities"}')
    receive(sock)
    sock.sendall(b'{"execute": "instance-add", "arguments": {"name": "w", "type": "mgpu-64"}}')
    sock.close()
    wait_until(lambda: "w" in plane.server.instances, 5, "the whole command to run")
    with plane.qmp() as client:
        assert [i["name"] for i in call(client, "query-instances")] == ["w"]
        call(client, "instance-del", name="w")
    assert plane.control._thread.is_alive()


def test_json_splitter_splits_a_stream_like_qemu() -> None:
    splitter = JsonSplitter(limit=64)
    assert splitter.feed(b'{"a": "}"}{"b"') == [b'{"a": "}"}']
    assert splitter.feed(b": [1]}\n junk\n") == [b'{"b": [1]}', b"junk"]
    with pytest.raises(Exception, match="longer than 64"):
        splitter.feed(b"{" + b" " * 100)


# ---------------------------------------------------------------------- queries


def test_queries_show_types_pool_instances_resources_aperture_and_faults(plane: Plane) -> None:
    served = plane.add("g0", mapping="trap", policy="dummy", interrupts="msi")
    with plane.qmp() as client:
        types = {t["name"]: t for t in call(client, "query-types")}
        assert types["mgpu-64"]["available_instances"] == 3
        usage = call(client, "query-physical")
        # A quota is a limit, not a reservation: the pool is used only by resources.
        assert usage["limits"] == 64 << 20 and usage["memory_used"] == 0
        assert usage["instances"] == 1
        (info,) = call(client, "query-instances")
        assert (info["mapping"], info["policy"], info["interrupts"]) == ("trap", "dummy", "msi")
        assert info["socket"] == str(plane.workdir / "g0.sock")
        with VfioUserClient.connect(served.endpoint.path) as vfio:
            driver = MgpuDriver(vfio)
            handle = driver.create(8192)
            offset = driver.place(handle)
            assert vfio.region_read(PciRegion.BAR2, 1 << 20, 4) == b"\0" * 4  # denied: dummy
            (resource,) = call(client, "query-resources", name="g0")
            assert resource["handle"] == handle and resource["mapped_pages"] == 2
            aperture = call(client, "query-aperture", name="g0")
            assert aperture["runs"][0]["aperture_offset"] == offset
            assert aperture["runs"][0]["length"] == 8192 and aperture["mapping"] == "trap"
            faults = call(client, "query-faults", name="g0")
            assert faults["counters"]["g0"]["dummy"] == 1
            last = faults["last_seq"]["g0"]
            vfio.region_read(PciRegion.BAR2, 2 << 20, 4)
            newer = call(client, "query-faults", name="g0", since=last)["records"]
            assert [r["kind"] for r in newer] == ["dummy"] and newer[0]["offset"] == 2 << 20
            stats = call(client, "query-instances")[0]["stats"]
            assert stats["register_accesses"] > 10 and stats["resident_bytes"] == 8192
            driver.close()


# ---------------------------------------------------------------------- tracing


def test_trace_records_filter_and_write_perfetto_and_json_lines(
    driven: tuple[Plane, QEMUMonitorProtocol, MgpuDriver],
) -> None:
    plane, client, driver = driven
    plane.add("other")
    jsonl = plane.workdir / "trace.jsonl"
    assert not trace.ENABLED, "tracing is off by default"
    call(
        client, "trace-set", enable=True, kinds=["register", "command", "dma", "irq"],
        instances=["g0"], jsonl=str(jsonl),
    )  # fmt: skip
    handle = driver.create(4096)
    driver.run(encode(Opcode.FILL, handle=handle, offset=0, length=4096, value=7))
    plane.server.instances["other"].device.region_read(PciRegion.BAR0, 0, 4)
    records = call(client, "query-trace")["records"]
    assert {r["instance"] for r in records} == {"g0"}
    kinds = {r["kind"] for r in records}
    assert kinds == {"register", "command", "dma", "irq"}, kinds
    phases = [r["ph"] for r in records if r["kind"] == "command"]
    assert phases == ["B", "E", "B", "E"]  # FILL and FENCE, start and end
    assert any(r["kind"] == "register" and r.get("write") for r in records)
    out = plane.workdir / "trace.json"
    result = call(client, "trace-set", enable=False, perfetto=str(out))
    assert result["written"] == len(records) and not trace.ENABLED
    timeline = json.loads(out.read_text())["traceEvents"]
    names = {e["args"]["name"] for e in timeline if e["name"] in ("process_name", "thread_name")}
    assert {"g0", "ring 0", "engine", "interrupts", "reg CTX0_RING_TAIL"} <= names
    commands = [e for e in timeline if e.get("cat") == "command"]
    assert len(commands) == 2 and {e["ph"] for e in commands} == {"X"}, "begin + end: a slice"
    assert len({(e["pid"], e["tid"]) for e in commands}) == 1, "commands on their ring's track"
    lines = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [r["seq"] for r in lines] == [r["seq"] for r in records]
    error = error_of(client, "trace-set", enable=True, kinds=["nope"])
    assert error[0] == "GenericError" and "unknown trace kind" in error[1]


# ---------------------------------------------------------------------- fault injection


def test_engine_hang_until_reset_then_the_driver_recovers(
    driven: tuple[Plane, QEMUMonitorProtocol, MgpuDriver],
) -> None:
    _plane, client, driver = driven
    call(client, "inject-fault", name="g0", fault="engine-hang")
    with pytest.raises(TimeoutError):
        driver.run(timeout=0.3)
    assert driver.read(driver.ctx("RING_STATUS")) == abi.RingStatus.BUSY
    call(client, "instance-reset", name="g0")
    event = client.pull_event(wait=5.0)
    while event is not None and event["event"] != "DEVICE_RESET":
        event = client.pull_event(wait=5.0)
    assert event is not None and event["data"]["instance"] == "g0"
    driver.setup_ring()
    driver.run(timeout=5)  # recovered: the hang was one command, ended by the reset
    assert call(client, "query-instances")[0]["injected"] == {}


def test_engine_hang_cleared_lets_the_command_finish(
    driven: tuple[Plane, QEMUMonitorProtocol, MgpuDriver],
) -> None:
    _plane, client, driver = driven
    call(client, "inject-fault", name="g0", fault="engine-hang")
    driver.submit(driver.fence())
    time.sleep(0.2)
    assert driver.read(driver.ctx("RING_STATUS")) == abi.RingStatus.BUSY
    # Armed no more (the command took it) but hanging: clearing releases it, and says so.
    assert call(client, "inject-clear", name="g0") == {"cleared": ["engine-hang"]}
    driver.wait_fence(driver.fence_value, timeout=5)


def test_ring_error_and_dma_error_fail_the_next_commands(
    driven: tuple[Plane, QEMUMonitorProtocol, MgpuDriver],
) -> None:
    _plane, client, driver = driven
    handle = driver.create(4096)
    call(client, "inject-fault", name="g0", fault="ring-error", code="INVALID_COMMAND")
    with pytest.raises(DriverError) as failed:
        driver.run()
    assert failed.value.code == abi.ErrorCode.INVALID_COMMAND
    event = client.pull_event(wait=5.0)
    while event is not None and event["event"] != "ENGINE_ERROR":
        event = client.pull_event(wait=5.0)
    assert event is not None and event["data"]["code"] == "INVALID_COMMAND"
    driver.setup_ring()
    guest = driver.ram.alloc(4096)
    upload = encode(Opcode.WRITE_RESOURCE, guest_addr=guest, handle=handle, length=4096)
    call(client, "inject-fault", name="g0", fault="dma-error", count=1)
    with pytest.raises(DriverError) as failed:
        driver.run(upload)
    assert failed.value.code == abi.ErrorCode.DMA_FAULT
    driver.setup_ring()
    driver.run(upload)  # only the next one failed


def test_interrupts_dropped_delayed_and_spurious(
    driven: tuple[Plane, QEMUMonitorProtocol, MgpuDriver],
) -> None:
    _plane, client, driver = driven
    call(client, "inject-fault", name="g0", fault="irq-drop", count=1)
    before = driver.drain_interrupts()[0]
    driver.run()  # the fence arrives (polled) ...
    time.sleep(0.1)
    assert driver.drain_interrupts()[0] == before  # ... but its interrupt never does
    call(client, "inject-fault", name="g0", fault="irq-delay", delay=0.3, count=1)
    driver.submit(driver.fence())
    started = time.monotonic()
    assert driver.wait_interrupt(abi.IntBit.FENCE, timeout=5)
    assert time.monotonic() - started >= 0.25
    driver.write("INT_ACK", abi.IntBit.FENCE)
    call(client, "inject-fault", name="g0", fault="irq-spurious", vector=1)
    assert driver.wait_interrupt(abi.IntBit.ERROR, timeout=5)
    assert driver.read("INT_STATUS") == 0, "spurious: nothing pending"
    cls, desc = error_of(client, "inject-fault", name="g0", fault="irq-spurious", vector=99)
    assert cls == "GenericError" and "vector must be" in desc


def test_allocation_failure_and_bit_flip(
    driven: tuple[Plane, QEMUMonitorProtocol, MgpuDriver],
) -> None:
    _plane, client, driver = driven
    call(client, "inject-fault", name="g0", fault="alloc-fail", count=1)
    with pytest.raises(DriverError) as failed:
        driver.create(4096)
    assert failed.value.code == abi.ErrorCode.NO_MEMORY
    handle = driver.create(4096)  # only the next one failed
    result = call(
        client, "inject-fault", name="g0", fault="bit-flip", handle=handle, offset=10, bit=3
    )
    assert result["value"] == 8
    guest = driver.ram.alloc(4096)
    driver.run(encode(Opcode.READ_RESOURCE, handle=handle, guest_addr=guest, length=4096))
    data = driver.ram.read(guest, 4096)
    assert data[10] == 8 and data.count(0) == 4095


def test_surprise_removal_reads_ones_and_drops_writes(
    driven: tuple[Plane, QEMUMonitorProtocol, MgpuDriver],
) -> None:
    _plane, client, driver = driven
    call(client, "inject-fault", name="g0", fault="surprise-removal")
    assert driver.read("ID") == 0xFFFFFFFF
    driver.write("SCRATCH", 0x1234)
    config = driver.client.region_read(PciRegion.CONFIG, 0, 4)
    assert config == b"\xff" * 4, "vendor ID 0xffff: the device is gone"
    call(client, "inject-clear", name="g0", fault="surprise-removal")
    assert driver.read("ID") == abi.ID_VALUE and driver.read("SCRATCH") == 0


def test_slow_faults_and_the_python_api(plane: Plane) -> None:
    served = plane.add("g0", mapping="trap", policy="dummy")
    device = served.device
    with VfioUserClient.connect(served.endpoint.path) as vfio:
        device.inject("slow-fault", {"delay": 0.2, "count": 1})
        started = time.monotonic()
        vfio.region_read(PciRegion.BAR2, 0, 4)
        assert time.monotonic() - started >= 0.2
        started = time.monotonic()
        vfio.region_read(PciRegion.BAR2, 0, 4)
        assert time.monotonic() - started < 0.2, "count 1: only one fault was slow"
    # The calls the device-memory model makes, by instance name.
    assert inject.fault_delay("g0") == 0.0 and not inject.allocation_should_fail("g0")
    device.inject("alloc-fail", {"count": 2})
    assert [inject.allocation_should_fail("g0") for _ in range(3)] == [True, True, False]
    device.inject("slow-fault", {"delay": 1, "count": 0})
    assert inject.fault_delay("g0") == inject.fault_delay("g0") == 1.0  # until cleared
    assert device.faults.clear() == ["slow-fault"]
    buffer = bytearray(4)
    assert inject.flip_bit(memoryview(buffer), 2, 7) == 0x80 and buffer[2] == 0x80
    with pytest.raises(ValueError, match="unknown fault"):
        device.inject("meteor", {})
