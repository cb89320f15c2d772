"""``run_qemu.sh``: boot a guest with GPU instances attached, console on this terminal.

Starts ``python -m device serve`` (its log goes to a file), boots QEMU in the
foreground with the guest's serial console on stdio and a QMP socket for scripts,
and stops the server (by PID) when QEMU exits, whatever the reason.

The edit-build-load loop: ``--share DIR`` mounts a host directory at /mnt/share in
the guest, ``--kernel``/``--modules`` boot a kernel of one's own, ``--gdb`` opens
QEMU's gdbstub, and ``--run CMD`` boots, runs one guest command through the guest
agent (``GuestVM``), prints its output, keeps the logs (the guest's kernel log
included) and exits with the command's status.
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
from device.gpu.modes import DeniedPolicy, InterruptMode, MappingMode
from device.gpu.types import DEFAULT_TYPES
from device.harness.vm import GUEST_SHARE, GuestError, GuestVM, probe_kvm, qemu_command
from guest_images import BuildError, Runtime, ensure_runtime
from guest_images.overlay import initrd_with_modules

DEFAULT_GDB_PORT = 1234


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="run_qemu.sh",
        description="Boot a Linux guest in QEMU with mgpu GPU instances attached. The guest's "
        "serial console is this terminal (Ctrl-A X quits QEMU; 'exit' in the guest shell "
        "powers it off). Inside the guest, 'mgpu-probe find' lists the GPUs.",
    )
    parser.add_argument(
        "--instances", type=int, default=1, metavar="N", help="GPU instances to attach (default: 1)"
    )
    parser.add_argument(
        "--type",
        default="mgpu-256",
        choices=[t.name for t in DEFAULT_TYPES],
        help="instance type (default: mgpu-256)",
    )
    parser.add_argument(
        "--interrupts",
        type=InterruptMode,
        default=InterruptMode.MSIX,
        choices=list(InterruptMode),
        help="msix (default) or msi; use msi for instances you will "
        "hot-unplug (QEMU 11.1.3 aborts unplugging MSI-X vfio-user devices)",
    )
    parser.add_argument(
        "--mapping",
        type=MappingMode,
        default=MappingMode.FAULT,
        choices=list(MappingMode),
        help="aperture mapping mode: fault (default: pages validated and translated at "
        "their first touch; trap where FUSE cannot be mounted), trap or static (see "
        "'python -m device serve --help')",
    )
    parser.add_argument(
        "--denied",
        type=DeniedPolicy,
        default=DeniedPolicy.SIGBUS,
        choices=list(DeniedPolicy),
        help="denied-access policy for the fault and trap modes",
    )
    parser.add_argument(
        "--memory", type=int, default=1024, metavar="MB", help="guest RAM in MiB (default: 1024)"
    )
    parser.add_argument(
        "--kvm",
        action="store_true",
        help="use KVM if a probe boot under KVM succeeds (otherwise TCG)",
    )
    parser.add_argument(
        "--qmp",
        type=Path,
        default=None,
        metavar="PATH",
        help="QMP socket path (default: in the run's temporary directory)",
    )
    parser.add_argument(
        "--append",
        default="quiet",
        metavar="ARGS",
        help="guest kernel command line additions (default: quiet; "
        "use --append '' for the kernel's boot messages)",
    )
    parser.add_argument(
        "--vnc",
        nargs="?",
        const="5900",
        metavar="[HOST:]PORT",
        help="watch each GPU's display over VNC: the first on PORT (default 5900), the "
        "next on PORT+1, ...; HOST defaults to 127.0.0.1 (the ports are printed)",
    )
    parser.add_argument(
        "--web",
        nargs="?",
        const="8000",
        metavar="[HOST:]PORT",
        help="one web page with every GPU's display live (default port 8000, 127.0.0.1)",
    )
    loop = parser.add_argument_group("the edit-build-load loop")
    loop.add_argument(
        "--share",
        type=Path,
        metavar="DIR",
        help=f"mount the host directory DIR in the guest at {GUEST_SHARE} (9p, read-write): "
        "build a module on the host ('python -m guest_images kbuild DIR'), then 'insmod "
        f"{GUEST_SHARE}/NAME.ko' in the guest",
    )
    loop.add_argument(
        "--kernel",
        type=Path,
        metavar="IMAGE",
        help="boot this kernel (a bzImage) instead of the runtime's; the configuration it "
        "needs is in docs/guest-kernel.md",
    )
    loop.add_argument(
        "--modules",
        type=Path,
        metavar="DIR",
        help="add these kernel modules to the initramfs (DIR/lib/modules/RELEASE as left by "
        "'make modules_install INSTALL_MOD_PATH=DIR', or a lib/modules/RELEASE directory): "
        "'modprobe NAME' then works in the guest",
    )
    loop.add_argument(
        "--gdb",
        type=int,
        nargs="?",
        const=DEFAULT_GDB_PORT,
        metavar="PORT",
        help=f"open QEMU's gdbstub on 127.0.0.1:PORT (default {DEFAULT_GDB_PORT}) and boot "
        "with nokaslr; then: gdb vmlinux -ex 'target remote :PORT'",
    )
    loop.add_argument(
        "--gdb-wait",
        action="store_true",
        help="with --gdb: the CPUs start stopped (QEMU -S) until gdb continues ('c')",
    )
    loop.add_argument(
        "--run",
        metavar="CMD",
        help="boot, run CMD (one shell line) in the guest, print its output and exit with "
        "its status; the guest's kernel log and the other logs are kept (paths printed)",
    )
    loop.add_argument(
        "--timeout",
        type=float,
        default=600,
        metavar="SECONDS",
        help="with --run: how long CMD may take (default 600); exit status 124 after it",
    )
    loop.add_argument(
        "--log-dir",
        type=Path,
        metavar="DIR",
        help="with --run: copy the logs here (default: they stay in the run's directory)",
    )
    return parser


def check_args(args: argparse.Namespace) -> str | None:
    """What is wrong with the arguments, or None."""
    if args.instances < 1:
        return "--instances must be at least 1"
    if args.share is not None and not args.share.is_dir():
        return f"--share {args.share}: not a directory"
    if args.kernel is not None and not args.kernel.is_file():
        return f"--kernel {args.kernel}: no such file"
    if args.modules is not None and not args.modules.is_dir():
        return f"--modules {args.modules}: not a directory"
    if args.gdb_wait and args.gdb is None:
        return "--gdb-wait needs --gdb"
    if args.run is not None and "\n" in args.run:
        return "--run takes one line (join commands with ; or &&)"
    if args.log_dir is not None and args.run is None:
        return "--log-dir goes with --run"
    return None


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@contextlib.contextmanager
def gpu_server(args: argparse.Namespace, workdir: Path) -> Iterator[list[Path]]:
    """``python -m device serve`` with one socket per instance; stopped by PID on exit.
    Yields the sockets once it is ready; raises GuestError if it does not start."""
    sockets = [workdir / f"gpu{n}.sock" for n in range(args.instances)]
    server_log = workdir / "server.log"
    control_path = workdir / "control.sock"
    serve = [
        sys.executable,
        "-m",
        "device",
        "serve",
        "--type",
        args.type,
        "--interrupts",
        args.interrupts.value,
        "--mapping",
        args.mapping.value,
        "--denied",
        args.denied.value,
        "--control",
        str(control_path),
    ]
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
        progress(
            f"mgpu: GPU control socket {control_path} "
            f"(MGPU_CONTROL={control_path} mgpu list; qmp-shell {control_path})"
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
    keep = args.run is not None and args.log_dir is None
    try:
        accel = "tcg"
        if args.kvm:
            if probe_kvm(runtime, workdir / "kvm-probe"):
                accel = "kvm"
            else:
                progress(
                    "KVM probe boot failed here (nested KVM cannot run real guests); using TCG"
                )
        with gpu_server(args, workdir) as sockets:
            progress(
                f"mgpu: {args.instances} x {args.type} GPU ({args.interrupts.value}), QEMU "
                f"{runtime.qemu_version} under {accel.upper()}"
            )
            if args.share is not None:
                progress(f"mgpu: {args.share.resolve()} is {GUEST_SHARE} in the guest")
            if args.gdb is not None:
                progress(
                    f"mgpu: gdbstub on 127.0.0.1:{args.gdb}"
                    + (" (CPUs stopped until gdb continues)" if args.gdb_wait else "")
                    + f"; gdb vmlinux -ex 'target remote :{args.gdb}'"
                )
            if args.run is not None:
                return run_once(args, runtime, accel, sockets, workdir)
            return interactive(args, runtime, accel, sockets, workdir)
    except GuestError as exc:
        keep = True
        print(f"run_qemu.sh: {exc}", file=sys.stderr)
        return 1
    finally:
        for sock in workdir.glob("*.sock"):
            sock.unlink()
        if keep or (workdir / ".keep").exists():
            progress(f"mgpu: logs kept in {workdir}")
        else:
            with contextlib.suppress(OSError):
                shutil.rmtree(workdir)


def interactive(
    args: argparse.Namespace, runtime: Runtime, accel: str, sockets: list[Path], workdir: Path
) -> int:
    """QEMU in the foreground, the guest's console on this terminal."""
    qmp_path = args.qmp or workdir / "qmp.sock"
    initrd = None
    if args.modules is not None:
        initrd = initrd_with_modules(runtime.initrd, args.modules, workdir / "initrd.img")
    command = qemu_command(
        runtime,
        memory_mb=args.memory,
        accel=accel,
        vfio_user_sockets=sockets,
        append=args.append,
        serial=["mon:stdio"],
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
    progress(f"mgpu: QEMU exited with status {status}")
    return status


def run_once(
    args: argparse.Namespace, runtime: Runtime, accel: str, sockets: list[Path], workdir: Path
) -> int:
    """Boot, run ``args.run`` through the guest agent, print its output; its status."""
    vm = GuestVM(
        runtime,
        workdir,
        vfio_user_sockets=sockets,
        memory_mb=args.memory,
        accel=accel,
        cmdline_extra=args.append,
        share=args.share,
        kernel=args.kernel,
        modules=args.modules,
        gdb_port=args.gdb,
        gdb_wait=args.gdb_wait,
        boot_timeout=3600 if args.gdb_wait else 180,
    )
    kernel_log = workdir / "kernel.log"
    status = 1
    with vm:
        (workdir / "qemu-command.txt").write_text(" ".join(vm.command_line()) + "\n")
        try:
            vm.start()
            progress(f"mgpu: guest up in {vm.boot_seconds:.1f} s; running: {args.run}")
            status, output = vm.run(args.run, timeout=args.timeout)
            sys.stdout.write(output + ("\n" if output else ""))
            sys.stdout.flush()
        except GuestError as exc:
            timed_out = "timed out" in str(exc)
            status = 124 if timed_out else 1
            progress(f"run_qemu.sh: {'timed out: ' if timed_out else ''}{exc}")
        finally:
            kernel_log.write_text(vm.kernel_log())
            if vm.process is not None and vm.process.poll() is None:
                vm.quit(timeout=30)
    if args.log_dir is not None:
        args.log_dir.mkdir(parents=True, exist_ok=True)
        for name in ("kernel.log", "serial.log", "qemu.log", "server.log", "qemu-command.txt"):
            if (workdir / name).exists():
                shutil.copy(workdir / name, args.log_dir / name)
        kernel_log = args.log_dir / "kernel.log"
    progress(f"mgpu: guest kernel log saved to {kernel_log}")
    progress(f"mgpu: guest command exited with status {status}")
    return status


if __name__ == "__main__":
    sys.exit(main())
