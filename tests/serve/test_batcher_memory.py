"""serve/batcher.py: what an idle instance keeps alive."""

from __future__ import annotations

import asyncio
import gc
import time
import weakref
from pathlib import Path

import numpy as np

from serve.batcher import Batcher
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
