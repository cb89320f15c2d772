"""The mdevctl-style commands of ``mgpu``: they talk to a running server's control
socket (``mgpu serve --control PATH``) with ``qemu.qmp``'s own client.

    mgpu types | list | start --type T [--uuid U] | stop U
    mgpu faults [--follow] | trace start|stop|show [--decode] | inject NAME FAULT | top
    mgpu displays | screendump NAME FILE.png
    mgpu trace decode FILE [--perfetto OUT]     (a saved JSON lines file; no server)

Each prints a table for people, or the command's JSON with ``--json``.  The socket
comes from ``--control`` or ``$MGPU_CONTROL``.  Errors the server answers with are
printed as ``mgpu: CLASS: desc`` and exit 1; so are a socket that is not a control
socket (no QMP greeting in ``GREETING_TIMEOUT`` seconds: an instance's vfio-user
socket, say) and a server that goes away while a command or ``--follow`` waits.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import socket
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from qemu.qmp import ExecuteError, QMPError
from qemu.qmp.legacy import QEMUMonitorProtocol

from device import trace
from device.control import trace_view
from device.gpu import inject
from device.gpu.modes import DeniedPolicy, InterruptMode, MappingMode

CONTROL_ENV = "MGPU_CONTROL"
FAULT_EVENTS = ("FAULT", "ACCESS_DENIED", "REVOKED", "EVICTED")
UNIX_PATH_MAX = 107  # bytes in a unix socket path, as the kernel allows
GREETING_TIMEOUT = 5.0  # a control socket greets at once; anything else never does
LIVENESS_INTERVAL = 1.0  # --follow: how often an idle wait checks the server is there


class NotAControlSocket(Exception):
    """The socket answers, but not as a QMP control socket does."""


def socket_path_problem(path: str | os.PathLike[str]) -> str | None:
    """Why a unix socket cannot be made at ``path`` before anyone tries, or None."""
    size = len(os.fsencode(os.path.abspath(path)))
    if size > UNIX_PATH_MAX:
        return (
            f"the socket path {path} is {size} bytes long; the kernel allows "
            f"{UNIX_PATH_MAX}: choose a shorter one"
        )
    return None


def check_greeting(path: str, timeout: float = GREETING_TIMEOUT) -> None:
    """Connect once and read the QMP greeting, so that a socket that never sends one
    (an instance's vfio-user socket) is an error, not a hang.  OSError if nobody
    listens; NotAControlSocket if what answers is not QMP."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        data = b""
        try:
            while b"\n" not in data and len(data) < 4096:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
        except TimeoutError:
            pass
    if not data.lstrip().startswith(b'{"QMP"'):
        what = f"it sent {data[:40]!r}" if data else f"no greeting in {timeout:g} s"
        raise NotAControlSocket(
            f"{path} is not a control socket ({what}): is it a GPU instance's vfio-user "
            "socket? The control socket is the one 'mgpu serve --control PATH' serves "
            "(run_qemu.sh prints it: .../control.sock)"
        )


class Client:
    """A synchronous control-socket client (``qemu.qmp.legacy``)."""

    def __init__(self, path: str) -> None:
        check_greeting(path)
        self.qmp = QEMUMonitorProtocol(path)
        self.qmp.connect()

    def call(self, command: str, **arguments: Any) -> Any:
        args = {k: v for k, v in arguments.items() if v is not None}
        return self.qmp.cmd(command, **args)

    def close(self) -> None:
        self.qmp.close()


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A plain text table with a header line."""
    cells = [[str(row.get(c, "")) for c in columns] for row in rows]
    widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join(lines)


def _mib(value: int) -> str:
    return f"{value / (1 << 20):.0f}Mi"


# ---------------------------------------------------------------------- commands


def cmd_types(client: Client, args: argparse.Namespace) -> Any:
    types = client.call("query-types")
    rows = [{**t, "memory": _mib(t["memory"])} for t in types]
    cols = ("name", "memory", "contexts", "available_instances", "description")
    return types, table(rows, cols)


def cmd_list(client: Client, args: argparse.Namespace) -> Any:
    instances = client.call("query-instances")
    rows = [
        {
            **i,
            "client": "connected" if i["client_connected"] else "-",
            "memory": _mib(i["memory"]),
            "injected": ",".join(i["injected"]) or "-",
        }
        for i in instances
    ]
    cols = ("name", "type", "memory", "mapping", "interrupts", "client", "injected", "socket")
    return instances, table(rows, cols)


def cmd_start(client: Client, args: argparse.Namespace) -> Any:
    problem = args.socket and socket_path_problem(args.socket)
    if problem:
        raise ValueError(problem)
    name = args.uuid or str(uuid.uuid4())
    result = client.call(
        "instance-add", name=name, type=args.type, socket=args.socket, mapping=args.mapping,
        policy=args.policy, interrupts=args.interrupts,
    )  # fmt: skip
    return result, f"{name}\n(socket {result['socket']})"


def cmd_stop(client: Client, args: argparse.Namespace) -> Any:
    return client.call("instance-del", name=args.uuid), f"stopped {args.uuid}"


def _fault_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {**r, "offset": f"{r['offset']:#x}", "write": "w" if r.get("write") else "r"}
        for r in records
    ]


FAULT_COLUMNS = ("instance", "seq", "kind", "offset", "length", "write", "handle", "policy")


def cmd_faults(client: Client, args: argparse.Namespace) -> Any:
    result = client.call("query-faults", name=args.instance, since=args.since)
    if not args.follow:
        return result, table(_fault_rows(result["records"]), FAULT_COLUMNS)
    emit(args, result, table(_fault_rows(result["records"]), FAULT_COLUMNS))
    follow_events(client, args, FAULT_EVENTS)
    return None


def follow_events(client: Client, args: argparse.Namespace, names: Sequence[str]) -> None:
    """Print events as they come, until interrupted, ``--limit`` of them, or the server
    goes away (an idle wait asks it for its version every LIVENESS_INTERVAL)."""
    seen = 0
    while args.limit is None or seen < args.limit:
        try:
            message = client.qmp.pull_event(wait=LIVENESS_INTERVAL)
        except TimeoutError:
            client.call("query-version")  # raises once the server has closed the socket
            continue
        if message is None or message.get("event") not in names:
            continue
        data = message.get("data", {})
        if args.instance is not None and data.get("instance") != args.instance:
            continue
        seen += 1
        if args.json:
            print(json.dumps(message), flush=True)
        else:
            extra = " ".join(f"{k}={v}" for k, v in data.items() if k != "instance")
            print(f"{message['event']:<14} {data.get('instance', '')}  {extra}", flush=True)


def cmd_trace(client: Client, args: argparse.Namespace) -> Any:
    if args.action == "start":
        result = client.call(
            "trace-set", enable=True, kinds=args.kind, instances=args.instance,
            jsonl=args.jsonl, clear=True,
        )  # fmt: skip
        return result, f"tracing {', '.join(result['kinds'] or ['everything'])}"
    if args.action == "stop":
        perfetto = os.path.abspath(args.perfetto) if args.perfetto else None
        result = client.call("trace-set", enable=False, perfetto=perfetto)
        where = f"; {result['written']} records in {perfetto} (open it in ui.perfetto.dev)"
        return result, "tracing stopped" + (where if perfetto else "")
    result = client.call("query-trace", since=args.since, limit=args.limit or 10000)
    if args.decode:
        # Decoding needs what came before (the tail a TAIL write moved from): give
        # --since 0 for the whole buffer.
        decoded = trace_view.decoded_json(result["records"])
        return {**result, "decoded": decoded}, trace_view.decoded_table(result["records"])
    rows = [
        {**r, "ts": f"{r['ts']:.6f}", "detail": _detail(r)}
        for r in result["records"]
    ]  # fmt: skip
    return result, table(rows, ("seq", "ts", "instance", "kind", "ph", "detail"))


def _detail(record: dict[str, Any]) -> str:
    skip = {"seq", "ts", "instance", "kind", "ph"}
    return " ".join(f"{k}={v}" for k, v in record.items() if k not in skip)


def cmd_inject(client: Client, args: argparse.Namespace) -> Any:
    if args.fault == "clear":
        result = client.call("inject-clear", name=args.name, fault=args.which)
        return result, f"cleared {', '.join(result['cleared']) or 'nothing (none was armed)'}"
    params = {p: getattr(args, p) for p in _fault_params()}
    result = client.call("inject-fault", name=args.name, fault=args.fault, **params)
    return result, f"injected {args.fault} into {args.name}: " + json.dumps(result)


def _top_rows(
    before: dict[str, dict[str, Any]], after: list[dict[str, Any]], seconds: float
) -> list[dict[str, Any]]:
    rows = []
    for instance in after:
        now, then = instance["stats"], before.get(instance["name"], instance["stats"])

        def rate(key: str, now: dict[str, Any] = now, then: dict[str, Any] = then) -> float:
            return float(now[key] - then[key]) / seconds

        rows.append(
            {
                "name": instance["name"],
                "regs/s": f"{rate('register_accesses'):.0f}",
                "faults/s": f"{rate('faults'):.0f}",
                "resident": _mib(now["resident_bytes"]),
                "ring busy": f"{100 * rate('ring_busy_seconds'):.1f}%",
                "cmds/s": f"{rate('commands'):.0f}",
                "client": "yes" if instance["client_connected"] else "-",
            }
        )
    return rows


def cmd_top(client: Client, args: argparse.Namespace) -> Any:
    columns = ("name", "regs/s", "faults/s", "resident", "ring busy", "cmds/s", "client")
    before = {i["name"]: i["stats"] for i in client.call("query-instances")}
    started = time.monotonic()
    shown = 0
    while args.count is None or shown < args.count:
        time.sleep(args.interval)
        instances = client.call("query-instances")
        now = time.monotonic()
        rows = _top_rows(before, instances, now - started)
        before, started, shown = {i["name"]: i["stats"] for i in instances}, now, shown + 1
        if args.json:
            print(json.dumps(rows), flush=True)
            continue
        if sys.stdout.isatty():
            print("\033[H\033[2J", end="")
        print(table(rows, columns) + "\n", flush=True)
    return None


def cmd_displays(client: Client, args: argparse.Namespace) -> Any:
    displays = client.call("query-displays")
    rows = [
        {
            **d,
            "mode": f"{d['width']}x{d['height']} {d['format']}" if d["width"] else "-",
            "vnc": d.get("vnc") or "-",
            "problem": d["problem"] or "",
        }
        for d in displays
    ]
    return displays, table(rows, ("name", "mode", "serial", "vnc", "problem"))


def cmd_screendump(client: Client, args: argparse.Namespace) -> Any:
    result = client.call("screendump", name=args.name)
    data = base64.b64decode(result["png"])
    with open(args.file, "wb") as out:
        out.write(data)
    shown = {k: v for k, v in result.items() if k != "png"} | {"file": args.file}
    return shown, f"{args.file}: {result['width']}x{result['height']} PNG, {len(data)} bytes"


def _fault_params() -> list[str]:
    return list(dict.fromkeys(p for s in inject.FAULTS.values() for p in s.params))


# ---------------------------------------------------------------------- parser

Command = Callable[[Client, argparse.Namespace], Any]


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the client subcommands to ``mgpu``'s parser (``types`` is shared)."""

    def client_parser(name: str, func: Command, help_text: str) -> argparse.ArgumentParser:
        parser = sub.add_parser(name, help=help_text, description=help_text)
        add_client_options(parser)
        parser.set_defaults(client_command=func)
        return parser

    client_parser("list", cmd_list, "list the instances of a running server")
    start = client_parser("start", cmd_start, "create an instance on a running server")
    start.add_argument("--type", required=True, help="instance type (mgpu types)")
    start.add_argument("--uuid", default=None, help="its name (default: a new UUID)")
    start.add_argument("--socket", default=None, help="vfio-user socket path")
    start.add_argument("--mapping", choices=[m.value for m in MappingMode], default=None)
    start.add_argument("--policy", choices=[p.value for p in DeniedPolicy], default=None)
    start.add_argument("--interrupts", choices=[i.value for i in InterruptMode], default=None)
    stop = client_parser("stop", cmd_stop, "destroy an instance of a running server")
    stop.add_argument("uuid", help="the instance")
    faults = client_parser("faults", cmd_faults, "show the fault log, or follow it live")
    faults.add_argument("--instance", default=None)
    faults.add_argument("--since", type=int, default=0, help="after this sequence number")
    faults.add_argument("--follow", action="store_true", help="then print faults as they come")
    faults.add_argument("--limit", type=int, default=None, help="stop after this many events")
    tracing = client_parser("trace", cmd_trace, "start or stop tracing, or show the records")
    tracing.add_argument("action", choices=["start", "stop", "show", "decode"])
    tracing.add_argument(
        "file", nargs="?", default=None, help="decode: a JSON lines file (trace start --jsonl)"
    )
    tracing.add_argument(
        "--decode", action="store_true",
        help="show: in the driver's words (register names, commands queued, faults)",
    )  # fmt: skip
    tracing.add_argument("--kind", action="append", choices=list(trace.KINDS), default=None)
    tracing.add_argument("--instance", action="append", default=None)
    tracing.add_argument("--jsonl", default=None, help="start: also write JSON lines here")
    tracing.add_argument(
        "--perfetto", default=None, help="stop, decode: write a Perfetto trace here"
    )
    tracing.add_argument("--since", type=int, default=0)
    tracing.add_argument("--limit", type=int, default=None)
    injecting = client_parser("inject", cmd_inject, "inject a fault, or clear injected ones")
    injecting.add_argument("name", help="the instance")
    injecting.add_argument("fault", choices=[*inject.FAULTS, "clear"])
    injecting.add_argument("which", nargs="?", default=None, help="clear: one fault only")
    for param in _fault_params():
        kind = next(s.params[param] for s in inject.FAULTS.values() if param in s.params)
        injecting.add_argument(f"--{param}", type=kind.type, default=None, help=kind.doc)
    client_parser("displays", cmd_displays, "list the displays, their modes and VNC ports")
    dump = client_parser("screendump", cmd_screendump, "save what an instance shows as PNG")
    dump.add_argument("name", help="the instance")
    dump.add_argument("file", help="the PNG file to write (here, on the client's side)")
    top = client_parser("top", cmd_top, "live per-instance activity")
    top.add_argument("--interval", type=float, default=1.0)
    top.add_argument("--count", type=int, default=None, help="stop after this many samples")


def add_client_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--control",
        default=os.environ.get(CONTROL_ENV),
        metavar="PATH",
        help=f"the server's control socket (default: ${CONTROL_ENV})",
    )
    parser.add_argument("--json", action="store_true", help="print JSON, for scripts")


