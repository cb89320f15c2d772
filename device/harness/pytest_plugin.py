"""pytest plugin: test a guest driver on real guests in QEMU with mgpu GPUs attached.

Installed with mgpu (the ``pytest11`` entry point ``mgpu``), so a driver project only
depends on mgpu and uses the fixtures::

    def test_my_driver_loads(mgpu_kbuild, mgpu_share, mgpu_vm):
        mgpu_kbuild("module", mgpu_share)            # my_driver.ko into the share
        guest = mgpu_vm(2, share=mgpu_share)         # two GPU instances, /mnt/share
        guest.check("insmod /mnt/share/my_driver.ko")
        assert "my_driver: bound" in guest.dmesg()

Fixtures:

    mgpu_runtime   (session) the guest runtime: QEMU, guest kernel, initramfs (built
                   and cached on first use; concurrent builds wait on a lock)
    mgpu_tmp       a short, unique directory for this test's sockets and logs
    mgpu_server    a ``GpuServer``: one physical GPU (ini ``mgpu_vram_mb``, default 512)
    mgpu_instance  ``mgpu_instance(name=None, type_name="mgpu-64", **options)``: a GPU
                   instance of that type served on its own socket (``ServedInstance``)
    mgpu_vm        ``mgpu_vm(instances=1, *, type_name="mgpu-64", share=None, **kw)``: a
                   started ``Guest`` with N new instances (or the ``ServedInstance``s
                   given); ``guest.qmp`` is a connected qemu.qmp client, ``guest.run``
                   returns (status, output), ``guest.check`` raises on failure, ``kw``
                   go to ``GuestVM`` (memory_mb, kernel, modules, gdb_port, ...)
    mgpu_share     an empty host directory to pass as ``share=``; the guest sees it
                   at ``GUEST_SHARE`` (/mnt/share)
    mgpu_kbuild    ``mgpu_kbuild(source_dir, dest=None)``: copy a module's sources to
                   ``dest`` (default: a fresh directory) and build them against the
                   guest kernel; returns the ``.ko`` paths

Helpers: ``fault_log(instance)`` (the instance's ``FaultLog``: records with seq, kind
and offset, ``.since(seq)``), ``FaultCursor`` (what is new since the last look),
``read_register(instance, name)``, ``kernel_problems(text)``, ``screendump(instance)``
(what its display shows, a PIL image; ``guest.screendump(n)`` for a guest's n-th GPU).

After every test each of its guests' kernel log (``dmesg``, or the serial console if
the guest is gone) is checked: a WARN, BUG, Oops, KASAN/UBSAN report, general
protection fault or panic fails the test (``@pytest.mark.mgpu_kernel_log_ok`` for a
test that provokes one).  When a test fails, its serial, QEMU, kernel, server and
fault logs are kept in the test's own ``tmp_path`` (``mgpu-logs/``; the report says
where).  Nothing is at a fixed path, so tests run in parallel under pytest-xdist.
"""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
import tempfile
from collections.abc import Callable, Generator, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from device.control.manager import GpuServer, ServedInstance
from device.display import screendump as display_screendump
from device.display.source import display_of
from device.errors import FrameError
from device.gpu.aperture.fault_log import FaultLog, FaultRecord
from device.gpu.instance.instance import GpuInstance
from device.gpu.memory.physical import PhysicalGpu
from device.harness.vm import GUEST_SHARE, GuestVM
from guest_images import Runtime, ensure_runtime, parse_bdfs
from guest_images.kbuild import kbuild

__all__ = [
    "GUEST_SHARE",
    "CreateGuest",
    "CreateInstance",
    "FaultCursor",
    "Guest",
    "Kbuild",
    "fault_log",
    "kernel_problems",
    "read_register",
    "screendump",
]

MiB = 1024 * 1024
LOG_FILES = ("serial.log", "qemu.log", "kernel.log", "server.log", "faults-*.txt")

# A line that starts a kernel problem report.
_PROBLEM = re.compile(
    r"(WARNING: CPU: \d+ PID: \d+|------------\[ cut here \]------------|\bBUG: |"
    r"kernel BUG at|\bOops: |\bKASAN: |\bUBSAN: |general protection fault|Kernel panic)"
)


def kernel_problems(text: str) -> list[str]:
    """The kernel log lines that report a WARN, BUG, Oops, KASAN/UBSAN, GPF or panic."""
    return [line for line in text.splitlines() if _PROBLEM.search(line)]


