"""The edit-build-load loop through run_qemu.sh: kbuild a module on the host, load it
in the guest through --share, --run one command (its output and status), the kernel
log kept; a kernel and modules of one's own (--kernel, --modules) and the gdbstub."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from qemu.qmp.legacy import QEMUMonitorProtocol

from guest_images import Runtime
from guest_images.kbuild import kbuild, kernel_release
from tests.helpers import wait_until

ROOT = Path(__file__).resolve().parents[2]
MODULE = ROOT / "examples" / "hello-driver" / "module"
pytestmark = pytest.mark.qemu


def saved_kernel_log(stderr: str) -> str:
    match = re.search(r"guest kernel log saved to (\S+)", stderr)
    assert match, stderr
    return Path(match.group(1)).read_text()


def test_kbuild_share_and_run(mgpu_runtime: Runtime, mgpu_tmp: Path) -> None:
    share = mgpu_tmp / "share"
    shutil.copytree(MODULE, share)
    built = subprocess.run(
        [sys.executable, "-m", "guest_images", "kbuild", str(share)],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    assert built.stdout.split() == [str(share / "hello.ko")]

    logs = mgpu_tmp / "logs"
    command = (
        "insmod /mnt/share/hello.ko && echo written-in-guest > /mnt/share/from-guest.txt && "
        "cut -d' ' -f1 /proc/modules | grep hello; exit 3"
    )
    run = subprocess.run(
        [str(ROOT / "run_qemu.sh"), "--instances", "2", "--memory", "512",
         "--share", str(share), "--log-dir", str(logs), "--run", command],
        capture_output=True, text=True, cwd=ROOT, timeout=300, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert run.returncode == 3, run.stderr  # the guest command's own status
    assert run.stdout == "hello\n"
    assert (share / "from-guest.txt").read_text() == "written-in-guest\n"  # the share is rw
    assert "hello: loaded, 2 mgpu GPU(s)" in saved_kernel_log(run.stderr)
    assert (logs / "kernel.log").exists() and (logs / "server.log").exists()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def gdb_packet(conn: socket.socket, payload: str) -> str:
    """Send one GDB remote protocol packet; the reply's payload (checksum verified)."""
    checksum = sum(payload.encode()) % 256
    conn.sendall(f"${payload}#{checksum:02x}".encode())
    data = b""
    while not re.search(rb"\$([^#]*)#([0-9a-f]{2})", data):
        chunk = conn.recv(4096)
        assert chunk, f"gdbstub closed the connection; got {data!r}"
        data += chunk
    match = re.search(rb"\$([^#]*)#([0-9a-f]{2})", data)
    assert match is not None
    assert sum(match.group(1)) % 256 == int(match.group(2), 16), data
    conn.sendall(b"+")
    return match.group(1).decode()


