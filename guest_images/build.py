"""Build the guest runtime: QEMU >= 10.1, a guest kernel and our initramfs.

Stages, each cached under ``cache_dir()`` by a hash of its inputs, built into a
temporary name and renamed into place (so a half-built stage is never used), and
serialised by a lock file (a second build waits, then finds the first one's work):

1. ``root-<key>``: a Debian 13 (trixie) root made with mmdebstrap, holding
   trixie-backports' QEMU, the distribution kernel and busybox-static.  Its QEMU runs
   on the host through the root's own dynamic loader.  The mirror comes from the
   host's apt configuration.  Skipped for QEMU when the host's own QEMU is new enough.
2. ``initramfs-<key>.cpio.gz``: busybox, ``/init`` (init.sh), our guest programs built
   statically with the host's gcc (the guest kernel's DRM uAPI headers on their include
   path), our guest drivers (driver/mgpu.c, the raw helper, and driver/mgpu_drm_*.c, the
   DRM driver) built inside the root against its kernel headers with its compiler, and
   the vfio modules and the modules our drivers depend on (decompressed), with a
   modules.dep, written as a newc cpio by Python.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from device.errors import SetupError
from guest_images.cpio import Cpio, module_files
from guest_images.mirror import host_mirror

HERE = Path(__file__).resolve().parent
PROGRAMS = HERE / "programs"
DRIVER = HERE / "driver"
INIT_SCRIPT = HERE / "init.sh"
GDB_SYMBOLS_SCRIPT = HERE / "gdb-symbols.sh"  # /bin/mgpu-gdb-symbols in the guest

SUITE = "trixie"
# linux-headers and make let us build the guest driver (driver/mgpu.c) inside the root
# with the compiler the guest kernel was built with.
ROOT_PACKAGES = (
    "qemu-system-x86",
    "linux-image-amd64",
    "linux-headers-amd64",
    "make",
    "binutils",
    "busybox-static",
    "kmod",
)
ROOT_RECIPE = "1"  # bump to force a rebuild of the root when the recipe changes
INITRAMFS_RECIPE = "4"  # 4: driver/Kbuild, sources in debug info, mgpu-gdb-symbols
# Shipped for vfio-pci in the guest.  Debian's kernel lacks CONFIG_VFIO_NOIOMMU, so
# without a vIOMMU these cannot give userspace MSI-X; driver/mgpu.c does that instead.
GUEST_MODULES = ("vfio", "vfio_iommu_type1", "vfio_pci_core", "vfio_pci", "irqbypass")
# 9p over virtio (with 9pnet and netfs, their dependencies): /init mounts a host
# directory shared with ``run_qemu.sh --share DIR`` at /mnt/share (SHARE_TAG).
SHARE_MODULES = ("9pnet_virtio", "9p")
SHARE_TAG = "mgpushare"
MIN_QEMU = (10, 1)
# (command or absolute file that must exist, Debian package providing it).  libc.a is
# checked on its own: gcc does not pull in libc6-dev without recommends, and `gcc -static`
# then fails with a linker error that does not name the package.
HOST_TOOLS = (
    ("mmdebstrap", "mmdebstrap"),
    ("gcc", "gcc"),
    ("dpkg", "dpkg"),
    ("unshare", "util-linux"),
    ("/usr/lib/x86_64-linux-gnu/libc.a", "libc6-dev"),
)

Progress = Callable[[str], None]


class BuildError(SetupError):
    """A build step failed; the message says which and what to do."""


@dataclass(frozen=True)
class Runtime:
    qemu_argv: tuple[str, ...]  # runs qemu-system-x86_64, loader and -L data dirs included
    qemu_version: str
    kernel: Path
    initrd: Path
    kvm_usable: bool | None = None


def cache_dir() -> Path:
    explicit = os.environ.get("MGPU_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mgpu"


def _digest(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode() if isinstance(part, str) else part)
        h.update(b"\0")
    return h.hexdigest()[:16]


@contextlib.contextmanager
def _locked(path: Path, progress: Progress) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            progress(f"another build holds {path}; waiting for it")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _run(argv: list[str], what: str, progress: Progress, **kwargs: object) -> None:
    """Run a build command, streaming its output as progress; BuildError on failure."""
    progress(f"$ {' '.join(argv)}")
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs
    )  # type: ignore[call-overload]
    tail: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip()
        tail = [*tail[-30:], line]
        progress(f"  {line}")
    if proc.wait() != 0:
        raise BuildError(
            f"{what} failed (exit {proc.returncode}); last output:\n" + "\n".join(tail)
        )


# ---------------------------------------------------------------------- host


def _ensure_host_tools(progress: Progress) -> None:
    missing = [
        pkg
        for tool, pkg in HOST_TOOLS
        if not (Path(tool).exists() if tool.startswith("/") else shutil.which(tool))
    ]
    if not missing:
        return
    if os.geteuid() != 0:
        raise BuildError(
            f"missing host tools; install them with: apt-get install {' '.join(missing)}"
        )
    progress(f"installing host packages: {' '.join(missing)}")
    _run(["apt-get", "update"], "apt-get update", progress)
    _run(
        ["apt-get", "install", "-y", "--no-install-recommends", *missing],
        "apt-get install",
        progress,
        env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"),
    )


def _qemu_version(argv: list[str]) -> tuple[int, ...] | None:
    try:
        out = subprocess.run([*argv, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r"version (\d+)\.(\d+)\.?(\d*)", out.stdout)
    if not match:
        return None
    return tuple(int(x) for x in match.groups() if x)


def _has_vfio_user(argv: list[str]) -> bool:
    out = subprocess.run([*argv, "-device", "help"], capture_output=True, text=True, timeout=30)
    return '"vfio-user-pci"' in out.stdout


# ---------------------------------------------------------------------- stages


def _root_key() -> str:
    return _digest(ROOT_RECIPE, SUITE, *ROOT_PACKAGES)


def build_root(progress: Progress) -> Path:
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    root = cache / f"root-{_root_key()}"
    if (root / ".complete").exists():
        return root
    _ensure_host_tools(progress)
    if os.geteuid() != 0:
        raise BuildError("building the Debian root needs root (mmdebstrap --mode=root)")
    try:
        mirror = host_mirror()
    except LookupError as exc:
        raise BuildError(str(exc)) from None
    tmp = Path(tempfile.mkdtemp(prefix="root-building-", dir=cache))
    started = time.monotonic()
    progress(
        f"building a Debian {SUITE} root with QEMU from {SUITE}-backports "
        f"(~500 MB download, about a minute) into {root}"
    )
    try:
        tmp.rmdir()  # mmdebstrap wants to create it
        _run(
            [
                "mmdebstrap",
                "--mode=root",
                "--variant=apt",
                f'--aptopt=APT::Default-Release "{SUITE}-backports"',
                "--include=" + ",".join(ROOT_PACKAGES),
                "--dpkgopt=path-exclude=/usr/share/doc/*",
                "--dpkgopt=path-exclude=/usr/share/man/*",
                "--dpkgopt=path-exclude=/usr/share/locale/*",
                SUITE,
                str(tmp),
                f"deb {mirror} {SUITE} main",
                f"deb {mirror} {SUITE}-backports main",
            ],
            "mmdebstrap of the guest runtime root",
            progress,
        )
        (tmp / ".complete").write_text(time.strftime("%Y-%m-%dT%H:%M:%S\n"))
        if root.exists():
            shutil.rmtree(root)
        tmp.rename(root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    progress(f"root built in {time.monotonic() - started:.0f} s")
    return root


def root_qemu_argv(root: Path) -> list[str]:
    libs = f"{root}/usr/lib/x86_64-linux-gnu:{root}/lib/x86_64-linux-gnu"
    return [
        f"{root}/lib64/ld-linux-x86-64.so.2",
        "--library-path",
        libs,
        f"{root}/usr/bin/qemu-system-x86_64",
        "-L",
        f"{root}/usr/share/qemu",
        "-L",
        f"{root}/usr/share/seabios",
    ]


def find_qemu(root: Path, progress: Progress) -> tuple[list[str], str]:
    host = shutil.which("qemu-system-x86_64")
    if host:
        version = _qemu_version([host])
        if version and version[:2] >= MIN_QEMU and _has_vfio_user([host]):
            return [host], ".".join(map(str, version))
        progress(f"host QEMU {host} is too old or lacks vfio-user-pci; using the cached one")
    argv = root_qemu_argv(root)
    version = _qemu_version(argv)
    if not version or version[:2] < MIN_QEMU:
        raise BuildError(f"QEMU in {root} reports version {version}; delete {root} to rebuild")
    if not _has_vfio_user(argv):
        raise BuildError(f"QEMU in {root} has no vfio-user-pci device")
    return argv, ".".join(map(str, version))


def _kernel(root: Path) -> tuple[Path, str]:
    kernels = sorted((root / "boot").glob("vmlinuz-*"))
    if not kernels:
        raise BuildError(f"no kernel in {root}/boot; delete {root} to rebuild")
    kernel = kernels[-1]
    return kernel, kernel.name.removeprefix("vmlinuz-")


# Our guest drivers, built from driver/NAME.c into NAME.ko.
DRIVER_MODULES = ("mgpu", "mgpu_drm")


def _uapi_flags(root: Path, kversion: str) -> list[str]:
    """gcc flags giving programs the guest kernel's DRM uAPI (drm.h, which
    driver/mgpu_drm.h includes), taken from its headers package: searched after the
    host's own headers, with ``__user`` removed as headers_install would."""
    common = kversion.rsplit("-", 1)[0] + "-common"
    uapi = root / "usr" / "src" / f"linux-headers-{common}" / "include" / "uapi"
    if not (uapi / "drm" / "drm.h").exists():
        raise BuildError(f"no DRM uAPI headers in {uapi}; delete {root} to rebuild")
    return ["-D__user=", "-idirafter", str(uapi / "drm"), "-idirafter", str(uapi)]


