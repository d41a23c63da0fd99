"""serve/benchenv.py's reading of a metrics URL that answers with something else."""

from __future__ import annotations

import http.server
import threading

import pytest

from serve.benchenv import MetricsError, read_metrics


class _Binary(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"\xff\xfe\x00binary"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_an_answer_that_is_not_text_is_not_called_no_answer() -> None:
    # A service answered 200 with bytes that are not UTF-8; the warning said "no answer
    # (invalid start byte)", sending the user to look for a server that was not there.
    server = http.server.HTTPServer(("127.0.0.1", 0), _Binary)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/metrics"
        with pytest.raises(MetricsError) as e:
            read_metrics(url, "tiny", timeout=10)
        assert "no answer" not in str(e.value), e.value
        assert "not UTF-8" in str(e.value), e.value
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
