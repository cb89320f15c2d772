"""`python -m device serve` as users run it: a process, signals, clear errors.

Every process started here is killed by PID in a fixture finalizer, whatever happens."""

from __future__ import annotations

import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from device.gpu import abi
from device.gpu.regs import table as regs
from device.vfio_user.client import VfioUserClient
from device.vfio_user.protocol import messages as m
from device.vfio_user.protocol.constants import Command

ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "device"]
Serve = Callable[..., "subprocess.Popen[bytes]"]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """A CLI run expected to end by itself (subprocess.run kills it on timeout)."""
    return subprocess.run([*CLI, *args], cwd=ROOT, capture_output=True, text=True, timeout=30)


def read_line(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> str:
    """The next stdout line, or fail (with stderr) instead of hanging.  stdout is
    unbuffered, so select() sees every line still unread."""
    assert proc.stdout is not None
    selector = selectors.DefaultSelector()
    selector.register(proc.stdout, selectors.EVENT_READ)
    try:
        if not selector.select(timeout):
            raise AssertionError(f"no output within {timeout} s")
    finally:
        selector.close()
    line = proc.stdout.readline()
    if not line:
        stderr = proc.stderr.read() if proc.stderr is not None else b""
        raise AssertionError(f"the server exited ({proc.wait()}): {stderr.decode()}")
    return line.decode().strip()


@pytest.fixture
def workdir(short_tmp: Path) -> Path:
    """Where the servers' sockets go (short enough for a unix socket path)."""
    return short_tmp


@pytest.fixture
def serve() -> Iterator[Serve]:
    """``serve(*args)`` starts ``python -m device serve *args``; all are killed at the end."""
    processes: list[subprocess.Popen[bytes]] = []

    def start(*args: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [*CLI, "serve", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            bufsize=0,
            cwd=ROOT,
        )
        processes.append(proc)
        return proc

    yield start
    for proc in processes:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=30)


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_serve_answers_then_exits_0_on_a_signal_and_removes_its_socket(
    workdir: Path, serve: Serve, stop: signal.Signals
) -> None:
    path = workdir / "gpu.sock"
    proc = serve("--socket", str(path))
    assert read_line(proc) == f"ready {path}"
    assert path.is_socket()
    with VfioUserClient.connect(path, negotiate=False) as client:
        request = m.Version(0, 0, {"max_msg_fds": 16, "max_data_xfer_size": 1 << 20}).pack()
        reply = client.request(Command.VERSION, request)
        version = m.Version.unpack(reply.payload)
        assert (version.major, version.minor) == (0, 0)
        info = client.device_info()
        assert (info.flags, info.num_regions, info.num_irqs) == (3, 9, 5)
        assert client.read32(0, 0) == abi.ID_VALUE
    proc.send_signal(stop)
    assert proc.wait(10) == 0
    assert not path.exists(), "the socket file is removed"
    _, stderr = proc.communicate()
    assert b"Traceback" not in stderr


def test_sigterm_with_a_client_still_connected_exits_0(workdir: Path, serve: Serve) -> None:
    path = workdir / "gpu.sock"
    proc = serve("--socket", str(path))
    assert read_line(proc) == f"ready {path}"
    with VfioUserClient.connect(path) as client:
        assert client.read32(0, 0) == abi.ID_VALUE
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        client.connection.sock.settimeout(5)
        assert client.connection.sock.recv(16) == b"", "the client is disconnected"
    assert not path.exists()


def test_several_sockets_and_a_type(workdir: Path, serve: Serve) -> None:
    sockets = [workdir / "a.sock", workdir / "b.sock"]
    proc = serve("--socket", str(sockets[0]), "--socket", str(sockets[1]), "--type", "mgpu-64")
    assert [read_line(proc) for _ in sockets] == [f"ready {s}" for s in sockets]
    for path in sockets:
        with VfioUserClient.connect(path) as client:
            assert client.read32(0, regs.BY_NAME["MEM_QUOTA_LO"].offset) == 64 << 20
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 0
    assert not any(s.exists() for s in sockets)


def test_aperture_size_sets_the_bar2_size(workdir: Path, serve: Serve) -> None:
    path = workdir / "gpu.sock"
    proc = serve("--socket", str(path), "--aperture-size", "32M")
    assert read_line(proc) == f"ready {path}"
    with VfioUserClient.connect(path) as client:
        region, fd = client.region_info(2)
        if fd is not None:
            os.close(fd)
        assert region.size == 32 << 20


def test_help_lists_the_options() -> None:
    result = run_cli("serve", "--help")
    assert result.returncode == 0
    for option in (
        "--socket",
        "--aperture-size",
        "--type",
        "--memory",
        "--interrupts",
        "--name",
        "--log-level",
    ):
        assert option in result.stdout, option


def test_serve_without_a_socket_is_a_usage_error() -> None:
    result = run_cli("serve")
    assert result.returncode == 2 and "--socket" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_directory_is_a_clear_error(workdir: Path) -> None:
    missing = workdir / "nope"
    result = run_cli("serve", "--socket", str(missing / "gpu.sock"))
    assert result.returncode != 0
    assert str(missing) in result.stderr and "does not exist" in result.stderr
    assert "Traceback" not in result.stderr
    assert not missing.exists()


def test_a_socket_in_use_is_refused(workdir: Path, serve: Serve) -> None:
    path = workdir / "gpu.sock"
    first = serve("--socket", str(path))
    assert read_line(first) == f"ready {path}"
    second = run_cli("serve", "--socket", str(path))
    assert second.returncode != 0 and "in use" in second.stderr
    assert "Traceback" not in second.stderr
    with VfioUserClient.connect(path) as client:  # the first server is untouched
        assert client.read32(0, 0) == abi.ID_VALUE
    assert first.poll() is None


def test_a_stale_socket_is_replaced(workdir: Path, serve: Serve) -> None:
    path = workdir / "gpu.sock"
    first = serve("--socket", str(path))
    assert read_line(first) == f"ready {path}"
    os.kill(first.pid, signal.SIGKILL)  # leaves its socket file behind
    first.wait(10)
    assert path.is_socket()
    third = serve("--socket", str(path))
    assert read_line(third) == f"ready {path}"
    with VfioUserClient.connect(path) as client:
        assert client.read32(0, 0) == abi.ID_VALUE


def test_a_stale_socket_left_by_a_closed_listener_is_replaced(workdir: Path, serve: Serve) -> None:
    path = workdir / "gpu.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.close()  # the file stays, nobody listens
    proc = serve("--socket", str(path))
    assert read_line(proc) == f"ready {path}"
    with VfioUserClient.connect(path) as client:
        assert client.device_info().num_regions == 9


def test_a_file_in_the_way_is_not_removed(workdir: Path) -> None:
    path = workdir / "not-a-socket"
    path.write_text("precious")
    result = run_cli("serve", "--socket", str(path))
    assert result.returncode != 0 and "not a socket" in result.stderr
    assert "Traceback" not in result.stderr
    assert path.read_text() == "precious"


def test_more_instances_than_the_pool_holds_is_a_clear_error(workdir: Path) -> None:
    result = run_cli(
        "serve",
        "--type",
        "mgpu-1024",
        "--memory",
        "1G",
        "--socket",
        str(workdir / "a"),
        "--socket",
        str(workdir / "b"),
    )
    assert result.returncode == 2 and "cannot create gpu1" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (workdir / "a").exists(), "the first instance's socket is cleaned up"


def test_types_lists_available_instances() -> None:
    result = run_cli("types", "--memory", "512M")
    assert result.returncode == 0
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines()[1:]}
    assert rows["mgpu-64"][3] == "8" and rows["mgpu-256"][3] == "2"
    assert rows["mgpu-1024"][3] == "0"


