"""Fixtures for every test: unit and integration.

The integration tests use mgpu's own pytest plugin (device/harness/pytest_plugin.py),
which pytest loads through its ``pytest11`` entry point once mgpu is installed; an
install made before the entry point existed gets it registered here.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import short_tmp_dir

pytest_plugins = ["pytester"]  # tests/integration/test_pytest_plugin.py


def pytest_configure(config: pytest.Config) -> None:
    if not config.pluginmanager.has_plugin("mgpu"):
        from device.harness import pytest_plugin

        config.pluginmanager.register(pytest_plugin, "mgpu")


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short temp dir, safe for unix socket paths; removed at the end of the test."""
    with short_tmp_dir() as path:
        yield path
