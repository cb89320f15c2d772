"""QEMU's command line for a guest with GPU instances attached, and what its exit means.

``qemu_command`` builds the argv (q35, the runtime's kernel and initramfs, one PCIe
root port per GPU plus spares, fd-backed shared RAM so DMA_MAP comes with fds);
``exit_description`` says in words how QEMU ended; ``format_kmsg`` turns the kernel log
the guest streams to its third serial port into dmesg's format; ``probe_kvm`` boots once
under KVM to see whether it works here.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from guest_images import Runtime
from guest_images.build import SHARE_TAG


def exit_description(status: int) -> str:
    """How QEMU ended, in words: a signal by name (SIGBUS explained), else the status."""
    if status >= 0:
        return f"exited with status {status}"
    name = signal.Signals(-status).name
    if -status == signal.SIGBUS:
        return (
            f"was killed by {name}: a guest access to an aperture page that maps no "
            "resource, under the GPU's 'sigbus' denied-access policy (the GPU server's "
            "log names the instance and the offset)"
        )
    return f"was killed by {name}"


def format_kmsg(raw: str) -> str:
    """/dev/kmsg records ("prio,seq,usec,flags;text", continuation lines of key=value
    starting with a space) as dmesg prints them: "[seconds] text"."""
    lines = []
    for record in raw.splitlines():
        head, sep, text = record.partition(";")
        fields = head.split(",")
        if not sep or len(fields) < 3 or not fields[2].isdigit():
            continue  # a dictionary line, or a record cut by a reboot
        usec = int(fields[2])
        lines.append(f"[{usec // 1_000_000:5d}.{usec % 1_000_000:06d}] {text}")
    return "\n".join(lines) + ("\n" if lines else "")


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
    reboot: bool = True,
) -> list[str]:
    """QEMU's argv: q35, our kernel and initramfs, one root port per GPU plus spares.

    ``kernel``/``initrd`` replace the runtime's; ``share`` is a host directory the
    guest's /init mounts at /mnt/share (9p); ``gdb_port`` opens QEMU's gdbstub on
    127.0.0.1 (``gdb_wait``: the CPUs wait for the debugger's first continue);
    ``reboot=False`` makes a guest reset power QEMU off (``-no-reboot``)."""
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
        *([] if reboot else ["-no-reboot"]),
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