def test_stale_socket_probe_does_not_hang_on_a_listener_that_never_accepts(workdir: Path) -> None:
    path = workdir / "busy.sock"
    listener = socket.socket(socket.AF_UNIX)
    try:
        listener.bind(str(path))
        listener.listen(1)
        started = time.monotonic()
        result = run_cli("serve", "--socket", str(path))
        assert result.returncode != 0 and "in use" in result.stderr
        assert time.monotonic() - started < 20
    finally:
        listener.close()


def test_mdevctl_style_commands_over_the_control_socket(serve: Serve, workdir: Path) -> None:
    control = workdir / "control.sock"
    proc = serve("--control", str(control))
    assert read_line(proc) == f"control {control}"
    env = {**os.environ, "MGPU_CONTROL": str(control)}

    def mgpu(*args: str, code: int = 0) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [*CLI, *args], cwd=ROOT, capture_output=True, text=True, timeout=30, env=env
        )
        assert done.returncode == code, done.stderr
        return done

    types = json.loads(mgpu("types", "--json").stdout)
    assert {t["name"]: t["available_instances"] for t in types}["mgpu-64"] == 16
    assert mgpu("start", "--type", "mgpu-64", "--uuid", "u1").stdout.startswith("u1\n")
    listed = mgpu("list").stdout.splitlines()
    assert listed[0].split()[:3] == ["name", "type", "memory"] and listed[1].startswith("u1 ")
    assert [i["name"] for i in json.loads(mgpu("list", "--json").stdout)] == ["u1"]
    mgpu("inject", "u1", "ring-error", "--count", "2", "--code", "DMA_FAULT")
    injected = json.loads(mgpu("list", "--json").stdout)[0]["injected"]
    assert injected == {"ring-error": {"count": 2, "value": "DMA_FAULT"}}
    assert "cleared ring-error" in mgpu("inject", "u1", "clear").stdout
    faults = json.loads(mgpu("faults", "--json").stdout)
    assert faults["records"] == [] and faults["counters"] == {"u1": {}}
    mgpu("trace", "start", "--kind", "register")
    mgpu("trace", "stop", "--perfetto", str(workdir / "t.json"))
    assert "traceEvents" in json.loads((workdir / "t.json").read_text())
    top = json.loads(mgpu("top", "--count", "1", "--interval", "0.1", "--json").stdout)
    assert top[0]["name"] == "u1" and top[0]["regs/s"] == "0"
    failed = mgpu("stop", "nope", code=1)
    assert "DeviceNotFound: no instance named 'nope'" in failed.stderr
    mgpu("stop", "u1")
    assert json.loads(mgpu("list", "--json").stdout) == []
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(30) == 0
    assert not control.exists()


