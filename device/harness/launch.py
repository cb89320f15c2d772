"""``run_qemu.sh``: boot a guest with GPU instances attached, console on this terminal.

Starts ``python -m device serve`` (its log goes to a file), boots QEMU in the
foreground with the guest's serial console on stdio and a QMP socket for scripts,
and stops the server (by PID) when QEMU exits, whatever the reason.

The edit-build-load loop: ``--share DIR`` mounts a host directory at /mnt/share in
the guest, ``--kernel``/``--modules`` boot a kernel of one's own, ``--gdb`` opens
QEMU's gdbstub, and ``--run CMD`` boots, runs one guest command through the guest
agent (``GuestVM``), prints its output and exits with the command's status.

Every run has a directory (``/tmp/mgpu-run-*``) with its sockets and logs: the
server's, QEMU's, the serial console and the guest's whole kernel log.  It is removed
when the run went well, and kept (its path printed) when it did not: QEMU died or
exited non-zero, the server failed, the command failed or timed out.  A guest reset
(QMP ``system_reset``) reboots the guest.  The default denied-access policy is
``report``, so a stray aperture access is reported to the guest driver instead of
killing the VM; ``--denied sigbus`` kills it as hardware would, and then says so.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from device.control.ctl import Client
from device.harness.launch_options import (
    DEFAULT_RUN_TIMEOUT,
    DENIAL_LOG,
    build_parser,
    check_args,
)
from device.harness.qemu import exit_description, format_kmsg, probe_kvm, qemu_command
from device.harness.vm import GUEST_SHARE, GuestError, GuestTimeout, GuestVM
from guest_images import BuildError, Runtime, ensure_runtime
from guest_images.build import driver_modules_dir
from guest_images.debug import ensure_vmlinux
from guest_images.overlay import initrd_with_modules


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def tool(name: str) -> str:
    """How to call one of our console scripts (``mgpu``, ``qmp-shell``): its name when it
    is on PATH, else its path in the venv that runs us."""
    if shutil.which(name):
        return name
    return str(Path(sys.executable).parent / name)


def denials(server_log: Path) -> list[str]:
    """The server's log lines about denied accesses that killed a VM."""
    with contextlib.suppress(OSError):
        return [ln for ln in server_log.read_text().splitlines() if DENIAL_LOG in ln]
    return []


@contextlib.contextmanager
def gpu_server(args: argparse.Namespace, workdir: Path) -> Iterator[list[Path]]:
    """``python -m device serve`` with one socket per instance; stopped by PID on exit.
    Yields the sockets once it is ready; raises GuestError if it does not start."""
    sockets = [workdir / f"gpu{n}.sock" for n in range(args.instances)]
    server_log = workdir / "server.log"
    control_path = workdir / "control.sock"
    serve = [
        sys.executable, "-m", "device", "serve", "--type", args.type,
        "--interrupts", args.interrupts.value, "--mapping", args.mapping.value,
        "--denied", args.denied.value, "--control", str(control_path),
    ]  # fmt: skip
    for path in sockets:
        serve += ["--socket", str(path)]
    viewers = [opt for opt in ("vnc", "web") if getattr(args, opt) is not None]
    for opt in viewers:
        serve += [f"--{opt}", getattr(args, opt)]
    server: subprocess.Popen[str] | None = None
    try:
        with open(server_log, "w") as log:
            server = subprocess.Popen(
                serve, stdout=subprocess.PIPE, stderr=log, text=True, stdin=subprocess.DEVNULL
            )
        assert server.stdout is not None
        # One "ready" line per instance, the control socket's "control" line, then
        # "vnc HOST:PORT" and "web URL" when asked for.
        for prefix in ["ready "] * len(sockets) + ["control "] + [f"{v} " for v in viewers]:
            line = server.stdout.readline()
            if not line.startswith(prefix):
                raise GuestError(
                    f"the GPU server did not start; its log:\n{server_log.read_text()}"
                )
            if prefix.strip() in viewers:
                progress(f"mgpu: {show_viewer(prefix.strip(), line.split()[1], control_path)}")
        for line in server_log.read_text().splitlines():
            if " WARNING " in line or " ERROR " in line:  # e.g. no FUSE: trap mode instead
                progress(f"mgpu: the GPU server says: {line}")
        progress(
            f"mgpu: GPU control socket {control_path} "
            f"(MGPU_CONTROL={control_path} {tool('mgpu')} list; "
            f"{tool('qmp-shell')} {control_path})"
        )
        names = ", ".join(f"gpu{n} is PCI slot {n + 1}" for n in range(len(sockets)))
        progress(
            f"mgpu: in the guest, {names} ('mgpu-probe find' shows each one's address, "
            "driver and /dev/dri node)"
        )
        yield sockets
    finally:
        if server is not None and server.poll() is None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(server.pid, signal.SIGKILL)
                server.wait()
        if server is not None and server.returncode not in (0, None):
            (workdir / ".keep").touch()
            progress(
                f"mgpu: the GPU server exited with {server.returncode}; log kept in {server_log}"
            )


