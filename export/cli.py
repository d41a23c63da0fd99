"""`python -m export CKPT`: argument parsing and the human summary."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from export.config import ExportConfig, parse_floats, parse_shape
from export.errors import ExportError, strip_ansi
from export.onnx_export import EXPORTERS, MAX_OPSET, MIN_OPSET
from export.pipeline import ExportResult, export_checkpoint
from export.zoo import architectures
from serve.cli_help import DefaultsFormatter, reader_gone


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"error: {message}; see python -m export --help\n")


def _text(value: str) -> str:
    # An empty value (`--mean=`, `-o "$UNSET"`) is a mistake: ignored, or read as the current
    # directory, it would export something other than what was asked for.
    if not value.strip():
        raise argparse.ArgumentTypeError(
            "expected a value, got an empty string; give one or leave the option out"
        )
    return value


def _path(value: str) -> Path:
    return Path(_text(value))


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m export",
        description="Export a trained PyTorch classifier checkpoint to a parity-checked ONNX file.",
        epilog="exit codes: 0 exported and checked; 1 a graph or parity check failed (no .onnx "
        "left at the output path); 2 bad input or usage",
        formatter_class=DefaultsFormatter,
    )
    p.add_argument(
        "checkpoint", type=_path, help="checkpoint (.ckpt/.pt/.pth, .safetensors, TorchScript)"
    )
    p.add_argument(
        "-o",
        "--output",
        type=_text,
        help="output .onnx path, or an existing directory (default: CKPT with .onnx)",
    )
    p.add_argument(
        "--arch", type=_text, help=f"zoo name ({', '.join(architectures())}) or module.path:factory"
    )
    p.add_argument(
        "--input-shape", type=_text, metavar="C,H,W", help="input shape without the batch axis"
    )
    p.add_argument(
        "--labels",
        type=_path,
        metavar="FILE",
        help="class labels: one per line, or JSON (a list, or TorchServe's index_to_name.json)",
    )
    p.add_argument(
        "--mean", type=_text, metavar="M[,M...]", help="per-channel mean for preprocessing"
    )
    p.add_argument(
        "--std", type=_text, metavar="S[,S...]", help="per-channel std for preprocessing"
    )
    p.add_argument(
        "--opset", type=int, default=MIN_OPSET, help=f"ONNX opset ({MIN_OPSET} to {MAX_OPSET})"
    )
    p.add_argument("--atol", type=float, default=1e-4, help="absolute tolerance")
    p.add_argument("--rtol", type=float, default=1e-3, help="relative tolerance")
    p.add_argument("--sample", type=_path, metavar="FILE.npy", help="extra inputs for parity")
    p.add_argument(
        "--exporter",
        choices=EXPORTERS,
        default="auto",
        help="auto: TorchScript-based exporter, dynamo where it cannot express an op",
    )
    p.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow checkpoints holding pickled objects, or an arch entry naming "
        "module.path:factory (runs code the file chose)",
    )
    return p


def config_from_args(args: argparse.Namespace) -> ExportConfig:
    return ExportConfig(
        checkpoint=args.checkpoint,
        output=args.output,
        arch=args.arch,
        input_shape=parse_shape(args.input_shape) if args.input_shape else None,
        labels_file=args.labels,
        mean=parse_floats(args.mean, "--mean") if args.mean else None,
        std=parse_floats(args.std, "--std") if args.std else None,
        opset=args.opset,
        atol=args.atol,
        rtol=args.rtol,
        sample=args.sample,
        trust_pickle=args.trust_pickle,
        exporter=args.exporter,
    )


def format_summary(result: ExportResult) -> str:
    shape = "×".join(map(str, result.input_shape))
    lines = [
        f"exported {result.arch} → {result.output}",
        f"  parameters   {result.frozen.parameters:,}",
        f"  batchnorm    {result.frozen.batchnorm_layers} layer(s) frozen (eval mode)",
        f"  input        {shape} float32, batch axis symbolic; {result.num_classes} classes",
        f"  opset        {result.opset} ({result.exporter} exporter)",
        f"  file size    {result.file_bytes / 2**20:.1f} MiB",
        "  parity       provider / batch: max abs err, max rel err",
    ]
    for r in result.parity.results:
        provider = r.provider.replace("ExecutionProvider", "")
        lines.append(
            f"    {provider:<5} batch {r.batch:>6}: {r.max_abs_err:.2e}  {r.max_rel_err:.2e}  "
            f"{'ok' if r.passed else 'FAIL'}"
        )
    lines.append(f"  report       {result.report_path}")
    lines.append(f"  time         {result.seconds:.1f} s")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = export_checkpoint(config_from_args(args))
    except ExportError as e:
        print(f"error: {strip_ansi(str(e))}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("error: interrupted; no .onnx written", file=sys.stderr)
        return 130
    try:
        for note in result.warnings:
            print(f"warning: {note}", file=sys.stderr)
        print(format_summary(result))
        sys.stdout.flush()  # a reader gone shows here, not as a line of Python's at exit
    except BrokenPipeError:
        # `python -m export ... | head -2`: the export is written and checked, but a traceback
        # and exit 1 (a failed check, per the exit codes) ended it.
        return reader_gone()
    return 0
