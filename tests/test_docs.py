"""docs/registers.md and the guest C header are generated from the code and must match it."""

import pytest

from device import docs


@pytest.mark.parametrize(("path", "render"), docs.GENERATED, ids=lambda v: getattr(v, "name", ""))
def test_generated_file_is_current(path: object, render: object) -> None:
    assert callable(render)
    assert hasattr(path, "read_text")
    assert path.read_text() == render(), (  # type: ignore[attr-defined]
        f"{path} is stale: run `python -m device.docs`"
    )