def emit(args: argparse.Namespace, result: Any, text: str) -> None:
    print(json.dumps(result, indent=2) if args.json else text, flush=True)


def run(args: argparse.Namespace, func: Command) -> int:
    if not args.control:
        print(
            f"mgpu: no control socket: pass --control PATH or set ${CONTROL_ENV}", file=sys.stderr
        )
        return 2
    try:
        client = Client(args.control)
    except NotAControlSocket as exc:
        print(f"mgpu: {exc}", file=sys.stderr)
        return 1
    except (QMPError, OSError, EOFError) as exc:
        print(f"mgpu: cannot connect to {args.control}: {exc}", file=sys.stderr)
        return 1
    try:
        outcome = func(client, args)
    except ExecuteError as exc:
        print(f"mgpu: {exc.error_class}: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:  # refused here, before asking the server
        print(f"mgpu: {exc}", file=sys.stderr)
        return 2
    except (QMPError, OSError, EOFError) as exc:
        # ExecuteError aside, qemu.qmp reports a closed connection in several ways.
        detail = f" ({type(exc).__name__}{': ' + str(exc) if str(exc) else ''})"
        print(
            f"mgpu: the server closed the control socket {args.control}: it stopped{detail}",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        with contextlib.suppress(QMPError, OSError, EOFError):
            client.close()
    if outcome is not None:
        emit(args, *outcome)
    return 0
