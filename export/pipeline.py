"""One export from checkpoint to checked `.onnx`: load, resolve, freeze, export, check, write."""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from export.checkpoint import check_checkpoint_path, load_checkpoint
from export.config import ExportConfig
from export.errors import CheckFailed, UsageError, first_line
from export.freeze import Frozen, check_unchanged, freeze
from export.onnx_export import as_json, check_graph, export_onnx, graph_opset, write_metadata
from export.parity import ParityReport, Tolerance, check_parity, make_inputs, run_torch
from export.resolve import Resolved, resolve

# torch's words for a dtype mismatch ("Input type (c10::Half) and bias type (float) should be the
# same", "expected scalar type Half but found Float", "mat1 and mat2 must have the same dtype").
_DTYPE_ERROR = re.compile(r"scalar type|dtype|\b(Half|BFloat16|Double)\b")


@dataclass(frozen=True)
class ExportResult:
    """What an export produced; `parity.passed` is True whenever a result is returned."""

    output: Path
    report_path: Path
    arch: str
    input_shape: tuple[int, int, int]
    num_classes: int
    frozen: Frozen
    opset: int
    exporter: str
    file_bytes: int
    parity: ParityReport
    metadata: dict[str, str]
    seconds: float
    warnings: tuple[str, ...]


def export_checkpoint(config: ExportConfig) -> ExportResult:
    """Export `config.checkpoint`; raises UsageError (exit 2) or CheckFailed (exit 1)."""
    started = time.perf_counter()
    output, report_path = config.output_path, config.report_path
    check_checkpoint_path(config.checkpoint)
    _check_writable(output.parent)
    _check_outputs(config.checkpoint, output, report_path)
    checkpoint = load_checkpoint(config.checkpoint, trust_pickle=config.trust_pickle)
    resolved = resolve(checkpoint, config.arch, trust_pickle=config.trust_pickle)
    frozen = freeze(resolved.model)
    notes = []
    if frozen.untrained_batchnorms:
        notes.append(
            f"{len(frozen.untrained_batchnorms)} BatchNorm layer(s) still have their initial "
            "statistics (mean 0, var 1), the model looks untrained: "
            + ", ".join(frozen.untrained_batchnorms[:3])
        )
    input_shape = _input_shape(config, resolved)
    num_classes = _probe(resolved.model, input_shape, resolved.arch)
    labels = _labels(config.labels_file, num_classes)
    mean, std = _stats(config, resolved, input_shape[0])
    sample = _sample(config.sample, input_shape)
    batches = make_inputs(input_shape, sample)
    try:
        expected = run_torch(resolved.model, batches, resolved.arch, num_classes)
    except UsageError:
        # A model that fails at some batch size, or drops the batch axis, could never pass
        # parity, so a .onnx already at the output path is no checked export of it: as after a
        # failed check, it must not be served in its place (DESIGN.md), nor its report stay.
        output.unlink(missing_ok=True)
        report_path.unlink(missing_ok=True)
        raise

    try:
        fd, tmp_name = tempfile.mkstemp(
            prefix=f".{output.stem}.", suffix=".onnx.tmp", dir=output.parent
        )
    except OSError as e:
        raise UsageError(
            f"expected a writable output directory, got {output.parent} ({e.strerror}); "
            "pass -o with a path you can write"
        ) from e
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        exported = export_onnx(
            resolved.model, input_shape, tmp, opset=config.opset, exporter=config.exporter
        )
        if exported.fallback_reason:
            notes.append(f"legacy exporter failed ({exported.fallback_reason}); used dynamo")
        notes.extend(
            f"the tracer fixed data-dependent Python to the example's path: {warning}; parity "
            "checks random inputs only, so check that forward does not branch on tensor values"
            for warning in exported.tracer_warnings
        )
        graph = onnx.load(str(tmp))
        opset = graph_opset(graph)
        if opset != config.opset:
            notes.append(f"asked for --opset {config.opset}, the exporter wrote opset {opset}")
        problems = check_graph(graph, input_shape, tmp.stat().st_size)
        tolerance = Tolerance(atol=config.atol, rtol=config.rtol)
        parity = check_parity(expected, tmp, batches, tolerance, problems)
        try:
            check_unchanged(resolved.model, frozen)
        except CheckFailed:
            report_path.unlink(missing_ok=True)  # an earlier run's report would say "pass"
            raise
        _write_report(report_path, parity, resolved.arch, exported.exporter)
        if not parity.passed:
            raise CheckFailed(
                "expected the ONNX model to match the torch model, got:\n  "
                + "\n  ".join(parity.failures())
                + f"\nno .onnx written; details in {report_path}"
            )
        metadata = {
            "arch": resolved.arch,
            "num_classes": str(num_classes),
            "input_shape": ",".join(map(str, input_shape)),
            "labels": as_json(labels),
            "mean": as_json(list(mean)),
            "std": as_json(list(std)),
            "checkpoint_sha256": checkpoint.sha256,
            "torch_version": torch.__version__,
            "parity": as_json({**parity.summary(), "exporter": exported.exporter}),
        }
        write_metadata(graph, tmp, metadata)
        tmp.chmod(_default_mode())  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, output)
    except CheckFailed:
        # DESIGN.md: after a failed check no .onnx is left at the output path.
        output.unlink(missing_ok=True)
        raise
    finally:
        tmp.unlink(missing_ok=True)
    return ExportResult(
        output=output,
        report_path=report_path,
        arch=resolved.arch,
        input_shape=input_shape,
        num_classes=num_classes,
        frozen=frozen,
        opset=opset,
        exporter=exported.exporter,
        file_bytes=output.stat().st_size,
        parity=parity,
        metadata=metadata,
        seconds=time.perf_counter() - started,
        warnings=tuple(notes),
    )


