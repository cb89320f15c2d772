"""The initramfs's parts that are data, not steps: a newc cpio writer (what the kernel
unpacks as an initramfs) and the guest kernel modules it ships, with their
dependencies and a modules.dep that modprobe reads."""

from __future__ import annotations

import io
import lzma
import re
import stat
from pathlib import Path


class Cpio:
    """A newc cpio archive (what the kernel unpacks as an initramfs)."""

    def __init__(self) -> None:
        self.out = io.BytesIO()
        self.inode = 1

    def _entry(self, name: str, mode: int, data: bytes = b"") -> None:
        encoded = name.encode() + b"\0"
        fields = [self.inode, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(encoded), 0]
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        self.out.write(header + encoded)
        self.out.write(b"\0" * (-(len(header) + len(encoded)) % 4))
        self.out.write(data + b"\0" * (-len(data) % 4))
        self.inode += 1

    def directory(self, name: str) -> None:
        self._entry(name, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, mode: int = 0o755) -> None:
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return self.out.getvalue()


def _modinfo_depends(module: bytes) -> list[str]:
    """The ``depends=`` names in a built module's .modinfo."""
    match = re.search(rb"(?:^|\0)depends=([^\0]*)\0", module)
    return [name.decode() for name in match.group(1).split(b",") if name] if match else []


def _dependency_paths(
    names: list[str], deps: dict[str, list[str]], by_name: dict[str, str]
) -> list[str]:
    """The modules.dep right-hand side for a module needing ``names``: every module
    they need, transitively, each after the ones that need it (modprobe loads the
    list from its end)."""
    load_order: list[str] = []  # dependencies before what needs them

    def visit(path: str) -> None:
        if path not in load_order:
            for dep in reversed(deps[path]):
                visit(dep)
            load_order.append(path)

    for name in names:
        visit(by_name[name.replace("-", "_")])
    return load_order[::-1]


def module_files(
    root: Path, kversion: str, shipped: tuple[str, ...], ours: dict[str, bytes] | None = None
) -> dict[str, bytes]:
    """The guest modules we ship (``shipped``, decompressed), their dependencies and ours
    (``extra/NAME.ko``, needing what their .modinfo names), by path."""
    ours = ours or {}
    moddir = root / "lib" / "modules" / kversion
    deps: dict[str, list[str]] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        path, _, rest = line.partition(":")
        deps[path] = rest.split()
    by_name = {Path(p).name.split(".ko")[0].replace("-", "_"): p for p in deps}
    wanted: list[str] = []
    needed_by_ours = [dep for data in ours.values() for dep in _modinfo_depends(data)]
    for name in [*shipped, *needed_by_ours]:
        module = by_name.get(name)
        if module is None:
            continue  # built into this kernel
        for needed in [*deps[module], module]:
            if needed not in wanted:
                wanted.append(needed)
    files: dict[str, bytes] = {}
    dep_lines = []
    for path in wanted:
        data = (moddir / path).read_bytes()
        plain = path
        if path.endswith(".xz"):
            data, plain = lzma.decompress(data), path[:-3]
        elif path.endswith(".zst"):
            raise ValueError("zstd-compressed modules are not supported yet")
        files[plain] = data
        dep_lines.append(
            plain + ": " + " ".join(d[:-3] if d.endswith(".xz") else d for d in deps[path])
        )
    for name, data in ours.items():
        files[f"extra/{name}.ko"] = data
        needs = _dependency_paths(_modinfo_depends(data), deps, by_name)
        dep_lines.append(f"extra/{name}.ko: " + " ".join(d.removesuffix(".xz") for d in needs))
    files["modules.dep"] = ("\n".join(dep_lines) + "\n").encode()
    return files
