"""The control socket's commands and events, declared once.

``COMMANDS`` is the single source of truth: each command's name, arguments (name,
JSON type, required, choices, doc), what it returns and its handler are one
decorated function here.  The QMP server (``qmp.py``) checks arguments against the
table before calling a handler, ``query-commands`` lists it and docs/control.md is
generated from it (``python -m device.docs``).  ``EVENTS`` lists the asynchronous
events the same way.

A handler gets the ``Control`` (the GpuServer and where sockets go) and checked
arguments; it returns the JSON value of ``return``, or raises ``QmpError`` with a
QMP error class.  ``run`` turns the model's own errors into QMP errors, so that
nothing a client sends can end a worker thread.
"""

from __future__ import annotations

import base64
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from device import trace
from device.control.manager import GpuServer, ServedInstance
from device.control.schema import (
    COMMAND_NOT_FOUND,
    DEVICE_NOT_FOUND,
    ERROR_CLASSES,
    GENERIC_ERROR,
    Arg,
    ControlCommand,
    Event,
    Handler,
    QmpError,
)
from device.display import screendump
from device.display.source import FrameSource, describe_display
from device.errors import CapacityError, DeviceError, MgpuError, SetupError
from device.gpu import inject
from device.gpu.modes import DeniedPolicy, InterruptMode, MappingMode
from device.insight import perfetto as perfetto_trace

VERSION = (0, 1, 0)
PACKAGE = "mgpu"


@dataclass
class Control:
    """What handlers work on."""

    server: GpuServer
    socket_dir: Path  # where instance-add puts a socket it is not given


COMMANDS: dict[str, ControlCommand] = {}


def command(name: str, doc: str, returns: str, *args: Arg) -> Callable[[Handler], Handler]:
    """Declare a command; ``args`` must name the handler's keyword parameters."""

    def declare(handler: Handler) -> Handler:
        parameters = list(inspect.signature(handler).parameters)[1:]
        assert parameters == [a.name for a in args], f"{name}: {parameters} != args"
        COMMANDS[name] = ControlCommand(name, doc, args, returns, handler)
        return handler

    return declare


EVENTS: dict[str, Event] = {
    e.name: e
    for e in (
        Event("FAULT", "an aperture page was faulted in (served) or paged in", (
            "kind", "offset", "length")),
        Event("ACCESS_DENIED", "an aperture access touched no placed resource (denied, "
              "dummy, reported) or a writeback was dropped", ("kind", "offset", "length")),
        Event("REVOKED", "aperture pages were revoked from the guest", (
            "kind", "offset", "length")),
        Event("EVICTED", "device memory was evicted", ("kind", "offset", "length")),
        Event("DEVICE_RESET", "the device was reset (register, FLR, vfio-user or "
              "instance-reset)", ("resets", "resources_freed")),
        Event("ENGINE_ERROR", "a ring command or ring configuration failed", (
            "code", "context", "ring_offset")),
        Event("INSTANCE_ADDED", "an instance was created", ("type", "socket")),
        Event("INSTANCE_DELETED", "an instance was destroyed", ()),
        Event("CLIENT_CONNECTED", "a vfio-user client (QEMU) connected to an instance", ()),
        Event("CLIENT_DISCONNECTED", "the vfio-user client of an instance went away", ()),
    )
}  # fmt: skip

NAME = Arg("name", "string", "the instance", required=True)


def instance_of(control: Control, name: str) -> ServedInstance:
    served = control.server.instances.get(name)
    if served is None:
        raise QmpError(DEVICE_NOT_FOUND, f"no instance named '{name}'")
    return served


def run(control: Control, name: str, arguments: object) -> object:
    """Execute one command: checked arguments, handler, errors as QMP errors."""
    spec = COMMANDS.get(name)
    if spec is None:
        raise QmpError(COMMAND_NOT_FOUND, f"The command {name} has not been found")
    checked = spec.check(arguments)
    try:
        return spec.handler(control, **checked)
    except QmpError:
        raise
    except (CapacityError, SetupError, DeviceError, MgpuError, ValueError, OSError) as exc:
        raise QmpError(GENERIC_ERROR, str(exc)) from None


