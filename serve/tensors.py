"""Decode request tensors and encode results: KServe raw/typed contents, top-k, BYTES strings."""

from __future__ import annotations

import math
import struct

import numpy as np

from serve.errors import invalid, shown
from serve.model_info import ModelInfo


def check_rows(info: ModelInfo, shape: tuple[int, ...], what: str) -> int:
    """The row count of a tensor of ``shape`` [N, *sample_shape]; INVALID_ARGUMENT if it differs."""
    if len(shape) != len(info.sample_shape) + 1 or tuple(shape[1:]) != info.sample_shape:
        dims = "".join(f", {d}" for d in info.sample_shape)
        fix = "send [rows, *dims] (ModelMetadata lists rows as -1)"
        if tuple(shape) == info.sample_shape:
            fix = f"add the row axis first: [1{dims}] for one sample"
        raise invalid(
            f"expected {what} of shape [rows{dims}] for model {info.name}, got "
            f"{shown(list(shape))}; {fix}"
        )
    # ModelMetadata's -1 is copied into requests (tritonclient users build shapes from it);
    # echoing the expected shape with its -1 back to them said nothing.
    if shape[0] < 1:
        why = ": ModelMetadata's -1 means any count, not a value to send" if shape[0] < 0 else ""
        raise invalid(
            f"expected at least one row in {what}, got shape {shown(list(shape))}; send the "
            f"number of rows, 1 or more, as the first dim{why}"
        )
    return shape[0]


def from_raw(info: ModelInfo, shape: tuple[int, ...], raw: bytes, what: str) -> np.ndarray:
    """A read-only float32 view [N, *sample_shape] of little-endian ``raw`` bytes."""
    rows = check_rows(info, shape, what)
    count = rows * math.prod(info.sample_shape)
    if len(raw) != count * 4:
        raise invalid(
            f"expected {count * 4} bytes ({count} float32) for {what} of shape {list(shape)}, "
            f"got {len(raw)}; send the tensor as little-endian float32"
        )
    return np.frombuffer(raw, dtype="<f4").reshape(shape)


def from_values(info: ModelInfo, shape: tuple[int, ...], values: object, what: str) -> np.ndarray:
    """A float32 array [N, *sample_shape] from a repeated float field."""
    rows = check_rows(info, shape, what)
    count = rows * math.prod(info.sample_shape)
    array = np.asarray(values, dtype=np.float32)
    if array.size != count:
        raise invalid(
            f"expected {count} fp32_contents values for {what} of shape {list(shape)}, "
            f"got {array.size}; send one value per element"
        )
    return array.reshape(shape)


def top_k(logits: np.ndarray, k: int) -> np.ndarray:
    """Indices [N, k] of the k largest values per row, best first (ties: lower index first)."""
    k = min(k, logits.shape[1])
    # argmax ranks NaN first and argsort last: a row with a NaN got another best class at k=1.
    if k == 1 and not np.isnan(logits).any():
        return np.argmax(logits, axis=1)[:, None]
    return np.argsort(-logits, axis=1, kind="stable")[:, :k]


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64; a row with NaN or +Inf comes out NaN, as torch.softmax."""
    values = logits.astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        shifted = values - np.max(values, axis=1, keepdims=True)
        exp = np.exp(shifted)
        return exp / np.sum(exp, axis=1, keepdims=True)


def classification_strings(logits: np.ndarray, k: int, labels: tuple[str, ...]) -> list[bytes]:
    """The classification extension's "score:index:label" elements, row-major [N, k]."""
    indices = top_k(logits, k)
    out = []
    for row, best in zip(logits, indices, strict=True):
        for index in best:
            out.append(f"{float(row[index]):f}:{int(index)}:{labels[index]}".encode())
    return out


def encode_bytes(elements: list[bytes]) -> bytes:
    """KServe raw BYTES: each element as a 4-byte little-endian length, then its bytes."""
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)
