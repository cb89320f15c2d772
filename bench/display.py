"""Benchmark: what showing a display costs the server: screendumps, VNC frames, idling.

- ``screendump``: a 1024x768 XRGB8888 frame to PNG bytes (conversion to RGB with the
  cursor, then Pillow's encoder), against a plain Pillow PNG encode of the same RGB
  array at the same zlib level, in interleaved rounds.  Two pictures: ``desktop``
  (flat areas, gradients and some text-like noise) and ``noise`` (incompressible).
- ``vnc_full`` / ``vnc_tile``: the server's work for one FramebufferUpdate after a
  flip to a frame built beforehand: ``Screen.refresh`` (scanout, RGB, tile
  comparison) and the session's update (raw or ZRLE), for a frame where everything
  changed and one where a single 64x64 tile did; against a numpy copy of the frame's
  3 MiB (the floor of touching the picture at all).  ``vnc_wire`` is a full raw
  frame end to end over loopback: present() to the last byte at a real RFB client.
- ``idle``: the server process's CPU time per second with a VNC server serving one
  display: no client; one client whose incremental request waits on a still
  picture; the same with the source's serial bumped at 60 Hz and nothing changing (a
  display engine that counts vblanks); a web page viewer on a still picture.  Against
  the same process with no display server, measured the same way.

    python -m bench.display [--rounds 15] [--idle-seconds 2] [--json PATH]
"""

from __future__ import annotations

import argparse
import io
import statistics
import struct
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image
from websockets.sync.client import connect

from bench.common import percentile, publish
from device.display import rfb
from device.display.frame import Cursor, Frame, PixelFormat, from_rgb
from device.display.registry import DisplayRegistry
from device.display.screendump import PNG_COMPRESS_LEVEL, capture, png_bytes
from device.display.source import Framebuffer
from device.display.tiles import Screen
from device.display.vnc import VncServer
from device.display.vnc_session import VncSession
from device.display.web import WebServer
from tests.unit.rfb_client import RfbClient  # the tests' RFB client, over loopback

ROOT = Path(__file__).resolve().parent.parent
WIDTH, HEIGHT = 1024, 768
RGB = npt.NDArray[np.uint8]


