"""``run_qemu.sh``'s options: the parser and the checks made before anything starts."""

from __future__ import annotations

import argparse
from pathlib import Path

from device.control.ctl import socket_path_problem
from device.gpu.modes import DeniedPolicy, InterruptMode, MappingMode
from device.gpu.types import DEFAULT_TYPES
from device.harness.vm import GUEST_SHARE

DEFAULT_GDB_PORT = 1234
DEFAULT_RUN_TIMEOUT = 600.0
# What the GPU server logs when a denied access kills the VM (device/gpu/aperture/window.py).
DENIAL_LOG = "denied aperture access"


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
        default=DeniedPolicy.REPORT,
        choices=list(DeniedPolicy),
        help="what a guest access to an aperture page that maps no resource gets: report "
        "(default: all ones, and the FAULT interrupt the guest driver logs), dummy (a zero "
        "page) or sigbus (QEMU gets SIGBUS and the VM dies, as on hardware; the server's "
        "log and this script then say which access it was)",
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
        help="QMP socket path, also with --run (default: in the run's directory)",
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
        default=None,
        metavar="SECONDS",
        help=f"with --run: how long CMD may take (default {DEFAULT_RUN_TIMEOUT:g}); after it "
        "QEMU is stopped, the output so far printed, the logs kept, and the exit status is 124",
    )
    loop.add_argument(
        "--log-dir",
        type=Path,
        metavar="DIR",
        help="with --run: copy the logs here (default: they are kept in the run's directory "
        "only if something failed)",
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
    if args.timeout is not None and args.run is None:
        return "--timeout goes with --run (an interactive guest runs until you exit it)"
    if args.timeout is not None and args.timeout <= 0:
        return "--timeout must be more than 0 seconds"
    if args.qmp is not None and socket_path_problem(args.qmp):
        return f"--qmp: {socket_path_problem(args.qmp)}"
    if args.qmp is not None and not args.qmp.parent.is_dir():
        return f"--qmp {args.qmp}: directory {args.qmp.parent} does not exist"
    return None
