"""Planted defects: each fails export with exit 1, names the cause, and leaves no .onnx."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import user_models

from export import CheckFailed, ExportConfig, export_checkpoint

HERE = Path(__file__).resolve().parent


def save_user_model(tmp_path: Path, cls: type[torch.nn.Module]) -> Path:
    path = tmp_path / f"{cls.__name__}.ckpt"
    torch.save(user_models.trained_state(cls()), path)
    return path


@pytest.mark.parametrize(
    ("cls", "cause"),
    [
        ("TrainingBatchNorm", "BatchNormalization node"),
        ("BatchMean", "rows differ from the same samples run alone"),
        ("TrainingDropout", "Dropout node"),
    ],
)
def test_planted_defect_exits_1(run_main, tmp_path: Path, cls: str, cause: str) -> None:
    path = save_user_model(tmp_path, getattr(user_models, cls))
    out = tmp_path / "out.onnx"
    out.write_bytes(b"a previous export that must not survive a failed check")
    done = run_main(path, "-o", out, "--arch", f"user_models:{cls}", "--input-shape", "3,8,8",
                    extra_path=HERE)  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert cause in done.stderr
    assert "Traceback" not in done.stderr
    assert not out.exists()
    assert not list(tmp_path.glob("*.onnx*"))
    report = json.loads((tmp_path / "out.parity.json").read_text())
    assert report["verdict"] == "fail"
    assert any(cause in line for line in report["failures"])


@pytest.mark.parametrize(
    ("cls", "phrases"),
    [
        ("FixedBatch", ("accept any batch size", "RuntimeError at batch size 1", "x.flatten(1)")),
        ("Squeeze", ("shape N×K = 1×5 at batch size 1, got (5,)", "no .squeeze()")),
    ],
)
def test_model_that_breaks_the_batch_axis_exits_2(
    run_main, tmp_path: Path, cls: str, phrases: tuple[str, ...]
) -> None:
    # Both pass the probe (batch 2) and used to end in a traceback from the parity run.
    path = tmp_path / "tiny.ckpt"
    torch.save(user_models.trained_state(user_models.TinyNet()), path)
    out = tmp_path / "out.onnx"
    out.write_bytes(b"a previous export that must not be served in place of this model")
    report = tmp_path / "out.parity.json"
    report.write_text('{"verdict": "pass"}')  # and its report, which must not stay beside it
    done = run_main(path, "-o", out, "--arch", f"user_models:{cls}", "--input-shape", "3,8,8",
                    extra_path=HERE)  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1, done.stderr
    for phrase in (f"user_models:{cls}", *phrases):
        assert phrase in done.stderr
    assert not list(tmp_path.glob("*.onnx*"))
    assert not report.exists()


def test_a_trace_of_value_dependent_python_is_exported_with_a_warning(
    run_main, tmp_path: Path
) -> None:
    # Parity on random inputs cannot reach the branch the trace dropped; the tracer's warning,
    # silenced with the exporter's other output, was the only sign of it.
    path = tmp_path / "tiny.ckpt"
    torch.save(user_models.trained_state(user_models.TinyNet()), path)
    done = run_main(path, "--arch", "user_models:ValueBranch", "--input-shape", "3,8,8",
                    extra_path=HERE)  # fmt: skip
    assert done.returncode == 0, done.stderr
    warning = next(line for line in done.stderr.splitlines() if "tracer" in line)
    assert warning.startswith("warning: the tracer fixed data-dependent Python")
    assert "user_models.py:" in warning and "branch on tensor values" in warning


def test_an_infinite_buffer_is_allowed_and_a_nan_one_refused(run_main, tmp_path: Path) -> None:
    model = user_models.MaskedLogits()
    path = tmp_path / "masked.ckpt"
    torch.save(user_models.trained_state(model), path)
    args = ("--arch", "user_models:MaskedLogits", "--input-shape", "3,8,8")
    done = run_main(path, *args, extra_path=HERE)
    assert done.returncode == 0, done.stderr  # a -inf floor is meant, not a diverged training
    state = user_models.trained_state(model)
    state["floor"][2] = float("nan")
    torch.save(state, path)
    done = run_main(path, *args, extra_path=HERE)
    assert done.returncode == 2 and "1 NaN value(s) of 5 in floor" in done.stderr, done.stderr


def test_training_batchnorm_via_cli_subprocess(run_cli, tmp_path: Path) -> None:
    path = save_user_model(tmp_path, user_models.TrainingBatchNorm)
    done = run_cli(path, "--arch", "user_models:TrainingBatchNorm", "--input-shape", "3,8,8",
                   extra_path=HERE)  # fmt: skip
    assert done.returncode == 1
    assert "training mode" in done.stderr
    assert "Traceback" not in done.stderr
    assert not path.with_suffix(".onnx").exists()


def test_model_that_mutates_itself(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(HERE))
    path = save_user_model(tmp_path, user_models.Counter)
    stale = path.with_suffix(".parity.json")
    stale.write_text('{"verdict": "pass"}')  # an earlier export's report
    with pytest.raises(CheckFailed, match="unchanged"):
        export_checkpoint(ExportConfig(checkpoint=path, arch="user_models:Counter",
                                       input_shape=(3, 8, 8)))  # fmt: skip
    assert not path.with_suffix(".onnx").exists()
    assert not stale.exists()


def test_tolerance_flags_are_applied(small_ckpt, tmp_path: Path) -> None:
    path, _ = small_ckpt
    # Zero tolerance: float reordering between torch and ORT makes some element differ.
    with pytest.raises(CheckFailed, match="exceeds atol 0"):
        export_checkpoint(ExportConfig(checkpoint=path, output=tmp_path / "z.onnx", atol=0, rtol=0))
    assert not (tmp_path / "z.onnx").exists()


def test_report_lists_every_batch_and_sample(small_ckpt, tmp_path: Path) -> None:
    import numpy as np

    path, _ = small_ckpt
    sample = tmp_path / "sample.npy"
    np.save(sample, np.random.default_rng(5).random((3, 3, 32, 32), dtype=np.float32))
    result = export_checkpoint(ExportConfig(checkpoint=path, output=tmp_path / "s.onnx",
                                            sample=sample))  # fmt: skip
    report = json.loads(result.report_path.read_text())
    assert report["verdict"] == "pass"
    assert report["checks"] == {"graph": True, "tolerance": True, "top1": True,
                                "batch_invariance": True}  # fmt: skip
    batches = [r["batch"] for r in report["results"]]
    assert batches == ["1", "2", "7", "32", "sample"]
    for r in report["results"]:
        assert r["provider"] == "CPUExecutionProvider"
        assert 0 <= r["max_abs_err"] <= 1e-4 + 1e-3 * 1e6
    summary = json.loads(result.metadata["parity"])
    assert summary["verdict"] == "pass"
    assert summary["batch_sizes"] == [1, 2, 3, 7, 32]


def test_float64_logits_exit_2_before_export(run_main, tmp_path: Path) -> None:
    # Used to fail the graph check after a whole export: exit 1, "got elem_type 11".
    path = save_user_model(tmp_path, user_models.TinyNet)
    out = tmp_path / "out.onnx"
    out.write_bytes(b"a previous export that must not be served in place of this model")
    done = run_main(path, "-o", out, "--arch", "user_models:DoubleLogits", "--input-shape",
                    "3,8,8", extra_path=HERE)  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1, done.stderr
    assert "return float32 logits, got float64 at batch size 1" in done.stderr
    assert "end it with .float()" in done.stderr
    assert not list(tmp_path.glob("*.onnx*"))


def test_a_shape_error_with_a_cpp_stack_trace_is_still_told_to_fix_the_input_shape(
    run_cli, tmp_path: Path
) -> None:
    # With TORCH_SHOW_CPP_STACKTRACES=1 torch's message goes on with a C++ trace full of
    # "c10::", which once turned the --input-shape advice into "remove dtype casts".
    path = save_user_model(tmp_path, user_models.TinyNet)
    done = run_cli(path, "--arch", "user_models:tiny_net", "--input-shape", "3,16,16",
                   extra_path=HERE, prefix=("env", "TORCH_SHOW_CPP_STACKTRACES=1"))  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "pass a matching --input-shape" in done.stderr
    assert "remove dtype casts" not in done.stderr


def test_cast_to_half_in_forward_is_not_blamed_on_the_input_shape(
    run_main, tmp_path: Path
) -> None:
    # The weights are converted to float32, so x.half() in forward meets float32 weights; the
    # message used to advise a matching --input-shape.
    path = save_user_model(tmp_path, user_models.TinyNet)
    done = run_main(path, "--arch", "user_models:CastsToHalf", "--input-shape", "3,8,8",
                    extra_path=HERE)  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    assert "remove dtype casts such as x.half() from forward" in done.stderr
    assert "pass a matching --input-shape" not in done.stderr
