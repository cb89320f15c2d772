"""Boot a guest in QEMU with GPU instances attached, and drive it: QMP and a guest agent.

``GuestVM`` is a context manager: whatever happens, QEMU is killed (by its PID) and
its sockets are removed on exit.  QMP goes through ``qemu.qmp`` (QEMU listens on a
socket we serve, as QEMU's own ``QEMUMachine`` does).  Commands run in the guest
through the agent that ``/init`` starts on the second serial port: each command's
output comes back framed by BEGIN/END markers with its exit status.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from qemu.qmp.legacy import QEMUMonitorProtocol

from device.errors import MgpuError
from guest_images import Runtime
from guest_images.build import SHARE_TAG
from guest_images.overlay import initrd_with_modules

BOOT_TIMEOUT = 120.0
GUEST_SHARE = "/mnt/share"  # where /init mounts the host directory of ``share``


class GuestError(MgpuError):
    """The guest or QEMU misbehaved; the message carries the serial log's tail."""


def vfio_user_device(dev_id: str, bus: str, socket_path: Path) -> dict[str, Any]:
    return {
        "driver": "vfio-user-pci",
        "id": dev_id,
        "bus": bus,
        "socket": {"type": "unix", "path": str(socket_path)},
    }


def qemu_command(
    runtime: Runtime,
    *,
    memory_mb: int = 512,
    accel: str = "tcg",
    vfio_user_sockets: Sequence[Path] = (),
    spare_root_ports: int = 2,
    shared_ram: bool = True,
    append: str = "",
    serial: Sequence[str] = (),
    extra_args: Sequence[str] = (),
    kernel: Path | None = None,
    initrd: Path | None = None,
    share: Path | None = None,
    gdb_port: int | None = None,
    gdb_wait: bool = False,
) -> list[str]:
    """QEMU's argv: q35, our kernel and initramfs, one root port per GPU plus spares.

    ``kernel``/``initrd`` replace the runtime's; ``share`` is a host directory the
    guest's /init mounts at /mnt/share (9p); ``gdb_port`` opens QEMU's gdbstub on
    127.0.0.1 (``gdb_wait``: the CPUs wait for the debugger's first continue)."""
    if share is not None:
        append = f"mgpu.share=1 {append}"
    if gdb_port is not None:
        append = f"nokaslr {append}"  # so vmlinux symbols match the running kernel
    argv = [
        *runtime.qemu_argv,
        "-machine",
        f"q35,accel={accel}",
        "-m",
        str(memory_mb),
        "-nodefaults",
        "-display",
        "none",
        "-no-reboot",
        "-kernel",
        str(kernel or runtime.kernel),
        "-initrd",
        str(initrd or runtime.initrd),
        "-append",
        f"console=ttyS0 panic=-1 {append}".strip(),
    ]
    if accel == "tcg":
        argv += ["-cpu", "max"]
    if shared_ram:
        # fd-backed, shared guest RAM: DMA_MAP then comes with fds the server can mmap.
        argv += [
            "-object",
            f"memory-backend-memfd,id=mem,size={memory_mb}M,share=on",
            "-machine",
            "memory-backend=mem",
        ]
    for spec in serial:
        argv += ["-serial", spec]
    if share is not None:
        # security_model=none: the guest sees the host's owners and modes as they are.
        argv += [
            "-fsdev",
            f"local,id=share,path={share},security_model=none",
            "-device",
            f"virtio-9p-pci,fsdev=share,mount_tag={SHARE_TAG}",
        ]
    if gdb_port is not None:
        argv += ["-gdb", f"tcp:127.0.0.1:{gdb_port}", *(["-S"] if gdb_wait else [])]
    ports = len(vfio_user_sockets) + spare_root_ports
    for n in range(ports):
        argv += ["-device", f"pcie-root-port,id=rp{n},chassis={n + 1},slot={n + 1},bus=pcie.0"]
    for n, path in enumerate(vfio_user_sockets):
        argv += ["-device", json.dumps(vfio_user_device(f"gpu{n}", f"rp{n}", path))]
    return [*argv, *extra_args]


