"""Many concurrent clients: every answer matches its own input, none lost, batching happened."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
from prometheus_client.parser import text_string_to_metric_families

from protos import kserve_pb2
from serve.background import BackgroundServer

CLIENTS = 64
REQUESTS = 50


def test_64_clients_by_50_requests_without_cross_talk(
    start_server: Callable[..., BackgroundServer], classifier_path: Path
) -> None:
    server = start_server(max_batch_size=16, instances=2, max_queue_size=4096)
    rng = np.random.default_rng(42)
    inputs = [
        [rng.normal(size=(1 + (c + r) % 3, 3, 8, 8)).astype(np.float32) for r in range(REQUESTS)]
        for c in range(CLIENTS)
    ]
    session = ort.InferenceSession(str(classifier_path), providers=["CPUExecutionProvider"])

    def client(index: int) -> list[np.ndarray]:
        answers = []
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            infer = channel.unary_unary(
                "/inference.GRPCInferenceService/ModelInfer",
                request_serializer=kserve_pb2.ModelInferRequest.SerializeToString,
                response_deserializer=kserve_pb2.ModelInferResponse.FromString,
            )
            for r, x in enumerate(inputs[index]):
                request = kserve_pb2.ModelInferRequest(model_name="tiny", id=f"{index}-{r}")
                request.inputs.add(name="input", datatype="FP32", shape=x.shape)
                request.raw_input_contents.append(x.tobytes())
                response = infer(request, timeout=120)
                assert response.id == f"{index}-{r}"
                shape = tuple(response.outputs[0].shape)
                answers.append(np.frombuffer(response.raw_output_contents[0], "<f4").reshape(shape))
        return answers

    with ThreadPoolExecutor(CLIENTS) as pool:
        results = list(pool.map(client, range(CLIENTS)))

    for c in range(CLIENTS):
        assert len(results[c]) == REQUESTS
        for x, got in zip(inputs[c], results[c], strict=True):
            (expected,) = session.run(None, {"input": x})
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)

    batches = server.server.models["tiny"].batcher.batch_rows
    total_rows = sum(len(x) for per_client in inputs for x in per_client)
    assert sum(rows * count for rows, count in batches.items()) == total_rows
    assert max(batches) > 1, f"expected some batch above 1 row, got {dict(batches)}"

    families = {
        f.name: f for f in text_string_to_metric_families(server.server.metrics.render().decode())
    }
    successes = [
        s.value
        for s in families["serve_requests"].samples
        if s.name == "serve_requests_total" and s.labels == {"model": "tiny", "outcome": "success"}
    ]
    assert successes == [CLIENTS * REQUESTS]
