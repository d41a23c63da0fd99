"""The ``--help`` format of our commands: every option ends with its default."""

from __future__ import annotations

import argparse


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
