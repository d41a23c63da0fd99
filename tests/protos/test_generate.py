"""protos/generate.py: the committed generated modules are what the .proto files produce."""

from __future__ import annotations

import re
from pathlib import Path

from protos.generate import PROTOS_DIR, generate

# Version stamps that change with every grpcio-tools / protobuf release, not with our protos.
_STAMPS = [
    re.compile(r"^# Protobuf Python Version:.*$", re.M),
    re.compile(r"^_runtime_version\.ValidateProtobufRuntimeVersion\(.*?^\)$", re.M | re.S),
    re.compile(r"^GRPC_GENERATED_VERSION = .*$", re.M),
]


def _normalized(path: Path) -> str:
    text = path.read_text()
    for stamp in _STAMPS:
        text = stamp.sub("<version stamp>", text)
    return text


def test_generated_modules_are_current(tmp_path: Path) -> None:
    written = generate(tmp_path)
    assert {p.name for p in written} == {
        "kserve_pb2.py",
        "classifier_pb2.py",
        "classifier_pb2_grpc.py",
    }
    for fresh in written:
        committed = PROTOS_DIR / fresh.name
        assert committed.is_file(), f"{committed} is missing; run `make protos` and commit it"
        assert _normalized(fresh) == _normalized(committed), (
            f"{committed.name} differs from what protos/*.proto generate; "
            "run `make protos` and commit the result"
        )


def test_stamps_are_the_only_thing_ignored(tmp_path: Path) -> None:
    (fresh,) = [p for p in generate(tmp_path) if p.name == "kserve_pb2.py"]
    text = fresh.read_text()
    assert _normalized(fresh).count("<version stamp>") == 2
    changed = tmp_path / "changed.py"
    changed.write_text(text.replace("raw_input_contents", "raw_input_content"))
    assert _normalized(changed) != _normalized(fresh)