class GuestVM:
    def __init__(
        self,
        runtime: Runtime,
        workdir: Path,
        *,
        vfio_user_sockets: Sequence[Path] = (),
        memory_mb: int = 512,
        accel: str = "tcg",
        agent: bool = True,
        shared_ram: bool = True,
        cmdline_extra: str = "",
        extra_args: Sequence[str] = (),
        boot_timeout: float = BOOT_TIMEOUT,
        share: Path | None = None,
        kernel: Path | None = None,
        modules: Path | None = None,
        gdb_port: int | None = None,
        gdb_wait: bool = False,
    ) -> None:
        self.runtime = runtime
        self.workdir = Path(workdir)
        self.vfio_user_sockets = list(vfio_user_sockets)
        self.memory_mb = memory_mb
        self.accel = accel
        self.agent = agent
        self.shared_ram = shared_ram
        self.cmdline_extra = cmdline_extra
        self.extra_args = list(extra_args)
        self.boot_timeout = boot_timeout
        self.share = Path(share).resolve() if share is not None else None
        self.kernel = Path(kernel).resolve() if kernel is not None else None
        self.modules = Path(modules).resolve() if modules is not None else None
        self.gdb_port = gdb_port
        self.gdb_wait = gdb_wait
        # With ``modules``: our initramfs with them appended, written by start().
        self.initrd = self.workdir / "initrd-with-modules.img" if modules is not None else None
        self.serial_log = self.workdir / "serial.log"
        self.qemu_log = self.workdir / "qemu.log"
        self.qmp_path = self.workdir / "qmp.sock"
        self.agent_path = self.workdir / "agent.sock"
        self.process: subprocess.Popen[bytes] | None = None
        self._qmp: QEMUMonitorProtocol | None = None
        self._agent: socket.socket | None = None
        self._agent_buffer = b""
        self._next_id = 1
        self.boot_seconds: float | None = None

    # ------------------------------------------------------------------ lifecycle

    @property
    def qmp(self) -> QEMUMonitorProtocol:
        """The QMP connection (qemu.qmp's synchronous client); only after ``start``."""
        if self._qmp is None:
            raise GuestError("QEMU is not running: call start() first")
        return self._qmp

    def command_line(self) -> list[str]:
        # ttyS0 (console) goes to a file; ttyS1 is the agent's port, a socket we connect to.
        serial = [f"file:{self.serial_log}"]
        agent_args: list[str] = []
        if self.agent:
            serial.append("chardev:agent")
            agent_args = ["-chardev", f"socket,id=agent,path={self.agent_path},server=on,wait=off"]
        return qemu_command(
            self.runtime,
            memory_mb=self.memory_mb,
            accel=self.accel,
            vfio_user_sockets=self.vfio_user_sockets,
            shared_ram=self.shared_ram,
            append=f"{'mgpu.agent=1 ' if self.agent else ''}{self.cmdline_extra}",
            serial=serial,
            kernel=self.kernel,
            initrd=self.initrd,
            share=self.share,
            gdb_port=self.gdb_port,
            gdb_wait=self.gdb_wait,
            extra_args=[
                *agent_args,
                "-chardev",
                f"socket,id=qmp,path={self.qmp_path}",
                "-object",
                "monitor-qmp,id=qmp-monitor,chardev=qmp",
                *self.extra_args,
            ],
        )

    def start(self) -> None:
        """Launch QEMU and wait until QMP is up and (with the agent) the guest is ready."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        for path, what in ((self.kernel, "kernel"), (self.share, "shared directory")):
            if path is not None and not path.exists():
                raise GuestError(f"the {what} {path} does not exist")
        if self.modules is not None and self.initrd is not None:
            initrd_with_modules(self.runtime.initrd, self.modules, self.initrd)
        started = time.monotonic()
        self._qmp = QEMUMonitorProtocol(str(self.qmp_path), server=True)
        with open(self.qemu_log, "wb") as log:
            self.process = subprocess.Popen(
                self.command_line(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        try:
            self._qmp.accept(timeout=30)
        except Exception as exc:
            raise GuestError(f"QEMU did not connect to QMP: {exc}\n{self.diagnostics()}") from exc
        if not self.agent:
            return
        self._connect_agent(started + self.boot_timeout)
        self._wait_for(b"@@MGPU-READY\n", started + self.boot_timeout)
        self.boot_seconds = time.monotonic() - started

    def _connect_agent(self, deadline: float) -> None:
        while True:
            self._check_alive()
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(self.agent_path))
                self._agent = sock
                return
            except OSError:
                sock.close()
                if time.monotonic() > deadline:
                    raise GuestError(f"no agent socket\n{self.diagnostics()}") from None
                time.sleep(0.05)

    def _check_alive(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            raise GuestError(
                f"QEMU exited with status {self.process.returncode}\n{self.diagnostics()}"
            )

    def diagnostics(self) -> str:
        parts = [f"command line: {' '.join(self.command_line())}"]
        for name, path in (("QEMU output", self.qemu_log), ("serial console", self.serial_log)):
            with contextlib.suppress(OSError):
                tail = path.read_text(errors="replace")[-3000:]
                parts.append(f"--- {name} (tail) ---\n{tail}")
        return "\n".join(parts)

    def quit(self, timeout: float = 30) -> int:
        """QMP quit; returns QEMU's exit status."""
        assert self.process is not None
        with contextlib.suppress(Exception):
            self.qmp.cmd("quit")
        return self.process.wait(timeout)

    def close(self) -> None:
        if self._agent is not None:
            self._agent.close()
            self._agent = None
        if self._qmp is not None:
            with contextlib.suppress(Exception):
                self._qmp.close()
            self._qmp = None
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(30)
        for path in (self.qmp_path, self.agent_path):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def __enter__(self) -> GuestVM:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ------------------------------------------------------------------ guest agent

    def _wait_for(self, marker: bytes, deadline: float) -> bytes:
        """Read agent output until ``marker``; returns everything before it."""
        if self._agent is None:
            raise GuestError("no guest agent: GuestVM(agent=True) and start() first")
        while marker not in self._agent_buffer:
            self._check_alive()
            left = deadline - time.monotonic()
            if left <= 0:
                raise GuestError(
                    f"timed out waiting for {marker!r} from the guest agent\n{self.diagnostics()}"
                )
            self._agent.settimeout(min(left, 1.0))
            try:
                chunk = self._agent.recv(65536)
            except TimeoutError:
                continue
            if not chunk:
                raise GuestError(f"guest agent closed its port\n{self.diagnostics()}")
            self._agent_buffer += chunk
        before, _, self._agent_buffer = self._agent_buffer.partition(marker)
        return before

    def run(self, command: str, timeout: float = 60) -> tuple[int, str]:
        """Run a shell command in the guest; returns (exit status, stdout+stderr)."""
        if "\n" in command:
            raise ValueError("guest commands are one line")
        if self._agent is None:
            raise GuestError("no guest agent: GuestVM(agent=True) and start() first")
        ident = self._next_id
        self._next_id += 1
        self._agent.sendall(f"{ident} {command}\n".encode())
        deadline = time.monotonic() + timeout
        self._wait_for(f"@@MGPU-BEGIN {ident}\n".encode(), deadline)
        output = self._wait_for(f"@@MGPU-END {ident} ".encode(), deadline)
        status = self._wait_for(b"\n", deadline)
        text = output.decode(errors="replace")
        return int(status), text[:-1] if text.endswith("\n") else text

    def check(self, command: str, timeout: float = 60) -> str:
        status, output = self.run(command, timeout)
        if status != 0:
            raise GuestError(f"guest command {command!r} exited {status}:\n{output}")
        return output

    def dmesg(self, timeout: float = 30) -> str:
        """The guest kernel's log (``dmesg``) through the agent."""
        return self.check("dmesg", timeout)

    def kernel_log(self) -> str:
        """The kernel log: ``dmesg`` if the guest still answers, else the serial console
        (which has the kernel's messages up to where the guest stopped)."""
        if self._agent is not None and self.process is not None and self.process.poll() is None:
            with contextlib.suppress(GuestError, OSError):
                return self.dmesg()
        try:
            return self.serial_log.read_text(errors="replace")
        except OSError:
            return ""

    # ------------------------------------------------------------------ QMP

    def wait_event(self, name: str, timeout: float, **match: Any) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise GuestError(f"no QMP event {name} {match} within {timeout}s")
            try:
                event = self.qmp.pull_event(wait=left)
            except TimeoutError:  # asyncio's, the same class since Python 3.11
                continue  # the deadline check above reports it
            if event is None:
                continue
            data = event.get("data", {})
            if event.get("event") == name and all(data.get(k) == v for k, v in match.items()):
                return dict(event)

    def hot_unplug(self, dev_id: str, timeout: float = 60) -> None:
        """device_del, then wait for the guest to release it (DEVICE_DELETED)."""
        self.qmp.cmd("device_del", id=dev_id)
        self.wait_event("DEVICE_DELETED", timeout, device=dev_id)

    def hot_plug(self, dev_id: str, bus: str, socket_path: Path) -> None:
        """device_add a vfio-user GPU on a (hotplug-capable) PCIe root port."""
        self.qmp.cmd("device_add", **vfio_user_device(dev_id, bus, socket_path))


def probe_kvm(runtime: Runtime, workdir: Path | None = None, timeout: float = 20) -> bool:
    """Does a real guest boot under KVM here?  (Nested KVM on these VMs often cannot: it
    hangs or stops with an internal error.)  A TCG boot takes about 4 s, so a KVM boot
    that has not finished in ``timeout`` seconds counts as a failure."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    del workdir  # kept for callers that pass one: the probe boot writes no files
    argv = qemu_command(
        runtime,
        memory_mb=256,
        accel="kvm",
        append="mgpu.test=boot",
        serial=["stdio"],
        spare_root_ports=0,
        shared_ram=False,
    )
    try:
        out = subprocess.run(
            argv, capture_output=True, timeout=timeout, text=True, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired:
        return False
    return re.search(r"MGPU-DONE rc=0", out.stdout) is not None
