"""The README's main command: ./run_qemu.sh boots a guest whose console shows the GPU."""

from __future__ import annotations

import os
import re
import select
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from qemu.qmp.legacy import QEMUMonitorProtocol

from guest_images import Runtime

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.qemu


def read_until(
    proc: subprocess.Popen[bytes], pattern: str, seen: bytearray, timeout: float = 120
) -> re.Match[str]:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while True:
        match = re.search(pattern, seen.decode(errors="replace"))
        if match:
            return match
        left = deadline - time.monotonic()
        exited = proc.poll() is not None
        if select.select([proc.stdout], [], [], 0 if exited else max(0, min(left, 1)))[0]:
            chunk = os.read(proc.stdout.fileno(), 65536)
            if chunk:
                seen += chunk
                continue
        if left <= 0 or exited:
            raise AssertionError(f"no {pattern!r} in run_qemu.sh output:\n{seen.decode()[-3000:]}")


@pytest.mark.parametrize("kvm", [False, True], ids=["tcg", "kvm-if-probe-boots"])
def test_run_qemu_boots_a_guest_that_shows_the_gpu(runtime: Runtime, kvm: bool) -> None:
    assert runtime.kernel.exists()  # built once by the session fixture
    extra = ["--kvm"] if kvm else []
    proc = subprocess.Popen(
        [str(ROOT / "run_qemu.sh"), "--instances", "2", "--memory", "512", *extra],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    seen = bytearray()
    try:
        accel = read_until(proc, r"QEMU \S+ under (TCG|KVM)", seen, timeout=180).group(1)
        if kvm and accel == "TCG":
            assert "KVM probe boot failed" in seen.decode(), "TCG only after a failed probe"
        elif not kvm:
            assert accel == "TCG", "TCG is the default"
        workdir = Path(read_until(proc, r"server log (\S+)/server\.log", seen).group(1))
        qmp = read_until(proc, r"QMP socket (\S+);", seen).group(1)
        control = read_until(proc, r"GPU control socket (\S+) ", seen).group(1)
        read_until(proc, r"mgpu guest ready", seen)
        assert Path(qmp).exists()
        with QEMUMonitorProtocol(control) as client:
            client.connect()
            assert len(client.cmd("query-instances")) == 2  # type: ignore[arg-type]
        assert proc.stdin is not None
        proc.stdin.write(b"mgpu-probe find\n")
        proc.stdin.flush()
        read_until(proc, r"mgpu GPU in PCI slot 2 \(run_qemu.sh's gpu1\)", seen)
        proc.stdin.write(b"exit\n")
        proc.stdin.flush()
        assert proc.wait(60) == 0
        read_until(proc, r"QEMU exited with status 0", seen)
        assert not workdir.exists(), "run_qemu.sh left its sockets and logs behind"
    finally:
        if proc.poll() is None:  # SIGTERM first: run_qemu.sh then cleans up
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if "workdir" in locals():
            shutil.rmtree(workdir, ignore_errors=True)


def test_a_vm_killed_by_a_denied_access_is_named_and_its_logs_kept(runtime: Runtime) -> None:
    """--denied sigbus, chosen explicitly: mgpu-drm-test skips its stray access, and a
    deliberate one kills QEMU; run_qemu.sh says so, with the server's line naming the
    instance, the aperture offset and the policy, and keeps the run's logs."""
    command = (
        "modprobe mgpu_drm && mgpu-drm-test stray-aperture-access && "
        "mgpu-probe read $(mgpu-probe find 2>/dev/null) 2 0x3000"
    )
    run = subprocess.run(
        [str(ROOT / "run_qemu.sh"), "--denied", "sigbus", "--run", command],
        capture_output=True, text=True, cwd=ROOT, timeout=300, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert run.returncode == 1, run.stderr
    assert "MGPU-RESULT stray_read=skipped" in run.stdout, run.stdout  # printed before it died
    assert "run_qemu.sh: QEMU was killed by SIGBUS" in run.stderr, run.stderr
    said = re.search(
        r"the GPU server says: .*gpu0: denied aperture access at offset (\S+) .*policy sigbus",
        run.stderr,
    )
    assert said and said.group(1) == "0x3000", run.stderr
    kept = re.search(r"logs kept in (\S+)", run.stderr)
    assert kept, run.stderr
    workdir = Path(kept.group(1))
    try:
        assert "denied aperture access at offset 0x3000" in (workdir / "server.log").read_text()
        assert "Linux version" in (workdir / "kernel.log").read_text()
    finally:
        shutil.rmtree(workdir)
