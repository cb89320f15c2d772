"""run_qemu.sh's loop options and the plugin's helpers, without booting anything."""

from __future__ import annotations

import gzip
import lzma
from pathlib import Path

import pytest

from device.gpu.aperture.fault_log import FaultLog
from device.gpu.modes import DeniedPolicy
from device.harness.launch import main
from device.harness.launch_options import build_parser, check_args
from device.harness.pytest_plugin import FaultCursor, kernel_problems
from device.harness.qemu import exit_description, format_kmsg, qemu_command
from guest_images import Runtime, parse_bdfs
from guest_images.cpio import Cpio
from guest_images.overlay import _cpio_files, initrd_with_modules

RUNTIME = Runtime(("qemu",), "11.1.3", Path("/k/vmlinuz"), Path("/k/initrd"))


def test_share_and_gdb_reach_qemu_and_the_kernel_command_line(tmp_path: Path) -> None:
    argv = qemu_command(RUNTIME, share=tmp_path, gdb_port=4321, gdb_wait=True)
    assert f"local,id=share,path={tmp_path},security_model=none" in argv
    assert "virtio-9p-pci,fsdev=share,mount_tag=mgpushare" in argv
    assert argv[argv.index("-gdb") + 1] == "tcp:127.0.0.1:4321" and "-S" in argv
    append = argv[argv.index("-append") + 1].split()
    assert "mgpu.share=1" in append and "nokaslr" in append
    plain = qemu_command(RUNTIME)
    assert "-gdb" not in plain and "-S" not in plain and "-fsdev" not in plain
    # A guest reset reboots the guest, unless asked for QEMU's old -no-reboot.
    assert "-no-reboot" not in plain and "-no-reboot" in qemu_command(RUNTIME, reboot=False)
    own = qemu_command(RUNTIME, kernel=Path("/mine/bzImage"), initrd=Path("/mine/initrd"))
    assert own[own.index("-kernel") + 1] == "/mine/bzImage"
    assert own[own.index("-initrd") + 1] == "/mine/initrd"


def test_bad_loop_arguments_are_refused_before_anything_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    parse = build_parser().parse_args
    assert check_args(parse(["--gdb-wait"])) == "--gdb-wait needs --gdb"
    assert "no such file" in str(check_args(parse(["--kernel", str(tmp_path / "none")])))
    assert "not a directory" in str(check_args(parse(["--share", str(tmp_path / "none")])))
    assert check_args(parse(["--log-dir", str(tmp_path)])) == "--log-dir goes with --run"
    assert parse(["--gdb"]).gdb == 1234
    assert main(["--gdb-wait"]) == 2
    assert "--gdb-wait needs --gdb" in capsys.readouterr().err


def test_help_lists_every_loop_option() -> None:
    text = build_parser().format_help()
    for option in ("--share", "--kernel", "--modules", "--gdb", "--gdb-wait", "--run"):
        assert option in text


def test_modules_are_appended_decompressed_and_modules_dep_merged(tmp_path: Path) -> None:
    base = Cpio()
    base.file("lib/modules/6.1/modules.dep", b"extra/mgpu.ko:\n")
    (tmp_path / "base.gz").write_bytes(gzip.compress(base.finish()))
    release = tmp_path / "mods" / "lib" / "modules" / "6.1"
    (release / "kernel").mkdir(parents=True)
    (release / "kernel" / "mine.ko.xz").write_bytes(lzma.compress(b"\x7fELF mine"))
    (release / "modules.dep").write_text("kernel/mine.ko.xz:\n")
    (release / "build").symlink_to("/usr/src/somewhere")
    out = initrd_with_modules(tmp_path / "base.gz", tmp_path / "mods", tmp_path / "out.img")
    data, base_data = out.read_bytes(), (tmp_path / "base.gz").read_bytes()
    assert data.startswith(base_data)  # the kernel unpacks both archives, in order
    overlay = _cpio_files(gzip.decompress(data[len(base_data) :]))
    assert overlay["lib/modules/6.1/kernel/mine.ko"] == b"\x7fELF mine"
    assert overlay["lib/modules/6.1/modules.dep"] == b"extra/mgpu.ko:\nkernel/mine.ko:\n"


def test_kernel_problems_and_fault_cursor() -> None:
    log = "\n".join(
        [
            "[ 1.0] hello: loaded",
            "[ 2.0] WARNING: CPU: 1 PID: 42 at drivers/gpu/x.c:3 probe+0x1/0x2",
            "[ 3.0] BUG: KASAN: slab-out-of-bounds in f+0x1",
            "[ 4.0] Oops: general protection fault, probably for non-canonical address",
            "[ 5.0] not a BUGGY line",
        ]
    )
    assert [line[:7] for line in kernel_problems(log)] == ["[ 2.0] ", "[ 3.0] ", "[ 4.0] "]
    faults = FaultLog("gpu0")
    faults.add("served", 0, 4096)
    cursor = FaultCursor(faults)
    assert cursor.new() == []
    faults.add("denied", 0x3000, 4096)
    faults.add("served", 0x4000, 4096)
    assert [(r.kind, r.offset) for r in cursor.new("denied")] == [("denied", 0x3000)]
    assert cursor.new() == []


def test_options_that_would_be_ignored_are_refused(tmp_path: Path) -> None:
    parse = build_parser().parse_args
    assert "--timeout goes with --run" in str(check_args(parse(["--timeout", "5"])))
    assert check_args(parse(["--run", "true", "--timeout", "5"])) is None
    too_long = tmp_path / ("q" * 120) / "qmp.sock"
    assert "the kernel allows 107" in str(check_args(parse(["--qmp", str(too_long)])))
    # The README's flow must not kill the VM: a stray access is reported by default.
    assert parse([]).denied is DeniedPolicy.REPORT


def test_how_qemu_ended_in_words_and_the_kernel_log_as_dmesg_prints_it() -> None:
    assert exit_description(0) == "exited with status 0"
    assert "killed by SIGBUS" in exit_description(-7) and "sigbus" in exit_description(-7)
    assert exit_description(-9) == "was killed by SIGKILL"
    raw = (
        "6,1,0,-;Linux version 7.3.4\n"
        " SUBSYSTEM=pci\n"
        "4,2,1500000,-;mgpu_drm 0000:01:00.0: aperture fault\n"
        "6,3,12"  # cut by a reset
    )
    assert format_kmsg(raw) == (
        "[    0.000000] Linux version 7.3.4\n[    1.500000] mgpu_drm 0000:01:00.0: aperture fault\n"
    )


def test_mgpu_probe_find_output_gives_bdfs_that_info_takes() -> None:
    output = (
        "0000:01:00.0\n"
        "mgpu-probe: 0000:01:00.0: mgpu GPU in PCI slot 1 (run_qemu.sh's gpu0), driver "
        "mgpu_drm, /dev/dri/renderD128\n"
        "0000:02:00.0\n"
    )
    assert parse_bdfs(output) == ["0000:01:00.0", "0000:02:00.0"]
