"""Export a trained PyTorch classifier to a parity-checked ONNX model (`python -m export`)."""

from __future__ import annotations

import serve  # noqa: F401  (first: it turns onnxruntime's telemetry off before its import)
from export.config import ExportConfig
from export.errors import CheckFailed, ExportError, UsageError
from export.pipeline import ExportResult, export_checkpoint

__all__ = [
    "CheckFailed",
    "ExportConfig",
    "ExportError",
    "ExportResult",
    "UsageError",
    "export_checkpoint",
]
