"""serve/cli_help.py: every command's --help says what each option does and its default."""

from __future__ import annotations

import argparse
from collections.abc import Callable

import pytest

from serve import __main__ as serve_main
from serve import benchargs, client_cli, health
from serve.cli_help import DefaultsFormatter

PARSERS: dict[str, Callable[[], argparse.ArgumentParser]] = {
    "serve": serve_main.build_parser,
    "serve.client": client_cli.build_parser,
    "serve.bench": benchargs.build_parser,
    "serve.health": health.build_parser,
}


@pytest.mark.parametrize("command", PARSERS)
def test_every_option_has_help_and_shows_its_default(command: str) -> None:
    parser = PARSERS[command]()
    text = parser.format_help()
    for action in parser._actions:
        # An option without help text is listed bare, its default left out with it.
        assert action.help, f"{command}: {action.option_strings or action.dest} has no help"
        default = action.default
        unset = default is None or default is False or default is argparse.SUPPRESS
        if action.option_strings and not unset and default not in ("", [], ()):
            shown = " ".join(map(str, default)) if isinstance(default, list) else str(default)
            assert f"(default: {shown})" in " ".join(text.split()) or "default" in action.help


def test_serve_help_names_the_batching_defaults() -> None:
    text = " ".join(serve_main.build_parser().format_help().split())
    assert "larger requests are split (default: 64)" in text
    assert "RESOURCE_EXHAUSTED (default: 1024)" in text
    assert "(default: None)" not in text


def test_a_percent_in_a_default_is_printed() -> None:
    parser = argparse.ArgumentParser(formatter_class=DefaultsFormatter)
    parser.add_argument("--fmt", default="%d images", help="how to print")
    assert "(default: %d images)" in parser.format_help()
