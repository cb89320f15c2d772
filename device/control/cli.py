"""Command line: ``mgpu serve --socket PATH [--control PATH]`` (also ``python -m device``),
and the mdevctl-style commands that talk to a running server's control socket
(``ctl.py``: types, list, start, stop, faults, trace, inject, top)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from device.control import ctl, trace_view
from device.control.commands import Control
from device.control.manager import GpuServer
from device.control.qmp import ControlServer
from device.display.vnc import VncServer
from device.display.web import WebServer
from device.errors import CapacityError
from device.fuse.server import FuseUnavailable
from device.gpu.memory.physical import DEFAULT_CONTEXTS, DEFAULT_MEMORY, PhysicalGpu
from device.gpu.modes import DeniedPolicy, InterruptMode, MappingMode
from device.gpu.types import DEFAULT_TYPES, MAX_CONTEXTS_PER_INSTANCE, InstanceType
from device.vfio_user import fast_path
from device.vfio_user.server import SocketPathError

DEFAULT_TYPE = "mgpu-256"
DEFAULT_VIEW_HOST = "127.0.0.1"

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


def parse_address(text: str) -> tuple[str, int]:
    """``[HOST:]PORT`` (``[::1]:PORT`` for IPv6) as (host, port); host 127.0.0.1."""
    host, _, port = text.rpartition(":")
    host = host.strip("[]") or DEFAULT_VIEW_HOST
    try:
        number = int(port)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not [HOST:]PORT: {text!r} (try 5900)") from None
    if not 0 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"port {number} out of range (0-65535)")
    return host, number


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mgpu", description="A mediated GPU emulator for QEMU, served over vfio-user."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser(
        "serve",
        help="serve GPU instances on unix sockets",
        description="Create a physical GPU and one GPU instance per --socket on it, serve "
        "each on its vfio-user unix socket until SIGTERM or SIGINT, then remove the "
        "sockets and exit 0. Attach one with QEMU's "
        "-device vfio-user-pci,socket.type=unix,socket.path=PATH.",
    )
    serve.add_argument(
        "--socket",
        type=Path,
        metavar="PATH",
        action="append",
        default=[],
        help="unix socket path to listen on (its directory must exist); "
        "repeat to serve several GPU instances from this one process",
    )
    serve.add_argument(
        "--control",
        type=Path,
        metavar="PATH",
        default=None,
        help="also serve the control socket here (QMP protocol: qmp-shell, `mgpu list`, "
        "docs/control.md); instances can then be added at run time, so --socket is optional",
    )
    serve.add_argument(
        "--type",
        default=DEFAULT_TYPE,
        metavar="TYPE",
        help=f"instance type (default: {DEFAULT_TYPE}); one of: "
        + ", ".join(f"{t.name} ({t.description})" for t in DEFAULT_TYPES),
    )
    serve.add_argument(
        "--aperture-size",
        type=parse_size,
        default=None,
        metavar="SIZE",
        help="instead of --type: a custom type with this much device memory "
        "(a power of two; it is also the BAR2 aperture size)",
    )
    serve.add_argument(
        "--memory",
        type=parse_size,
        default=None,
        metavar="SIZE",
        help="device memory of the physical GPU (default: 1G, or enough for "
        "every instance asked for)",
    )
    serve.add_argument(
        "--overcommit",
        type=float,
        default=1.0,
        metavar="RATIO",
        help="let the instances' memory limits add up to RATIO times the pool (default 1: "
        "no overcommit); idle resources are then evicted to host memory under pressure "
        "and paged back in at their next touch",
    )
    serve.add_argument(
        "--interrupts",
        type=InterruptMode,
        choices=list(InterruptMode),
        default=InterruptMode.MSIX,
        help="msix (default, 8 vectors) or msi (4 vectors). QEMU 11.1.3 aborts "
        "when it hot-unplugs a vfio-user device with MSI-X: use msi for "
        "instances you will device_del",
    )
    serve.add_argument(
        "--mapping",
        type=MappingMode,
        choices=list(MappingMode),
        default=MappingMode.FAULT,
        help="how the guest reaches the BAR2 aperture: fault (default: each page on "
        "first touch, validated and translated through the instance's page table; needs "
        "a FUSE mount, else trap is used with a message saying why), trap (every access "
        "is a message) or static (the instance's memory mapped 1:1 at realize, no checks: "
        "the fast baseline). At mount, fault mode measures the page-cache granularity the "
        "kernel gives FUSE files (a touch of a scratch file); where it exceeds 4 KiB "
        "(FUSE large folios) it remounts with 4 KiB pinned (max_pages 1, max_read and "
        "max_write 4 KiB), and the fault log says so (`mounted`, `pinned_4k`)",
    )
    serve.add_argument(
        "--denied",
        type=DeniedPolicy,
        choices=list(DeniedPolicy),
        default=DeniedPolicy.SIGBUS,
        help="what a touch of an aperture page that maps no resource gets "
        "(fault and trap modes): sigbus (the VM dies, as on hardware; default), "
        "dummy (a zero page) or report (all ones, and the FAULT interrupt)",
    )
    serve.add_argument(
        "--vnc",
        type=parse_address,
        default=None,
        metavar="[HOST:]PORT",
        help="serve each instance's display over VNC (RFB 3.8, view-only, no password): "
        "the first display on PORT, the next on PORT+1, ... in the order they appear "
        "(a port in use is skipped; `mgpu displays` lists them); HOST defaults to "
        "127.0.0.1. Try 5900",
    )
    serve.add_argument(
        "--web",
        type=parse_address,
        default=None,
        metavar="[HOST:]PORT",
        help="serve one web page showing every instance's display live at "
        "http://HOST:PORT/ (HOST defaults to 127.0.0.1)",
    )
    serve.add_argument(
        "--poll-us",
        type=float,
        default=0.0,
        metavar="US",
        help="after answering a trapped access, poll the socket this many microseconds "
        "for the next one before sleeping, while the client keeps sending within that "
        "time (adaptive; default 0: off). Pays only when client and server run on "
        "different CPUs whose idle wake-up is slow; costs CPU (bench: python -m bench)",
    )
    serve.add_argument(
        "--name", default=None, help="instance name used in logs (default: gpu0, gpu1, ...)"
    )
    serve.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="logging verbosity on stderr (default: info)",
    )
    types = sub.add_parser(
        "types",
        help="list instance types and how many fit",
        description="List the instance types and available_instances of each: on a "
        "running server with --control (or $MGPU_CONTROL), else on a physical GPU of "
        "--memory bytes.",
    )
    types.add_argument("--memory", type=parse_size, default=DEFAULT_MEMORY, metavar="SIZE")
    ctl.add_client_options(types)
    ctl.add_commands(sub)
    return parser


def make_physical(args: argparse.Namespace, count: int) -> tuple[PhysicalGpu, str]:
    """The physical GPU and the instance type the arguments ask for."""
    if args.aperture_size is not None:
        itype = InstanceType(
            "custom",
            args.aperture_size,
            MAX_CONTEXTS_PER_INSTANCE,
            f"{args.aperture_size >> 20} MiB, given on the command line",
        )
        types: tuple[InstanceType, ...] = (*DEFAULT_TYPES, itype)
    else:
        types = DEFAULT_TYPES
        matches = [t for t in types if t.name == args.type]
        if not matches:
            raise ValueError(f"unknown type {args.type!r}; `mgpu types` lists them")
        itype = matches[0]
    memory = args.memory or max(DEFAULT_MEMORY, itype.memory * count)
    contexts = max(DEFAULT_CONTEXTS, itype.contexts * count)
    return PhysicalGpu(memory, contexts, types, overcommit=args.overcommit), itype.name


def create_instances(
    server: GpuServer, args: argparse.Namespace, names: list[str], type_name: str
) -> int:
    """The instances of --socket; 0, or the exit code if one cannot be created."""
    for name, path in zip(names, args.socket, strict=True):
        try:
            try:
                server.create_instance(
                    name, type_name, path, args.interrupts, args.mapping, args.denied
                )
            except FuseUnavailable as exc:
                if args.mapping is not MappingMode.FAULT:
                    raise
                log.warning(
                    "%s: fault mode is not available here (%s); serving it in trap mode "
                    "(every aperture access a message) instead", name, exc,
                )  # fmt: skip
                args.mapping = MappingMode.TRAP
                server.create_instance(
                    name, type_name, path, args.interrupts, args.mapping, args.denied
                )
        except (CapacityError, FuseUnavailable, ValueError) as exc:
            log.error("cannot create %s: %s", name, exc)
            return 2
        except SocketPathError as exc:
            log.error("cannot serve on %s: %s", path, exc)
            return 1
    return 0


def check_sockets(args: argparse.Namespace) -> str | None:
    """What is wrong with the socket paths asked for, before anything is created."""
    if not args.socket and args.control is None:
        return "nothing to serve: give --socket PATH (repeatable) or --control PATH"
    for path in [*args.socket, *([args.control] if args.control is not None else [])]:
        problem = ctl.socket_path_problem(path)
        if problem:
            return f"cannot serve on {path}: {problem}"
    return None


def serve(args: argparse.Namespace) -> int:
    sockets: list[Path] = args.socket
    problem = check_sockets(args)
    if problem:
        log.error("%s", problem)
        return 2
    names = (
        [args.name]
        if len(sockets) == 1 and args.name
        else [f"{args.name or 'gpu'}{i}" for i in range(len(sockets))]
    )
    fast_path.POLL_US = max(0.0, args.poll_us)
    try:
        physical, type_name = make_physical(args, max(1, len(sockets)))
    except ValueError as exc:
        log.error("bad configuration: %s", exc)
        return 2
    server = GpuServer(physical)
    failed = create_instances(server, args, names, type_name)
    if failed:
        server.close()
        return failed
    try:
        control = start_control(server, args)
    except SocketPathError as exc:
        log.error("cannot serve control on %s: %s", args.control, exc)
        server.close()
        return 1
    try:
        viewers = start_viewers(server, args)
    except OSError as exc:
        log.error("cannot serve the displays: %s", exc)
        if control is not None:
            control.stop()
        server.close()
        return 1
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("received %s, shutting down", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    announce(server, type_name, control, viewers)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        viewers.stop()
        if control is not None:
            control.stop()
        server.close()
    return 0


def announce(
    server: GpuServer, type_name: str, control: ControlServer | None, viewers: Viewers
) -> None:
    """Say what is served: on stderr for people, on stdout for run_qemu.sh (``ready
    SOCKET`` per instance, then ``control PATH``, ``vnc HOST:PORT``, ``web URL``)."""
    for served in server.instances.values():
        log.info(
            "serving %s (%s, %d MiB aperture) on %s",
            served.device.name,
            type_name,
            served.device.aperture_size >> 20,
            served.endpoint.path,
        )
        print(f"ready {served.endpoint.path}", flush=True)
    if control is not None:
        log.info("control socket (QMP) on %s", control.path)
        print(f"control {control.path}", flush=True)
    for line in viewers.announce():
        print(line, flush=True)


def start_control(server: GpuServer, args: argparse.Namespace) -> ControlServer | None:
    if args.control is None:
        return None
    control = ControlServer(args.control, Control(server, args.control.parent))
    control.start()
    return control


def start_viewers(server: GpuServer, args: argparse.Namespace) -> Viewers:
    """The VNC server and the web page the arguments ask for (OSError if a port
    cannot be had)."""
    viewers = Viewers()
    try:
        if args.vnc is not None:
            host, port = args.vnc
            viewers.vnc = VncServer(server.displays, host, port)
            viewers.vnc.start()
        if args.web is not None:
            host, port = args.web
            viewers.web = WebServer(server.displays, host, port)
            viewers.web.start()
    except BaseException:
        viewers.stop()
        raise
    return viewers


@dataclass
class Viewers:
    vnc: VncServer | None = None
    web: WebServer | None = None

    def announce(self) -> list[str]:
        """The lines ``serve`` prints for them (run_qemu.sh reads them)."""
        lines = []
        if self.vnc is not None:
            lines.append(f"vnc {self.vnc.host}:{self.vnc.base_port}")
            log.info("VNC: displays from port %d on %s up", self.vnc.base_port, self.vnc.host)
        if self.web is not None:
            lines.append(f"web {self.web.url}")
            log.info("web page of every display: %s", self.web.url)
        return lines

    def stop(self) -> None:
        if self.web is not None:
            self.web.stop()
        if self.vnc is not None:
            self.vnc.stop()


def list_types(args: argparse.Namespace) -> int:
    physical = PhysicalGpu(args.memory, DEFAULT_CONTEXTS, DEFAULT_TYPES)
    try:
        print(f"{'type':<12}{'memory':>10}{'contexts':>10}{'available':>11}  description")
        for t in DEFAULT_TYPES:
            print(
                f"{t.name:<12}{t.memory >> 20:>8}Mi{t.contexts:>10}"
                f"{physical.available_instances(t.name):>11}  {t.description}"
            )
    finally:
        physical.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, getattr(args, "log_level", "info").upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if args.command == "serve":
        return serve(args)
    if args.command == "types":
        if args.control:
            return ctl.run(args, ctl.cmd_types)
        return list_types(args)
    if args.command == "trace" and args.action == "decode":
        return trace_view.decode_file(args)  # a saved file: no server needed
    return ctl.run(args, args.client_command)


if __name__ == "__main__":
    sys.exit(main())
