"""Read a checkpoint file into a state_dict (or, when trusted, a whole module), safely."""

from __future__ import annotations

import hashlib
import pickle
import re
import warnings
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import torch
from torch import Tensor, nn

from export.errors import UsageError, first_line

STATE_DICT_ENTRIES = ("state_dict", "model_state_dict", "model", "net", "state_dict_ema")
STRIPPABLE_PREFIXES = ("module.", "_orig_mod.", "model.")
# Weight norm's (g, v) pair, as torch.nn.utils.parametrizations.weight_norm and the older
# torch.nn.utils.weight_norm save it in place of a layer's `weight`.
_WEIGHT_NORM = re.compile(r"^(.*?)(parametrizations\.weight\.original0|weight_g)$")
_WEIGHT_NORM_V = {"parametrizations.weight.original0": "parametrizations.weight.original1",
                  "weight_g": "weight_v"}  # fmt: skip
# An ONNX ModelProto starts with its ir_version (field 1, varint: tag 0x08, a small value),
# then the tag of the next field it sets (2..8, 14, 20 or 25; fields go out in number order).
_ONNX_NEXT_TAGS = frozenset({0x12, 0x1A, 0x22, 0x28, 0x32, 0x3A, 0x42, 0x72, 0xA2, 0xCA})
# How a Git LFS pointer file (a checkout whose weights were never fetched) begins.
_LFS_POINTER = b"version https://git-lfs"


@dataclass(frozen=True)
class Checkpoint:
    """What a checkpoint file held: its weights, and a ready module when it carried one."""

    path: Path
    sha256: str
    format: str
    state_dict: Mapping[str, Tensor]
    arch: str | None = None
    module: nn.Module | None = field(default=None, compare=False)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_checkpoint_path(path: Path) -> None:
    """Refuse, saying what the path is instead, anything but a readable, non-empty file that is
    neither a Git LFS pointer nor already an ONNX model (checked before the output path is
    compared with it)."""
    if path.is_dir():
        raise UsageError(
            f"expected a checkpoint file, got {path} which is a directory; pass the checkpoint "
            "file inside it"
        )
    if path.exists() and not path.is_file():
        raise UsageError(
            f"expected a checkpoint file, got {path} which is a special file (device, pipe or "
            "socket); pass the checkpoint file written by torch.save"
        )
    if not path.is_file():
        raise UsageError(
            f"expected a checkpoint file, got {path} which does not exist; check the path"
        )
    try:
        with path.open("rb") as f:
            head = f.read(len(_LFS_POINTER))
    except OSError as e:
        raise _unreadable(path, e) from e
    if not head:
        raise UsageError(f"expected a checkpoint, got an empty file {path}; save the model again")
    if head == _LFS_POINTER:  # whatever the suffix: Hugging Face's .safetensors are LFS files
        raise UsageError(
            f"expected a PyTorch checkpoint, got {path}, a Git LFS pointer file (the weights "
            "were not downloaded); run git lfs pull in its repository, then export again"
        )
    if _looks_like_onnx(head[:3], path) and _is_onnx_model(path):
        raise UsageError(
            f"expected a PyTorch checkpoint, got {path} which is already an ONNX model; serve it "
            f"with python -m serve {path}, or pass the torch checkpoint it was exported from"
        )


def load_checkpoint(path: Path, *, trust_pickle: bool = False) -> Checkpoint:
    """Load a torch.save file (weights only unless `trust_pickle`), safetensors or TorchScript."""
    path = Path(path)
    check_checkpoint_path(path)
    try:
        digest = sha256_of(path)
    except OSError as e:
        raise _unreadable(path, e) from e
    if path.suffix == ".safetensors" or _looks_like_safetensors(path):
        return Checkpoint(path, digest, "safetensors", _load_safetensors(path))
    if _is_torchscript(path):
        module = float32_network(_load_torchscript(path))
        return Checkpoint(path, digest, "torchscript", module.state_dict(), module=module)
    obj = _torch_load(path, trust_pickle)
    found, arch = (obj, None) if isinstance(obj, nn.Module) else _find_state_dict(obj, path)
    if isinstance(found, nn.Module):
        module = float32_network(found)
        return Checkpoint(path, digest, "pickled module", module.state_dict(), arch=arch,
                          module=module)  # fmt: skip
    return Checkpoint(path, digest, "state_dict", found, arch=arch)


def key_variants(state_dict: Mapping[str, Tensor]) -> Iterator[dict[str, Tensor]]:
    """The state_dict as saved, then with each wrapper prefix that every key shares removed;
    each followed by its weight-norm-folded form when it has weight-norm keys.

    A prefix is only a candidate: the `mlp` zoo model's own keys start with `model.`, so the
    caller keeps the variant whose keys fit the architecture. So is folding: a factory that
    applies weight norm itself wants the (g, v) keys as saved.
    """
    current = dict(state_dict)
    while True:
        yield current
        folded = fold_weight_norm(current)
        if folded is not current:
            yield folded
        if not current:
            return
        prefix = next(
            (p for p in STRIPPABLE_PREFIXES if all(k.startswith(p) for k in current)), None
        )
        if prefix is None:
            return
        current = {k[len(prefix) :]: v for k, v in current.items()}


