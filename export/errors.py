"""Exceptions that carry the exporter's exit codes (DESIGN.md: 1 check failed, 2 bad input)."""

from __future__ import annotations

import re

# Colour and cursor codes (CSI sequences) that some libraries put in their messages (torch.export
# highlights "This is step 1/3"); in a message for the user, or a log file, they are noise.
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
_TORCHSCRIPT_FAILURE = "The following operation failed in the TorchScript interpreter"


class ExportError(Exception):
    """Base class: the message is meant for the user and says what to do."""

    exit_code = 2


class UsageError(ExportError):
    """Bad input or usage: unreadable or unsafe checkpoint, unknown architecture, bad option."""

    exit_code = 2


class CheckFailed(ExportError):
    """A graph or parity check failed; no `.onnx` is left at the output path."""

    exit_code = 1


def first_line(error: BaseException, limit: int = 300) -> str:
    """The first line of ``error``'s message, at most ``limit`` characters (its type if empty):
    libraries' errors run to pages, and a message for the user is one line."""
    lines = strip_ansi(str(error)).strip().splitlines()
    if lines and lines[0].startswith(_TORCHSCRIPT_FAILURE):
        # TorchScript's interpreter puts the two tracebacks first and the error itself last
        # ("RuntimeError: mat1 and mat2 shapes cannot be multiplied (2x256 and 400x120)");
        # callers name the type themselves.
        return lines[-1].removeprefix(f"{type(error).__name__}: ")[:limit]
    return lines[0][:limit] if lines else type(error).__name__


def strip_ansi(text: str) -> str:
    """``text`` without terminal escape sequences."""
    return _ANSI_ESCAPE.sub("", text)
