"""serve/logs.py: text and JSON lines, levels, extras, exceptions, and a real server's stderr."""

from __future__ import annotations

import io
import json
import logging
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from serve.client import Client
from serve.logs import configure
from tests.serve.conftest import free_port
from tests.serve.procs import ServeProcess
from tests.serve.v2 import INFER, infer_payload


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


# Every character Python's str.splitlines ends a line at, besides \n itself.
LINE_BREAKERS = "\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_a_value_with_line_breakers_stays_one_line(restore_root: None, fmt: str) -> None:
    # A client's model name with NEL or U+2028 in it is one record, in either format, for a
    # reader that splits lines the way Python does; JSON still parses to the name sent.
    out = io.StringIO()
    configure("info", fmt, stream=out)
    name = f"tiny{LINE_BREAKERS}\x9bERROR forged"
    logging.getLogger("serve.x").info("model=%s", name)
    assert len(out.getvalue().splitlines()) == 1, out.getvalue()
    if fmt == "json":
        assert json.loads(out.getvalue())["msg"] == f"model={name}"
    else:
        assert out.getvalue().rstrip("\n").endswith(
            "model=tiny\\r\\x0b\\x0c\\x1c\\x1d\\x1e\\x85\\u2028\\u2029\\x9bERROR forged"
        )


def test_debug_level_shows_our_debug_lines_not_other_libraries(restore_root: None) -> None:
    out = io.StringIO()
    configure("debug", "text", stream=out)
    logging.getLogger("PIL.PngImagePlugin").debug("STREAM b'IHDR' 16 13")
    logging.getLogger("serve.state").debug("request id=1")
    logging.getLogger("PIL").warning("a library's warning still shows")
    lines = out.getvalue().splitlines()
    assert len(lines) == 2, lines
    assert lines[0].endswith("serve.state: request id=1")
    assert lines[1].endswith("PIL: a library's warning still shows")


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_library_warnings_become_one_log_line_in_the_chosen_format(
    fmt: str, tmp_path: Path
) -> None:
    # Pillow warns through the warnings module ("Corrupt EXIF data", ...): such lines came out
    # raw on stderr, breaking --log-format json. A process of its own: the hook is global.
    script = tmp_path / "warn.py"  # a file, so the warning has a source line to (not) show
    script.write_text(
        "import warnings\n"
        "from serve.logs import configure\n"
        f"configure('info', {fmt!r})\n"
        "warnings.warn('Corrupt EXIF data.  Expecting to read 2 bytes but only got 0.')\n"
    )
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, check=True
    )
    (line,) = done.stderr.splitlines()
    expected = "warn.py:4: UserWarning: Corrupt EXIF data.  Expecting to read 2 bytes but only"
    if fmt == "json":
        entry = json.loads(line)
        assert entry["level"] == "warning" and entry["logger"] == "py.warnings"
        assert entry["msg"].endswith(f"{expected} got 0.")
    else:
        assert " WARNING py.warnings: " in line and line.endswith(f"{expected} got 0.")


@pytest.mark.parametrize(
    ("level", "fmt", "match"), [("loud", "text", "log level"), ("info", "xml", "log format")]
)
def test_bad_choices_are_refused(level: str, fmt: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        configure(level, fmt)


# --- a real server's stderr -------------------------------------------------------------------


# A model name a client sent, made to look like a second log line of its own.
FORGED = "tiny\n2000-01-01T00:00:00.000Z ERROR   serve.server: forged by a client"


def _serve_and_stop(model: Path, tmp_path: Path, fmt: str) -> str:
    port = free_port()
    args = [str(model), "--host", "127.0.0.1", "--port", str(port), "--metrics-port", "0",
            "--device", "cpu", "--log-format", fmt, "--log-level", "debug", "--grace", "5"]
    with ServeProcess(args, port, tmp_path / f"serve-{fmt}.log") as server:
        with Client(server.target) as client:
            shape = list(client.model_metadata("tiny").inputs[0].shape)[1:]
            client.infer("tiny", np.zeros((3, *shape), np.float32))
        with grpc.insecure_channel(server.target) as channel, pytest.raises(grpc.RpcError) as e:
            channel.unary_unary(INFER)(infer_payload(FORGED, np.zeros((1, 3, 8, 8))), timeout=30)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        server.terminate()
        assert server.wait(60) == 0, server.output()
        return server.output()


def test_server_logs_json_lines(classifier_path: Path, tmp_path: Path) -> None:
    output = _serve_and_stop(classifier_path, tmp_path, "json")
    entries = [json.loads(line) for line in output.splitlines() if line.strip()]
    for entry in entries:
        assert {"ts", "level", "logger", "msg"} <= entry.keys()
    messages = [e["msg"] for e in entries if e["logger"].startswith("serve")]
    assert any(m.startswith("ready: serving tiny") for m in messages), messages
    assert any(m.startswith("draining") for m in messages)
    assert messages[-1] == "stopped"
    request = re.compile(
        r"^request id=\d+ model=tiny status=OK rows=3 queue_s=\d+\.\d{6} "
        r"compute_s=\d+\.\d{6} total_s=\d+\.\d{6}$"
    )
    debug = [e["msg"] for e in entries if e["level"] == "debug"]
    assert sum(bool(request.match(m)) for m in debug) == 1, debug
    assert any(m.startswith(f"request id=2 model={FORGED} status=NOT_FOUND") for m in debug)


def test_server_logs_text_lines(classifier_path: Path, tmp_path: Path) -> None:
    output = _serve_and_stop(classifier_path, tmp_path, "text")
    line = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (DEBUG|INFO|WARNING|ERROR)\s+\S+: ")
    ours = [x for x in output.splitlines() if " serve" in x]
    assert ours and all(line.match(x) for x in ours), ours
    assert any("ready: serving tiny" in x for x in ours)
    # The client's newline is escaped: its name stays inside the request's one line.
    (forged,) = [x for x in output.splitlines() if "forged by a client" in x]
    escaped = FORGED.replace("\n", "\\n")
    assert " DEBUG   serve.state: request id=2 model=" in forged, forged
    assert f"model={escaped} status=NOT_FOUND" in forged, forged


def test_grpcs_failed_send_traceback_is_one_warning(restore_root: None) -> None:
    # grpc.aio's own record when a client cancels as its answer goes out (seen in
    # tests/serve/test_chaos.py): an ERROR with a traceback that reads like a server bug.
    stream = io.StringIO()
    configure("info", "text", stream=stream)
    try:
        raise grpc._cython.cygrpc.ExecuteBatchError('Failed "execute_batch"')
    except grpc._cython.cygrpc.ExecuteBatchError:
        logging.getLogger("grpc._cython.cygrpc").exception(
            "ExecuteBatchError raised in core by servicer method "
            "[/inference.GRPCInferenceService/ModelInfer]"
        )
    (line,) = stream.getvalue().splitlines()
    assert " WARNING " in line and "Traceback" not in line, line
    assert "answer of [/inference.GRPCInferenceService/ModelInfer] not sent" in line, line


def test_that_warning_obeys_log_level_error(restore_root: None) -> None:
    # Demoted after the logger's level check had passed it as an ERROR, it still showed under
    # --log-level error, which asks for errors only.
    stream = io.StringIO()
    configure("error", "text", stream=stream)
    grpc_log = logging.getLogger("grpc._cython.cygrpc")
    grpc_log.error("ExecuteBatchError raised in core by servicer method [/a.B/C]")
    grpc_log.error("another error of grpc's")
    (line,) = stream.getvalue().splitlines()
    assert " ERROR " in line and "another error of grpc's" in line, line
