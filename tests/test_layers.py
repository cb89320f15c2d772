"""The layering drawn in device/__init__.py holds: imports only go down."""

from __future__ import annotations

import ast
from pathlib import Path

import device

ROOT = Path(device.__file__).resolve().parent
# Bottom up; a module may import from its own layer and the ones before it.
LAYERS = [
    "errors",
    "units",
    "trace",
    "vfio_user",
    "conformance",  # a client of the protocol only: tests any vfio-user server
    "pci",
    "fuse",
    "gpu",
    "display",
    "insight",  # reads the device model's tables: trace decoding (and later coverage, replay)
    "control",
    "harness",
    "docs",
]


# Inside the device model, bottom up likewise: the ABI and the shared vocabulary, the
# register table, device memory and the page table, the BAR2 window, the engines,
# and the instance that composes them.
GPU_LAYERS = [
    ("abi", "modes", "types", "inject"),
    ("regs",),
    ("memory",),
    ("aperture",),
    ("engine",),
    ("instance",),
]


def gpu_layer_of(module: str) -> int:
    """The layer index of ``device.gpu.X...`` inside the device model; -1 elsewhere."""
    parts = module.split(".")
    if parts[:2] != ["device", "gpu"] or len(parts) < 3:
        return -1
    for index, names in enumerate(GPU_LAYERS):
        if parts[2] in names:
            return index
    return -1


def layer_of(module: str) -> int:
    """The layer index of ``device.X...`` (its first component after ``device``)."""
    part = module.split(".")[1] if "." in module else ""
    part = part.removesuffix(".py")
    return LAYERS.index(part) if part in LAYERS else -1


def imports_of(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append(node.module)
        elif isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
    return [name for name in found if name == "device" or name.startswith("device.")]


def test_every_module_belongs_to_a_layer() -> None:
    for path in ROOT.rglob("*.py"):
        relative = path.relative_to(ROOT)
        if relative.name in ("__init__.py", "__main__.py") and len(relative.parts) == 1:
            continue
        assert layer_of("device." + relative.parts[0]) >= 0, f"{relative} is in no layer"


def test_imports_only_go_down() -> None:
    upward: list[str] = []
    for path in ROOT.rglob("*.py"):
        relative = path.relative_to(ROOT)
        if len(relative.parts) == 1 and relative.name in ("__init__.py", "__main__.py"):
            continue
        own = layer_of("device." + relative.parts[0])
        for name in imports_of(path):
            if layer_of(name) > own:
                upward.append(f"{relative} imports {name}")
    assert not upward, "imports that go up a layer:\n" + "\n".join(upward)


def test_gpu_modules_belong_to_a_sublayer() -> None:
    for path in (ROOT / "gpu").rglob("*.py"):
        relative = path.relative_to(ROOT / "gpu")
        if relative.name == "__init__.py" and len(relative.parts) == 1:
            continue
        module = "device.gpu." + ".".join(relative.with_suffix("").parts)
        assert gpu_layer_of(module) >= 0, f"gpu/{relative} is in no sublayer of GPU_LAYERS"


def test_gpu_imports_only_go_down() -> None:
    upward: list[str] = []
    for path in (ROOT / "gpu").rglob("*.py"):
        relative = path.relative_to(ROOT / "gpu")
        if relative.name == "__init__.py" and len(relative.parts) == 1:
            continue
        own = gpu_layer_of("device.gpu." + ".".join(relative.with_suffix("").parts))
        for name in imports_of(path):
            if gpu_layer_of(name) > own:
                upward.append(f"gpu/{relative} imports {name}")
    assert not upward, "imports that go up a sublayer of the device model:\n" + "\n".join(upward)