# ---------------------------------------------------------------------- the client, told the truth


def mgpu_client(*args: str, control: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [*CLI, *args, "--control", str(control)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0, cwd=ROOT,
    )  # fmt: skip


def test_an_instance_socket_given_as_control_socket_is_named_not_waited_on(
    serve: Serve, workdir: Path
) -> None:
    gpu = workdir / "gpu0.sock"
    proc = serve("--socket", str(gpu))
    assert read_line(proc) == f"ready {gpu}"
    done = subprocess.run(
        [*CLI, "list", "--control", str(gpu)], cwd=ROOT, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert f"{gpu} is not a control socket" in done.stderr, done.stderr
    assert "vfio-user" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize(
    "command", [("top", "--interval", "0.1"), ("faults", "--follow")], ids=["top", "follow"]
)
def test_a_client_waiting_on_a_server_that_stops_says_so_and_exits(
    serve: Serve, workdir: Path, command: tuple[str, ...]
) -> None:
    control = workdir / "control.sock"
    server = serve("--control", str(control))
    assert read_line(server) == f"control {control}"
    client = mgpu_client(*command, control=control)
    try:
        read_line(client)  # the first table line: connected and running
        os.kill(server.pid, signal.SIGTERM)
        assert server.wait(30) == 0
        _out, err = client.communicate(timeout=30)
    finally:
        if client.poll() is None:
            client.kill()
            client.communicate()
    assert client.returncode == 1, err
    assert b"the server closed the control socket" in err and b"Traceback" not in err, err


def test_a_socket_path_too_long_for_the_kernel_is_refused_with_its_length(
    workdir: Path,
) -> None:
    long_path = workdir / ("x" * 120) / "gpu.sock"
    (workdir / ("x" * 120)).mkdir()
    result = run_cli("serve", "--socket", str(long_path))
    assert result.returncode == 2
    assert "the kernel allows 107" in result.stderr and "None" not in result.stderr
