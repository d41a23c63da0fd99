"""The exceptions' messages: one line for the user, without terminal escape codes."""

from __future__ import annotations

from export.errors import first_line


def test_first_line_drops_ansi_escapes() -> None:
    # torch.export colours part of its message ("\x1b[96mThis is step 1/3\x1b[0m ...").
    error = RuntimeError("Failed. \x1b[96mThis is step 1/3\x1b[0m of exporting.\nmore detail")
    assert first_line(error) == "Failed. This is step 1/3 of exporting."