def _compile_programs(out_dir: Path, progress: Progress, uapi_flags: list[str]) -> list[Path]:
    _ensure_host_tools(progress)
    binaries = []
    for source in sorted(PROGRAMS.glob("*.c")):
        binary = out_dir / source.stem
        _run(
            [
                "gcc",
                "-static",
                "-O2",
                "-Wall",
                "-Wextra",
                "-Werror",
                *uapi_flags,
                "-o",
                str(binary),
                str(source),
            ],
            f"compiling {source.name}",
            progress,
        )
        binaries.append(binary)
    return binaries


def _build_driver(root: Path, kversion: str, progress: Progress) -> dict[str, bytes]:
    """driver/ (its Kbuild, sources and headers) built in the root with its kernel
    headers and its gcc: NAME.ko by NAME.  The build happens in a copy under the root's
    /tmp; the debug info names the sources where they are in this checkout
    (-fdebug-prefix-map), so gdb finds them."""
    if os.geteuid() != 0:
        raise BuildError("building the guest driver needs root (chroot into the runtime root)")
    build = Path(tempfile.mkdtemp(prefix="mgpu-driver-", dir=root / "tmp"))
    try:
        for source in DRIVER.iterdir():
            if source.suffix in (".c", ".h") or source.name == "Kbuild":
                shutil.copy(source, build / source.name)
        inside = f"/tmp/{build.name}"
        # objtool reads /proc: mount one in a private mount namespace, gone on exit.
        script = (
            f"mount -t proc proc {root}/proc && "
            f"chroot {root} make -s -C /usr/src/linux-headers-{kversion} M={inside} "
            f"KCFLAGS=-fdebug-prefix-map={inside}={DRIVER} modules"
        )
        _run(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
            "building the guest drivers",
            progress,
        )
        return {name: (build / f"{name}.ko").read_bytes() for name in DRIVER_MODULES}
    finally:
        shutil.rmtree(build, ignore_errors=True)


