"""`python -m device serve` as users run it: a process, signals, clear errors."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from device.client import VfioUserClient
from device.gpu import registers as regs

ROOT = Path(__file__).resolve().parents[2]


def serve(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "device", "serve", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT)


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="mgpu-cli-"))
    yield path
    for leftover in path.iterdir():
        leftover.unlink()
    path.rmdir()


@pytest.fixture
def started() -> Iterator[list[subprocess.Popen[str]]]:
    processes: list[subprocess.Popen[str]] = []
    yield processes
    for proc in processes:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.communicate()


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_serve_answers_then_exits_0_and_removes_its_sockets(
    workdir: Path, started: list[subprocess.Popen[str]], stop: signal.Signals
) -> None:
    sockets = [workdir / "a.sock", workdir / "b.sock"]
    proc = serve("--socket", str(sockets[0]), "--socket", str(sockets[1]), "--type", "mgpu-64")
    started.append(proc)
    assert proc.stdout is not None
    assert [proc.stdout.readline().strip() for _ in sockets] == [f"ready {s}" for s in sockets]
    for path in sockets:
        with VfioUserClient.connect(path) as client:
            assert client.device_info().num_regions == 9
            assert client.read32(0, 0) == regs.ID_VALUE
            assert client.read32(0, regs.BY_NAME["MEM_QUOTA_LO"].offset) == 64 << 20
    proc.send_signal(stop)
    assert proc.wait(10) == 0
    assert not any(s.exists() for s in sockets)


def test_help_lists_every_option() -> None:
    out = subprocess.run([sys.executable, "-m", "device", "serve", "--help"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    for option in ("--socket", "--type", "--aperture-size", "--memory", "--interrupts",
                   "--name", "--log-level"):
        assert option in out


def test_missing_directory_is_a_clear_error(workdir: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "device", "serve", "--socket",
                             str(workdir / "nope" / "gpu.sock")], cwd=ROOT,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    assert "does not exist" in result.stderr and str(workdir / "nope") in result.stderr
    assert "Traceback" not in result.stderr


def test_socket_in_use_is_refused_and_stale_socket_is_replaced(
    workdir: Path, started: list[subprocess.Popen[str]]
) -> None:
    path = workdir / "gpu.sock"
    first = serve("--socket", str(path))
    started.append(first)
    assert first.stdout is not None and first.stdout.readline().startswith("ready")
    second = subprocess.run([sys.executable, "-m", "device", "serve", "--socket", str(path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert second.returncode != 0 and "in use" in second.stderr
    assert "Traceback" not in second.stderr
    os.kill(first.pid, signal.SIGKILL)  # leaves its socket file behind
    first.wait()
    assert path.exists()
    third = serve("--socket", str(path))
    started.append(third)
    assert third.stdout is not None and third.stdout.readline().startswith("ready")
    with VfioUserClient.connect(path) as client:
        assert client.read32(0, 0) == regs.ID_VALUE


def test_a_file_in_the_way_is_not_removed(workdir: Path) -> None:
    path = workdir / "not-a-socket"
    path.write_text("precious")
    result = subprocess.run([sys.executable, "-m", "device", "serve", "--socket", str(path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert result.returncode != 0 and "not a socket" in result.stderr
    assert path.read_text() == "precious"


def test_more_instances_than_the_pool_holds_is_a_clear_error(workdir: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "device", "serve", "--type", "mgpu-1024", "--memory", "1G",
         "--socket", str(workdir / "a"), "--socket", str(workdir / "b")],
        cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "cannot create gpu1" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (workdir / "a").exists()


def test_types_lists_available_instances() -> None:
    out = subprocess.run([sys.executable, "-m", "device", "types", "--memory", "512M"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:]}
    assert rows["mgpu-64"][3] == "8" and rows["mgpu-256"][3] == "2"
    assert rows["mgpu-1024"][3] == "0"


def test_stale_socket_probe_does_not_hang_on_a_listener_that_never_accepts(
    workdir: Path
) -> None:
    path = workdir / "busy.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen(1)
    result = subprocess.run([sys.executable, "-m", "device", "serve", "--socket", str(path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert result.returncode != 0 and "in use" in result.stderr
    listener.close()
