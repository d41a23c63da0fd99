"""Logging set-up for the server: human text or one JSON object per line."""

from __future__ import annotations

import json
import logging
import sys
import time
import warnings
from datetime import datetime, timezone
from typing import TextIO

LEVELS = ("debug", "info", "warning", "error", "critical")
FORMATS = ("text", "json")

# Attributes every LogRecord has; anything else was passed through `extra=` and is logged too.
_STANDARD = frozenset(
    vars(logging.LogRecord("", logging.INFO, "", 0, "", None, None))
) | {"message", "asctime", "taskName"}


# Characters json.dumps leaves raw (with ensure_ascii off) that line readers split at: Python's
# str.splitlines cuts a JSON line at NEL (U+0085) and the Unicode separators, older JavaScript
# parsers refuse the separators. Written as JSON escapes, the line parses to the same value.
_JSON_ESCAPED = {c: f"\\u{c:04x}" for c in (0x85, 0x2028, 0x2029)}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts, level, logger, msg, any extras, and exc on errors."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, tz=timezone.utc).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_") and key not in entry:
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str, ensure_ascii=False).translate(_JSON_ESCAPED)


# Control characters in a text line's message, escaped: a newline in a value a client sent
# (a model name, logged at debug level) started a line of its own, which a reader or a log
# collector took for another event (a forged "ERROR" line). C1 controls (NEL, U+0085, among
# them) and the Unicode line and paragraph separators end lines in some readers too. A
# traceback keeps its lines.
_ESCAPED = {
    c: f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"
    for c in (*range(0x20), *range(0x7F, 0xA0), 0x2028, 0x2029)
    if c != ord("\t")
} | {ord("\n"): "\\n", ord("\r"): "\\r"}


class _TextFormatter(logging.Formatter):
    """One line per record (its traceback, if any, below it), in UTC."""

    converter = time.gmtime

    def formatMessage(self, record: logging.LogRecord) -> str:
        return super().formatMessage(record).translate(_ESCAPED)


def _text_formatter() -> logging.Formatter:
    return _TextFormatter(
        "%(asctime)s.%(msecs)03dZ %(levelname)-7s %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%S"
    )


def _ours_at_debug(record: logging.LogRecord) -> bool:
    """DEBUG lines of our own modules only: at debug level Pillow logs every PNG chunk it
    reads, and those lines would bury the per-request ones."""
    return record.levelno > logging.DEBUG or record.name.split(".", 1)[0] == "serve"


# grpc.aio logs this at ERROR, with a traceback, when a handler's answer cannot be sent because
# the call ended first. It means to stay quiet when the client closed the call, but that news
# can arrive after the failed send: now and then under load, a client cancelling or a deadline
# passing as its answer went out made an ERROR and a traceback (tests/serve/test_chaos.py).
_GRPC_SEND_FAILED = "ExecuteBatchError raised in core by servicer method "


def _call_gone_as_warning(record: logging.LogRecord) -> bool:
    """Turn grpc's failed-send traceback into one WARNING line that says what happened."""
    message = str(record.msg)
    if record.name == "grpc._cython.cygrpc" and message.startswith(_GRPC_SEND_FAILED):
        record.msg = (
            "answer of %s not sent: the call ended first (its client cancelled, its deadline "
            "passed or its connection dropped)"
        )
        record.args = (message.removeprefix(_GRPC_SEND_FAILED),)
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.exc_info, record.exc_text = None, None
        # Passed as an ERROR: under --log-level error it is no longer one.
        return logging.getLogger(record.name).isEnabledFor(logging.WARNING)
    return True


def _log_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    """``warnings.showwarning`` as one log line of logger ``py.warnings`` (logging's own
    capture adds the warning's source line: three lines in text, a newline inside JSON)."""
    logging.getLogger("py.warnings").warning(
        "%s:%d: %s: %s", filename, lineno, category.__name__, message
    )


def configure(level: str, fmt: str, *, stream: TextIO | None = None) -> None:
    """Send logs at ``level`` and above to stderr (or ``stream``) as ``fmt`` ("text" or "json").

    Calling it again replaces the handler it installed before; other handlers are left alone.
    """
    if level.lower() not in LEVELS:
        raise ValueError(f"expected a log level in {LEVELS}, got {level!r}; pass one of them")
    if fmt not in FORMATS:
        raise ValueError(f"expected a log format in {FORMATS}, got {fmt!r}; pass one of them")
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, "_serve_logs", False):
            root.removeHandler(old)
            old.close()
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(JsonFormatter() if fmt == "json" else _text_formatter())
    handler._serve_logs = True  # type: ignore[attr-defined]
    handler.addFilter(_ours_at_debug)
    handler.addFilter(_call_gone_as_warning)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # Library warnings (Pillow's "Corrupt EXIF data", ...) as log lines in the chosen format,
    # not raw lines on stderr that break --log-format json; process-wide, as configure is.
    warnings.showwarning = _log_warning