def report_qemu_death(status: int, workdir: Path) -> None:
    """Say how QEMU ended, when it was not a clean exit, and which access killed it."""
    progress(f"run_qemu.sh: QEMU {exit_description(status)}")
    for line in denials(workdir / "server.log"):
        progress(f"run_qemu.sh: the GPU server says: {line}")
    (workdir / ".keep").touch()


def choose_accel(args: argparse.Namespace, runtime: Runtime, workdir: Path) -> str:
    if args.kvm:
        if probe_kvm(runtime, workdir / "kvm-probe"):
            return "kvm"
        progress("KVM probe boot failed here (nested KVM cannot run real guests); using TCG")
    return "tcg"


def write_gdbinit(args: argparse.Namespace, runtime: Runtime, workdir: Path) -> Path:
    """A gdb script for this run: the kernel's symbols (the runtime's vmlinux, unless
    --kernel), the stub, and the --share directory as gdb's working directory, so the
    ``add-symbol-file NAME.ko ...`` that ``mgpu-gdb-symbols NAME`` prints in the guest
    finds the module's .ko (whose debug info names its sources there)."""
    lines = ["set pagination off", "set confirm off"]
    if args.kernel is None:
        lines.append(f"file {ensure_vmlinux(progress)}")
    if args.share is not None:
        lines.append(f"cd {args.share.resolve()}")
    lines.append(f"target remote 127.0.0.1:{args.gdb}")
    path = workdir / "gdbinit"
    path.write_text("\n".join(lines) + "\n")
    return path


def announce(args: argparse.Namespace, runtime: Runtime, accel: str) -> None:
    progress(
        f"mgpu: {args.instances} x {args.type} GPU ({args.interrupts.value}, "
        f"denied accesses: {args.denied.value}), QEMU {runtime.qemu_version} "
        f"under {accel.upper()}"
    )
    if args.share is not None:
        progress(f"mgpu: {args.share.resolve()} is {GUEST_SHARE} in the guest")
    if args.gdb is not None:
        progress(
            f"mgpu: gdbstub on 127.0.0.1:{args.gdb}"
            + (" (CPUs stopped until gdb continues)" if args.gdb_wait else "")
            + f"; gdb -x {args.gdbinit}  (a module's symbols: 'mgpu-gdb-symbols NAME' in the "
            "guest prints the add-symbol-file command to paste into gdb"
            + (f"; ours are in {driver_modules_dir(runtime.initrd)})" if not args.kernel else ")")
        )


class Stopped(Exception):
    """SIGTERM: stop the run, cleaning up as for any other end."""


def _stop(_signum: int, _frame: object) -> None:
    raise Stopped


