"""docs/registers.md and the guest C header are generated from the code and must match it."""

import re
from collections.abc import Callable
from pathlib import Path

import pytest

from device import docs
from device.gpu.engine.commands import SPECS, Opcode


@pytest.mark.parametrize(("path", "render"), docs.GENERATED, ids=lambda v: getattr(v, "name", ""))
def test_generated_file_is_current(path: Path, render: Callable[[], str]) -> None:
    assert path.read_text() == render(), f"{path} is stale: run `python -m device.docs`"


UAPI = Path(docs.ROOT) / "guest_images" / "driver" / "mgpu_drm.h"
# The uAPI names user space writes; each must be the device opcode of the same command.
UAPI_COMMANDS = {
    "NOP": Opcode.NOP,
    "COPY": Opcode.COPY_RESOURCE,
    "FILL": Opcode.FILL,
    "BLIT": Opcode.BLIT,
    "SAXPY": Opcode.SAXPY,
    "MATMUL": Opcode.MATMUL,
}


def test_drm_uapi_command_numbers_are_the_device_opcodes() -> None:
    """mgpu_drm.h must stand alone (user space copies it), so its MGPU_CMD_* values are
    written out there: they must be the table's opcodes (the driver also checks this at
    compile time against the generated header)."""
    found = {
        name: int(value, 0)
        for name, value in re.findall(
            r"#define MGPU_CMD_(\w+)\s+(0x[0-9a-fA-F]+|\d+)", UAPI.read_text()
        )
    }
    assert found == {name: int(op) for name, op in UAPI_COMMANDS.items()}
    # The commands user space may not submit take guest physical addresses.
    allowed = {op for op in Opcode if not any(a == "guest_addr" for a in SPECS[op].args)}
    assert allowed == set(UAPI_COMMANDS.values())