def _default_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _check_writable(directory: Path) -> None:
    if not directory.is_dir():
        raise UsageError(
            f"expected an existing output directory, got {directory}; create it or pass -o"
        )
    if not os.access(directory, os.W_OK | os.X_OK):
        raise UsageError(
            f"expected a writable output directory, got {directory} (permission denied); "
            "pass -o with a path you can write"
        )


def _check_outputs(checkpoint: Path, output: Path, report_path: Path) -> None:
    """Refuse outputs that would destroy the checkpoint or something that is not a file."""
    for role, path in (("output", output), ("parity report", report_path)):
        if checkpoint.exists() and path.exists() and os.path.samefile(path, checkpoint):
            raise UsageError(
                f"expected the {role} to be a new file, got {path}, which is the checkpoint "
                f"{checkpoint} itself; pass -o with another .onnx path"
            )
        if path.exists() and not path.is_file():
            kind = "a directory" if path.is_dir() else "a special file (device, pipe or socket)"
            raise UsageError(
                f"expected the {role} {path} to be a regular file or a new path, got {kind}; "
                "pass -o with another .onnx path"
            )


def _input_shape(config: ExportConfig, resolved: Resolved) -> tuple[int, int, int]:
    if config.input_shape is not None:
        shape = config.input_shape
    elif resolved.spec is not None and resolved.in_channels is not None:
        shape = resolved.spec.default_input_shape(resolved.in_channels)
    else:
        raise UsageError(
            f"expected --input-shape C,H,W for {resolved.arch}, which has no default input "
            "shape; e.g. --input-shape 3,224,224"
        )
    if resolved.in_channels is not None and shape[0] != resolved.in_channels:
        raise UsageError(
            f"expected {resolved.in_channels} input channels (read from the weights of "
            f"{resolved.arch}), got --input-shape {','.join(map(str, shape))}; fix C"
        )
    return shape


def _probe(model: nn.Module, input_shape: tuple[int, int, int], arch: str) -> int:
    """Run one small batch to prove the shape fits and learn the number of classes."""
    try:
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = model(torch.zeros(2, *input_shape))
    except Exception as e:
        shape = ",".join(map(str, input_shape))
        hint = (
            # The weights were converted to float32, so a cast in forward (x.half()) now meets
            # float32 weights: no --input-shape would help.
            "the exporter runs the model in float32 (the ONNX input and output are float32), so "
            "remove dtype casts such as x.half() from forward"
            if _DTYPE_ERROR.search(first_line(e))  # not a C++ stack trace's words
            else "pass a matching --input-shape C,H,W"
        )
        raise UsageError(
            f"expected {arch} to accept inputs of shape {shape}, got "
            f"{type(e).__name__}: {first_line(e)}; {hint}"
        ) from e
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != 2:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise UsageError(
            f"expected {arch} to return one logits tensor of shape N×K, got {got}; wrap the "
            "model so forward returns the logits only"
        )
    return int(out.shape[1])


def _labels(path: Path | None, num_classes: int) -> list[str]:
    if path is None:
        return [f"class_{i}" for i in range(num_classes)]
    try:
        # utf-8-sig: a byte-order mark (Windows Notepad writes one) would else start label 0.
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else first_line(e)
        raise UsageError(
            f"expected a readable UTF-8 labels file, got {path} ({reason}); pass --labels a "
            "text file with one label per line, in class-index order"
        ) from e
    document = _json_document("\n".join(lines))
    if document is not None:
        labels = _json_labels(document, path)
    else:
        labels = [line.strip() for line in lines]
    while labels and not labels[-1]:
        labels.pop()
    if not all(labels):
        # A blank line inside the list would shift every later label to the wrong class.
        blank = labels.index("") + 1
        raise UsageError(
            f"expected {num_classes} non-empty labels (one per line) in {path}, got "
            f"{sum(map(bool, labels))} and a blank line {blank}; remove it, or write the "
            "missing label there, one label per class in class-index order"
        )
    if len(labels) != num_classes:
        raise UsageError(
            f"expected {num_classes} non-empty labels (one per line) in {path}, got "
            f"{len(labels)}; write one label per class in class-index order"
        )
    return labels