def fold_weight_norm(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """`state_dict` with every weight-norm pair (g, v) replaced by the `weight` it stands for,
    g·v/‖v‖ as the layer computes it, so a network trained with weight norm fits its plain
    architecture; `state_dict` itself when there is none. The weight takes g's place in the
    key order, which the class count of a factory's network is read from (its last weight)."""
    weights: dict[str, tuple[str, Tensor]] = {}  # g's key → (the weight's key, the weight)
    for key, g in state_dict.items():
        found = _WEIGHT_NORM.match(key)
        if found is None:
            continue
        stem, g_name = found.groups()
        v = state_dict.get(stem + _WEIGHT_NORM_V[g_name])
        dim = None if v is None else _weight_norm_dim(g, v)
        if dim is None or stem + "weight" in state_dict:
            continue
        weights[key] = (stem + "weight", torch._weight_norm(v.float(), g.float(), dim))
    if not weights:
        return state_dict
    v_keys = {
        _WEIGHT_NORM.sub(lambda m: m.group(1) + _WEIGHT_NORM_V[m.group(2)], key) for key in weights
    }
    folded: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if key in weights:
            name, weight = weights[key]
            folded[name] = weight
        elif key not in v_keys:
            folded[key] = value
    return folded


def _weight_norm_dim(g: Tensor, v: Tensor) -> int | None:
    """The dim weight norm kept (-1: the norm of the whole tensor), read from g's shape, which
    is v's with every other dim 1; None when the pair does not fit together."""
    if not (g.is_floating_point() and v.is_floating_point()):
        return None
    if g.dim() == 0:
        return -1
    if g.dim() != v.dim() or any(a not in (1, b) for a, b in zip(g.shape, v.shape, strict=True)):
        return None
    kept = [i for i, a in enumerate(g.shape) if a != 1]
    if not kept:  # v's kept dim has size 1 too: any dim of size 1 gives the same norms
        kept = [i for i, b in enumerate(v.shape) if b == 1][:1]
    return kept[0] if len(kept) == 1 else None


def _torch_load(path: Path, trust_pickle: bool) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if found:
            raise UsageError(
                f"expected a checkpoint of plain tensors, got a pickled Python object "
                f"({found.group(1)}) in {path} that cannot be loaded safely; save "
                "model.state_dict() instead, or, only if you trust the file, re-run with "
                "--trust-pickle"
            ) from e
        raise _not_a_checkpoint(path) from e
    except AttributeError as e:
        found = re.search(r"Can't get attribute '(\w+)' on <module '(?:[\w.]+\.)?__main__'", str(e))
        if found is None:
            raise _not_importable(path, e) from e
        # torch.save(model) in a training script pickles its classes as __main__.Name, which
        # only that script, run as the main program, can load again.
        name = found.group(1)
        raise UsageError(
            f"expected the classes pickled in {path} to be importable, got __main__.{name}, a "
            "class of the script that saved it; there, save model.state_dict() instead, move "
            f"{name} into an importable module and export with --arch module.path:{name}"
        ) from e
    except (ModuleNotFoundError, ImportError) as e:
        raise _not_importable(path, e) from e
    except Exception as e:
        # Garbage makes the unpickler fail in many ways (IndexError, KeyError, struct.error..).
        raise _not_a_checkpoint(path) from e


def _not_importable(path: Path, error: Exception) -> UsageError:
    return UsageError(
        f"expected the classes pickled in {path} to be importable, got {error}; run from the "
        "project that defines the model, or save model.state_dict() instead"
    )


def _unreadable(path: Path, error: OSError) -> UsageError:
    return UsageError(
        f"expected a readable checkpoint file, got {path} which cannot be read "
        f"({error.strerror or error}); check its permissions, or pass a copy you can read"
    )


def _looks_like_onnx(head: bytes, path: Path) -> bool:
    """A cheap first test, so that only likely ONNX files are parsed whole."""
    return (
        path.suffix != ".safetensors"
        and len(head) == 3
        and head[0] == 0x08
        and 1 <= head[1] <= 30
        and head[2] in _ONNX_NEXT_TAGS
    )


def _is_onnx_model(path: Path) -> bool:
    """Whether `path` parses as an ONNX ModelProto with a graph (a torch zip or pickle does not)."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # protobuf's DecodeError, or anything else: then it is no ONNX model
        return False
    return model.ir_version > 0 and len(model.graph.output) > 0


def float32_network(module: nn.Module) -> nn.Module:
    """The network inside any DataParallel, DistributedDataParallel or torch.compile wrappers,
    in float32: half, bfloat16 or double modules export as float32 (the ONNX input and output
    are). The wrappers only run the network (and neither ONNX exporter takes them); their
    state_dict keys are the network's with a `module.` or `_orig_mod.` prefix. SyncBatchNorm
    layers become plain BatchNorm ones (same keys): in eval mode they compute the same."""
    while True:
        if isinstance(module, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            module = module.module
        elif type(module).__name__ == "OptimizedModule" and isinstance(
            getattr(module, "_orig_mod", None), nn.Module
        ):
            module = module._orig_mod
        else:
            if not isinstance(module, torch.jit.ScriptModule):
                module = _without_sync_batchnorm(module)
            return module.float()


class _EvalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm for inputs of any rank, as SyncBatchNorm takes them."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")


def _without_sync_batchnorm(module: nn.Module) -> nn.Module:
    """`module` with each SyncBatchNorm replaced: its forward tests `input.size(1) == 0`, which
    the ONNX tracer reports as data-dependent Python in the user's model."""
    if isinstance(module, nn.SyncBatchNorm):
        plain = _EvalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                               module.track_running_stats, device="meta")  # fmt: skip
        plain.load_state_dict(module.state_dict(), assign=True)
        return plain.train(module.training)
    for name, child in module.named_children():
        replaced = _without_sync_batchnorm(child)
        if replaced is not child:
            setattr(module, name, replaced)
    return module


