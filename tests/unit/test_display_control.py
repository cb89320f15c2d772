"""Screendumps and the display list through the control plane: the control socket (with
qemu.qmp's client), ``mgpu screendump``, the pytest plugin's ``screendump``, and how an
instance's display is found (its ``display`` attribute, the device side's plug)."""

from __future__ import annotations

import base64
import io
import signal
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from qemu.qmp import ExecuteError
from qemu.qmp.legacy import QEMUMonitorProtocol

from device.control import cli, manager
from device.control.commands import Control
from device.control.manager import GpuServer
from device.control.qmp import ControlServer
from device.display.frame import Frame, PixelFormat
from device.display.screendump import capture
from device.display.source import Framebuffer
from device.errors import FrameError
from device.gpu.instance.instance import GpuInstance
from device.gpu.memory.physical import PhysicalGpu
from device.harness import launch
from device.harness.launch_options import build_parser
from device.harness.pytest_plugin import screendump
from tests.unit.test_cli import CLI, ROOT, Serve, read_line, serve

__all__ = ["serve"]  # a fixture


class DisplayedInstance(GpuInstance):
    """A GPU instance with a display, as the device side will give it one: a
    ``display`` attribute that is a FrameSource (here an in-process Framebuffer)."""

    def __init__(self, name: str, **kwargs: Any) -> None:
        super().__init__(name, **kwargs)
        self.display = Framebuffer(name, 160, 120, PixelFormat.RGB565)
        rng = np.random.default_rng(3)
        self.display.draw_rgb(rng.integers(0, 256, (120, 160, 3), dtype=np.uint8))
        self.display.present()


@pytest.fixture
def plane(short_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[GpuServer, str]]:
    """A GpuServer whose instance "shown" has a display and "plain" has none, and its
    control socket."""
    with GpuServer(PhysicalGpu(256 << 20)) as server:
        monkeypatch.setattr(manager, "GpuInstance", DisplayedInstance)
        server.create_instance("shown", "mgpu-64", short_tmp / "shown.sock")
        monkeypatch.undo()
        server.create_instance("plain", "mgpu-64", short_tmp / "plain.sock")
        control = ControlServer(short_tmp / "control.sock", Control(server, short_tmp))
        control.start()
        try:
            yield server, str(control.path)
        finally:
            control.stop()


class Qmp(QEMUMonitorProtocol):
    def cmd(self, cmd: str, **kwds: object) -> Any:
        return super().cmd(cmd, **kwds)


def qmp(path: str) -> Qmp:
    client = Qmp(path)
    client.connect()
    return client


def source_of(server: GpuServer) -> Framebuffer:
    display = server.instances["shown"].device.display  # type: ignore[attr-defined]
    assert isinstance(display, Framebuffer)
    return display


def test_an_instance_with_a_display_attribute_is_registered_while_it_lives(
    plane: tuple[GpuServer, str], short_tmp: Path
) -> None:
    server, path = plane
    assert server.displays.names() == ["shown"]
    with qmp(path) as client:
        shown = client.cmd("query-displays")
        assert shown == [{"name": "shown", "serial": source_of(server).serial, "width": 160,
                          "height": 120, "format": "RGB565", "problem": None}]  # fmt: skip
    server.destroy_instance("shown")
    assert server.displays.names() == []


def test_screendump_returns_the_png_of_what_is_shown(plane: tuple[GpuServer, str]) -> None:
    server, path = plane
    with qmp(path) as client:
        result = client.cmd("screendump", name="shown")
    assert (result["width"], result["height"]) == (160, 120)
    image = Image.open(io.BytesIO(base64.b64decode(result["png"])))
    assert image.format == "PNG" and image.mode == "RGB"
    assert np.array_equal(np.asarray(image), capture(source_of(server)))


def test_screendump_writes_a_file_on_the_server_side(
    plane: tuple[GpuServer, str], short_tmp: Path
) -> None:
    server, path = plane
    target = short_tmp / "shot.png"
    with qmp(path) as client:
        assert client.cmd("screendump", name="shown", filename=str(target)) == {
            "width": 160, "height": 120, "filename": str(target)}  # fmt: skip
        with pytest.raises(ExecuteError, match="absolute path"):
            client.cmd("screendump", name="shown", filename="relative.png")
    assert np.array_equal(np.asarray(Image.open(target)), capture(source_of(server)))


