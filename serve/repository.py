"""Find the models to serve: explicit ``MODEL.onnx`` paths or a model repository folder."""

from __future__ import annotations

import errno
import logging
from pathlib import Path

from serve.config import ServerConfig
from serve.errors import UNKNOWN_MODEL

_log = logging.getLogger(__name__)
_MODEL_FILE = "model.onnx"
_VERSION = "1"  # the one version served (serve/state.py)


def _model_at(path: Path) -> Path | None:
    """``path`` when it is a file; ``path/model.onnx`` when ``path`` is a folder holding one,
    as Triton allows for an ONNX model with its external data files beside it."""
    if path.is_file():
        return path
    inner = path / _MODEL_FILE
    return inner if path.is_dir() and inner.is_file() else None


def _other_versions(folder: Path) -> list[str]:
    """``folder``'s version folders other than 1 that hold a model, in numeric order (Triton
    takes folders named by a number without leading zeros, and serves the highest)."""
    versions = [
        p.name
        for p in folder.iterdir()
        if p.name.isascii() and p.name.isdigit() and not p.name.startswith("0")
        and p.name != _VERSION and _model_at(p / _MODEL_FILE) is not None
    ]  # fmt: skip
    return sorted(versions, key=int)


def _model_in(folder: Path) -> Path:
    name = folder.name
    plain, triton = _model_at(folder / _MODEL_FILE), _model_at(folder / _VERSION / _MODEL_FILE)
    if plain is not None and triton is not None:
        raise ValueError(
            f"expected one of {name}/model.onnx or {name}/1/model.onnx, got both; remove one"
        )
    others = _other_versions(folder)
    # Triton serves the highest version: quietly serving another one would answer with
    # another model than the one its user meant.
    if others and triton is not None:
        raise ValueError(
            f"expected only version 1 in {folder} (this server serves one version of a model), "
            f"got versions {', '.join([_VERSION, *others])}; keep the one to serve as "
            f"{name}/1/model.onnx and move the other version folders out of the repository"
        )
    if others:
        found = f"{name}/model.onnx and " if plain is not None else ""
        raise ValueError(
            f"expected {folder}/1/model.onnx (this server serves version 1 only), got "
            f"{found}version {', '.join(others)}; move the model to serve to {name}/1/model.onnx "
            "and other version folders out of the repository"
        )
    model = plain or triton
    if model is not None and (folder / "config.pbtxt").is_file():
        _log.warning(
            "model %s: %s is not read; labels, input shape and normalisation come from the ONNX "
            "file's metadata_props, batching and instances from the flags",
            name,
            folder / "config.pbtxt",
        )
    if model is None:
        raise ValueError(
            f"expected {folder}/model.onnx or {folder}/1/model.onnx (Triton layout), got "
            "neither; add the model or remove the folder"
        )
    return model


def _from_repository(root: Path) -> dict[str, Path]:
    if not root.is_dir():
        raise ValueError(
            f"expected --model-repository to be a folder, got {str(root)!r}; pass a folder with "
            "one subfolder per model"
        )
    # lost+found: the root of a freshly formatted volume (ext4) mounted as the repository.
    entries = sorted(
        p for p in root.iterdir() if not p.name.startswith(".") and p.name != "lost+found"
    )
    found = {folder.name: _model_in(folder) for folder in entries if folder.is_dir()}
    loose = [p.name for p in entries if p.suffix == ".onnx" and p.is_file()]
    if not found:
        also = f" (and {', '.join(loose)} directly in it, which is not served)" if loose else ""
        raise ValueError(
            f"expected at least one model folder in {root}, got none{also}; move each model to "
            f"{root}/<name>/model.onnx"
        )
    for file in loose:
        _log.warning(
            "not serving %s: files directly in --model-repository are ignored; move it to "
            "%s/model.onnx to serve it",
            root / file,
            root / Path(file).stem,
        )
    return found


def find_models(config: ServerConfig) -> dict[str, Path]:
    """Model name → ONNX path, in a stable order. Raises ValueError saying what to fix."""
    try:
        found = _find(config)
    except OSError as e:  # a folder without r or x: Path.is_file raises EACCES, not False
        fix = (
            "make it and the folders above it readable by the user the server runs as"
            if e.errno in (errno.EACCES, errno.EPERM)
            else "check the path"
        )
        raise ValueError(
            f"expected to read {e.filename or 'the model paths'}, got {e.strerror or e}; {fix}"
        ) from e
    for path in found.values():
        try:
            str(path).encode()
        except UnicodeEncodeError as e:  # a name from a latin-1 archive, say
            raise ValueError(
                f"expected a UTF-8 path, got {str(path)!r}; rename it (ONNX Runtime opens "
                "models by UTF-8 paths, and model names are UTF-8)"
            ) from e
    if UNKNOWN_MODEL in found:
        raise ValueError(
            f"expected model names other than {UNKNOWN_MODEL!r}, which the metrics use for "
            f"requests naming no served model, got {found[UNKNOWN_MODEL]}; rename it"
        )
    return found


def _find(config: ServerConfig) -> dict[str, Path]:
    if config.model_repository is not None:
        return _from_repository(config.model_repository)
    found: dict[str, Path] = {}
    for path in config.models:
        if path.is_dir():  # a Triton user's model folder, or a repository
            raise ValueError(
                f"expected an ONNX file, got the folder {str(path)!r}; pass the .onnx file in "
                "it, or a folder of model folders as --model-repository DIR"
            )
        if not path.is_file():
            raise ValueError(
                f"expected an ONNX file, got {str(path)!r} (not a file); check the path"
            )
        if path.stem in found:
            raise ValueError(
                f"expected distinct model names (file stems), got {path.stem!r} twice "
                f"({found[path.stem]} and {path}); rename one file or use --model-repository"
            )
        found[path.stem] = path
    return found
