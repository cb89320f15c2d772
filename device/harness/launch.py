"""``run_qemu.sh``: boot a guest with GPU instances attached, console on this terminal.

Starts ``python -m device serve`` (its log goes to a file), boots QEMU in the
foreground with the guest's serial console on stdio and a QMP socket for scripts,
and stops the server (by PID) when QEMU exits, whatever the reason.
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
from pathlib import Path

from device.gpu.modes import DeniedPolicy, InterruptMode, MappingMode
from device.gpu.types import DEFAULT_TYPES
from device.harness.vm import probe_kvm, qemu_command
from guest_images import BuildError, ensure_runtime


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
        default=MappingMode.STATIC,
        choices=list(MappingMode),
        help="aperture mapping mode (see 'python -m device serve --help')",
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
    return parser


def server_ready(server: subprocess.Popen[str], instances: int, server_log: Path) -> bool:
    """Wait for the server's ``ready`` line per instance and its ``control`` line."""
    assert server.stdout is not None
    expected = ["ready "] * instances + ["control "]
    for prefix in expected:
        if not server.stdout.readline().startswith(prefix):
            print(
                f"run_qemu.sh: the GPU server did not start; its log:\n{server_log.read_text()}",
                file=sys.stderr,
            )
            return False
    return True


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.instances < 1:
        print("run_qemu.sh: --instances must be at least 1", file=sys.stderr)
        return 2

    def progress(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    try:
        runtime = ensure_runtime(progress)
    except BuildError as exc:
        print(f"run_qemu.sh: cannot build the guest runtime: {exc}", file=sys.stderr)
        return 1
    workdir = Path(tempfile.mkdtemp(prefix="mgpu-run-"))
    accel = "tcg"
    if args.kvm:
        if probe_kvm(runtime, workdir / "kvm-probe"):
            accel = "kvm"
        else:
            progress("KVM probe boot failed here (nested KVM cannot run real guests); using TCG")
    sockets = [workdir / f"gpu{n}.sock" for n in range(args.instances)]
    server_log = workdir / "server.log"
    qmp_path = args.qmp or workdir / "qmp.sock"
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
    server: subprocess.Popen[str] | None = None
    try:
        with open(server_log, "w") as log:
            server = subprocess.Popen(
                serve, stdout=subprocess.PIPE, stderr=log, text=True, stdin=subprocess.DEVNULL
            )
        if not server_ready(server, len(sockets), server_log):
            return 1
        command = qemu_command(
            runtime,
            memory_mb=args.memory,
            accel=accel,
            vfio_user_sockets=sockets,
            append=args.append,
            serial=["mon:stdio"],
            extra_args=[
                "-chardev",
                f"socket,id=qmp,path={qmp_path},server=on,wait=off",
                "-object",
                "monitor-qmp,id=qmp-monitor,chardev=qmp",
            ],
        )
        progress(
            f"mgpu: {args.instances} x {args.type} GPU ({args.interrupts.value}), QEMU "
            f"{runtime.qemu_version} under {accel.upper()}"
        )
        progress(f"mgpu: QMP socket {qmp_path}; server log {server_log}")
        progress(
            f"mgpu: GPU control socket {control_path} "
            f"(MGPU_CONTROL={control_path} mgpu list; qmp-shell {control_path})"
        )
        progress("mgpu: guest console follows (Ctrl-A X quits QEMU)")
        # QEMU owns the terminal now: a Ctrl-C is the guest's, not ours.
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            status = subprocess.call(command)
        finally:
            signal.signal(signal.SIGINT, previous)
        progress(f"mgpu: QEMU exited with status {status}")
        return status
    finally:
        if server is not None and server.poll() is None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(server.pid, signal.SIGKILL)
                server.wait()
        if server is not None and server.returncode not in (0, None):
            progress(
                f"mgpu: the GPU server exited with {server.returncode}; log kept in {server_log}"
            )
        else:
            with contextlib.suppress(OSError):
                shutil.rmtree(workdir)


if __name__ == "__main__":
    sys.exit(main())
