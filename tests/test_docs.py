"""docs/registers.md and the guest C header are generated from the code and must match it."""

from collections.abc import Callable
from pathlib import Path

import pytest

from device import docs


@pytest.mark.parametrize(("path", "render"), docs.GENERATED, ids=lambda v: getattr(v, "name", ""))
def test_generated_file_is_current(path: Path, render: Callable[[], str]) -> None:
    assert path.read_text() == render(), f"{path} is stale: run `python -m device.docs`"
