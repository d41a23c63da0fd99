"""KServe v2 ModelInfer messages to arrays and back: input checks, raw/typed contents, and the
classification extension. Shared by the unary ``ModelInfer`` and ``ModelStreamInfer``."""

from __future__ import annotations

import numpy as np

from protos import kserve_pb2 as pb
from serve import tensors
from serve.errors import check_answer_size, invalid, shown
from serve.state import VERSION, Model

_CLASSIFICATION = "classification"
_SHARED_MEMORY = "shared_memory_region"
_NO_SHARED_MEMORY = (
    "a shared memory region, which this server does not support; send the tensor in "
    "raw_input_contents (tritonclient: set_data_from_numpy, no set_shared_memory)"
)


def decode_request(model: Model, request: pb.ModelInferRequest) -> tuple[np.ndarray, int | None]:
    """The input rows [N, *sample_shape] and the classification count k (None: logits).

    Raises INVALID_ARGUMENT with what to change when the request does not fit the model.
    """
    return _decode_input(model, request), _requested_classes(model, request)


def _decode_input(model: Model, request: pb.ModelInferRequest) -> np.ndarray:
    info = model.info
    if len(request.inputs) != 1 or request.inputs[0].name != info.input_name:
        names = [t.name for t in request.inputs]
        fix = "name the tensor as ModelMetadata lists it"
        if _repeated(names, info.input_name):
            fix = f"send {info.input_name!r} once"
        raise invalid(
            f"expected exactly one input named {info.input_name!r} for model {info.name}, "
            f"got {shown(names)}; {fix}"
        )
    tensor = request.inputs[0]
    if tensor.datatype != "FP32":
        raise invalid(
            f"expected datatype FP32 for input {shown(tensor.name)}, got {shown(tensor.datatype)}; "
            "send float32 data"
        )
    shape = tuple(tensor.shape)
    what = f"input {shown(tensor.name)}"
    # Triton reads typed values from the field of the tensor's datatype only; values in
    # another field used to be reported as no data at all.
    stray = [f.name for f, _ in tensor.contents.ListFields() if f.name != "fp32_contents"]
    if stray:
        raise invalid(
            f"expected the values of {what}, datatype FP32, in raw_input_contents or "
            f"contents.fp32_contents, got contents.{stray[0]}; send them as float32"
        )
    typed = len(tensor.contents.fp32_contents)
    has_typed = typed > 0
    if request.raw_input_contents:
        if has_typed or len(request.raw_input_contents) != 1:
            raise invalid(
                f"expected one raw_input_contents entry and no typed contents, got "
                f"{len(request.raw_input_contents)} raw entries and {typed} fp32_contents "
                "values; send the tensor once"
            )
        return tensors.from_raw(info, shape, request.raw_input_contents[0], what)
    if not has_typed:
        if _SHARED_MEMORY in tensor.parameters:
            raise invalid(f"expected the data of {what} in the request, got {_NO_SHARED_MEMORY}")
        tensors.check_rows(info, shape, what)
        raise invalid(
            f"expected data for {what} in raw_input_contents or contents.fp32_contents, got "
            "none; send the tensor's values"
        )
    return tensors.from_values(info, shape, tensor.contents.fp32_contents, what)


def _repeated(names: list[str], name: str) -> bool:
    """True when ``names`` is the one right ``name`` given more than once."""
    return len(names) > 1 and set(names) == {name}


def _requested_classes(model: Model, request: pb.ModelInferRequest) -> int | None:
    """The classification count k asked for (None: plain logits); checks output names."""
    info = model.info
    if not request.outputs:
        return None
    if len(request.outputs) != 1 or request.outputs[0].name != info.output_name:
        names = [o.name for o in request.outputs]
        fix = "ask for it by that name or ask for none"
        if _repeated(names, info.output_name):
            fix = f"ask for {info.output_name!r} once"
        raise invalid(
            f"expected the requested output to be {info.output_name!r} for model {info.name}, "
            f"got {shown(names)}; {fix}"
        )
    params = request.outputs[0].parameters
    if _SHARED_MEMORY in params:
        raise invalid(
            f"expected output {info.output_name!r} returned in the response, got a shared memory "
            "region to write it to, which this server does not support; request the output "
            "without one (tritonclient: no set_shared_memory)"
        )
    if _CLASSIFICATION not in params:
        return None
    param = params[_CLASSIFICATION]
    choice = param.WhichOneof("parameter_choice")
    k = param.int64_param if choice == "int64_param" else param.uint64_param
    if choice not in ("int64_param", "uint64_param") or k < 1:
        if choice is None:  # the parameter sent with none of its value fields set
            got = "the parameter without a value"
        else:
            got = f"{choice} {shown(getattr(param, choice))}"
        raise invalid(
            f"expected the classification parameter of output {info.output_name!r} to hold "
            f"the number of top classes wanted, an integer >= 1 in int64_param, got {got}; "
            f"send e.g. int64_param 5 (tritonclient: InferRequestedOutput("
            f"{info.output_name!r}, class_count=5))"
        )
    return min(int(k), info.num_classes)


def encode_response(
    model: Model, request: pb.ModelInferRequest, logits: np.ndarray, k: int | None, limit: int
) -> pb.ModelInferResponse:
    """The answer to ``request``; RESOURCE_EXHAUSTED when it would be above ``limit`` bytes,
    gRPC's send limit, which fails the whole call instead (and ends a stream with every
    request on it)."""
    info = model.info
    tensor = pb.ModelInferResponse.InferOutputTensor
    if k is None:
        output = tensor(name=info.output_name, datatype="FP32", shape=list(logits.shape))
        raw = np.ascontiguousarray(logits, dtype="<f4").tobytes()
    else:
        output = tensor(name=info.output_name, datatype="BYTES", shape=[len(logits), k])
        raw = tensors.encode_bytes(tensors.classification_strings(logits, k, info.labels))
    response = pb.ModelInferResponse(
        model_name=info.name,
        model_version=VERSION,
        id=request.id,
        outputs=[output],
        raw_output_contents=[raw],
    )
    # UTF-8 takes at most 4 bytes a character; shape and version take well under 64 bytes.
    text = len(request.id) + len(info.name) + len(info.output_name)
    check_answer_size(
        response,
        len(raw) + 4 * text + 64,
        limit,
        lambda: f"{len(logits)} rows of {info.num_classes} classes: send fewer rows per request "
        "or ask for the top classes only (classification)",
    )
    return response
