"""The exporter's options, checked once where they are built."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from export.errors import UsageError
from export.onnx_export import EXPORTERS, MAX_OPSET, MIN_OPSET

# Parity runs batches of 32 of the input (DESIGN.md), so this bound keeps the largest input
# batch at 2 GiB of float32 before any activation; 3×2048×2048 and 1×4096×4096 still fit.
MAX_INPUT_VALUES = 2**24
_SEPARATORS = tuple(sep for sep in (os.sep, os.altsep) if sep)


@dataclass(frozen=True)
class ExportConfig:
    """Everything one export needs. Paths are checked when the export runs."""

    checkpoint: Path
    output: Path | None = None
    arch: str | None = None
    input_shape: tuple[int, int, int] | None = None
    labels_file: Path | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    opset: int = MIN_OPSET
    atol: float = 1e-4
    rtol: float = 1e-3
    sample: Path | None = None
    trust_pickle: bool = False
    exporter: str = "auto"
    # `-o models/` names a directory even before it exists; Path() drops the trailing slash.
    output_is_dir: bool = field(default=False, init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "checkpoint", Path(self.checkpoint))
        if isinstance(self.output, str) and self.output.endswith(_SEPARATORS):
            object.__setattr__(self, "output_is_dir", True)
        for name in ("output", "labels_file", "sample"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, Path(value))
        if not MIN_OPSET <= self.opset <= MAX_OPSET:
            raise UsageError(
                f"expected --opset from {MIN_OPSET} to {MAX_OPSET} (the opsets the installed torch "
                f"exporter writes), got {self.opset}; pass one in that range, e.g. --opset "
                f"{MIN_OPSET}"
            )
        # An infinite tolerance would let every parity comparison pass.
        if not all(math.isfinite(t) and t >= 0 for t in (self.atol, self.rtol)):
            raise UsageError(
                f"expected finite --atol and --rtol >= 0, got {self.atol} and {self.rtol}; "
                "pass e.g. --atol 1e-4 --rtol 1e-3 (the defaults)"
            )
        if self.exporter not in EXPORTERS:
            raise UsageError(f"expected --exporter in {EXPORTERS}, got {self.exporter!r}")
        if self.input_shape is not None and (
            len(self.input_shape) != 3 or min(self.input_shape) < 1
        ):
            raise UsageError(
                f"expected --input-shape C,H,W with three positive integers, got "
                f"{self.input_shape}; e.g. --input-shape 3,224,224"
            )
        if self.input_shape is not None and math.prod(self.input_shape) > MAX_INPUT_VALUES:
            shape = ",".join(map(str, self.input_shape))
            raise UsageError(
                f"expected --input-shape with at most {MAX_INPUT_VALUES:,} values per sample "
                f"(e.g. 3,2048,2048), got {shape} = {math.prod(self.input_shape):,}; parity runs "
                "batches of 32 of it, which would not fit in memory; pass a smaller --input-shape"
            )
        if self.mean is not None and not all(math.isfinite(m) for m in self.mean):
            raise UsageError(
                f"expected finite --mean values, got {self.mean}; e.g. --mean 0.485,0.456,0.406"
            )
        if self.std is not None and not all(math.isfinite(s) and s > 0 for s in self.std):
            raise UsageError(
                f"expected finite --std values > 0, got {self.std}; e.g. --std 0.229,0.224,0.225"
            )

    @property
    def output_path(self) -> Path:
        if self.output is None:
            return self.checkpoint.with_suffix(".onnx")
        if self.output_is_dir or self.output.is_dir():
            return self.output / (self.checkpoint.stem + ".onnx")
        return self.output

    @property
    def report_path(self) -> Path:
        out = self.output_path
        return out.with_name(out.stem + ".parity.json")


def parse_floats(text: str, option: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError as e:
        raise UsageError(
            f"expected {option} as comma-separated numbers, got {text!r}; e.g. {option} 0.5,0.5,0.5"
        ) from e


def parse_shape(text: str) -> tuple[int, int, int]:
    try:
        dims = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError as e:
        raise UsageError(
            f"expected --input-shape C,H,W as integers, got {text!r}; e.g. --input-shape 3,224,224"
        ) from e
    if len(dims) != 3 or min(dims) < 1:
        raise UsageError(
            f"expected --input-shape C,H,W with three positive integers, got {text!r}; "
            "e.g. --input-shape 3,224,224"
        )
    return dims  # type: ignore[return-value]
