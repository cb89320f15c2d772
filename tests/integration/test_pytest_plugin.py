"""mgpu's pytest plugin as a driver project sees it: a kernel WARN in the guest fails a
test that otherwise passes, and a failed test's logs are kept in its own directory."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from guest_images import cache_dir

ROOT = Path(__file__).resolve().parents[2]
CACHE = cache_dir()  # now: pytester points HOME elsewhere while a test runs
pytestmark = pytest.mark.qemu

# What an installed mgpu gives through its entry point; registered here if the
# interpreter's mgpu predates it (the same fallback as tests/conftest.py).
CONFTEST = """
def pytest_configure(config):
    if not config.pluginmanager.has_plugin("mgpu"):
        from device.harness import pytest_plugin
        config.pluginmanager.register(pytest_plugin, "mgpu")
"""

TEST = """
from pathlib import Path

def test_a_driver_that_warns(mgpu_vm, mgpu_tmp):
    Path("tmp-dir.txt").write_text(str(mgpu_tmp))
    guest = mgpu_vm(1)
    warn = "WARNING: CPU: 0 PID: 1 at drivers/gpu/fake.c:7 fake_probe+0x1/0x2"
    guest.check(f"echo '{warn}' > /dev/kmsg")
    assert guest.run("true") == (0, "")  # the test itself passes
"""


def test_a_guest_kernel_warning_fails_the_test_and_its_logs_are_kept(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # this checkout's mgpu, installed or not
    monkeypatch.setenv("MGPU_CACHE_DIR", str(CACHE))  # the runtime already built
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_driver=TEST)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", timeout=300)
    result.assert_outcomes(failed=1)
    text = result.stdout.str()
    assert "guest kernel log reports a problem" in text
    assert "WARNING: CPU: 0 PID: 1 at drivers/gpu/fake.c:7" in text
    match = re.search(r"fault logs kept in (\S+)", text)
    assert match, text
    kept = Path(match.group(1))
    names = {p.name for p in kept.iterdir()}
    assert {"vm0-serial.log", "vm0-qemu.log", "vm0-kernel.log", "server.log"} <= names, names
    assert "faults-gpu0.txt" in names, names
    assert "fake_probe" in (kept / "vm0-kernel.log").read_text()
    assert "created gpu0" in (kept / "server.log").read_text()
    tmp = Path((pytester.path / "tmp-dir.txt").read_text())
    assert not tmp.exists(), "the test's short directory (sockets) was not removed"
