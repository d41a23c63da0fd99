"""What our commands share: the ``--help`` format (every option ends with its default), and
how they stop when the reader of their output goes away."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

# How a shell reports a process ended by SIGPIPE (128 + 13).
EXIT_READER_GONE = 141


def reader_gone() -> int:
    """For a BrokenPipeError on stdout (`... | head`): point stdout at /dev/null, so the
    flush at exit does not print "Exception ignored ... BrokenPipeError", and return the exit
    code of a process ended by SIGPIPE. What is still buffered goes nowhere."""
    with contextlib.suppress(OSError, ValueError, AttributeError):  # no stdout left
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return EXIT_READER_GONE


class DefaultsFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to each option's help, as Triton's and perf_analyzer's help do.

    Left as written: options without a default (None, False, empty), and help that
    already says its default in its own words.
    """

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (
            not action.option_strings
            or "default" in text
            or default is None
            or default is False
            or default is argparse.SUPPRESS
            or default in ([], (), "")
        ):
            return text
        if isinstance(default, (list, tuple)):
            default = " ".join(map(str, default))
        # argparse %-formats help strings: a % in a default would otherwise end the format.
        shown = str(default).replace("%", "%%")
        return f"{text} (default: {shown})" if text else f"(default: {shown})"