# ---------------------------------------------------------------------- queries


@command("query-version", "the server's version", "{qemu: {major, minor, micro}, package}")
def _query_version(control: Control) -> object:
    major, minor, micro = VERSION
    return {"qemu": {"major": major, "minor": minor, "micro": micro}, "package": PACKAGE}


@command("query-commands", "the commands this socket accepts", "[{name}]")
def _query_commands(control: Control) -> object:
    return [{"name": "qmp_capabilities"}, *({"name": n} for n in COMMANDS)]


@command(
    "query-types",
    "the instance types and how many more of each fit (mdev's available_instances)",
    "[{name, memory, contexts, description, available_instances}]",
)
def _query_types(control: Control) -> object:
    physical = control.server.physical
    return [
        {
            "name": t.name,
            "memory": t.memory,
            "contexts": t.contexts,
            "description": t.description,
            "available_instances": physical.available_instances(t.name),
        }
        for t in physical.types.values()
    ]


@command(
    "query-physical",
    "the physical GPU's pool: memory and contexts, used and free",
    "{name, memory, memory_used, memory_free, overcommit, limits, contexts, contexts_used, "
    "instances, resident_resources, evictions, page_ins}",
)
def _query_physical(control: Control) -> object:
    return {"name": control.server.physical.name, **control.server.physical.usage()}


@command(
    "query-instances",
    "every instance: type, socket, modes, client, injected faults and counters",
    "[{name, type, socket, mapping, policy, interrupts, memory, contexts, "
    "client_connected, clients_served, injected, stats}]",
)
def _query_instances(control: Control) -> object:
    return [served.describe() for served in list(control.server.instances.values())]


@command(
    "query-resources",
    "the live resources of an instance",
    "[{handle, size, resident, pages, runs, mapped_pages, pins}]",
    NAME,
)
def _query_resources(control: Control, name: str) -> object:
    return instance_of(control, name).device.describe_resources()


@command(
    "query-aperture",
    "an instance's aperture: size, mapping mode, policy and the mapped runs with residency",
    "{size, mapping, policy, runs: [{aperture_offset, length, handle, resource_offset, resident}]}",
    NAME,
)
def _query_aperture(control: Control, name: str) -> object:
    device = instance_of(control, name).device
    return {
        "size": device.aperture_size,
        "mapping": device.window.mode.value,
        "policy": device.window.policy.value,
        "runs": device.describe_aperture(),
    }


@command(
    "query-faults",
    "fault log records (after sequence number `since`, per instance) and counters",
    "{records: [{seq, time, instance, kind, offset, length, write, device_page, handle, "
    "policy}], counters: {instance: {kind: n}}, last_seq: {instance: n}}",
    Arg("name", "string", "one instance (default: all)"),
    Arg("since", "int", "only records with a higher sequence number (default 0)"),
)
def _query_faults(control: Control, name: str | None = None, since: int = 0) -> object:
    chosen = [instance_of(control, name)] if name is not None else list(
        control.server.instances.values()
    )  # fmt: skip
    records: list[dict[str, Any]] = []
    counters: dict[str, dict[str, int]] = {}
    last: dict[str, int] = {}
    for served in chosen:
        log = served.device.window.log
        found = log.since(since)
        records += [r._asdict() for r in found]
        with log.lock:
            counters[log.instance] = dict(log.counters)
            last[log.instance] = log.records[-1].seq if log.records else 0
    records.sort(key=lambda r: float(r["time"]))
    return {"records": records, "counters": counters, "last_seq": last}


# ---------------------------------------------------------------------- instances