def _not_a_checkpoint(path: Path) -> UsageError:
    try:
        with path.open("rb") as f:
            head = f.read(64)
    except OSError:
        head = b""
    if head.startswith(b"PK\x03\x04") and not zipfile.is_zipfile(path):
        # torch.save and torch.jit.save write zip archives: one cut short (an interrupted copy
        # or download) has lost its central directory, and torch's reader only says that.
        return UsageError(
            f"expected a complete PyTorch checkpoint, got {path}, a zip archive (as torch.save "
            "and torch.jit.save write) that is truncated or damaged; copy or download it again, "
            "or save the model again"
        )
    return UsageError(
        f"expected a PyTorch checkpoint (torch.save, .safetensors or TorchScript), got {path} "
        "which is none of these; pass the file written by torch.save(model.state_dict(), ...)"
    )


def _find_state_dict(obj: object, path: Path) -> tuple[dict[str, Tensor] | nn.Module, str | None]:
    """The weights in a torch.load result, or the whole module that a trusted training checkpoint
    keeps under one of the entries (YOLO's {"model": DetectionModel, "epoch": ...})."""
    if not isinstance(obj, Mapping):
        raise UsageError(
            f"expected a state_dict (a dict of tensors), got a {type(obj).__name__} in {path}; "
            "save model.state_dict()"
        )
    arch = obj.get("arch") if isinstance(obj.get("arch"), str) else None
    for entry in STATE_DICT_ENTRIES:
        inner = obj.get(entry)
        if isinstance(inner, nn.Module):
            return inner, arch
        if isinstance(inner, Mapping) and _tensors(inner):
            return _tensors(inner), arch
    tensors = _tensors(obj)
    if not tensors:
        raise UsageError(
            f"expected tensors in {path}, got a dict of {len(obj)} entries without any; "
            f"put the weights under one of {', '.join(STATE_DICT_ENTRIES)} "
            "or save model.state_dict()"
        )
    return tensors, arch


def _tensors(mapping: Mapping[object, object]) -> dict[str, Tensor]:
    return {k: v for k, v in mapping.items() if isinstance(k, str) and isinstance(v, Tensor)}


def _looks_like_safetensors(path: Path) -> bool:
    with path.open("rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 1 << 30


def _load_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path), device="cpu")
    except Exception as e:  # safetensors raises its own SafetensorError, OSError, ValueError
        raise UsageError(
            f"expected a valid .safetensors file, got {path} which cannot be read ({e}); "
            "write it again with safetensors.torch.save_file"
        ) from e
    if not tensors:
        # Else every zoo architecture would be listed as missing all of its keys.
        raise UsageError(
            f"expected tensors in {path}, got a .safetensors file that holds none; save the "
            "weights with safetensors.torch.save_file(model.state_dict(), path)"
        )
    return tensors


def _is_torchscript(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return any(name.endswith("/constants.pkl") or "/code/" in name for name in names)


def _load_torchscript(path: Path) -> torch.jit.ScriptModule:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript archives still exist
            return torch.jit.load(str(path), map_location="cpu")
    except Exception as e:  # a damaged archive fails in torch's C++ reader in many ways
        raise UsageError(
            f"expected a readable TorchScript archive, got {path} which torch.jit.load cannot "
            f"read ({type(e).__name__}: {first_line(e)}); save the model again "
            "with torch.jit.save, or pass its state_dict saved with torch.save"
        ) from e
