"""Build an out-of-tree kernel module against the guest kernel, as our own mgpu.ko is.

    python -m guest_images kbuild DIR [TARGET ...]

runs ``make -C /usr/src/linux-headers-<guest kernel> M=DIR TARGET...`` (default target
``modules``) inside the runtime root (its kernel headers and the compiler the guest
kernel was built with), with DIR bind-mounted into the root in a private mount
namespace, so the build's output (``*.ko``, ``*.o``, ``Module.symvers``) lands in DIR
itself and nothing stays mounted afterwards.  The debug info names the sources in DIR
(``-fdebug-prefix-map``), not the temporary mount point, so gdb finds them.  DIR
holds a ``Kbuild`` or ``Makefile`` as for any out-of-tree module (``obj-m := hello.o``).
Load the result in the guest through ``run_qemu.sh --share DIR`` (``insmod
/mnt/share/hello.ko``).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
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


def kernel_release(progress: Progress) -> str:
    """The guest kernel's release (``uname -r`` in the guest); builds the root if needed."""
    with _locked(cache_dir() / "build.lock", progress):
        return _kernel(build_root(progress))[1]


def kbuild(
    directory: Path, progress: Progress, targets: Sequence[str] = ("modules",)
) -> list[Path]:
    """Run kbuild on ``directory``; returns the ``.ko`` files found in it afterwards."""
    source = Path(directory).resolve()
    if not source.is_dir():
        raise BuildError(f"{directory} is not a directory")
    if not any((source / name).exists() for name in ("Kbuild", "Makefile", "makefile")):
        raise BuildError(f"{source} has no Kbuild or Makefile (for a module: obj-m := name.o)")
    if os.geteuid() != 0:
        raise BuildError("kbuild needs root (it chroots into the runtime root)")
    # The lock keeps a concurrent runtime build from replacing the root under us.
    with _locked(cache_dir() / "build.lock", progress):
        root = build_root(progress)
        _, kversion = _kernel(root)
        mountpoint = Path(tempfile.mkdtemp(prefix="mgpu-kbuild-", dir=root / "tmp"))
        inside = f"/tmp/{mountpoint.name}"
        # objtool reads /proc; both mounts vanish with the private mount namespace.
        script = (
            f"mount -t proc proc {root}/proc && mount --bind {source} {mountpoint} && "
            f"chroot {root} make -C /usr/src/linux-headers-{kversion} M={inside} "
            f"KCFLAGS=-fdebug-prefix-map={inside}={source} " + " ".join(targets)
        )
        try:
            _run(
                ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                f"kbuild of {source} against the guest kernel {kversion}",
                progress,
            )
        finally:
            mountpoint.rmdir()
    _give_back(source)
    return sorted(source.rglob("*.ko"))


def _give_back(directory: Path) -> None:
    """Files the build created as root belong to the directory's owner."""
    owner = directory.stat()
    if owner.st_uid == 0:
        return
    for dirpath, dirnames, filenames in os.walk(directory):
        for name in [*dirnames, *filenames]:
            path = os.path.join(dirpath, name)
            if os.lstat(path).st_uid == 0:
                os.lchown(path, owner.st_uid, owner.st_gid)