@pytest.mark.parametrize(
    ("name", "error_class", "words"),
    [
        ("plain", "GenericError", "instance 'plain' has no display"),
        ("nosuch", "DeviceNotFound", "no instance named 'nosuch'"),
    ],
)
def test_screendump_without_a_display_is_a_clear_error(
    plane: tuple[GpuServer, str], name: str, error_class: str, words: str
) -> None:
    _, path = plane
    with qmp(path) as client, pytest.raises(ExecuteError) as info:
        client.cmd("screendump", name=name)
    assert info.value.error_class == error_class and words in str(info.value)


def test_screendump_of_a_display_that_is_off_or_bad_says_why(
    plane: tuple[GpuServer, str],
) -> None:
    server, path = plane
    source = source_of(server)
    with qmp(path) as client:
        source.set_enabled(False)
        with pytest.raises(ExecuteError, match="display 'shown' is off"):
            client.cmd("screendump", name="shown")
        source.set_enabled(True)
        source.show(Frame(160, 120, 100, PixelFormat.XRGB8888, bytes(1000)))
        with pytest.raises(ExecuteError, match="stride 100 too small"):
            client.cmd("screendump", name="shown")
        assert "stride 100" in client.cmd("query-displays")[0]["problem"]
        assert client.cmd("query-version")  # the socket carries on


def test_mgpu_screendump_writes_the_png_on_the_client_side(
    plane: tuple[GpuServer, str], short_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server, path = plane
    target = short_tmp / "cli.png"
    assert cli.main(["screendump", "shown", str(target), "--control", path]) == 0
    assert np.array_equal(np.asarray(Image.open(target)), capture(source_of(server)))
    assert "160x120 PNG" in capsys.readouterr().out
    assert cli.main(["screendump", "plain", str(short_tmp / "no.png"), "--control", path]) == 1
    assert "has no display" in capsys.readouterr().err
    assert not (short_tmp / "no.png").exists()
    assert cli.main(["displays", "--control", path]) == 0
    assert "160x120 RGB565" in capsys.readouterr().out


def test_the_plugin_screendump_is_a_pil_image(plane: tuple[GpuServer, str]) -> None:
    server, _ = plane
    image = screendump(server.instances["shown"])
    assert image.size == (160, 120)
    assert np.array_equal(np.asarray(image), capture(source_of(server)))
    with pytest.raises(FrameError, match="has no display"):
        screendump(server.instances["plain"])


@pytest.mark.parametrize(
    ("text", "address"),
    [("5900", ("127.0.0.1", 5900)), ("0.0.0.0:5901", ("0.0.0.0", 5901)),
     ("[::1]:80", ("::1", 80)), (":7", ("127.0.0.1", 7))],
)  # fmt: skip
def test_view_addresses(text: str, address: tuple[str, int]) -> None:
    assert cli.parse_address(text) == address


def test_serve_with_vnc_and_web_says_where_and_serves_the_page(
    short_tmp: Path, serve: Serve
) -> None:
    control = short_tmp / "control.sock"
    proc = serve("--control", str(control), "--vnc", "127.0.0.1:0", "--web", "0")
    assert read_line(proc) == f"control {control}"
    assert read_line(proc) == "vnc 127.0.0.1:0"
    web = read_line(proc)
    assert web.startswith("web http://127.0.0.1:")
    with urllib.request.urlopen(web.split()[1], timeout=10) as response:
        assert b"mgpu displays" in response.read()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0


def test_serve_refuses_a_web_port_in_use(short_tmp: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [*CLI, "serve", "--control", str(short_tmp / "c.sock"), "--web", str(port)],
            capture_output=True, text=True, timeout=60, cwd=ROOT,
        )  # fmt: skip
    assert result.returncode == 1
    assert "cannot serve the displays" in result.stderr


def test_run_qemu_vnc_and_web_print_where_to_look(
    short_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = build_parser().parse_args(["--vnc", "127.0.0.1:0", "--web", "0", "--mapping", "static"])
    with launch.gpu_server(args, short_tmp) as sockets:
        assert len(sockets) == 1
        err = capsys.readouterr().err
        assert "VNC from 127.0.0.1:0 up, one port per display: none yet" in err
        url = err.split("every GPU's display live at ")[1].split()[0]
        with urllib.request.urlopen(url, timeout=10) as response:
            assert b"mgpu displays" in response.read()
    assert build_parser().parse_args(["--vnc"]).vnc == "5900"


def test_serve_refuses_a_vnc_host_that_is_not_here(short_tmp: Path) -> None:
    result = subprocess.run(
        [*CLI, "serve", "--control", str(short_tmp / "c.sock"), "--vnc", "192.0.2.1:5900"],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 1
    assert "cannot serve the displays" in result.stderr