def _initramfs_key(root_key: str) -> str:
    parts: list[bytes | str] = [
        INITRAMFS_RECIPE,
        root_key,
        str(DRIVER),  # the drivers' debug info names their sources here
        INIT_SCRIPT.read_bytes(),
        GDB_SYMBOLS_SCRIPT.read_bytes(),
        *GUEST_MODULES,
        *SHARE_MODULES,
    ]
    for source in sorted([*PROGRAMS.glob("*.[ch]"), *DRIVER.glob("*.[ch]"), DRIVER / "Kbuild"]):
        parts += [source.name, source.read_bytes()]
    return _digest(*parts)


def driver_modules_dir(initramfs: Path) -> Path:
    """Where the .ko files of our drivers in ``initramfs`` are kept on the host."""
    return initramfs.with_name(initramfs.name.removesuffix(".cpio.gz") + "-modules")


def build_initramfs(root: Path, progress: Progress) -> Path:
    cache = cache_dir()
    target = cache / f"initramfs-{_initramfs_key(_root_key())}.cpio.gz"
    if target.exists():
        return target
    started = time.monotonic()
    progress("building the initramfs (busybox, /init, guest programs, guest driver, modules)")
    _, kversion = _kernel(root)
    archive = Cpio()
    skeleton = "bin sbin dev proc sys tmp etc lib lib/modules usr usr/bin usr/sbin run mnt"
    for directory in [*skeleton.split(), f"lib/modules/{kversion}"]:
        archive.directory(directory)
    busybox = root / "bin" / "busybox"
    if not busybox.exists():
        busybox = root / "usr" / "bin" / "busybox"
    archive.file("bin/busybox", busybox.read_bytes())
    applets = subprocess.run(
        [str(busybox), "--list-full"], capture_output=True, text=True, check=True
    ).stdout.split()
    for applet in applets:
        if applet != "bin/busybox" and applet.count("/") <= 2:
            archive.symlink(applet, "/bin/busybox")
    archive.file("init", INIT_SCRIPT.read_bytes())
    archive.file("bin/mgpu-gdb-symbols", GDB_SYMBOLS_SCRIPT.read_bytes())
    with tempfile.TemporaryDirectory(prefix="mgpu-programs-") as out:
        for binary in _compile_programs(Path(out), progress, _uapi_flags(root, kversion)):
            archive.file(f"bin/{binary.name}", binary.read_bytes())
    directories = {f"lib/modules/{kversion}"}
    ours = _build_driver(root, kversion, progress)
    # Our drivers with their debug info, for gdb: add-symbol-file <dir>/mgpu_drm.ko ...
    debug_modules = driver_modules_dir(target)
    debug_modules.mkdir(exist_ok=True)
    for name, data in ours.items():
        (debug_modules / f"{name}.ko").write_bytes(data)
    try:
        modules = module_files(root, kversion, (*GUEST_MODULES, *SHARE_MODULES), ours)
    except ValueError as exc:
        raise BuildError(str(exc)) from None
    for path, data in modules.items():
        full = f"lib/modules/{kversion}/{path}"
        parent = full.rsplit("/", 1)[0]
        for i in range(len(parent.split("/"))):
            sub = "/".join(parent.split("/")[: i + 1])
            if sub not in directories and sub.count("/") >= 2:
                directories.add(sub)
                archive.directory(sub)
        archive.file(full, data, 0o644)
    tmp = target.with_suffix(f".tmp{os.getpid()}")
    tmp.write_bytes(gzip.compress(archive.finish(), compresslevel=6))
    tmp.rename(target)
    progress(f"initramfs built in {time.monotonic() - started:.1f} s: {target}")
    return target


def ensure_runtime(progress: Progress | None = None) -> Runtime:
    """Build what is missing (or stale) and return where everything is."""
    sink = progress or (lambda message: print(message, file=sys.stderr, flush=True))
    started = time.monotonic()

    def say(message: str) -> None:
        # Elapsed time on every line shows which step (or mmdebstrap phase) is slow.
        sink(f"[{time.monotonic() - started:6.1f}s] {message}")

    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    with _locked(cache / "build.lock", say):
        root = build_root(say)
        qemu_argv, qemu_version = find_qemu(root, say)
        kernel, _ = _kernel(root)
        initrd = build_initramfs(root, say)
    return Runtime(tuple(qemu_argv), qemu_version, kernel, initrd)
