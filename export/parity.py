"""Compare the eval-mode torch model with ONNX Runtime, per provider and batch size."""

from __future__ import annotations

import contextlib
import io
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from export.errors import UsageError, first_line
from export.onnx_export import INPUT_NAME
from serve.runtime import nvidia_driver_present

BATCH_SIZES = (1, 2, 7, 32)


@dataclass(frozen=True)
class Tolerance:
    atol: float = 1e-4
    rtol: float = 1e-3


@dataclass(frozen=True)
class BatchResult:
    """One provider at one batch size (or the user's sample batch)."""

    provider: str
    batch: str
    batch_size: int
    max_abs_err: float
    max_rel_err: float
    within_tolerance: bool
    top1_agrees: bool
    batch_invariant: bool
    max_batch_deviation: float

    @property
    def passed(self) -> bool:
        return self.within_tolerance and self.top1_agrees and self.batch_invariant


@dataclass(frozen=True)
class ParityReport:
    """Every comparison, the graph problems found, and the verdict."""

    tolerance: Tolerance
    providers: tuple[str, ...]
    results: tuple[BatchResult, ...]
    graph_problems: tuple[str, ...]

    @property
    def passed(self) -> bool:
        return not self.graph_problems and all(r.passed for r in self.results)

    def failures(self) -> list[str]:
        """One line per failed check, graph problems first (they name the cause)."""
        lines = list(self.graph_problems)
        for r in self.results:
            where = f"{r.provider} batch {r.batch}"
            if not r.within_tolerance:
                lines.append(
                    f"{where}: max |onnx - torch| {r.max_abs_err:.3g} exceeds atol "
                    f"{self.tolerance.atol:g} + rtol {self.tolerance.rtol:g}·|torch|"
                )
            if not r.top1_agrees:
                lines.append(f"{where}: top-1 class differs between torch and ONNX")
            if not r.batch_invariant:
                lines.append(
                    f"{where}: rows differ from the same samples run alone (max "
                    f"{r.max_batch_deviation:.3g}); the model mixes samples within a batch, "
                    "e.g. batch statistics in forward"
                )
        return lines

    def summary(self) -> dict[str, object]:
        return {
            "verdict": "pass" if self.passed else "fail",
            "providers": list(self.providers),
            "batch_sizes": sorted({r.batch_size for r in self.results}),
            "atol": self.tolerance.atol,
            "rtol": self.tolerance.rtol,
            "max_abs_err": max((r.max_abs_err for r in self.results), default=0.0),
            "max_rel_err": max((r.max_rel_err for r in self.results), default=0.0),
        }

    def to_dict(self) -> dict[str, object]:
        return {
            **self.summary(),
            "checks": {
                "graph": not self.graph_problems,
                "tolerance": all(r.within_tolerance for r in self.results),
                "top1": all(r.top1_agrees for r in self.results),
                "batch_invariance": all(r.batch_invariant for r in self.results),
            },
            "failures": self.failures(),
            "results": [asdict(r) for r in self.results],
        }