def _instance_of(served: ServedInstance | GpuInstance) -> GpuInstance:
    return served.device if isinstance(served, ServedInstance) else served


def fault_log(served: ServedInstance | GpuInstance) -> FaultLog:
    """The instance's aperture fault log (``device.window.log``)."""
    return _instance_of(served).window.log


def read_register(served: ServedInstance | GpuInstance, name: str) -> int:
    """A BAR0 register's current value as the device holds it (names: registers.md)."""
    return _instance_of(served).registers.get(name)


def screendump(served: ServedInstance | GpuInstance) -> Image.Image:
    """What the instance's display shows, as an RGB PIL image (FrameError if the
    instance has no display, the display is off or its frame is bad)."""
    device = _instance_of(served)
    source = display_of(device)
    if source is None:
        raise FrameError(f"instance {device.name!r} has no display (no display engine)")
    return display_screendump.image(source)


class FaultCursor:
    """What a fault log recorded since the last look::

    cursor = FaultCursor(fault_log(gpu))
    guest.check("...touch a page...")
    assert [r.kind for r in cursor.new()] == ["served"]
    """

    def __init__(self, log: FaultLog) -> None:
        self.log = log
        self.seq = max((r.seq for r in log.since(0)), default=0)

    def new(self, kind: str | None = None) -> list[FaultRecord]:
        records = self.log.since(self.seq)
        if records:
            self.seq = records[-1].seq
        return [r for r in records if kind is None or r.kind == kind]


class Guest(GuestVM):
    """A started ``GuestVM`` and the GPU instances attached to it."""

    def __init__(
        self, runtime: Runtime, workdir: Path, instances: Sequence[ServedInstance], **kw: Any
    ) -> None:
        super().__init__(
            runtime, workdir, vfio_user_sockets=[i.endpoint.path for i in instances], **kw
        )
        self.instances = list(instances)

    def screendump(self, index: int = 0) -> Image.Image:
        """What GPU instance ``index`` of this guest shows, as an RGB PIL image."""
        return screendump(self.instances[index])

    def gpus(self) -> list[str]:
        """The PCI addresses of the mgpu GPUs the guest sees."""
        status, output = self.run("mgpu-probe find")
        if status:
            return []
        return parse_bdfs(output)


class _TestState:
    """One test's mgpu resources: its short directory, instances and guests."""

    def __init__(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="mgpu-"))
        self.instances: list[ServedInstance] = []
        self.guests: list[Guest] = []
        self.kept: Path | None = None

    def dump_fault_logs(self) -> None:
        for served in self.instances:
            log = fault_log(served)
            lines = [f"counters {log.counters}"] + [repr(r) for r in log.since(0)]
            (self.tmp / f"faults-{served.device.name}.txt").write_text("\n".join(lines) + "\n")

    def keep_logs(self, where: Path) -> None:
        where.mkdir(parents=True, exist_ok=True)
        for pattern in LOG_FILES:
            for path in self.tmp.rglob(pattern):
                relative = path.relative_to(self.tmp)
                target = where / "-".join(relative.parts)
                with contextlib.suppress(OSError):
                    shutil.copy(path, target)


_STATE = pytest.StashKey[_TestState]()
_FAILED = pytest.StashKey[bool]()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini("mgpu_vram_mb", "mgpu_server's physical GPU memory in MiB", default="512")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "mgpu_kernel_log_ok: problems in the test's guest kernel logs do not fail it"
    )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    failed = True
    try:
        yield
        failed = False
    finally:
        problems = _check_guests(item)
    if problems and not failed and item.get_closest_marker("mgpu_kernel_log_ok") is None:
        pytest.fail("guest kernel log reports a problem:\n" + "\n".join(problems), pytrace=False)


def _check_guests(item: pytest.Item) -> list[str]:
    state = item.stash.get(_STATE, None)
    if state is None:
        return []
    problems: list[str] = []
    for n, guest in enumerate(state.guests):
        text = guest.kernel_log()
        with contextlib.suppress(OSError):
            (guest.workdir / "kernel.log").write_text(text)
        found = kernel_problems(text)
        if found:
            problems += [f"guest {n} ({guest.workdir}): {line}" for line in found]
            item.add_report_section("call", f"mgpu guest {n} kernel log", text[-20000:])
    return problems


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed:
        item.stash[_FAILED] = True
        state = item.stash.get(_STATE, None)
        if state is not None and state.kept is not None:
            kept = f"serial, QEMU, kernel, server and fault logs kept in {state.kept}"
            report.sections.append(("mgpu logs", kept))
    return report


