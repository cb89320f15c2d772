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
        description="Serve one GPU instance on a vfio-user unix socket until SIGTERM or "
        "SIGINT, then remove the socket and exit 0. Attach it with QEMU's "
        "-device vfio-user-pci,socket.type=unix,socket.path=PATH.",
    )
    serve.add_argument("--socket", required=True, type=Path, metavar="PATH",
                       help="unix socket path to listen on (its directory must exist)")
    serve.add_argument("--aperture-size", type=parse_size, default=DEFAULT_APERTURE_SIZE,
                       metavar="SIZE",
                       help="size of the BAR2 aperture, a power of two (default: 256M)")
    serve.add_argument("--name", default="gpu0", help="instance name used in logs")
    serve.add_argument("--log-level", default="info",
                       choices=["debug", "info", "warning", "error"],
                       help="logging verbosity on stderr (default: info)")
    return parser


def serve(args: argparse.Namespace) -> int:
    try:
        device = GpuInstance(args.name, args.aperture_size)
    except ValueError as exc:
        log.error("bad instance configuration: %s", exc)
        return 2
    try:
        endpoint = Endpoint(args.socket, device, args.name)
    except SocketPathError as exc:
        log.error("cannot serve on %s: %s", args.socket, exc)
        device.close()
        return 1
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("received %s, shutting down", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    endpoint.start()
    log.info("serving %s on %s (aperture %d MiB)", args.name, args.socket,
             args.aperture_size >> 20)
    print(f"ready {args.socket}", flush=True)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        endpoint.stop()
        device.close()
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
