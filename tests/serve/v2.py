"""Raw KServe v2 ModelInfer calls for the production tests: exact statuses, own metadata."""

from __future__ import annotations

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from protos import kserve_pb2

INFER = "/inference.GRPCInferenceService/ModelInfer"


def infer_payload(model: str, batch: np.ndarray, request_id: str = "") -> bytes:
    """A serialized ModelInferRequest carrying ``batch`` as raw little-endian float32."""
    request = kserve_pb2.ModelInferRequest(model_name=model, id=request_id)
    request.inputs.add(name="input", datatype="FP32", shape=list(batch.shape))
    request.raw_input_contents.append(np.ascontiguousarray(batch, "<f4").tobytes())
    return request.SerializeToString()


def reply_logits(reply: bytes) -> tuple[str, np.ndarray]:
    """The id and logits of a serialized ModelInferResponse."""
    response = kserve_pb2.ModelInferResponse.FromString(reply)
    shape = list(response.outputs[0].shape)
    return response.id, np.frombuffer(response.raw_output_contents[0], "<f4").reshape(shape)


def request_counts(text: str) -> dict[tuple[str, str], float]:
    """``serve_requests_total`` by (model, outcome) from a Prometheus text exposition."""
    return {
        (s.labels["model"], s.labels["outcome"]): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "serve_requests_total"
    }


def samples(text: str, name: str, model: str) -> float:
    """The value of the sample ``name`` labelled ``model`` (0 when absent)."""
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels.get("model") == model:
                return s.value
    return 0.0
