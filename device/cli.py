"""Command line: ``python -m device serve --socket PATH``."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path

from .gpu.instance import DEFAULT_APERTURE_SIZE, GpuInstance
from .server import Endpoint, SocketPathError

log = logging.getLogger("mgpu")


def parse_size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    text = text.strip().lower().removesuffix("ib").removesuffix("b")
    try:
        if text and text[-1] in units:
            return int(text[:-1]) * units[text[-1]]
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 256M)") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mgpu", description="A mediated GPU emulator for QEMU, served over vfio-user."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser(
        "serve",
        help="serve a GPU instance on a unix socket",
        description="Serve GPU instances on vfio-user unix sockets until SIGTERM or "
        "SIGINT, then remove the sockets and exit 0. Attach one with QEMU's "
        "-device vfio-user-pci,socket.type=unix,socket.path=PATH.",
    )
    serve.add_argument("--socket", required=True, type=Path, metavar="PATH", action="append",
                       help="unix socket path to listen on (its directory must exist); "
                       "repeat to serve several GPU instances from this one process")
    serve.add_argument("--aperture-size", type=parse_size, default=DEFAULT_APERTURE_SIZE,
                       metavar="SIZE",
                       help="size of the BAR2 aperture, a power of two (default: 256M)")
    serve.add_argument("--name", default=None,
                       help="instance name used in logs (default: gpu0, gpu1, ...)")
    serve.add_argument("--log-level", default="info",
                       choices=["debug", "info", "warning", "error"],
                       help="logging verbosity on stderr (default: info)")
    return parser


def serve(args: argparse.Namespace) -> int:
    sockets: list[Path] = args.socket
    names = [args.name] if len(sockets) == 1 and args.name else [
        f"{args.name or 'gpu'}{i}" for i in range(len(sockets))
    ]
    devices: list[GpuInstance] = []
    endpoints: list[Endpoint] = []

    def close_all() -> None:
        for endpoint in endpoints:
            endpoint.stop()
        for device in devices:
            device.close()

    for name, path in zip(names, sockets, strict=True):
        try:
            devices.append(GpuInstance(name, args.aperture_size))
            endpoints.append(Endpoint(path, devices[-1], name))
        except ValueError as exc:
            log.error("bad instance configuration: %s", exc)
            close_all()
            return 2
        except SocketPathError as exc:
            log.error("cannot serve on %s: %s", path, exc)
            close_all()
            return 1
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("received %s, shutting down", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    for name, endpoint in zip(names, endpoints, strict=True):
        endpoint.start()
        log.info("serving %s on %s (aperture %d MiB)", name, endpoint.path,
                 args.aperture_size >> 20)
        print(f"ready {endpoint.path}", flush=True)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        close_all()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper(), logging.INFO) if "log_level" in args
        else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if args.command == "serve":
        return serve(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
