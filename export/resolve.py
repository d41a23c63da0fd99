"""Decide which network a checkpoint holds and build it with the checkpoint's weights."""

from __future__ import annotations

import contextlib
import difflib
import importlib
import inspect
import io
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from export.checkpoint import Checkpoint, float32_network, fold_weight_norm, key_variants
from export.errors import UsageError, first_line
from export.zoo import ArchSpec, architectures

# BatchNorm's step counter is absent from old checkpoints and plays no part in eval mode.
IGNORED_SUFFIXES = ("num_batches_tracked",)
RUNNING_STATS = ("running_mean", "running_var")


@dataclass(frozen=True)
class Fit:
    """How one architecture's expected keys and shapes compare with a state_dict's."""

    arch: str
    missing: tuple[str, ...]
    unexpected: tuple[str, ...]
    mismatched: tuple[str, ...]

    @property
    def exact(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    @property
    def errors(self) -> int:
        return len(self.missing) + len(self.unexpected) + len(self.mismatched)

    def describe(self, limit: int = 4) -> str:
        parts = []
        for label, keys in (("missing", self.missing), ("unexpected", self.unexpected),
                            ("wrong shape", self.mismatched)):  # fmt: skip
            if keys:
                more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
                parts.append(f"{label} {', '.join(keys[:limit])}{more}")
        return f"{self.arch}: " + "; ".join(parts)


@dataclass(frozen=True)
class Resolved:
    """A built eval-ready network with its weights loaded, and where it came from."""

    arch: str
    model: nn.Module
    num_classes: int | None
    in_channels: int | None
    spec: ArchSpec | None


def resolve(checkpoint: Checkpoint, arch: str | None, *, trust_pickle: bool = False) -> Resolved:
    """Build the network: `arch` (a zoo name or `module.path:factory`), else the checkpoint's
    own `arch` entry, else the zoo architecture whose keys and shapes fit the weights.

    A `module.path:factory` entry read from the checkpoint is imported only with `trust_pickle`:
    importing runs code, and the file, not the user, would have chosen which.
    """
    name = arch or checkpoint.arch
    source = "--arch" if arch else f"the checkpoint's 'arch' entry in {checkpoint.path}"
    if name is not None and ":" in name:
        if not arch and not trust_pickle:
            raise UsageError(
                f"expected a zoo name in the checkpoint's 'arch' entry in {checkpoint.path}, got "
                f"{name!r}, a module to import (that runs code the file chose); pass --arch "
                f"{name} if you trust that module, or --trust-pickle if you trust the file"
            )
        return _build_factory(name, checkpoint, source)
    zoo = architectures()
    if arch is not None and arch not in zoo:
        raise UsageError(
            f"expected an architecture from the zoo ({', '.join(zoo)}) or module.path:factory, "
            f"got {name!r} from {source}; pass --arch with one of these"
        )
    if name is not None and name not in zoo:
        # A training script's own name for its network ("resnet50", type(model).__name__):
        # it names no zoo entry, so the weights decide, as when there is no entry at all.
        name = None
    specs = [zoo[name]] if name is not None else list(zoo.values())
    fits: list[Fit] = []
    for variant in key_variants(checkpoint.state_dict):
        for spec in specs:
            fit, weights = _fit(spec, variant)
            if fit.exact:
                return _build_zoo(spec, weights, checkpoint)
            fits.append(fit)
    if checkpoint.module is not None and name is None:
        # A TorchScript or trusted pickled module that is not a zoo network exports as it is.
        guesses = _guess_sizes(checkpoint.state_dict)
        label = type(checkpoint.module).__name__
        if checkpoint.format == "torchscript":
            label = getattr(checkpoint.module, "original_name", label)
        return Resolved(label, checkpoint.module, guesses["num_classes"],
                        guesses["in_channels"], None)  # fmt: skip
    closest: dict[str, Fit] = {}
    for fit in sorted(fits, key=lambda f: f.errors):
        closest.setdefault(fit.arch, fit)
    _refuse_missing_running_stats(next(iter(closest.values()), None), checkpoint)
    described = "\n  ".join(f.describe() for f in list(closest.values())[:3])
    if name is not None:
        raise UsageError(
            f"expected weights of {name!r}, got keys that do not fit it:\n  {described}\n"
            "pass the right --arch, or module.path:factory for your own network"
        )
    entry = (
        f" (the checkpoint's 'arch' entry {checkpoint.arch!r} names none)"
        if checkpoint.arch is not None
        else ""
    )
    nested = _nested_fit(checkpoint.state_dict, specs)
    if nested is not None:
        raise UsageError(nested)
    raise UsageError(
        f"expected weights of a zoo architecture{entry}, got keys that fit none; closest:\n  "
        f"{described}\npass --arch NAME, or --arch module.path:factory to build your own network"
    )


def _nested_fit(state_dict: Mapping[str, Tensor], specs: list[ArchSpec]) -> str | None:
    """The message for weights that hold a zoo network under one name beside other keys, as a
    LightningModule's state_dict holds `model.*` beside a loss's `criterion.weight`; None when
    the largest such group fits no architecture."""
    groups: dict[str, dict[str, Tensor]] = {}
    for key, value in state_dict.items():
        head, dot, rest = key.partition(".")
        if dot:
            groups.setdefault(head, {})[rest] = value
    if len(groups) < 2:
        return None
    head, inner = max(groups.items(), key=lambda item: len(item[1]))
    for variant in key_variants(inner):
        for spec in specs:
            if _fit(spec, variant)[0].exact:
                others = sorted(k for k in state_dict if not k.startswith(head + "."))
                more = f" (+{len(others) - 3} more)" if len(others) > 3 else ""
                return (
                    f"expected the weights of one network, got those of {spec.name} under "
                    f"'{head}.' beside {len(others)} other key(s) ({', '.join(others[:3])}{more}); "
                    "if those are training-only (a loss's class weights, metrics, a teacher), save "
                    f"the network alone, e.g. torch.save(pl_module.{head}.state_dict(), path), and "
                    "export that file"
                )
    return None


def _fit(spec: ArchSpec, state_dict: Mapping[str, Tensor]) -> tuple[Fit, dict[str, Tensor]]:
    weights = {k: v for k, v in state_dict.items() if not k.startswith(spec.ignored_prefixes)}
    sizes = spec.sizes(weights)
    num_classes, in_channels = sizes if sizes is not None else (10, 3)
    with torch.device("meta"):
        expected = spec.build(num_classes=num_classes, in_channels=in_channels).state_dict()
    return compare(spec.name, expected, weights), weights


def _refuse_missing_running_stats(fit: Fit | None, checkpoint: Checkpoint) -> None:
    """The network fits but for BatchNorm running statistics: the model was trained with
    track_running_stats=False, and "pass the right --arch" would send the user astray."""
    if fit is None or fit.unexpected or fit.mismatched or not fit.missing:
        return
    if all(key.endswith(RUNNING_STATS) for key in fit.missing):
        layers = sorted({key.rsplit(".", 1)[0] for key in fit.missing})
        raise UsageError(
            f"expected BatchNorm running statistics in {checkpoint.path} for {fit.arch}, got "
            f"none for {len(layers)} layer(s) ({', '.join(layers[:3])}"
            f"{', ...' if len(layers) > 3 else ''}): trained with track_running_stats=False, "
            "eval() would still use batch statistics; train with track_running_stats=True (or "
            "recompute the statistics) and save again"
        )


def compare(arch: str, expected: Mapping[str, Tensor], actual: Mapping[str, Tensor]) -> Fit:
    """Keys missing from, unexpected in, and of the wrong shape in `actual`."""
    want = {k: v for k, v in expected.items() if not k.endswith(IGNORED_SUFFIXES)}
    have = {k: v for k, v in actual.items() if not k.endswith(IGNORED_SUFFIXES)}
    return Fit(
        arch=arch,
        missing=tuple(k for k in want if k not in have),
        unexpected=tuple(k for k in have if k not in want),
        mismatched=tuple(k for k in want if k in have and want[k].shape != have[k].shape),
    )


def _build_zoo(spec: ArchSpec, weights: dict[str, Tensor], checkpoint: Checkpoint) -> Resolved:
    num_classes, in_channels = spec.sizes(weights) or (None, None)
    if checkpoint.module is not None:
        model = checkpoint.module
    else:
        # Built on the meta device and given the checkpoint's tensors: no time spent on random
        # initialisation that would be overwritten (hundreds of ms for VGG).
        with torch.device("meta"):
            model = spec.build(num_classes=num_classes, in_channels=in_channels)
        _check_floating(model.state_dict(), weights, spec.name, checkpoint)
        tensors = {k: _as_float32(weights[k]) if k in weights else torch.zeros_like(v, device="cpu")
                   for k, v in model.state_dict().items()}  # fmt: skip
        model.load_state_dict(tensors, assign=True)
    return Resolved(spec.name, model, num_classes, in_channels, spec)


def _check_floating(
    expected: Mapping[str, Tensor], weights: Mapping[str, Tensor], arch: str, checkpoint: Checkpoint
) -> None:
    """Integer (quantized, or cast by mistake) values where the network holds floats would load
    as nonsense, or not at all (an integer tensor cannot be a parameter)."""
    for key, value in weights.items():
        if key in expected and expected[key].is_floating_point() and not value.is_floating_point():
            raise UsageError(
                f"expected floating-point weights for {arch}, got {key} of dtype "
                f"{str(value.dtype).removeprefix('torch.')} in {checkpoint.path}; save the float "
                "model's state_dict (quantized or integer weights cannot be exported as float32)"
            )


def _as_float32(tensor: Tensor) -> Tensor:
    """Half or bfloat16 checkpoints export as float32 (the ONNX input and output are float32)."""
    return tensor.float() if tensor.is_floating_point() else tensor


def _exit_status(e: SystemExit) -> str:
    """A SystemExit as the process would have ended: its exit code, and its message if any."""
    if e.code is None or isinstance(e.code, int):
        return f"code {e.code or 0}"
    return f"code 1: {str(e.code)[:200]!r}"


def _build_factory(target: str, checkpoint: Checkpoint, source: str) -> Resolved:
    factory = _import_factory(target, source)
    params = _parameters(factory)
    guesses = _guess_sizes(checkpoint.state_dict)
    kwargs = {k: v for k, v in guesses.items() if k in params and v is not None}
    model = _build(target, factory, kwargs)
    best = _best_variant(target, model, checkpoint)
    classes = guesses["num_classes"]
    if not best[0].exact and "num_classes" not in kwargs and classes and _takes_keywords(factory):
        # torchvision's builders (`resnet50(*, weights=None, **kwargs)`) hand num_classes on
        # to the network: a fine-tuned head of 10 classes did not fit their default 1000.
        retry = {**kwargs, "num_classes": classes}
        try:
            other = _build(target, factory, retry)
        except UsageError:  # the keywords go elsewhere, or nowhere: keep the first build
            pass
        else:
            other_best = _best_variant(target, other, checkpoint)
            if other_best[0].errors < best[0].errors:
                model, best, kwargs = other, other_best, retry
    _refuse_missing_running_stats(best[0], checkpoint)
    if not best[0].exact:
        raise UsageError(
            f"expected weights that fit {target}, got {best[0].describe()}; check that the "
            "factory builds the network the checkpoint was trained with"
        )
    _check_floating(model.state_dict(), best[1], target, checkpoint)
    _load(model, best[1], target)
    return Resolved(target, model, kwargs.get("num_classes"), kwargs.get("in_channels"), None)


def _build(target: str, factory: Callable[..., object], kwargs: dict[str, int]) -> nn.Module:
    """``factory(**kwargs)`` as a float32 network; UsageError naming the call when it fails."""
    call = f"{target}({', '.join(f'{k}={v}' for k, v in kwargs.items())})"
    printed = io.StringIO()  # held back, as at import: a usage text would read as ours
    try:
        with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
            model = factory(**kwargs)
    except SystemExit as e:
        # A factory that parses the command line (args = parser.parse_args()) reads ours, fails
        # and exits: without this the export would end with its exit code and usage text.
        said = printed.getvalue().strip().splitlines()
        raise UsageError(
            f"expected {call} to build a model, got SystemExit ({_exit_status(e)})"
            + (f" after it printed {said[-1][:200]!r}" if said else "")
            + "; the factory exited, e.g. it parses the command line: give it parameters with "
            "defaults instead"
        ) from e
    except Exception as e:
        raise UsageError(
            f"expected {call} to build a model, got {type(e).__name__}: {e}; fix the factory or "
            "its defaults"
        ) from e
    sys.stderr.write(printed.getvalue())
    if not isinstance(model, nn.Module):
        raise UsageError(
            f"expected {target} to return a torch.nn.Module, got {type(model).__name__}; "
            "make the factory return the network"
        )
    # As for pickled modules: a factory may wrap the network (torch.compile, DataParallel) or
    # build it in half precision; the ONNX input and output are float32 either way.
    return float32_network(model)


def _best_variant(
    target: str, model: nn.Module, checkpoint: Checkpoint
) -> tuple[Fit, dict[str, Tensor]]:
    """The checkpoint's key variant that fits ``model`` best, with how well it fits."""
    expected = model.state_dict()
    return min(
        ((compare(target, expected, variant), variant)
         for variant in key_variants(checkpoint.state_dict)),
        key=lambda pair: pair[0].errors,
    )  # fmt: skip


def _takes_keywords(factory: Callable[..., object]) -> bool:
    """Whether ``factory`` takes any keyword (``**kwargs``)."""
    try:
        parameters = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def _import_factory(target: str, source: str) -> Callable[..., object]:
    """Import `module.path:factory`; `source` says where the name came from, for messages."""
    module_name, _, attr = target.partition(":")
    if not (all(part.isidentifier() for part in module_name.split(".")) and attr.isidentifier()):
        raise UsageError(
            f"expected module.path:factory (an absolute module path, a colon, a name), got "
            f"{target!r} from {source}; e.g. --arch mypkg.nets:build"
        )
    # What the module prints while it is imported is held back: when importing fails (an
    # argparse error in a training script) it would read as this command's usage text.
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
            module = importlib.import_module(module_name)
    except SystemExit as e:
        # A training script's sys.exit() or argparse error, run at import: without this the
        # export would end with the script's exit code, and usage text that is not ours.
        raise UsageError(
            f"expected module {module_name} (for {target} from {source}) to import, got "
            f"SystemExit: importing {module_name} exited ({_exit_status(e)}); guard its script "
            "code with if __name__ == '__main__':"
        ) from e
    except ImportError as e:
        raise UsageError(
            f"expected an importable module for {target} from {source}, got "
            f"{type(e).__name__}: {first_line(e)}; run from the directory that holds it or add "
            "it to PYTHONPATH"
        ) from e
    except Exception as e:  # SyntaxError, or anything the module raises while it is imported
        raise UsageError(
            f"expected module {module_name} (for {target} from {source}) to import, got "
            f"{type(e).__name__}: {first_line(e)}; fix the error in that module"
        ) from e
    sys.stderr.write(printed.getvalue())
    if not hasattr(module, attr):
        names = [n for n in dir(module) if callable(getattr(module, n, None))]
        close = difflib.get_close_matches(attr, names, n=3)
        raise UsageError(
            f"expected a callable {attr!r} in module {module_name} (for {target} from {source}), "
            f"got no such name there{'; closest: ' + ', '.join(close) if close else ''}; pass "
            "--arch module.path:function_or_class with a name the module defines"
        )
    factory = getattr(module, attr)
    if not callable(factory):
        raise UsageError(
            f"expected a callable {attr!r} in module {module_name} (for {target} from {source}), "
            f"got {type(factory).__name__}; pass --arch module.path:function_or_class"
        )
    return factory


def _parameters(factory: Callable[..., object]) -> set[str]:
    try:
        return set(inspect.signature(factory).parameters)
    except (TypeError, ValueError):
        return set()


def _guess_sizes(state_dict: Mapping[str, Tensor]) -> dict[str, int | None]:
    """num_classes from the last 2-D+ weight, in_channels from the first 4-D weight (a layer
    under weight norm keeps its weight as a (g, v) pair, read as the weight it stands for)."""
    folded = fold_weight_norm(dict(state_dict))
    weights = [v for k, v in folded.items() if k.endswith("weight") and v.dim() >= 2]
    convs = [v for v in weights if v.dim() == 4]
    return {
        "num_classes": int(weights[-1].shape[0]) if weights else None,
        "in_channels": int(convs[0].shape[1]) if convs else None,
    }


def _load(model: nn.Module, weights: Mapping[str, Tensor], arch: str) -> None:
    try:
        model.load_state_dict(weights, strict=False)
    except RuntimeError as e:
        raise UsageError(f"expected weights that load into {arch}, got: {e}; check --arch") from e
