"""The metrics port's HTTP answers as a client reads them: the methods it says it takes."""

from __future__ import annotations

import http.client

import pytest

from serve.metrics import Metrics
from tests.serve.conftest import free_port


@pytest.mark.parametrize(("method", "status"), [("OPTIONS", 200), ("POST", 405)])
def test_the_methods_the_metrics_port_lists_include_head(method: str, status: int) -> None:
    # HEAD /metrics is answered, but OPTIONS and a 405 still said "Allow: OPTIONS,GET"
    # (prometheus_client's own list), so a client that reads Allow would not try HEAD.
    m = Metrics()
    port = free_port()
    m.serve_http("127.0.0.1", port)
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request(method, "/metrics")
        answer = connection.getresponse()
        answer.read()
        assert answer.status == status
        allowed = {m.strip() for m in answer.headers["Allow"].split(",")}
        assert allowed == {"OPTIONS", "GET", "HEAD"}, answer.headers["Allow"]
        connection.request("HEAD", "/metrics")
        head = connection.getresponse()
        head.read()
        assert head.status == 200
    finally:
        connection.close()
        m.close()
