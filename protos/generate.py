"""Regenerate the committed Python modules from the .proto files: ``python -m protos.generate``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

PROTOS_DIR = Path(__file__).resolve().parent
ROOT = PROTOS_DIR.parent
# proto file → whether it gets a *_pb2_grpc.py service module. The KServe service is bound
# by hand on the upstream path (serve/kserve.py), so its generated stub would be misleading.
PROTOS = {"kserve.proto": False, "classifier.proto": True}


def generate(out_root: Path = ROOT) -> list[Path]:
    """Write ``protos/*_pb2.py`` (and ``*_pb2_grpc.py``) under ``out_root``; return their paths."""
    try:
        from grpc_tools import protoc
    except ImportError as e:
        raise SystemExit(
            "expected grpcio-tools to be installed, got ImportError; "
            "run `pip install grpcio-tools` (part of the [test] extra)"
        ) from e
    include = str(Path(protoc.__file__).resolve().parent / "_proto")
    (out_root / "protos").mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for name, with_service in PROTOS.items():
        args = ["grpc_tools.protoc", f"-I{ROOT}", f"-I{include}", f"--python_out={out_root}"]
        if with_service:
            args.append(f"--grpc_python_out={out_root}")
        args.append(str(PROTOS_DIR / name))
        if protoc.main(args) != 0:
            raise SystemExit(f"protoc failed on protos/{name}; see the messages above")
        stem = name.removesuffix(".proto")
        written.append(out_root / "protos" / f"{stem}_pb2.py")
        if with_service:
            written.append(out_root / "protos" / f"{stem}_pb2_grpc.py")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m protos.generate", description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT, help="root to write protos/ under")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