def create_sessions(path: Path) -> dict[str, ort.InferenceSession]:
    """A CPU session, and a CUDA one when a GPU is really usable (the GPU wheel lists the CUDA
    provider even on hosts without one, so the session's own provider list decides)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    sessions = {"CPUExecutionProvider": ort.InferenceSession(
        str(path), options, providers=["CPUExecutionProvider"])}  # fmt: skip
    cuda = _cuda_session(path, options)
    if cuda is not None:
        sessions["CUDAExecutionProvider"] = cuda
    return sessions


def _cuda_session(path: Path, options: ort.SessionOptions) -> ort.InferenceSession | None:
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return None
    if not nvidia_driver_present():
        return None  # skip the attempt and its loud failure log
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            if hasattr(ort, "preload_dlls"):
                ort.preload_dlls()  # CUDA/cuDNN from the pip wheels, when installed
        # TF32 would loosen fp32 parity; compare true fp32 arithmetic.
        provider = ("CUDAExecutionProvider", {"use_tf32": 0})
        session = ort.InferenceSession(str(path), options, providers=[provider])
    except Exception:
        return None
    return session if session.get_providers()[0] == "CUDAExecutionProvider" else None


def make_inputs(
    input_shape: tuple[int, int, int], sample: np.ndarray | None, seed: int = 0
) -> dict[str, np.ndarray]:
    """Random batches of every size in BATCH_SIZES (prefixes of one pool) plus the sample."""
    pool = np.random.default_rng(seed).standard_normal((max(BATCH_SIZES), *input_shape))
    batches = {str(n): pool[:n].astype(np.float32) for n in BATCH_SIZES}
    if sample is not None:
        batches["sample"] = sample.astype(np.float32)
    return batches


def run_torch(
    model: nn.Module, batches: dict[str, np.ndarray], arch: str, num_classes: int
) -> dict[str, np.ndarray]:
    """The torch reference for every batch, run before anything is exported. torch runs on the
    CPU whatever the provider: one reference per batch serves them all.

    Raises UsageError when the model breaks the conventions the ONNX file must keep (DESIGN.md:
    every batch size runs, the output is N×K logits): the model itself has to change, as when
    the probe in the pipeline refuses it, so this is bad input (exit 2), not a failed check.
    """
    expected = {}
    for name, batch in batches.items():
        where = f"batch size {name}" if name.isdigit() else f"the --sample batch (N={len(batch)})"
        try:
            out = _run_torch(model, batch)
        except Exception as e:
            raise UsageError(
                f"expected {arch} to accept any batch size, got {type(e).__name__} at {where}: "
                f"{first_line(e)}; make forward work for every N (e.g. x.flatten(1) or "
                "x.reshape(x.shape[0], -1), not a fixed batch size)"
            ) from e
        if out.shape != (len(batch), num_classes):
            raise UsageError(
                f"expected {arch} to return logits of shape N×K = {len(batch)}×{num_classes} "
                f"at {where}, got {tuple(out.shape)}; make forward keep the batch axis for "
                "every N (e.g. no .squeeze() without a dim)"
            )
        if out.dtype != torch.float32:
            # The ONNX output must be float32: found here, before the export, rather than by
            # the graph check after it (as an ONNX elem_type number).
            raise UsageError(
                f"expected {arch} to return float32 logits, got "
                f"{str(out.dtype).removeprefix('torch.')} at {where}; make forward return "
                "float32 logits (e.g. end it with .float()), not class indices or another "
                "precision"
            )
        expected[name] = out.numpy()
    return expected


def check_parity(
    expected_by_batch: dict[str, np.ndarray],
    path: Path,
    batches: dict[str, np.ndarray],
    tolerance: Tolerance,
    graph_problems: list[str],
) -> ParityReport:
    """Run every batch through every usable ORT provider and compare with torch's outputs."""
    sessions = create_sessions(path)
    results = []
    for provider, session in sessions.items():
        for name, batch in batches.items():
            expected = expected_by_batch[name]
            got = session.run(None, {INPUT_NAME: batch})[0]
            alone = np.concatenate([session.run(None, {INPUT_NAME: row[None]})[0] for row in batch])
            results.append(_compare(provider, name, expected, got, alone, tolerance))
    return ParityReport(tolerance, tuple(sessions), tuple(results), tuple(graph_problems))


def _run_torch(model: nn.Module, batch: np.ndarray) -> torch.Tensor:
    with torch.inference_mode():
        out = model(torch.from_numpy(batch.copy()))
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"forward returned a {type(out).__name__}, not one logits tensor")
    return out


def _compare(
    provider: str,
    name: str,
    expected: np.ndarray,
    got: np.ndarray,
    alone: np.ndarray,
    tol: Tolerance,
) -> BatchResult:
    if got.shape != expected.shape or alone.shape != expected.shape:
        return BatchResult(provider, name, len(expected), float("inf"), float("inf"),
                           False, False, False, float("inf"))  # fmt: skip
    diff = np.abs(got.astype(np.float64) - expected)
    bound = tol.atol + tol.rtol * np.abs(expected)
    rel = diff / np.maximum(np.abs(expected), np.finfo(np.float32).tiny)
    deviation = np.abs(got.astype(np.float64) - alone)
    finite = bool(np.isfinite(got).all() and np.isfinite(expected).all())
    return BatchResult(
        provider=provider,
        batch=name,
        batch_size=len(expected),
        max_abs_err=float(diff.max(initial=0.0)),
        max_rel_err=float(rel.max(initial=0.0)),
        within_tolerance=finite and bool((diff <= bound).all()),
        top1_agrees=_top1_agrees(expected, got, tol),
        batch_invariant=bool((deviation <= tol.atol + tol.rtol * np.abs(alone)).all()),
        max_batch_deviation=float(deviation.max(initial=0.0)),
    )


def _top1_agrees(expected: np.ndarray, got: np.ndarray, tol: Tolerance) -> bool:
    """ONNX's top class is torch's, or ties with it within tolerance (a true tie has no top-1)."""
    if expected.ndim != 2 or expected.shape[1] == 0:
        return False
    best = expected.max(axis=1)
    picked = np.take_along_axis(expected, got.argmax(axis=1)[:, None], axis=1)[:, 0]
    return bool((picked >= best - (tol.atol + tol.rtol * np.abs(best))).all())