def desktop_picture(seed: int) -> RGB:
    rng = np.random.default_rng(seed)
    rgb = np.zeros((HEIGHT, WIDTH, 3), dtype=np.uint8)
    rgb[..., 0] = np.linspace(0, 255, WIDTH, dtype=np.uint8)[None, :]
    rgb[..., 2] = np.linspace(0, 255, HEIGHT, dtype=np.uint8)[:, None]
    for _ in range(20):  # windows
        x, y = int(rng.integers(0, WIDTH - 200)), int(rng.integers(0, HEIGHT - 150))
        rgb[y : y + 150, x : x + 200] = rng.integers(0, 256, 3, dtype=np.uint8)
    text = rng.random((HEIGHT // 4, WIDTH)) < 0.1  # a quarter of the screen of "glyphs"
    rgb[: HEIGHT // 4][text] = 255
    return rgb


def noise_picture(seed: int) -> RGB:
    rgb: RGB = np.random.default_rng(seed).integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    return rgb


def row(samples: list[float], baseline: list[float] | None, unit: float = 1e3) -> dict[str, Any]:
    median = statistics.median(samples)
    shown: dict[str, Any] = {
        "median_ms": round(median * unit, 3),
        "p99_ms": round(percentile(samples, 0.99) * unit, 3),
        "samples": len(samples),
    }
    if baseline is not None:
        shown["ratio_to_baseline"] = round(median / statistics.median(baseline), 3)
    return shown


def interleave(ops: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
    """Time each op once per round, A B A B, after one warm-up each."""
    samples: dict[str, list[float]] = {name: [] for name in ops}
    for op in ops.values():
        op()
    for _ in range(rounds):
        for name, op in ops.items():
            started = time.perf_counter()
            op()
            samples[name].append(time.perf_counter() - started)
    return samples


def bench_screendump(rounds: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for kind, make in (("desktop", desktop_picture), ("noise", noise_picture)):
        fb = Framebuffer("bench", WIDTH, HEIGHT, PixelFormat.XRGB8888)
        picture = make(1)
        fb.draw_rgb(picture)
        fb.present()
        fb.set_cursor(Cursor(500, 400, bytes([0, 0, 0, 255]) * 64 * 64))
        shown = capture(fb)

        def baseline(rgb: RGB = shown) -> None:
            Image.fromarray(rgb, "RGB").save(io.BytesIO(), "PNG", compress_level=PNG_COMPRESS_LEVEL)

        def screendump(fb: Framebuffer = fb) -> None:
            png_bytes(capture(fb))

        samples = interleave({"pillow": baseline, "screendump": screendump}, rounds)
        results[kind] = {
            "screendump": row(samples["screendump"], samples["pillow"]),
            "pillow_baseline": row(samples["pillow"], None),
            "png_bytes": len(png_bytes(shown)),
        }
    return results


def vnc_ops(encoding: rfb.Encoding) -> dict[str, Callable[[], object]]:
    """Server work per update: a full change and a one-tile change (the frames are
    built beforehand: what is timed starts at the flip)."""
    first, second = (desktop_picture(seed) for seed in (1, 2))
    tile = first.copy()
    tile[128:192, 256:320] = second[128:192, 256:320]
    stride = WIDTH * 4
    frames = {
        name: [Frame(WIDTH, HEIGHT, stride, PixelFormat.XRGB8888, from_rgb(p, PixelFormat.XRGB8888))
               for p in pictures]
        for name, pictures in (("full", (first, second)), ("tile", (first, tile)))
    }  # fmt: skip

    def viewer(name: str) -> Callable[[], None]:
        """A display and a client session of its own, flipping between two frames."""
        fb = Framebuffer("bench", WIDTH, HEIGHT, PixelFormat.XRGB8888)
        screen = Screen(fb)
        session = VncSession(screen)
        session.receive(b"RFB 003.008\n\x01\x01")
        session.receive(struct.pack(">BxHi", rfb.ClientType.SET_ENCODINGS, 1, encoding))
        flips = [0]

        def update() -> None:
            flips[0] += 1
            fb.show(frames[name][flips[0] % 2])
            session.out.clear()
            session.receive(struct.pack(">BBHHHH", 3, 1, 0, 0, WIDTH, HEIGHT))  # incremental
            screen.refresh()
            assert session.update()

        return update

    frame = np.zeros((HEIGHT, WIDTH * 4), dtype=np.uint8)
    return {
        "copy_baseline": lambda: frame.copy(),
        "full": viewer("full"),
        "tile": viewer("tile"),
    }


def bench_vnc(rounds: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for encoding in (rfb.Encoding.RAW, rfb.Encoding.ZRLE):
        ops = vnc_ops(encoding)
        samples = interleave(ops, rounds)
        name = encoding.name.lower()
        results[f"vnc_full_{name}"] = row(samples["full"], samples["copy_baseline"])
        results[f"vnc_tile_{name}"] = row(samples["tile"], samples["copy_baseline"])
    results["copy_baseline"] = row(samples["copy_baseline"], None)
    return results


def bench_wire(rounds: int) -> dict[str, Any]:
    """present() of a full new frame to the last byte of its raw update at a client."""
    registry = DisplayRegistry()
    fb = Framebuffer("bench", WIDTH, HEIGHT)
    registry.add(fb)
    pictures = [desktop_picture(seed) for seed in (1, 2)]
    samples: list[float] = []
    with VncServer(registry, "127.0.0.1", 0) as server:
        port = server.port_of("bench")
        assert port is not None
        with RfbClient(port) as client:
            client.handshake()
            client.set_encodings([rfb.Encoding.RAW])
            client.request()
            client.read_update()
            for n in range(rounds):
                fb.draw_rgb(pictures[n % 2])
                client.request(incremental=True)
                started = time.perf_counter()
                fb.present()
                client.read_update()
                samples.append(time.perf_counter() - started)
    return {"vnc_wire_full_raw": row(samples, None)}


def cpu_per_second(seconds: float, during: Callable[[], None] | None = None) -> float:
    """This process's CPU seconds per wall second (every thread), over ``seconds``."""
    stop = threading.Event()
    thread = None
    if during is not None:

        def loop() -> None:
            while not stop.wait(1 / 60):
                during()

        thread = threading.Thread(target=loop, daemon=True)
        thread.start()
    cpu, wall = time.process_time(), time.monotonic()
    time.sleep(seconds)
    used = (time.process_time() - cpu) / (time.monotonic() - wall)
    stop.set()
    if thread is not None:
        thread.join()
    return used


def bench_idle(seconds: float, repeats: int) -> dict[str, Any]:

    from tests.unit.rfb_client import RfbClient

    registry = DisplayRegistry()
    fb = Framebuffer("bench", WIDTH, HEIGHT)
    fb.draw_rgb(desktop_picture(1))
    fb.present()
    registry.add(fb)
    samples: dict[str, list[float]] = {
        "baseline": [], "no_client": [], "waiting_client": [], "vblank_60hz": [], "web_viewer": []
    }  # fmt: skip
    for _ in range(repeats):
        samples["baseline"].append(cpu_per_second(seconds))
        with VncServer(registry, "127.0.0.1", 0) as server:
            samples["no_client"].append(cpu_per_second(seconds))
            port = server.port_of("bench")
            assert port is not None
            with RfbClient(port) as client:
                client.handshake()
                client.request()
                client.read_update()
                client.request(incremental=True)  # waits: nothing changes
                samples["waiting_client"].append(cpu_per_second(seconds))
                samples["vblank_60hz"].append(cpu_per_second(seconds, fb.present))
        with (
            WebServer(registry, "127.0.0.1", 0) as web,
            connect(f"ws://127.0.0.1:{web.port}/ws", max_size=None) as viewer,
        ):
            viewer.recv(timeout=10)
            samples["web_viewer"].append(cpu_per_second(seconds))
    results = {}
    for name, values in samples.items():
        results[f"idle_{name}"] = {
            "median_cpu_percent": round(100 * statistics.median(values), 2),
            "max_cpu_percent": round(100 * max(values), 2),
            "samples": len(values),
        }
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--idle-seconds", type=float, default=2.0)
    parser.add_argument("--idle-repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "display.json")
    args = parser.parse_args()
    results: dict[str, Any] = {"benchmark": "display", "size": f"{WIDTH}x{HEIGHT}"}
    results["screendump"] = bench_screendump(args.rounds)
    results["vnc"] = {**bench_vnc(args.rounds), **bench_wire(args.rounds)}
    results["idle"] = bench_idle(args.idle_seconds, args.idle_repeats)
    print(f"{'what':<34}{'median ms':>11}{'p99 ms':>10}{'x baseline':>12}")
    for kind, rows in results["screendump"].items():
        for name in ("screendump", "pillow_baseline"):
            r = rows[name]
            ratio = f"{r['ratio_to_baseline']:.3f}" if "ratio_to_baseline" in r else "-"
            print(f"{name + ' ' + kind:<34}{r['median_ms']:>11.2f}{r['p99_ms']:>10.2f}{ratio:>12}")
    for name, r in results["vnc"].items():
        ratio = f"{r['ratio_to_baseline']:.3f}" if "ratio_to_baseline" in r else "-"
        print(f"{name:<34}{r['median_ms']:>11.2f}{r['p99_ms']:>10.2f}{ratio:>12}")
    print(f"{'idle (CPU % of one core)':<34}{'median':>11}{'max':>10}")
    for name, r in results["idle"].items():
        print(f"{name:<34}{r['median_cpu_percent']:>11.2f}{r['max_cpu_percent']:>10.2f}")
    publish(results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
