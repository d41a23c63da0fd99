"""Trace a frozen network to ONNX, check the graph, and stamp the metadata the server reads."""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch
from onnx import numpy_helper
from torch import nn

from export.errors import UsageError, first_line

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
BATCH_AXIS = "batch"
MIN_OPSET = 18
MAX_BYTES = 2**31 - 1
EXPORTERS = ("auto", "legacy", "dynamo")


def _max_opset() -> int:
    """The newest opset that the installed torch exporters and onnx both know (23 for torch 2.13).

    Above it the legacy exporter refuses, and the dynamo exporter quietly writes its own default
    (18) instead, so the file would not have the opset asked for.
    """
    try:
        from torch.onnx import _constants  # private, but the only place torch states its limit

        newest = int(_constants.ONNX_MAX_OPSET)
    except (ImportError, AttributeError):
        newest = MIN_OPSET
    return max(MIN_OPSET, min(newest, onnx.defs.onnx_opset_version()))


MAX_OPSET = _max_opset()


@dataclass(frozen=True)
class Exported:
    """Which exporter wrote the graph (and why another one was not used), and what the tracer
    warned about (data-dependent Python the trace may have fixed to one path)."""

    exporter: str
    fallback_reason: str | None = None
    tracer_warnings: tuple[str, ...] = ()


def export_onnx(
    model: nn.Module, input_shape: tuple[int, int, int], path: Path, *, opset: int, exporter: str
) -> Exported:
    """Write `model` to `path` with a symbolic batch axis.

    `auto` uses the TorchScript-based exporter (fast, mature for these CNNs) and falls back to
    the dynamo exporter for ops the old one cannot express, such as adaptive pooling to a size
    that does not divide the input (VGG's 7×7 pool on small inputs).
    """
    example = torch.randn(2, *input_shape)
    scripted = isinstance(model, torch.jit.ScriptModule)
    if exporter == "dynamo" and scripted:
        raise UsageError(
            "expected a Python nn.Module for --exporter dynamo, got a TorchScript model, which "
            "the dynamo exporter cannot take (torch.export traces Python code); leave --exporter "
            "at auto or pass --exporter legacy"
        )
    if exporter == "dynamo":
        _export_dynamo(model, example, path, opset)
        return Exported("dynamo")
    try:
        return Exported("legacy", tracer_warnings=_export_legacy(model, example, path, opset))
    except Exception as e:
        if exporter == "legacy" or scripted:
            hint = (
                "export the original model's state_dict instead (the dynamo exporter cannot "
                "take TorchScript)"
                if scripted
                else "try --exporter dynamo or simplify the forward"
            )
            raise UsageError(
                f"expected a model the ONNX exporter can trace, got {type(e).__name__}: "
                f"{first_line(e)}; {hint}"
            ) from e
        reason = first_line(e)
    _export_dynamo(model, example, path, opset, legacy_failure=reason)
    return Exported("dynamo", fallback_reason=reason)


def _export_legacy(
    model: nn.Module, example: torch.Tensor, path: Path, opset: int
) -> tuple[str, ...]:
    """Trace and write; returns the tracer's warnings, one line each with where they arose.

    A TracerWarning means Python in forward looked at tensor values or sizes (an ``if`` on a
    tensor, ``int(x.sum())``): the trace keeps the path the example input took, and parity on
    random inputs may not reach the other one, so the user has to hear of it.
    """
    with _quiet(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("ignore")
        warnings.simplefilter("always", torch.jit.TracerWarning)
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: BATCH_AXIS}, OUTPUT_NAME: {0: BATCH_AXIS}},
            do_constant_folding=True,
        )
    found: dict[str, None] = {}  # distinct, in order
    for w in caught:
        if issubclass(w.category, torch.jit.TracerWarning):
            where = f"{Path(w.filename).name}:{w.lineno}"
            found[f"{first_line(w.message)} ({where})"] = None
    return tuple(found)


def _export_dynamo(
    model: nn.Module,
    example: torch.Tensor,
    path: Path,
    opset: int,
    *,
    legacy_failure: str | None = None,
) -> None:
    """Write with torch.export; `legacy_failure` is why the legacy exporter could not, if tried."""
    try:
        import onnxscript  # noqa: F401  (the dynamo exporter needs it)
    except ImportError as e:
        raise UsageError(
            "expected onnxscript to be installed for the dynamo exporter, got ImportError; "
            "pip install '.[export]' or pass --exporter legacy"
        ) from e
    try:
        with _quiet():
            torch.onnx.export(
                model,
                (example,),
                str(path),
                dynamo=True,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes=({0: torch.export.Dim(BATCH_AXIS, min=1, max=65536)},),
                external_data=False,
                optimize=True,
                verbose=False,
                report=False,
            )
    except Exception as e:
        # The dynamo exporter's own message is a generic "step 1/3 failed, next steps:"; the
        # innermost cause names the op or the construct it could not handle.
        cause = _root_cause(e)
        tried = f"legacy exporter: {legacy_failure}; dynamo exporter: " if legacy_failure else ""
        raise UsageError(
            f"expected a model the ONNX exporter can trace, got {tried}{type(cause).__name__}: "
            f"{first_line(cause)}; rewrite that part of forward (an op ONNX lacks, or "
            "data-dependent control flow)"
        ) from e


