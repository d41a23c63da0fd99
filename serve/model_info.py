"""What the server needs to know about one ONNX classifier, read from its graph and metadata."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import external_data_helper

_log = logging.getLogger(__name__)
# How a Git LFS pointer file (a checkout whose models were never fetched) begins.
_LFS_POINTER = b"version https://git-lfs"
# Output types the logits may have; they are sent as float32 (FP32).
_FLOAT_OUTPUTS = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)


@dataclass(frozen=True)
class ModelInfo:
    """One servable classifier: tensor names, per-sample input shape, labels, preprocessing."""

    name: str
    path: Path
    input_name: str
    output_name: str
    sample_shape: tuple[int, ...]  # input shape without the batch axis, e.g. (3, 224, 224)
    num_classes: int
    labels: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    fixed_batch: int | None  # the graph's batch size when it is not symbolic
    metadata: dict[str, str]

    @property
    def image_shape(self) -> tuple[int, int, int] | None:
        """(C, H, W) when the model takes images, else None."""
        if len(self.sample_shape) != 3:
            return None
        c, h, w = self.sample_shape
        return c, h, w


def _static_dims(value_info: onnx.ValueInfoProto) -> list[int | None]:
    dims = value_info.type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in dims]


def _parse_shape(text: str) -> tuple[int, ...]:
    """Positive integer dims from ``"3,224,224"`` or ``"[3, 224, 224]"``; ValueError otherwise
    (a zero or negative dim would be warmed up and served as such)."""
    text = text.strip()
    values = json.loads(text) if text.startswith("[") else [v for v in text.split(",") if v.strip()]
    if not isinstance(values, list):
        raise ValueError(f"not a list: {values!r}")
    dims = tuple(int(v) if isinstance(v, str) else v for v in values)
    if not all(type(d) is int and d > 0 for d in dims):
        raise ValueError(f"not positive integers: {dims!r}")
    return dims


def _parse_floats(text: str, what: str, path: Path) -> tuple[float, ...]:
    try:
        values = json.loads(text)
        return tuple(float(v) for v in (values if isinstance(values, list) else [values]))
    except (ValueError, TypeError) as e:
        raise ValueError(
            f"expected metadata {what!r} of {path} to be a JSON list of numbers, got {text!r}; "
            "re-export the model or fix its metadata_props"
        ) from e


def _parse_classes(text: str, path: Path) -> int:
    try:
        count = int(text.strip())
    except ValueError:
        count = 0
    if count < 1:
        raise ValueError(
            f"expected metadata 'num_classes' of {path} to be a positive integer, got {text!r}; "
            "fix the model's metadata_props or export with a fixed output size"
        )
    return count


def _encodable(names: list[object]) -> bool:
    """True when every name can be sent as UTF-8, as gRPC strings must be."""
    try:
        for name in names:
            str(name).encode()
    except UnicodeEncodeError:
        return False
    return True


def _channel_stats(
    meta: dict[str, str], key: str, default: float, sample: list[int], path: Path
) -> tuple[float, ...]:
    channels = sample[0] if len(sample) == 3 else 1
    values = _parse_floats(meta[key], key, path) if key in meta else (default,)
    if len(values) == 1:
        values = values * channels
    # NaN or infinity would turn every image's scores into NaN; a zero std divides by zero.
    if (
        len(values) != channels
        or not all(math.isfinite(v) for v in values)
        or (key == "std" and 0.0 in values)
    ):
        rule = "finite and non-zero" if key == "std" else "finite"
        fix = "fix the model's metadata_props or re-export it"
        if len(sample) == 3 and sample[0] not in (1, 3) and sample[2] in (1, 3):
            fix = (
                f"the input {sample} looks channels-last (H, W, C), and this server takes "
                "[C, H, W]: export the model with channels first"
            )
        raise ValueError(
            f"expected metadata {key!r} of {path} with {channels} {rule} values (one per "
            f"channel), got {meta[key]!r}; {fix}"
        )
    return values


def _load(path: Path) -> onnx.ModelProto:
    """The ONNX model at ``path`` without its external data; ValueError saying what the file is
    when it is not one."""
    try:
        with path.open("rb") as f:
            head = f.read(len(_LFS_POINTER))
        # As ONNX Runtime reads it: onnx.load would read .onnxtxt or .json files as text formats.
        model = (
            None
            if head == _LFS_POINTER
            else onnx.load(str(path), format="protobuf", load_external_data=False)
        )
    except OSError as e:  # "pass a file written by export" would not help an unreadable one
        raise ValueError(
            f"expected to read the ONNX model at {path}, got {e.strerror or e}; make it readable "
            "by the user the server runs as"
        ) from e
    except Exception as e:  # onnx raises DecodeError, ... for a bad file
        raise ValueError(
            f"expected a readable ONNX model at {path}, got {type(e).__name__}: {e}; "
            "pass a file written by `python -m export`"
        ) from e
    if model is None:
        raise ValueError(
            f"expected an ONNX model at {path}, got a Git LFS pointer file (the model was not "
            "downloaded); run git lfs pull in its repository"
        )
    # Protobuf reads an empty file (a failed copy or download) as an empty model.
    if not model.HasField("graph"):
        size = path.stat().st_size
        raise ValueError(
            f"expected an ONNX model at {path}, got {size} bytes without a graph; copy the model "
            "file again or pass a file written by `python -m export`"
        )
    return model


def _check_external_data(model: onnx.ModelProto, path: Path) -> None:
    """ValueError when a weights file the model names is missing or unreadable: ONNX Runtime
    finds out only when it opens the model, after the models before it have been warmed up."""
    checked: set[str] = set()
    for tensor in model.graph.initializer:
        if not external_data_helper.uses_external_data(tensor):
            continue
        location = external_data_helper.ExternalDataInfo(tensor).location
        # An absolute path or one outside the model's folder: ONNX Runtime refuses it in words.
        if location in checked or Path(location).is_absolute() or ".." in Path(location).parts:
            continue
        checked.add(location)
        try:
            with (path.parent / location).open("rb"):
                pass
        except OSError as e:
            raise ValueError(
                f"expected the external data file {path.parent / location} of {path} (weights "
                f"of {tensor.name!r} and maybe others), got {e.strerror or e}; copy it beside the "
                "model as it was saved, readable by the user the server runs as, or re-export "
                "the model as one file"
            ) from e


def read_model_info(name: str, path: Path) -> ModelInfo:
    """Read and check the graph interface and metadata of the ONNX file at ``path``.

    Raises ValueError naming what is wrong with the model and what to do about it.
    """
    model = _load(path)
    _check_external_data(model, path)
    initializers = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    outputs = list(model.graph.output)
    if len(inputs) != 1 or len(outputs) != 1:
        raise ValueError(
            f"expected a classifier with one input and one output, got {len(inputs)} inputs and "
            f"{len(outputs)} outputs in {path}; export with one `input` and one `logits` tensor"
        )
    (inp,), (out,) = inputs, outputs
    if inp.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
        raise ValueError(
            f"expected a float32 input in {path}, got "
            f"{onnx.TensorProto.DataType.Name(inp.type.tensor_type.elem_type)}; export in float32"
        )
    if out.type.tensor_type.elem_type not in _FLOAT_OUTPUTS:
        raise ValueError(
            f"expected float32 logits from the output of {path}, got "
            f"{onnx.TensorProto.DataType.Name(out.type.tensor_type.elem_type)}; export the "
            "scores before any ArgMax or Cast, as float32"
        )
    meta = {p.key: p.value for p in model.metadata_props}
    in_dims = _static_dims(inp)
    out_dims = _static_dims(out)
    if len(in_dims) < 2 or len(out_dims) != 2:
        raise ValueError(
            f"expected input [batch, ...] and output [batch, classes] in {path}, got ranks "
            f"{len(in_dims)} and {len(out_dims)}; export a batched classifier"
        )
    sample = in_dims[1:]
    if "input_shape" in meta:
        try:
            declared = _parse_shape(meta["input_shape"])
        except ValueError as e:
            raise ValueError(
                f"expected metadata input_shape of {path} as 'C,H,W' or a JSON list of positive "
                f"integers, got {meta['input_shape']!r}; fix the model's metadata_props"
            ) from e
        if len(declared) != len(sample) or any(
            g is not None and g != d for g, d in zip(sample, declared, strict=True)
        ):
            raise ValueError(
                f"expected metadata input_shape {list(declared)} of {path} to fit the graph's "
                f"input {sample}; re-export the model"
            )
        sample = list(declared)
    if any(d is None for d in sample):
        raise ValueError(
            f"expected fixed input dimensions after the batch axis in {path}, got {sample}; "
            "export with a fixed C,H,W or add metadata input_shape"
        )
    num_classes = out_dims[1]
    if num_classes is None and "num_classes" in meta:
        num_classes = _parse_classes(meta["num_classes"], path)
    if num_classes is None:
        raise ValueError(
            f"expected a fixed number of classes in the output of {path}, got a symbolic axis; "
            "export with a fixed output size or add metadata num_classes"
        )
    labels = tuple(f"class_{i}" for i in range(num_classes))
    if "labels" in meta:
        try:
            given = json.loads(meta["labels"])
        except ValueError:
            given = None
        if isinstance(given, list) and len(given) == num_classes and _encodable(given):
            labels = tuple(str(v) for v in given)
        else:
            if not isinstance(given, list):
                got = "not a JSON list"
            elif len(given) != num_classes:
                got = f"{len(given)} names"
            else:  # JSON's \ud800 escapes decode to text no answer can carry
                got = "a name that is not valid Unicode (a lone surrogate escape)"
            _log.warning(
                "model %s: expected metadata labels as a JSON list of %d names, one per class, "
                "got %s; using class_i",
                name,
                num_classes,
                got,
            )
    mean = _channel_stats(meta, "mean", 0.0, sample, path)
    std = _channel_stats(meta, "std", 1.0, sample, path)
    batch = in_dims[0]
    return ModelInfo(
        name=name,
        path=path,
        input_name=inp.name,
        output_name=out.name,
        sample_shape=tuple(int(d) for d in sample),
        num_classes=int(num_classes),
        labels=labels,
        mean=mean,
        std=std,
        fixed_batch=batch,
        metadata=meta,
    )
