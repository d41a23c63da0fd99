"""Markers of the deployment tests."""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "install: builds the project's wheel and installs `.[serve]` into a fresh virtual "
        "environment (about half a minute; select with -m install, skip with -m 'not install')",
    )