@command(
    "instance-add",
    "create an instance and serve it on its vfio-user socket",
    "the instance, as query-instances shows it",
    NAME,
    Arg("type", "string", "an instance type (query-types)", required=True),
    Arg("socket", "string", "vfio-user socket path (default: NAME.sock by the control socket)"),
    Arg(
        "mapping",
        "string",
        "aperture mapping mode (default static)",
        choices=tuple(m.value for m in MappingMode),
    ),
    Arg(
        "policy",
        "string",
        "denied-access policy (default sigbus)",
        choices=tuple(p.value for p in DeniedPolicy),
    ),
    Arg(
        "interrupts",
        "string",
        "msix (default) or msi",
        choices=tuple(i.value for i in InterruptMode),
    ),
)
def _instance_add(
    control: Control,
    name: str,
    type: str,  # the argument's name on the wire
    socket: str | None = None,
    mapping: str = "static",
    policy: str = "sigbus",
    interrupts: str = "msix",
) -> object:
    if not name or "/" in name or len(name) > 64:
        raise QmpError(GENERIC_ERROR, f"bad instance name {name!r} (1-64 chars, no '/')")
    if name in control.server.instances:
        raise QmpError(GENERIC_ERROR, f"instance '{name}' already exists")
    if type not in control.server.physical.types:
        known = ", ".join(control.server.physical.types)
        raise QmpError(GENERIC_ERROR, f"unknown instance type '{type}' (known: {known})")
    path = Path(socket) if socket is not None else control.socket_dir / f"{name}.sock"
    served = control.server.create_instance(
        name, type, path, InterruptMode(interrupts), MappingMode(mapping), DeniedPolicy(policy)
    )
    return served.describe()


@command("instance-del", "destroy an instance (its client is disconnected)", "{}", NAME)
def _instance_del(control: Control, name: str) -> object:
    instance_of(control, name)
    try:
        control.server.destroy_instance(name)
    except KeyError:  # destroyed meanwhile by another client
        raise QmpError(DEVICE_NOT_FOUND, f"no instance named '{name}'") from None
    return {}


@command("instance-reset", "reset an instance as its DEVICE_RESET register does", "{}", NAME)
def _instance_reset(control: Control, name: str) -> object:
    instance_of(control, name).device.reset()
    return {}


# ---------------------------------------------------------------------- displays


def display_source(control: Control, name: str) -> FrameSource:
    """The display called ``name``: DeviceNotFound if there is no such instance, a
    GenericError if the instance has no display."""
    source = control.server.displays.get(name)
    if source is not None:
        return source
    instance_of(control, name)
    raise QmpError(
        GENERIC_ERROR,
        f"instance '{name}' has no display (its device model has no display engine); "
        "query-displays lists the displays",
    )


@command(
    "query-displays",
    "the displays (an instance has one when its device model has a display engine), "
    "their current mode and where to watch them",
    "[{name, width, height, format, serial, problem, vnc, web}]",
)
def _query_displays(control: Control) -> object:
    shown = []
    for name in control.server.displays.names():
        source = control.server.displays.get(name)
        if source is not None:
            shown.append({**describe_display(source), **control.server.displays.addresses(name)})
    return shown


@command(
    "screendump",
    "what an instance's display shows, as PNG (encoded by Pillow): written to `filename` "
    "on the server's side, or returned base64-encoded",
    "{width, height, filename} or {width, height, png}",
    NAME,
    Arg("filename", "string", "an absolute path the server writes the PNG to (default: "
        "return it as `png`, base64)"),
)  # fmt: skip
def _screendump(control: Control, name: str, filename: str | None = None) -> object:
    source = display_source(control, name)
    if filename is not None:
        path = Path(filename)
        if not path.is_absolute():
            raise QmpError(GENERIC_ERROR, f"filename must be an absolute path, not {filename!r}")
        width, height = screendump.write_png(source, path)
        return {"width": width, "height": height, "filename": filename}
    rgb = screendump.capture(source)
    png = base64.b64encode(screendump.png_bytes(rgb)).decode()
    return {"width": rgb.shape[1], "height": rgb.shape[0], "png": png}


