"""serve/logs.py: text and JSON lines, levels, extras, exceptions, and a real server's stderr."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from serve.logs import configure


@pytest.fixture
def restore_root() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)


def test_json_lines_carry_fields_and_extras(restore_root: None) -> None:
    stream = io.StringIO()
    configure("info", "json", stream=stream)
    log = logging.getLogger("serve.test")
    log.debug("hidden")
    log.info("loaded %s", "digits", extra={"model": "digits", "rows": 3})
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("failed")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["level"] == "info"
    assert first["logger"] == "serve.test"
    assert first["msg"] == "loaded digits"
    assert first["model"] == "digits" and first["rows"] == 3
    assert first["ts"].endswith("+00:00")
    assert second["level"] == "error"
    assert "RuntimeError: boom" in second["exc"]


def test_text_format_and_reconfigure(restore_root: None) -> None:
    first, second = io.StringIO(), io.StringIO()
    configure("warning", "text", stream=first)
    configure("debug", "text", stream=second)
    logging.getLogger("serve.x").debug("detail %d", 7)
    assert first.getvalue() == ""
    line = second.getvalue().strip()
    assert line.endswith("DEBUG   serve.x: detail 7")
    assert "Z " in line


@pytest.mark.parametrize(
    ("level", "fmt", "match"), [("loud", "text", "log level"), ("info", "xml", "log format")]
)
def test_bad_choices_are_refused(level: str, fmt: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        configure(level, fmt)
