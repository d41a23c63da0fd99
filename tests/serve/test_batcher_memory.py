"""serve/batcher.py: what an idle instance keeps alive."""

from __future__ import annotations

import asyncio
import gc
import time
import weakref
from pathlib import Path

import numpy as np
import pytest

from serve import batcher as batcher_module
from serve.batcher import Batcher
from serve.errors import ServeError
from serve.model_info import read_model_info
from serve.runtime import Runtime


def test_an_idle_instance_lets_go_of_its_last_batchs_rows(classifier_path: Path) -> None:
    # An idle instance kept its last batch until the next one came: the rows of its requests,
    # views of a caller's whole array (a Classify call's can be 1 GiB), stayed in memory for
    # as long as the model was idle.
    info = read_model_info("tiny", classifier_path)
    runtime = Runtime(info, device="cpu", max_batch_size=4, intra_op_threads=1)
    runtime.warm_up()

    async def scenario() -> bool:
        batcher = Batcher(runtime, max_queue_size=16, max_queue_delay_s=0, instances=1)
        batcher.start()
        try:
            rows = np.zeros((3, *info.sample_shape), dtype=np.float32)
            gone = weakref.ref(rows)
            await batcher.infer(rows, None)
            del rows
            until = time.monotonic() + 30  # a bound on the instance reaching its next wait
            while gone() is not None and time.monotonic() < until:
                gc.collect()
                await asyncio.sleep(0.02)
            return gone() is None
        finally:
            await batcher.close()

    assert asyncio.run(scenario()), "the idle instance still holds the rows it computed"


def test_withdrawn_rows_past_the_bound_are_purged_from_the_queue_at_once(
    classifier_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A withdrawn Classify call gives its share of the decoded-rows budget back at once, but
    # its pieces stayed queued until an instance or a purge for a full queue dropped them:
    # calls cancelled on a busy model kept up to --max-queue-size x --max-batch-size rows.
    info = read_model_info("tiny", classifier_path)
    runtime = Runtime(info, device="cpu", max_batch_size=4, intra_op_threads=1)
    row_bytes = 4 * int(np.prod(info.sample_shape))
    monkeypatch.setattr(batcher_module, "PURGE_WITHDRAWN_BYTES", 10 * 4 * row_bytes)

    async def scenario() -> list[int]:
        batcher = Batcher(runtime, max_queue_size=64, max_queue_delay_s=0, instances=1)
        batcher._open = True  # open, with no instance started: nothing leaves the queue
        depths = []
        try:
            kept, _ = batcher.submit(np.zeros((4, *info.sample_shape), np.float32), None)
            for _ in range(3):
                calls = [
                    batcher.submit(np.zeros((8, *info.sample_shape), np.float32), None)
                    for _ in range(3)
                ]
                for future, pieces in calls:
                    batcher.withdraw(future, pieces)
                depths.append(batcher.depth)
        finally:
            await batcher.close()
        assert isinstance(kept.exception(), ServeError)  # failed UNAVAILABLE by close()
        return depths

    # Each withdrawn call leaves two pieces of 4 rows. 6 withdrawn pieces stay queued (below the
    # bound of 10); the fifth call reaches 10 and the queue is purged to the kept request, which
    # the sixth call's 2 pieces join; the last 3 calls' 6 more stay (8 since the purge).
    assert asyncio.run(scenario()) == [7, 3, 9]