# ---------------------------------------------------------------------- tracing


@command(
    "trace-set",
    "start or stop tracing; stopping can write the buffered records, decoded, as a "
    "Perfetto (Chrome trace-event JSON) file: a track per instance, register, ring and "
    "engine, events named in the driver's words, flows from each submit to its fence",
    "{enabled, kinds, instances, jsonl, buffered, written}",
    Arg("enable", "boolean", "start (true) or stop (false)", required=True),
    Arg("kinds", "[string]", "record only these kinds (default all): " + ", ".join(trace.KINDS)),
    Arg("instances", "[string]", "record only these instances (default all)"),
    Arg("jsonl", "string", "also append each record to this JSON lines file (server side)"),
    Arg("perfetto", "string", "when stopping: write the buffer to this trace file"),
    Arg("clear", "boolean", "empty the buffer first"),
)
def _trace_set(
    control: Control,
    enable: bool,
    kinds: list[str] | None = None,
    instances: list[str] | None = None,
    jsonl: str | None = None,
    perfetto: str | None = None,
    clear: bool = False,
) -> object:
    if clear:
        trace.clear()
    if enable:
        trace.start(kinds, instances, Path(jsonl) if jsonl is not None else None)
    else:
        trace.stop()
    written = perfetto_trace.write(Path(perfetto), trace.records()) if perfetto is not None else 0
    return {**trace.status(), "written": written}


@command(
    "query-trace",
    "the buffered trace records after sequence number `since`",
    "{records: [{seq, ts, instance, kind, ph, ...}], last_seq}",
    Arg("since", "int", "only records with a higher sequence number (default 0)"),
    Arg("kinds", "[string]", "only these kinds"),
    Arg("limit", "int", "at most this many (the oldest first; default 10000)"),
)
def _query_trace(
    control: Control, since: int = 0, kinds: list[str] | None = None, limit: int = 10000
) -> object:
    found = trace.records(since, kinds)[: max(0, limit)]
    return {"records": found, "last_seq": found[-1]["seq"] if found else since}


# ---------------------------------------------------------------------- fault injection


def _fault_args() -> tuple[Arg, ...]:
    types = {int: "int", float: "number", str: "string"}
    seen: dict[str, Arg] = {}
    for spec in inject.FAULTS.values():
        for pname, param in spec.params.items():
            uses = [s.name for s in inject.FAULTS.values() if pname in s.params]
            seen.setdefault(
                pname, Arg(pname, types[param.type], f"{param.doc} ({', '.join(uses)})")
            )
    return tuple(seen.values())


FAULT_ARGS = _fault_args()


def _inject_fault(control: Control, name: str, fault: str, **params: Any) -> object:
    device = instance_of(control, name).device
    return {"fault": fault, **device.inject(fault, params)}


COMMANDS["inject-fault"] = ControlCommand(
    "inject-fault",
    "make an instance misbehave; the parameters a fault takes are in the fault table",
    (NAME, Arg("fault", "string", "what to inject", True, tuple(inject.FAULTS)), *FAULT_ARGS),
    "{fault, ...its effective parameters}",
    _inject_fault,
)


@command(
    "inject-clear",
    "disarm one injected fault, or all; a hung command then runs on",
    "{cleared: [fault]}",
    NAME,
    Arg("fault", "string", "the fault to disarm (default: all)", choices=tuple(inject.FAULTS)),
)
def _inject_clear(control: Control, name: str, fault: str | None = None) -> object:
    return {"cleared": instance_of(control, name).device.faults.clear(fault)}


# The schema's vocabulary is re-exported: the QMP server, the docs and tests take it
# from here, with the table.
__all__ = [
    "COMMANDS", "COMMAND_NOT_FOUND", "DEVICE_NOT_FOUND", "ERROR_CLASSES", "EVENTS",
    "GENERIC_ERROR", "Arg", "Control", "ControlCommand", "Event", "Handler", "QmpError",
    "command", "instance_of", "run",
]  # fmt: skip