# ---------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def mgpu_runtime() -> Runtime:
    return ensure_runtime(progress=print)


@pytest.fixture
def _mgpu_state(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[_TestState]:
    state = _TestState()
    state.kept = tmp_path / "mgpu-logs"
    request.node.stash[_STATE] = state
    try:
        yield state
    finally:
        for guest in state.guests:
            guest.close()
        with contextlib.suppress(Exception):
            state.dump_fault_logs()
        if request.node.stash.get(_FAILED, False):
            state.keep_logs(state.kept)
        shutil.rmtree(state.tmp, ignore_errors=True)


@pytest.fixture
def mgpu_tmp(_mgpu_state: _TestState) -> Path:
    """A short unique directory (unix socket paths are limited to 107 bytes), removed
    after the test; its logs are kept in tmp_path/mgpu-logs if the test fails."""
    return _mgpu_state.tmp


@pytest.fixture
def mgpu_server(request: pytest.FixtureRequest, _mgpu_state: _TestState) -> Iterator[GpuServer]:
    vram = int(str(request.config.getini("mgpu_vram_mb"))) * MiB
    handler = logging.FileHandler(_mgpu_state.tmp / "server.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    logger = logging.getLogger("device")
    level = logger.level
    logger.addHandler(handler)
    if level == logging.NOTSET or level > logging.INFO:
        logger.setLevel(logging.INFO)
    try:
        with GpuServer(PhysicalGpu(vram)) as server:
            yield server
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        handler.close()


CreateInstance = Callable[..., ServedInstance]


@pytest.fixture
def mgpu_instance(mgpu_server: GpuServer, _mgpu_state: _TestState) -> CreateInstance:
    """``mgpu_instance(name=None, type_name="mgpu-64", **options)``: a served instance
    (options: interrupts, mapping, denied) on ``mgpu_tmp / "NAME.sock"``."""

    def create(
        name: str | None = None, type_name: str = "mgpu-64", **options: Any
    ) -> ServedInstance:
        name = name or f"gpu{len(mgpu_server.instances)}"
        socket_path = _mgpu_state.tmp / f"{name}.sock"
        served = mgpu_server.create_instance(name, type_name, socket_path, **options)
        _mgpu_state.instances.append(served)
        return served

    return create


CreateGuest = Callable[..., Guest]


@pytest.fixture
def mgpu_vm(
    mgpu_runtime: Runtime, mgpu_instance: CreateInstance, _mgpu_state: _TestState
) -> Iterator[CreateGuest]:
    """``mgpu_vm(instances=1, *, type_name="mgpu-64", share=None, **GuestVM options)``:
    a started guest; QEMU is killed and its sockets removed after the test (before
    the GPU server stops)."""

    def create(
        instances: int | Sequence[ServedInstance] = 1,
        *,
        type_name: str = "mgpu-64",
        share: Path | None = None,
        **options: Any,
    ) -> Guest:
        served = (
            [mgpu_instance(type_name=type_name) for _ in range(instances)]
            if isinstance(instances, int)
            else list(instances)
        )
        workdir = _mgpu_state.tmp / f"vm{len(_mgpu_state.guests)}"
        guest = Guest(mgpu_runtime, workdir, served, share=share, **options)
        _mgpu_state.guests.append(guest)
        guest.start()
        return guest

    try:
        yield create
    finally:
        for guest in _mgpu_state.guests:
            guest.close()


@pytest.fixture
def mgpu_share(_mgpu_state: _TestState) -> Path:
    """An empty host directory for ``mgpu_vm(share=...)``: /mnt/share in the guest."""
    path = _mgpu_state.tmp / "share"
    path.mkdir()
    return path


Kbuild = Callable[..., list[Path]]


@pytest.fixture
def mgpu_kbuild(_mgpu_state: _TestState) -> Kbuild:
    """``mgpu_kbuild(source_dir, dest=None)``: build a module (``Kbuild``/``Makefile`` with
    ``obj-m``) against the guest kernel in a copy of its sources; the ``.ko`` paths."""

    def build(source: Path, dest: Path | None = None) -> list[Path]:
        target = _mgpu_state.tmp / f"kbuild-{Path(source).name}" if dest is None else Path(dest)
        shutil.copytree(source, target, dirs_exist_ok=True)
        return kbuild(target, progress=print)

    return build
