"""Find the models to serve: explicit ``MODEL.onnx`` paths or a model repository folder."""

from __future__ import annotations

from pathlib import Path

from serve.config import ServerConfig


def _from_repository(root: Path) -> dict[str, Path]:
    if not root.is_dir():
        raise ValueError(
            f"expected --model-repository to be a folder, got {str(root)!r}; pass a folder with "
            "one subfolder per model"
        )
    found: dict[str, Path] = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        candidates = [folder / "model.onnx", folder / "1" / "model.onnx"]
        present = [c for c in candidates if c.is_file()]
        if len(present) > 1:
            raise ValueError(
                f"expected one of {folder.name}/model.onnx or {folder.name}/1/model.onnx, got "
                "both; remove one"
            )
        if not present:
            raise ValueError(
                f"expected {folder}/model.onnx or {folder}/1/model.onnx (Triton layout), got "
                "neither; add the model or remove the folder"
            )
        found[folder.name] = present[0]
    if not found:
        raise ValueError(
            f"expected at least one model folder in {root}, got none; add <name>/model.onnx"
        )
    return found


def find_models(config: ServerConfig) -> dict[str, Path]:
    """Model name → ONNX path, in a stable order. Raises ValueError saying what to fix."""
    if config.model_repository is not None:
        return _from_repository(config.model_repository)
    found: dict[str, Path] = {}
    for path in config.models:
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