def show_viewer(kind: str, where: str, control_path: Path) -> str:
    """What ``serve``'s "vnc" or "web" line means for the user, with each display's port."""
    if kind == "web":
        return f"every GPU's display live at {where}"
    client = Client(str(control_path))
    try:
        displays = client.call("query-displays")
        ports = [f"{d['name']} on {d['vnc']}" for d in displays if d.get("vnc")]
    finally:
        client.close()
    shown = ", ".join(ports) or "none yet (no instance has a display engine)"
    return f"VNC from {where} up, one port per display: {shown}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    problem = check_args(args)
    if problem:
        print(f"run_qemu.sh: {problem}", file=sys.stderr)
        return 2
    try:
        runtime = ensure_runtime(progress)
    except BuildError as exc:
        print(f"run_qemu.sh: cannot build the guest runtime: {exc}", file=sys.stderr)
        return 1
    workdir = Path(tempfile.mkdtemp(prefix="mgpu-run-"))
    signal.signal(signal.SIGTERM, _stop)  # so that the cleanup below runs
    try:
        accel = choose_accel(args, runtime, workdir)
        if args.gdb is not None:
            args.gdbinit = write_gdbinit(args, runtime, workdir)
        with gpu_server(args, workdir) as sockets:
            announce(args, runtime, accel)
            if args.run is not None:
                status = run_once(args, runtime, accel, sockets, workdir)
            else:
                status = interactive(args, runtime, accel, sockets, workdir)
        if status != 0 and args.log_dir is None:  # with --log-dir the logs are there
            (workdir / ".keep").touch()
        return status
    except Stopped:
        (workdir / ".keep").touch()
        progress("run_qemu.sh: stopped by SIGTERM; QEMU and the GPU server are stopped")
        return 143
    except (GuestError, BuildError) as exc:
        (workdir / ".keep").touch()
        print(f"run_qemu.sh: {exc}", file=sys.stderr)
        return 1
    finally:
        for sock in workdir.glob("*.sock"):
            sock.unlink()
        if args.qmp is not None:
            with contextlib.suppress(OSError):
                args.qmp.unlink()
        if (workdir / ".keep").exists():
            progress(f"mgpu: logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def kernel_cmdline(args: argparse.Namespace) -> str:
    """The guest kernel's command line additions: the user's, and the policy the GPUs are
    served with (mgpu-drm-test skips its stray access under sigbus)."""
    return f"mgpu.denied={args.denied.value} {args.append}".strip()


def interactive(
    args: argparse.Namespace, runtime: Runtime, accel: str, sockets: list[Path], workdir: Path
) -> int:
    """QEMU in the foreground, the guest's console on this terminal."""
    qmp_path = args.qmp or workdir / "qmp.sock"
    initrd = None
    if args.modules is not None:
        initrd = initrd_with_modules(runtime.initrd, args.modules, workdir / "initrd.img")
    kmsg = workdir / "kmsg.log"
    command = qemu_command(
        runtime,
        memory_mb=args.memory,
        accel=accel,
        vfio_user_sockets=sockets,
        append=f"mgpu.kmsg=1 {kernel_cmdline(args)}",
        # ttyS0 the console, ttyS1 (the agent's port) unused, ttyS2 the kernel log.
        serial=["mon:stdio", "null", f"file:{kmsg}"],
        kernel=args.kernel.resolve() if args.kernel else None,
        initrd=initrd,
        share=args.share.resolve() if args.share else None,
        gdb_port=args.gdb,
        gdb_wait=args.gdb_wait,
        extra_args=[
            "-chardev",
            f"socket,id=qmp,path={qmp_path},server=on,wait=off",
            "-object",
            "monitor-qmp,id=qmp-monitor,chardev=qmp",
        ],
    )
    progress(f"mgpu: QMP socket {qmp_path}; server log {workdir / 'server.log'}")
    progress("mgpu: guest console follows (Ctrl-A X quits QEMU)")
    # QEMU owns the terminal now: a Ctrl-C is the guest's, not ours.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        status = subprocess.call(command)
    finally:
        signal.signal(signal.SIGINT, previous)
    with contextlib.suppress(OSError):
        (workdir / "kernel.log").write_text(format_kmsg(kmsg.read_text(errors="replace")))
    if status < 0:
        if sys.stdin.isatty():
            subprocess.call(["stty", "sane"])  # QEMU had the terminal raw when it died
        report_qemu_death(status, workdir)
        return 128 - status
    progress(f"mgpu: QEMU exited with status {status}")
    return status


def run_once(
    args: argparse.Namespace, runtime: Runtime, accel: str, sockets: list[Path], workdir: Path
) -> int:
    """Boot, run ``args.run`` through the guest agent, print its output; its status."""
    timeout = args.timeout if args.timeout is not None else DEFAULT_RUN_TIMEOUT
    # The harness has its own QMP connection; scripts get a monitor of their own, where
    # --qmp says (QEMU listens there, as in the interactive mode).
    user_qmp = args.qmp or workdir / "qmp.sock"
    vm = GuestVM(
        runtime,
        workdir,
        vfio_user_sockets=sockets,
        memory_mb=args.memory,
        accel=accel,
        cmdline_extra=kernel_cmdline(args),
        share=args.share,
        kernel=args.kernel,
        modules=args.modules,
        gdb_port=args.gdb,
        gdb_wait=args.gdb_wait,
        boot_timeout=3600 if args.gdb_wait else 180,
        qmp_path=workdir / "harness-qmp.sock",
        extra_args=[
            "-chardev",
            f"socket,id=user-qmp,path={user_qmp},server=on,wait=off",
            "-mon",
            "chardev=user-qmp,mode=control",
        ],
    )
    status = 1
    died: int | None = None  # QEMU's status if it ended before we stopped it
    with vm:
        (workdir / "qemu-command.txt").write_text(" ".join(vm.command_line()) + "\n")
        try:
            vm.start()
            progress(f"mgpu: guest up in {vm.boot_seconds:.1f} s; QMP socket {user_qmp}")
            progress(f"mgpu: running: {args.run}")
            status, output = vm.run(args.run, timeout=timeout)
            sys.stdout.write(output + ("\n" if output else ""))
        except GuestTimeout as exc:
            status = 124
            sys.stdout.write(exc.output)  # what the command printed before the timeout
            progress(f"run_qemu.sh: timed out after {timeout:g} s: {args.run}")
        except GuestError as exc:
            status = 1
            sys.stdout.write(exc.output)  # what the command printed before it happened
            progress(f"run_qemu.sh: {exc}")
        finally:
            sys.stdout.flush()
            died = vm.process.poll() if vm.process is not None else None
            vm.close()  # the guest has nothing to save: stop QEMU at once
            (workdir / "kernel.log").write_text(vm.kernel_log())
    if died is not None and died != 0:
        report_qemu_death(died, workdir)
    logs = workdir
    if args.log_dir is not None:
        args.log_dir.mkdir(parents=True, exist_ok=True)
        for name in ("kernel.log", "serial.log", "qemu.log", "server.log", "qemu-command.txt"):
            if (workdir / name).exists():
                shutil.copy(workdir / name, args.log_dir / name)
        logs = args.log_dir
    if status != 0 or args.log_dir is not None:
        progress(f"mgpu: guest kernel log saved to {logs / 'kernel.log'}")
    if args.log_dir is not None:
        progress(f"mgpu: logs kept in {args.log_dir}")
    progress(f"mgpu: guest command exited with status {status}")
    return status


if __name__ == "__main__":
    sys.exit(main())
