"""A user's kernel modules appended to our initramfs (``run_qemu.sh --modules DIR``).

The kernel unpacks concatenated cpio archives in order, a later file replacing an
earlier one, so ``base + overlay`` is our initramfs with the user's
``lib/modules/<release>/`` tree added: ``modprobe NAME`` then works in the guest.
DIR is either an ``INSTALL_MOD_PATH`` (``make modules_install INSTALL_MOD_PATH=DIR``
leaves ``DIR/lib/modules/<release>/``) or one ``<release>`` directory itself (it holds
``modules.dep``).  ``.ko.xz`` modules are decompressed (busybox's modprobe wants plain
ones) and ``modules.dep`` rewritten to match; where our initramfs already has modules
for the same release, the two ``modules.dep`` are merged.
"""

from __future__ import annotations

import gzip
import lzma
import os
from pathlib import Path

from guest_images.build import BuildError
from guest_images.cpio import Cpio


def _release_dirs(modules: Path) -> list[Path]:
    if (modules / "lib" / "modules").is_dir():
        return sorted(p for p in (modules / "lib" / "modules").iterdir() if p.is_dir())
    if (modules / "modules.dep").exists():
        return [modules]
    raise BuildError(
        f"{modules} holds neither lib/modules/<release>/ (an INSTALL_MOD_PATH) nor a "
        "modules.dep (a lib/modules/<release> directory): run 'make modules_install "
        f"INSTALL_MOD_PATH={modules}' in your kernel tree"
    )


def _cpio_files(archive: bytes) -> dict[str, bytes]:
    """Regular files of a newc cpio archive, by name."""
    files: dict[str, bytes] = {}
    pos = 0
    while archive[pos : pos + 6] == b"070701":
        fields = [int(archive[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = fields[1], fields[6], fields[11]
        name_at = pos + 110
        name = archive[name_at : name_at + namesize - 1].decode()
        data_at = name_at + namesize + (-(110 + namesize) % 4)
        if name == "TRAILER!!!":
            break
        if mode & 0o170000 == 0o100000:
            files[name] = archive[data_at : data_at + size]
        pos = data_at + size + (-size % 4)
    return files


def initrd_with_modules(base: Path, modules: Path, out: Path) -> Path:
    """Write ``out``: the initramfs ``base`` followed by the modules in ``modules``."""
    base_data = base.read_bytes()
    base_files = _cpio_files(gzip.decompress(base_data))
    archive = Cpio()
    made: set[str] = set()

    def parents(name: str) -> None:
        parts = name.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            sub = "/".join(parts[:i])
            if sub not in made:
                made.add(sub)
                archive.directory(sub)

    for release_dir in _release_dirs(Path(modules)):
        prefix = f"lib/modules/{release_dir.name}"
        for dirpath, _, filenames in sorted(os.walk(release_dir)):
            for filename in sorted(filenames):
                path = Path(dirpath) / filename
                relative = path.relative_to(release_dir).as_posix()
                if relative.startswith(("build", "source")) or path.is_symlink():
                    continue  # the kernel tree's symlinks, not modules
                data = path.read_bytes()
                if relative.endswith(".ko.xz"):
                    data, relative = lzma.decompress(data), relative[:-3]
                elif relative.endswith(".ko.zst"):
                    raise BuildError(f"{path}: zstd modules are not supported; use xz or none")
                if relative == "modules.dep":
                    data = data.replace(b".ko.xz", b".ko")
                    data = base_files.get(f"{prefix}/modules.dep", b"") + data
                elif relative.startswith("modules.") and relative.endswith(".bin"):
                    continue  # binary indexes busybox does not read (and would be stale)
                parents(f"{prefix}/{relative}")
                archive.file(f"{prefix}/{relative}", data, 0o644)
    out.write_bytes(base_data + gzip.compress(archive.finish(), compresslevel=1))
    return out