def _root_cause(error: BaseException) -> BaseException:
    seen = {id(error)}
    while error.__cause__ is not None and id(error.__cause__) not in seen:
        error = error.__cause__
        seen.add(id(error))
    return error


def check_graph(model: onnx.ModelProto, input_shape: tuple[int, int, int], size: int) -> list[str]:
    """Problems with `model` (a file of `size` bytes): ONNX validity, our I/O conventions,
    opset, training-mode ops."""
    if size > MAX_BYTES:
        return [f"expected one self-contained ONNX file below 2 GB, got {size} bytes"]
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        return [f"onnx.checker rejected the graph: {first_line(e)}"]
    problems = _check_io(model, input_shape)
    opset = graph_opset(model)
    if opset < MIN_OPSET:
        problems.append(f"expected opset >= {MIN_OPSET}, got {opset}")
    return problems + training_mode_ops(model)


def graph_opset(model: onnx.ModelProto) -> int:
    """The default-domain opset the graph imports (0 when it imports none)."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _check_io(model: onnx.ModelProto, input_shape: tuple[int, int, int]) -> list[str]:
    graph = model.graph
    initializers = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    if [i.name for i in inputs] != [INPUT_NAME] or [o.name for o in graph.output] != [OUTPUT_NAME]:
        return [
            f"expected one input {INPUT_NAME!r} and one output {OUTPUT_NAME!r}, got inputs "
            f"{[i.name for i in inputs]} and outputs {[o.name for o in graph.output]}"
        ]
    problems = []
    for value, rank in ((inputs[0], 4), (graph.output[0], 2)):
        tensor = value.type.tensor_type
        dims = [d.dim_param or d.dim_value for d in tensor.shape.dim]
        if tensor.elem_type != onnx.TensorProto.FLOAT:
            problems.append(
                f"expected {value.name} to be float32, got "
                f"{onnx.TensorProto.DataType.Name(tensor.elem_type).lower()}"
            )
        if len(dims) != rank or not isinstance(dims[0], str) or not dims[0]:
            problems.append(f"expected {value.name} with a symbolic batch axis, got dims {dims}")
        elif value.name == INPUT_NAME and tuple(dims[1:]) != input_shape:
            problems.append(f"expected {value.name} dims [batch, {input_shape}], got {dims}")
    return problems


def training_mode_ops(model: onnx.ModelProto) -> list[str]:
    """BatchNormalization with training_mode=1 and Dropout whose training_mode may be true."""
    constants = _constants(model)
    problems = []
    for node in _nodes(model):
        if node.op_type == "BatchNormalization":
            mode = next((a.i for a in node.attribute if a.name == "training_mode"), 0)
            if mode:
                problems.append(
                    f"BatchNormalization node {node.name!r} is in training mode (training_mode=1): "
                    "it normalizes with batch statistics; call model.eval() before export"
                )
        elif node.op_type == "Dropout" and len(node.input) > 2 and node.input[2]:
            flag = constants.get(node.input[2])
            if flag is None or bool(flag.any()):
                problems.append(
                    f"Dropout node {node.name!r} runs in training mode (training_mode input "
                    f"{node.input[2]!r} is {'not constant' if flag is None else 'true'}); call "
                    "model.eval() and do not pass training=True to dropout in forward"
                )
    return problems


def _nodes(model: onnx.ModelProto) -> Iterator[onnx.NodeProto]:
    stack = [model.graph, *model.functions]
    while stack:
        graph = stack.pop()
        for node in graph.node:
            yield node
            for attr in node.attribute:
                stack.extend([attr.g] if attr.HasField("g") else [])
                stack.extend(attr.graphs)


def _constants(model: onnx.ModelProto) -> dict[str, object]:
    """Dropout flag candidates only: converting every initializer would copy all the weights."""
    wanted = {n.input[2] for n in _nodes(model) if n.op_type == "Dropout" and len(n.input) > 2}
    values = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer if i.name in wanted}
    for node in _nodes(model):
        if node.op_type == "Constant" and node.output[0] in wanted:
            for attr in node.attribute:
                if attr.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(attr.t)
    return values


def write_metadata(model: onnx.ModelProto, path: Path, metadata: Mapping[str, str]) -> None:
    """Replace the model's metadata_props with `metadata` and save it to `path` as one file."""
    del model.metadata_props[:]
    for key, value in metadata.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path), save_as_external_data=False)


def read_metadata(path: Path) -> dict[str, str]:
    """The metadata_props of an ONNX file, as a dict (without loading the weights)."""
    model = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in model.metadata_props}


def as_json(value: object) -> str:
    return json.dumps(value, separators=(",", ":"))


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporters' progress prints and warnings, including those written straight to
    file descriptors 1 and 2 by C++ (the legacy exporter dumps its IR graph there on errors)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with open(os.devnull, "wb") as sink, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            with (
                contextlib.redirect_stdout(io.StringIO()),
                contextlib.redirect_stderr(io.StringIO()),
            ):
                yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
