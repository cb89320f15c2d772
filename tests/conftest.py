"""Fixtures for every test: unit and integration."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import short_tmp_dir


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short temp dir, safe for unix socket paths; removed at the end of the test."""
    with short_tmp_dir() as path:
        yield path
