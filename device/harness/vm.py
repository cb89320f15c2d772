"""Boot a guest in QEMU with GPU instances attached, and drive it: QMP and a guest agent.

``GuestVM`` is a context manager: whatever happens, QEMU is killed (by its PID) and
its sockets are removed on exit.  QMP goes through ``qemu.qmp`` (QEMU listens on a
socket we serve, as QEMU's own ``QEMUMachine`` does).  Commands run in the guest
through the agent that ``/init`` starts on the second serial port: each command's
output comes back framed by BEGIN/END markers with its exit status.

Serial ports: ttyS0 is the console (a file, or the terminal), ttyS1 the agent, ttyS2
the kernel log: ``/init`` copies /dev/kmsg there as it is written, so the whole log
is on the host even when the guest hangs, is busy or dies (``kernel_log``).

A guest reset (QMP ``system_reset``, a reboot, a panic) reboots the guest; the agent
announces itself again and ``wait_for_reboot`` waits for that.  ``reboot=False``
gives QEMU's ``-no-reboot`` (a reset powers off) for whoever needs the old behaviour.
"""

from __future__ import annotations

import contextlib
import os
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
from device.harness.qemu import exit_description, format_kmsg, qemu_command, vfio_user_device
from guest_images import Runtime
from guest_images.overlay import initrd_with_modules

BOOT_TIMEOUT = 120.0
GUEST_SHARE = "/mnt/share"  # where /init mounts the host directory of ``share``


class GuestError(MgpuError):
    """The guest or QEMU misbehaved; the message carries the serial log's tail, and
    ``output`` what a guest command had printed when it happened (if one was running)."""

    def __init__(self, message: str, output: str = "") -> None:
        super().__init__(message)
        self.output = output


class GuestTimeout(GuestError):
    """A guest command did not finish in time; ``output`` is what it printed so far."""


