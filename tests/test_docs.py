"""docs/registers.md is generated from the code and must match it."""

from device import docs


def test_register_doc_is_current() -> None:
    assert docs.DOC_PATH.read_text() == docs.render(), (
        "docs/registers.md is stale: run `python -m device.docs`"
    )