def test_own_kernel_modules_and_gdbstub(mgpu_runtime: Runtime, mgpu_tmp: Path) -> None:
    source = mgpu_tmp / "src"
    shutil.copytree(MODULE, source)
    (ko,) = kbuild(source, print)
    release = kernel_release(print)
    modules = mgpu_tmp / "mods"
    (modules / "lib" / "modules" / release / "extra").mkdir(parents=True)
    shutil.copy(ko, modules / "lib" / "modules" / release / "extra" / "hello.ko")
    (modules / "lib" / "modules" / release / "modules.dep").write_text("extra/hello.ko:\n")
    kernel = mgpu_tmp / "bzImage"  # "my own kernel": a copy, so the path is ours
    shutil.copy(mgpu_runtime.kernel, kernel)
    logs = mgpu_tmp / "logs"
    port = free_port()
    proc = subprocess.Popen(
        [str(ROOT / "run_qemu.sh"), "--kernel", str(kernel), "--modules", str(modules),
         "--gdb", str(port), "--gdb-wait", "--log-dir", str(logs),
         "--run", "modprobe hello && cat /proc/cmdline"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while True:  # QEMU listens once the GPU server is up
            try:
                conn = socket.create_connection(("127.0.0.1", port), timeout=30)
                break
            except ConnectionRefusedError:
                assert proc.poll() is None, proc.communicate()
                assert time.monotonic() < deadline, "the gdbstub never listened"
                time.sleep(0.1)
        with conn:
            stop = gdb_packet(conn, "?")  # why are we stopped? (-S: before the first insn)
            assert re.fullmatch(r"[ST]05.*", stop), stop
            assert gdb_packet(conn, "D") == "OK"  # detach: the CPUs run
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "nokaslr" in out.split(), out  # --gdb boots without KASLR
    assert "hello: loaded, 1 mgpu GPU(s)" in saved_kernel_log(err)
    qemu = (logs / "qemu-command.txt").read_text()
    assert f"-kernel {kernel}" in qemu and "initrd-with-modules" in qemu
    assert f"-gdb tcp:127.0.0.1:{port} -S" in qemu


def test_gdb_breaks_in_the_users_module_at_its_source_line(
    mgpu_runtime: Runtime, mgpu_tmp: Path
) -> None:
    """run_qemu.sh --gdb: the runtime kernel's vmlinux with symbols, a gdbinit for the
    run, and a module built with kbuild whose debug info names its real sources: a
    breakpoint in the module's exit function is hit, with its file, line and text."""
    share = mgpu_tmp / "share"
    shutil.copytree(MODULE, share)
    kbuild(share, print)
    port = free_port()
    # The guest prints the symbol command, then waits for the host's go (the breakpoint
    # is set by then) before unloading the module.
    command = (
        "insmod /mnt/share/hello.ko && mgpu-gdb-symbols hello > /mnt/share/hello.gdb && "
        "while [ ! -e /mnt/share/go ]; do sleep 0.1; done && rmmod hello"
    )
    log = mgpu_tmp / "run_qemu.log"
    with open(log, "w") as stderr:
        proc = subprocess.Popen(
            [str(ROOT / "run_qemu.sh"), "--share", str(share), "--gdb", str(port),
             "--run", command, "--timeout", "600"],
            stdout=subprocess.PIPE, stderr=stderr, text=True, cwd=ROOT,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
    try:
        symbols = share / "hello.gdb"
        wait_until(
            lambda: proc.poll() is not None or (symbols.exists() and symbols.read_text()),
            900, "the guest to load the module (the first --gdb fetches vmlinux)",
            interval=0.2,
        )  # fmt: skip
        assert proc.poll() is None, log.read_text()
        gdbinit = re.search(r"; gdb -x (\S+)", log.read_text())
        assert gdbinit, log.read_text()
        gdb = subprocess.run(
            ["gdb", "-batch", "-nx", "-x", gdbinit.group(1), "-x", str(symbols),
             "-ex", "break hello_exit", "-ex", f"shell touch {share / 'go'}",
             "-ex", "continue", "-ex", "info source", "-ex", "bt 4", "-ex", "detach"],
            capture_output=True, text=True, timeout=300, cwd=share,
        )  # fmt: skip
        proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    source = (share / "hello.c").read_text().splitlines()
    first = next(n for n, text in enumerate(source, 1) if "hello_exit(void)" in text)
    last = next(n for n, text in enumerate(source, 1) if 'pr_info("hello: goodbye' in text)
    hit = re.search(r"Breakpoint 1, hello_exit \(\) at hello\.c:(\d+)\n(\d+)\t(.*)\n", gdb.stdout)
    assert hit, gdb.stdout + gdb.stderr
    line = int(hit.group(1))
    assert first <= line <= last and int(hit.group(2)) == line, gdb.stdout
    assert hit.group(3).strip() == source[line - 1].strip(), gdb.stdout  # the source line
    assert f"Located in {share}/hello.c" in gdb.stdout, gdb.stdout  # the user's own file
    assert "__do_sys_delete_module" in gdb.stdout, gdb.stdout  # the kernel's frames: vmlinux
    assert proc.returncode == 0, log.read_text()


def test_run_timeout_stops_soon_keeps_the_output_and_logs_and_qmp_is_where_asked(
    mgpu_runtime: Runtime, mgpu_tmp: Path
) -> None:
    """--run with --timeout: QEMU is stopped right after the timeout, what the command
    printed is kept, and so are the serial log and the whole kernel log (paths said);
    --qmp puts the QMP socket where a script looks for it while the command runs."""
    qmp_path = mgpu_tmp / "q.sock"
    timeout = 20
    started = time.monotonic()
    proc = subprocess.Popen(
        [str(ROOT / "run_qemu.sh"), "--qmp", str(qmp_path), "--timeout", str(timeout),
         "--run", "echo partial-output; sleep 3600"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_until(
            lambda: proc.poll() is not None or qmp_path.exists(), 300, "the QMP socket"
        )  # fmt: skip
        with QEMUMonitorProtocol(str(qmp_path)) as qmp:
            qmp.connect()
            assert qmp.cmd("query-status")["status"] == "running"  # type: ignore[index]
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    elapsed = time.monotonic() - started
    boot = float(re.search(r"guest up in ([\d.]+) s", err).group(1))  # type: ignore[union-attr]
    assert proc.returncode == 124, err
    assert out == "partial-output\n", out
    assert f"timed out after {timeout} s" in err, err
    # Stopped at once: no waiting on a guest that is busy with the command.
    assert elapsed - boot < timeout + 30, (elapsed, boot, err)
    workdir = Path(re.search(r"logs kept in (\S+)", err).group(1))  # type: ignore[union-attr]
    try:
        kernel_log = (workdir / "kernel.log").read_text()
        assert "Linux version" in kernel_log and len(kernel_log.splitlines()) > 100, kernel_log
        assert f"guest kernel log saved to {workdir / 'kernel.log'}" in err
        assert (workdir / "serial.log").exists() and (workdir / "server.log").exists()
    finally:
        shutil.rmtree(workdir)
    assert not qmp_path.exists()