def _json_document(text: str) -> list | dict | None:
    """`text` parsed, when it is a JSON list or object; None for plain text."""
    try:
        document = json.loads(text)
    except ValueError:
        return None
    return document if isinstance(document, (list, dict)) else None


def _json_labels(document: list | dict, path: Path) -> list[str]:
    """Labels from a JSON list of names, or from TorchServe's index_to_name.json: an object
    from "0", "1", ... to a name or to [id, name] (its ImageNet file). Read line by line
    they came out as '["cat",' or '"0": "cat",'."""
    if isinstance(document, dict):
        # Compared as text: "01" or "00" read as an index by int() matched no str(i) below.
        if set(document) != {str(i) for i in range(len(document))}:
            raise UsageError(
                f"expected the keys of the JSON object in {path} to be the class indices "
                '"0", "1", ... (TorchServe\'s index_to_name.json), got '
                f"{sorted(document)[:3]}...; or write one label per line, in class-index order"
            )
        values = [document[str(i)] for i in range(len(document))]
        document = [v[-1] if isinstance(v, list) and v else v for v in values]
    for index, name in enumerate(document):
        # A lone surrogate escape ("\\ud800") parses, but no ONNX file or answer can carry it.
        if not isinstance(name, str) or not _is_utf8(name):
            raise UsageError(
                f"expected JSON strings of valid Unicode as labels in {path}, got {name!r}; "
                "write each class's name as a string, or one label per line as plain text"
            )
        if not name.strip():  # not "a blank line": the file's lines are not its labels
            raise UsageError(
                f"expected a non-empty label for every class in {path}, got {name!r} for class "
                f"{index}; write that class's name there"
            )
    return [name.strip() for name in document]


def _is_utf8(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _stats(
    config: ExportConfig, resolved: Resolved, channels: int
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if resolved.spec is not None:
        mean, std = resolved.spec.default_stats(channels)
    else:
        mean, std = (0.0,) * channels, (1.0,) * channels
    chosen = []
    for option, given, default in (("--mean", config.mean, mean), ("--std", config.std, std)):
        if given is None:
            chosen.append(default)
        elif len(given) == 1:
            chosen.append(given * channels)
        elif len(given) == channels:
            chosen.append(given)
        else:
            raise UsageError(
                f"expected {option} with 1 or {channels} values (one per channel), got "
                f"{len(given)}; pass one value (used for every channel) or one per channel, e.g. "
                f"{option} {','.join(['0.5'] * channels)}"
            )
    return chosen[0], chosen[1]


def _sample(path: Path | None, input_shape: tuple[int, int, int]) -> np.ndarray | None:
    if path is None:
        return None
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.lib.npyio.NpzFile):
            with loaded:
                array = _only_array(loaded, path)
        else:
            array = loaded
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise UsageError(
            f"expected --sample to be a .npy file (or an .npz of one array), got {path}: "
            f"{type(e).__name__}: {first_line(e)}; save the inputs with np.save(path, inputs)"
        ) from e
    if array.shape == input_shape:
        array = array[None]
    if array.ndim != 4 or tuple(array.shape[1:]) != input_shape or len(array) == 0:
        raise UsageError(
            f"expected --sample of shape (N,{','.join(map(str, input_shape))}) or "
            f"({','.join(map(str, input_shape))}), got {array.shape}; save the preprocessed inputs"
        )
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        # bool, strings, or complex numbers (whose imaginary part a cast would drop)
        raise UsageError(
            f"expected a real-valued numeric --sample array, got dtype {array.dtype}; save the "
            "preprocessed inputs as float32, e.g. np.save(path, inputs.astype(np.float32))"
        )
    with np.errstate(over="ignore", invalid="ignore"):  # out-of-range values become inf
        array = array.astype(np.float32)
    bad = int(array.size - np.count_nonzero(np.isfinite(array)))
    if bad:
        # Parity on NaN or inf would blame the model for what is wrong with the input.
        raise UsageError(
            f"expected finite values in --sample {path}, got {bad} NaN or infinite value(s) "
            "(as float32); save the preprocessed inputs without them"
        )
    return array


def _only_array(npz: np.lib.npyio.NpzFile, path: Path) -> np.ndarray:
    """A .npz sample is accepted when it holds exactly one array (np.savez(path, x))."""
    if len(npz.files) != 1:
        raise UsageError(
            f"expected --sample to be a .npy file or a .npz holding one array, got {path} with "
            f"{len(npz.files)} arrays ({', '.join(npz.files[:5])}); save the inputs alone with "
            "np.save(path, inputs)"
        )
    return npz[npz.files[0]]


def _write_report(path: Path, parity: ParityReport, arch: str, exporter: str) -> None:
    report = {"arch": arch, "exporter": exporter, **parity.to_dict()}
    try:
        path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    except OSError as e:
        raise UsageError(
            f"expected to write the parity report {path}, got {e.strerror or e}; "
            "pass -o with a path whose directory you can write"
        ) from e
