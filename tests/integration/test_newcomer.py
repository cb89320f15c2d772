"""The newcomer's first hour, as the README writes it, in order: ``./run_qemu.sh`` on a
terminal, the guest commands typed at its console, the host commands in a second
shell (``mgpu`` by name, from PATH), QMP ``system_reset`` through ``qmp-shell``, then
``exit``.  It checks what a person would check: no VM died, no command failed or
printed a traceback, each one's output makes sense, and nothing is left behind in /tmp
or mounted.

The commands are read from the README's marked blocks, so the README cannot drift
from what works.  Every wait is for output, with a generous deadline (a loaded 2-core
machine boots slowly); nothing sleeps to synchronise.
"""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import shutil
import signal
import struct
import subprocess
import termios
import time
from pathlib import Path

import pytest

from guest_images import Runtime, parse_bdfs, parse_results

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
pytestmark = pytest.mark.qemu
BOOT = 300.0  # seconds: a cold initramfs build and a boot on a busy machine
COMMAND = 300.0
MOUNTS = Path("/proc/self/mountinfo")


def readme_block(marker: str) -> list[str]:
    """The lines of the README's ``sh`` block after ``<!-- marker -->``."""
    text = README.read_text()
    head = f"<!-- {marker} -->\n```sh\n"
    assert head in text, f"README.md lost its {marker} block"
    block = text.split(head, 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip()]


class Terminal:
    """A program on a pseudo-terminal, as a person runs it: type lines, read the screen."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
        self.proc = subprocess.Popen(
            argv, stdin=slave, stdout=slave, stderr=slave, cwd=ROOT, env=env,
            start_new_session=True,
        )  # fmt: skip
        os.close(slave)
        self.master = master
        self.screen = ""  # everything shown so far, \r removed
        self.read_to = 0  # what expect() has consumed

    def type(self, line: str) -> None:
        os.write(self.master, line.encode() + b"\r")  # Enter, on a raw terminal

    def expect(self, pattern: str, timeout: float) -> re.Match[str]:
        """Wait until ``pattern`` shows after what was consumed; consume up to it."""
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        while True:
            match = regex.search(self.screen, self.read_to)
            if match:
                self.read_to = match.end()
                return match
            left = deadline - time.monotonic()
            if left <= 0 or not self._read(left):
                raise AssertionError(
                    f"no {pattern!r} on the terminal within {timeout:g} s; it shows:\n"
                    f"{self.screen[-4000:]}"
                )

    def _read(self, timeout: float) -> bool:
        """Read what is there (waiting up to ``timeout``); False once the program ended."""
        if not select.select([self.master], [], [], min(timeout, 5.0))[0]:
            return self.proc.poll() is None or time.monotonic() < 0
        try:
            data = os.read(self.master, 65536)
        except OSError:  # EIO: the program closed the terminal
            return False
        self.screen += data.decode(errors="replace").replace("\r", "")
        return bool(data)

    def close(self) -> None:
        """Stop it as a person's Ctrl-C would not (QEMU has the terminal): SIGTERM, so
        run_qemu.sh cleans up, then SIGKILL if it must."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)
        os.close(self.master)


PROMPT = r"\n[^\n]{0,30}# "  # busybox sh's, at the start of a line


def guest_command(term: Terminal, line: str) -> tuple[int, str]:
    """Type a README line at the guest's shell, as a person does: wait for the prompt,
    then ask for its status.  Returns the status and what it printed."""
    term.read_to = mark = len(term.screen)
    term.type(line)
    prompt = term.expect(PROMPT, COMMAND)
    shown = term.screen[mark : prompt.start()]
    output = shown.split("\n", 1)[1] if "\n" in shown else ""  # after the echoed line
    term.type('echo "@@rc=$?"')
    status = int(term.expect(r"\n@@rc=(\d+)(?=\n)", 60).group(1))
    term.expect(PROMPT, 60)
    return status, output


