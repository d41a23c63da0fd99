"""Put a network into inference mode and prove that exporting it changes nothing."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import nn

from export.errors import CheckFailed, UsageError


@dataclass(frozen=True)
class Frozen:
    """What freezing found: BatchNorm layers, any left at initial statistics, the fingerprint."""

    batchnorm_layers: int
    untrained_batchnorms: tuple[str, ...]
    fingerprint: str
    parameters: int


def freeze(model: nn.Module) -> Frozen:
    """eval(), gradients off, every value checked to be finite, and every BatchNorm checked for
    usable running statistics."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    _check_finite(model)
    norms = [
        (n, m) for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._NormBase)
    ]
    norms = [(n, m) for n, m in norms if not isinstance(m, nn.modules.instancenorm._InstanceNorm)]
    untrained = []
    for name, bn in norms:
        if not bn.track_running_stats or bn.running_mean is None or bn.running_var is None:
            raise UsageError(
                f"expected BatchNorm layer {name!r} to track running statistics, got "
                "track_running_stats=False, so eval() would still use batch statistics; "
                "train with track_running_stats=True (or recompute the statistics) and save again"
            )
        initial = torch.all(bn.running_mean == 0) and torch.all(bn.running_var == 1)
        if bool(initial):
            untrained.append(name)
    return Frozen(
        batchnorm_layers=len(norms),
        untrained_batchnorms=tuple(untrained),
        fingerprint=fingerprint(model),
        parameters=sum(p.numel() for p in model.parameters()),
    )


def _check_finite(model: nn.Module) -> None:
    """NaN weights, or infinite parameters, make every parity comparison fail, which would blame
    the export. An infinite buffer can be meant (a -inf attention mask, a clamp bound): allowed."""
    parameters = {name for name, _ in model.named_parameters()}
    for name, tensor in model.state_dict().items():
        if not tensor.is_floating_point():
            continue
        bad = tensor.isnan() if name not in parameters else ~torch.isfinite(tensor)
        count = int(bad.sum())
        if count:
            what = "NaN or infinite" if name in parameters else "NaN"
            raise UsageError(
                f"expected finite parameters and buffers without NaN, got {count} {what} "
                f"value(s) of {tensor.numel()} in {name}; the training diverged or the file is "
                "damaged: export an earlier checkpoint"
            )


def fingerprint(model: nn.Module) -> str:
    """sha256 over every parameter and buffer, by name, dtype, shape and bytes."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict(keep_vars=False).items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def check_unchanged(model: nn.Module, before: Frozen) -> None:
    """Fail when exporting mutated the model (e.g. a forward pass that updates buffers)."""
    after = fingerprint(model)
    if after != before.fingerprint:
        # torch.jit.trace records BatchNorm's training flag as a constant: a module traced in
        # train mode updates its statistics whatever eval() says.
        fix = (
            "if it was traced in train mode (torch.jit.trace before model.eval()), trace it "
            "again after model.eval(), or export its state_dict instead"
            if isinstance(model, torch.jit.ScriptModule)
            else "make forward side-effect free"
        )
        raise CheckFailed(
            "expected export to leave parameters and buffers unchanged, got a different "
            "fingerprint after export; the model's forward modifies its own state "
            f"(training-mode statistics or in-place updates): {fix}"
        )
