"""A real headless Chromium (Debian's ``chromium``, installed by scripts/provision_host.sh)
for the browser view's tests, driven by Playwright over the DevTools protocol.

We start Chromium ourselves, with a fresh profile, and stop it by its PID whatever
happens; Playwright only connects to it (its own browser download is not needed)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from playwright.sync_api import Page, sync_playwright

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-breakpad",  # no crash handler: it would leave our process group
    "--disable-crash-reporter",
    "--remote-debugging-address=127.0.0.1",
    "--remote-debugging-port=0",
    "--force-device-scale-factor=1",
    "--window-size=1400,1000",
]


def _devtools_port(profile: Path, proc: subprocess.Popen[bytes], timeout: float) -> int:
    """The port Chromium chose, from the DevToolsActivePort file it writes."""
    deadline = time.monotonic() + timeout
    marker = profile / "DevToolsActivePort"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"chromium exited with {proc.returncode}")
        with contextlib.suppress(OSError, ValueError, IndexError):
            return int(marker.read_text().splitlines()[0])
        time.sleep(0.05)
    raise TimeoutError(f"chromium did not open its DevTools port within {timeout} s")


@contextlib.contextmanager
def chromium_page(timeout: float = 60.0) -> Iterator[Page]:
    """A page in a fresh headless Chromium; the browser is killed by PID at the end."""
    root = Path(tempfile.mkdtemp(prefix="mgpu-chromium-"))
    profile, scratch = root / "profile", root / "tmp"
    profile.mkdir()
    scratch.mkdir()  # chromium's own temporary files, removed with the rest
    proc = subprocess.Popen(
        [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
        env={**os.environ, "TMPDIR": str(scratch)},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its helpers share its process group
    )
    try:
        port = _devtools_port(profile, proc, timeout)
        with sync_playwright() as playwright:
            browser = playwright.chromium.connect_over_cdp(f"http://127.0.0.1:{port}")
            try:
                context = browser.contexts[0]
                page = context.new_page()
                page.set_viewport_size({"width": 1400, "height": 1000})
                yield page
            finally:
                browser.close()
    finally:
        # The group is chromium's own (start_new_session): its PID names it.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)
        with contextlib.suppress(ProcessLookupError):  # helpers still in the group
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
        shutil.rmtree(root, ignore_errors=True)