READY = b"@@MGPU-READY\n"


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
        qmp_path: Path | None = None,
        reboot: bool = True,
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
        self.reboot = reboot
        # With ``modules``: our initramfs with them appended, written by start().
        self.initrd = self.workdir / "initrd-with-modules.img" if modules is not None else None
        self.serial_log = self.workdir / "serial.log"
        self.qemu_log = self.workdir / "qemu.log"
        self.kmsg_log = self.workdir / "kmsg.log"  # ttyS2: /dev/kmsg as the guest writes it
        self.qmp_path = Path(qmp_path) if qmp_path is not None else self.workdir / "qmp.sock"
        self.agent_path = self.workdir / "agent.sock"
        self.process: subprocess.Popen[bytes] | None = None
        self._qmp: QEMUMonitorProtocol | None = None
        self._agent: socket.socket | None = None
        self._agent_buffer = b""
        self._next_id = 1
        self._agent_busy = False
        self.boot_seconds: float | None = None

    # ------------------------------------------------------------------ lifecycle

    @property
    def qmp(self) -> QEMUMonitorProtocol:
        """The QMP connection (qemu.qmp's synchronous client); only after ``start``."""
        if self._qmp is None:
            raise GuestError("QEMU is not running: call start() first")
        return self._qmp

    def command_line(self) -> list[str]:
        # ttyS0 (console) goes to a file; ttyS1 is the agent's port, a socket we connect
        # to; ttyS2 gets the kernel log.
        serial = [f"file:{self.serial_log}", "chardev:agent" if self.agent else "null"]
        serial.append(f"file:{self.kmsg_log}")
        agent_args: list[str] = []
        if self.agent:
            agent_args = ["-chardev", f"socket,id=agent,path={self.agent_path},server=on,wait=off"]
        return qemu_command(
            self.runtime,
            memory_mb=self.memory_mb,
            accel=self.accel,
            vfio_user_sockets=self.vfio_user_sockets,
            shared_ram=self.shared_ram,
            append=f"{'mgpu.agent=1 ' if self.agent else ''}mgpu.kmsg=1 {self.cmdline_extra}",
            serial=serial,
            reboot=self.reboot,
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
        self._wait_for(READY, started + self.boot_timeout)
        self.boot_seconds = time.monotonic() - started

    def wait_for_reboot(self, timeout: float = BOOT_TIMEOUT) -> float:
        """After a guest reset (QMP ``system_reset``, a reboot): wait until the agent of
        the new boot is up; returns the seconds that took."""
        started = time.monotonic()
        self._wait_for(READY, started + timeout)
        return time.monotonic() - started

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
                f"QEMU {exit_description(self.process.returncode)}\n{self.diagnostics()}"
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
        """Read agent output until ``marker``; returns everything before it.  A new
        boot's READY while waiting for something else means the guest rebooted."""
        if self._agent is None:
            raise GuestError("no guest agent: GuestVM(agent=True) and start() first")
        while marker not in self._agent_buffer:
            if marker != READY and READY in self._agent_buffer:
                self._agent_buffer = self._agent_buffer.partition(READY)[2]
                raise GuestError(
                    "the guest rebooted (a reset, or a kernel panic: see the kernel log "
                    f"{self.kmsg_log}); after system_reset call wait_for_reboot()"
                )
            self._check_alive()
            left = deadline - time.monotonic()
            if left <= 0:
                raise GuestTimeout(
                    f"timed out waiting for {marker!r} from the guest agent\n{self.diagnostics()}",
                    self._agent_buffer.decode(errors="replace"),
                )
            self._agent.settimeout(min(left, 1.0))
            try:
                chunk = self._agent.recv(65536)
            except TimeoutError:
                continue
            if not chunk:
                # QEMU closes its sockets as it dies: say what killed it, if it did.
                with contextlib.suppress(subprocess.TimeoutExpired):
                    if self.process is not None:
                        self.process.wait(10)
                self._check_alive()
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
        try:
            self._wait_for(f"@@MGPU-BEGIN {ident}\n".encode(), deadline)
            output = self._wait_for(f"@@MGPU-END {ident} ".encode(), deadline)
            status = self._wait_for(b"\n", deadline)
        except GuestTimeout as exc:
            self._agent_busy = True  # the command runs on: the agent answers nothing else
            raise GuestTimeout(
                f"guest command {command!r} did not finish in {timeout:g} s", exc.output
            ) from None
        except GuestError as exc:  # QEMU died, the guest rebooted: keep what it printed
            exc.output = exc.output or self._agent_buffer.decode(errors="replace")
            raise
        # As $(...) would: no trailing newlines (the agent adds one before END).
        return int(status), output.decode(errors="replace").rstrip("\n")

    def check(self, command: str, timeout: float = 60) -> str:
        status, output = self.run(command, timeout)
        if status != 0:
            raise GuestError(f"guest command {command!r} exited {status}:\n{output}")
        return output

    def dmesg(self, timeout: float = 30) -> str:
        """The guest kernel's log (``dmesg``) through the agent."""
        return self.check("dmesg", timeout)

    def kernel_log(self) -> str:
        """The whole kernel log, as dmesg prints it, every boot of this VM included: the
        copy of /dev/kmsg ``/init`` streams to the host, which needs no answer from the
        guest (a busy, hung or dead one too).  While the guest answers, first wait for
        the copy to catch up with its ``dmesg``.  Before /init has started the copy (or
        with another /init), the serial console's messages."""
        if self._agent is not None and not self._agent_busy and self._alive():
            with contextlib.suppress(GuestError, OSError):
                self._wait_for_kmsg_copy()
        with contextlib.suppress(OSError):
            text = format_kmsg(self.kmsg_log.read_text(errors="replace"))
            if text:
                return text
        try:
            return self.serial_log.read_text(errors="replace")
        except OSError:
            return ""

    def _alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def _wait_for_kmsg_copy(self, timeout: float = 30) -> None:
        """Until the streamed copy holds the guest's latest kernel message."""
        last = self.check("dmesg | tail -n 1", timeout).partition("] ")[2]
        deadline = time.monotonic() + timeout
        while last and time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                if f"] {last}\n" in format_kmsg(self.kmsg_log.read_text(errors="replace")):
                    return
            time.sleep(0.05)

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
