"""serve/runtime.py: batch sizes (padded to buckets only where it pays), and the IOBinding path
(CUDA's, run here on CPU) answers like a plain run."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from serve.model_info import read_model_info
from serve.runtime import Runtime


def _runtime(path: Path, io_binding: bool) -> Runtime:
    info = read_model_info("tiny", path)
    return Runtime(
        info, device="cpu", max_batch_size=8, intra_op_threads=1, io_binding=io_binding
    )


def test_cpu_runs_plainly_by_default(classifier_path: Path) -> None:
    info = read_model_info("tiny", classifier_path)
    runtime = Runtime(info, device="cpu", max_batch_size=8, intra_op_threads=1)
    assert runtime.io_binding is False


def test_cpu_batches_run_unpadded_and_padding_fills_buckets(classifier_path: Path) -> None:
    info = read_model_info("tiny", classifier_path)
    cpu = Runtime(info, device="cpu", max_batch_size=8, intra_op_threads=1)
    assert cpu.pads is False
    assert [cpu.batch_size(n) for n in (1, 3, 5, 8)] == [1, 3, 5, 8]
    padded = Runtime(info, device="cpu", max_batch_size=8, intra_op_threads=1, pad=True)
    assert [padded.batch_size(n) for n in (1, 3, 5, 8)] == [1, 4, 8, 8]
    for runtime in (cpu, padded):
        with pytest.raises(ValueError, match="at most 8 rows"):
            runtime.batch_size(9)
    # Any batch size runs on the CPU provider, and each row's logits do not depend on it.
    rows = np.random.default_rng(2).normal(size=(5, *info.sample_shape)).astype(np.float32)
    np.testing.assert_allclose(cpu.run(rows)[3], cpu.run(rows[3:4])[0], rtol=1e-5, atol=1e-5)


def test_bound_runs_equal_plain_runs_for_every_bucket_and_reuse(classifier_path: Path) -> None:
    plain, bound = _runtime(classifier_path, False), _runtime(classifier_path, True)
    rng = np.random.default_rng(1)
    for _ in range(2):  # the second round reuses each bucket's buffer with new data
        for size in bound.buckets:
            batch = rng.normal(size=(size, 3, 8, 8)).astype(np.float32)
            expected = plain.run(batch)
            got = bound.run(batch)
            assert got.shape == (size, 5)
            np.testing.assert_array_equal(got, expected)


def test_bound_runs_from_threads_keep_their_own_buffers(classifier_path: Path) -> None:
    plain, bound = _runtime(classifier_path, False), _runtime(classifier_path, True)
    rng = np.random.default_rng(2)
    batches = [rng.normal(size=(4, 3, 8, 8)).astype(np.float32) for _ in range(16)]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(bound.run, batches))
    for batch, got in zip(batches, results, strict=True):
        np.testing.assert_array_equal(got, plain.run(batch))