def host_command(line: str, env: dict[str, str]) -> str:
    """Run a README host line in a shell, as a person would in a second terminal."""
    done = subprocess.run(
        ["bash", "-c", line], env=env, capture_output=True, text=True, timeout=COMMAND,
        stdin=subprocess.DEVNULL, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, f"{line}: exit {done.returncode}\n{done.stdout}{done.stderr}"
    assert "Traceback" not in done.stderr, done.stderr
    return done.stdout


def test_the_readme_first_hour_works_as_written(runtime: Runtime, tmp_path: Path) -> None:
    assert runtime.initrd.exists()  # built (cached) by the session fixture
    env = {**os.environ, "TERM": "xterm"}
    env["PATH"] = f"/usr/local/bin:{env.get('PATH', '/usr/bin:/bin')}"
    mounts_before = MOUNTS.read_text()
    term = Terminal([str(ROOT / "run_qemu.sh")], env)
    try:
        control = term.expect(r"GPU control socket (\S+) ", BOOT).group(1)
        workdir = Path(control).parent
        assert term.expect(r"\(MGPU_CONTROL=\S+ (\S+) list; (\S+) ", 5).groups() == (
            "mgpu",
            "qmp-shell",
        ), "run_qemu.sh must name the tools by name: they are on PATH"
        qmp = term.expect(r"QMP socket (\S+);", BOOT).group(1)
        term.expect(r"mgpu guest ready", BOOT)
        term.expect(PROMPT, BOOT)

        # In the guest, the README's lines in order.
        outputs: dict[str, str] = {}
        for line in readme_block("newcomer-guest"):
            status, output = guest_command(term, line)
            assert status == 0, f"{line}: exit {status}\n{output}"
            assert "Traceback" not in output and "Oops" not in output, output
            outputs[line.split("#")[0].strip()] = output
        found = outputs["mgpu-probe find"]
        (bdf,) = parse_bdfs(found)
        assert f"{bdf}: mgpu GPU in PCI slot 1 (run_qemu.sh's gpu0)" in found, found
        info = parse_results(outputs["mgpu-probe info $(mgpu-probe find)"])
        assert (info["vendor"], info["device"]) == ("0x1234", "0x4d47"), info
        drm = parse_results(outputs["mgpu-drm-test"])
        assert drm["failed"] == "0" and int(drm["passed"]) >= 17, outputs["mgpu-drm-test"]
        assert drm["node"] == "/dev/dri/renderD128" and drm["stray_read"] == "0xffffffff", drm
        ring = parse_results(outputs["mgpu-ring"])
        assert ring["copy_ok"] == ring["saxpy_ok"] == "1", ring

        # On the host, a second shell: the control socket, by name from PATH.
        lines = readme_block("newcomer-host")
        assert lines[0].startswith("export MGPU_CONTROL=")
        env["MGPU_CONTROL"] = control  # the README's placeholder, filled in as a person does
        shown = {line.split("#")[0].strip(): host_command(line, env) for line in lines[1:]}
        listed = shown["mgpu list"].splitlines()
        assert listed[0].split()[:2] == ["name", "type"], listed
        assert re.match(r"gpu0\s+mgpu-256\s+256Mi\s+fault\s+msix\s+connected", listed[1]), listed
        faults = shown["mgpu faults"].splitlines()
        assert faults[0].split()[:4] == ["instance", "seq", "kind", "offset"], faults
        assert any(" reported " in f and "sigbus" not in f for f in faults), faults
        top = [ln for ln in shown["mgpu top --count 3"].splitlines() if ln.startswith("gpu0")]
        assert len(top) == 3, shown["mgpu top --count 3"]

        # QMP: system_reset through qmp-shell reboots the guest, and the GPU works again.
        reset = subprocess.run(
            ["qmp-shell", qmp], input="system_reset\n", env=env, capture_output=True,
            text=True, timeout=COMMAND, cwd=ROOT,
        )  # fmt: skip
        assert reset.returncode == 0 and "Traceback" not in reset.stderr, reset
        term.expect(r"mgpu guest ready", BOOT)
        term.expect(PROMPT, BOOT)
        status, output = guest_command(term, "modprobe mgpu_drm && mgpu-drm-test bo-mmap")
        assert status == 0 and "MGPU-RESULT failed=0" in output, output

        # exit powers the guest off; run_qemu.sh ends cleanly and takes its run with it.
        term.type("exit")
        term.expect(r"QEMU exited with status 0", COMMAND)
        assert term.proc.wait(60) == 0
        assert "killed by" not in term.screen and "Traceback" not in term.screen, term.screen
        assert not workdir.exists(), f"run_qemu.sh left {workdir} behind"
        assert not Path(qmp).exists()
        assert MOUNTS.read_text().count("fuse") <= mounts_before.count("fuse")
    finally:
        term.close()
        (tmp_path / "terminal.txt").write_text(term.screen)
        if "workdir" in locals() and workdir.exists():  # kept by a failed run: keep a copy
            shutil.copytree(workdir, tmp_path / "run", ignore=shutil.ignore_patterns("*.sock"))
            shutil.rmtree(workdir, ignore_errors=True)
            print(f"run_qemu.sh's logs: {tmp_path / 'run'}")
