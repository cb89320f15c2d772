"""The guest kernel's ``vmlinux`` with its debug symbols, for ``run_qemu.sh --gdb``.

Debian ships the symbols of its kernels as ``linux-image-<release>-dbg``: about 1.2 GB
to download, 7.8 GB installed (every module's debug info).  The runtime keeps only the
kernel's own ``vmlinux`` (about 410 MB), fetched on first use of ``--gdb`` (or
``python -m guest_images debug-symbols``), not with every runtime: most runs never
need it.  Steps, cached under ``cache_dir()/debug-<release>/`` and serialised by the
build lock like the other stages:

1. ``apt-get download`` of the package inside the runtime root (the root's own apt
   sources, package lists in a temporary directory that is removed afterwards);
2. ``vmlinux`` alone extracted from the package's data (``dpkg-deb --fsys-tarfile``
   piped to ``tar``), renamed into place when complete; the package is deleted.

Modules get their symbols from their own ``.ko`` files: ``mgpu-gdb-symbols NAME`` in
the guest prints the ``add-symbol-file`` command with the addresses the module was
loaded at.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from guest_images.build import (
    BuildError,
    Progress,
    _kernel,
    _locked,
    _run,
    build_root,
    cache_dir,
)


def debug_package(kversion: str) -> str:
    return f"linux-image-{kversion}-dbg"


def _download(root: Path, package: str, progress: Progress) -> Path:
    """``package``'s .deb, downloaded inside the root into a temporary directory of its
    /tmp (removed by the caller)."""
    work = Path(tempfile.mkdtemp(prefix="mgpu-dbg-", dir=root / "tmp"))
    inside = f"/tmp/{work.name}"
    for sub in ("lists/partial", "cache/archives/partial"):
        (work / sub).mkdir(parents=True)
    apt = f"apt-get -q -o Dir::State::Lists={inside}/lists -o Dir::Cache={inside}/cache"
    script = (
        f"mount -t proc proc {root}/proc && chroot {root} sh -c "
        f"'{apt} update >/dev/null && cd {inside} && {apt} download {package}'"
    )
    _run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        f"downloading {package}",
        progress,
    )
    debs = sorted(work.glob(f"{package}_*.deb"))
    if not debs:
        raise BuildError(f"apt-get download left no {package} package in {work}")
    return debs[0]


def _extract_vmlinux(deb: Path, kversion: str, target: Path) -> None:
    member = f"./usr/lib/debug/lib/modules/{kversion}/vmlinux"
    with open(target, "wb") as out:
        unpack = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
        assert unpack.stdout is not None
        tar = subprocess.run(
            ["tar", "-xO", "-f", "-", member], stdin=unpack.stdout, stdout=out,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        unpack.stdout.close()
        unpack.wait()
    if tar.returncode or unpack.returncode:
        raise BuildError(f"cannot extract {member} from {deb}: {tar.stderr.decode()[-500:]}")


def ensure_vmlinux(progress: Progress) -> Path:
    """The runtime kernel's vmlinux with symbols; downloaded and extracted if missing."""
    cache = cache_dir()
    with _locked(cache / "build.lock", progress):
        root = build_root(progress)
        _, kversion = _kernel(root)
        target = cache / f"debug-{kversion}" / "vmlinux"
        if target.exists():
            return target
        package = debug_package(kversion)
        progress(
            f"fetching the guest kernel's debug symbols ({package}: about 1.2 GB to download, "
            "then about a minute to extract; 410 MB kept in the cache)"
        )
        started = time.monotonic()
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".partial")
        deb = _download(root, package, progress)
        try:
            progress(f"downloaded {deb.stat().st_size >> 20} MiB; extracting vmlinux")
            _extract_vmlinux(deb, kversion, partial)
            partial.rename(target)
        finally:
            shutil.rmtree(deb.parent, ignore_errors=True)
            partial.unlink(missing_ok=True)
        progress(
            f"vmlinux with symbols ready in {time.monotonic() - started:.0f} s: {target} "
            f"({target.stat().st_size >> 20} MiB)"
        )
        return target
