"""The benchmark's load generator: closed- or open-loop KServe v2 ModelInfer calls over grpc.aio.

Requests are serialized once per distinct input and sent as bytes (a generic unary call with
no serializers), responses are not parsed, and a latency costs two clock reads and an append,
so the generator spends its CPU on gRPC rather than on itself (2 cores are shared with the
server in the recorded runs).
"""

from __future__ import annotations

import asyncio
import collections
import math
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import grpc
import numpy as np
from grpc import aio

from protos import kserve_pb2
from serve.config import MAX_DEADLINE_S
from serve.loadsend import INFER, STREAM_INFER, Metadata, StreamSender, unary_sender

METADATA = "/inference.GRPCInferenceService/ModelMetadata"


@dataclass(frozen=True)
class Load:
    """One benchmark setting: ``concurrency`` calls in flight (closed loop) or ``rate`` calls
    per second (open loop), ``images`` per call, for ``seconds`` after ``warmup`` seconds."""

    concurrency: int = 1
    rate: float | None = None
    images: int = 1
    seconds: float = 10.0
    warmup: float = 2.0
    timeout: float = 30.0
    stream: bool = False  # ModelStreamInfer streams instead of unary ModelInfer calls

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError(
                f"expected -c/--concurrency >= 1, got {self.concurrency}; pass 1 or more"
            )
        # Written so that NaN fails every check: comparisons with NaN are False.
        if self.rate is not None and not 0 < self.rate < math.inf:
            raise ValueError(f"expected --rate > 0 requests/s, got {self.rate}; pass e.g. 500")
        if self.images < 1:
            raise ValueError(f"expected --images >= 1 per request, got {self.images}")
        if not (0 < self.seconds < math.inf and 0 <= self.warmup < math.inf):
            raise ValueError(
                f"expected --seconds > 0 and --warmup >= 0, got {self.seconds} and "
                f"{self.warmup}; pass e.g. --seconds 10 --warmup 2"
            )
        if not 0 < self.timeout <= MAX_DEADLINE_S:
            raise ValueError(
                f"expected --timeout > 0 seconds per call, at most {MAX_DEADLINE_S:g} (gRPC's "
                f"deadlines end in 2262), got {self.timeout}; pass e.g. 30"
            )

    @property
    def label(self) -> str:
        load = f"rate={self.rate:g}/s" if self.rate is not None else f"c={self.concurrency}"
        return f"stream:{load}" if self.stream else load


@dataclass
class Outcome:
    """What one setting measured: ``sent`` calls started (open loop: scheduled) inside the
    window, the ``latencies`` (seconds) of those answered, ``late`` of them only after the window
    closed, and ``requests`` calls answered inside the window, whenever started."""

    load: Load
    latencies: list[float] = field(default_factory=list)
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    window: float = 0.0
    requests: int = 0
    sent: int = 0
    late: int = 0

    @property
    def throughput(self) -> float:
        """Answered images per second inside the window."""
        return self.requests * self.load.images / self.window if self.window else 0.0

    @property
    def fell_behind(self) -> bool:
        """Whether an open-loop setting answered under 90% of the calls due in its window: the
        server (or the bench) did not keep up with the rate, and a backlog built up."""
        return self.load.rate is not None and self.requests < 0.9 * self.sent

    def percentile(self, q: float) -> float | None:
        """The ``q``-th latency percentile in seconds (nearest rank), None without calls."""
        if not self.latencies:
            return None
        ordered = sorted(self.latencies)
        return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


# The channel's send limit (``channel``), and a bound on the payloads held in memory.
MAX_REQUEST_BYTES = 256 * 1024 * 1024
MAX_PAYLOAD_BYTES = 4 * 1024**3


def _size(count: int) -> str:
    """``count`` bytes in the largest binary unit that leaves at least 1 of it."""
    for unit, power in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if count >= 2**power:
            return f"{count / 2**power:.1f} {unit}"
    return f"{count} B"


def check_payload(sample_shape: tuple[int, ...], images: int, distinct: int) -> None:
    """ValueError, saying what to lower, when one request of ``images`` float32 samples is
    above the channel's send limit or the ``distinct`` payloads together would hold more than
    ``MAX_PAYLOAD_BYTES`` of memory."""
    request = images * math.prod(sample_shape) * 4
    shape = "×".join(map(str, sample_shape))
    if request > MAX_REQUEST_BYTES:
        raise ValueError(
            f"expected a request of at most {MAX_REQUEST_BYTES / 2**20:.0f} MiB, got "
            f"{images} images of {shape} float32 = {request / 2**20:.1f} MiB; lower --images"
        )
    if distinct * request > MAX_PAYLOAD_BYTES:
        raise ValueError(
            f"expected at most {MAX_PAYLOAD_BYTES / 2**30:.0f} GiB of request payloads, got "
            f"--distinct {distinct} × {_size(request)} "
            f"({images} images of {shape}) = {distinct * request / 2**30:.1f} GiB; lower "
            "--distinct or --images"
        )


def infer_requests(
    model: str, input_name: str, sample_shape: tuple[int, ...], images: int, distinct: int
) -> list[bytes]:
    """``distinct`` serialized ModelInferRequests of random float32 images [images, *shape]."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(distinct):
        array = rng.random((images, *sample_shape), dtype=np.float32)
        request = kserve_pb2.ModelInferRequest(model_name=model)
        request.inputs.add(name=input_name, datatype="FP32", shape=array.shape)
        request.raw_input_contents.append(array.astype("<f4").tobytes())
        out.append(request.SerializeToString())
    return out


def channel(
    target: str,
    credentials: grpc.ChannelCredentials | None = None,
    max_message_bytes: int = MAX_REQUEST_BYTES,
) -> aio.Channel:
    """An aio channel of its own connection, with message limits large enough for 224×224
    batches: TLS with ``credentials``, else plaintext."""
    options = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        # gRPC shares one connection among channels of equal target and options (the
        # global subchannel pool): without this, --channels 4 was still one connection.
        ("grpc.use_local_subchannel_pool", 1),
    ]
    if credentials is None:
        return aio.insecure_channel(target, options=options)
    return aio.secure_channel(target, credentials, options=options)


async def model_input(
    chan: aio.Channel, model: str, timeout: float, metadata: Metadata = None
) -> tuple[str, tuple[int, ...], int | None]:
    """The model's input name, per-sample shape and class count (None where the output's last
    axis is not fixed) from ModelMetadata."""
    call = chan.unary_unary(
        METADATA,
        request_serializer=kserve_pb2.ModelMetadataRequest.SerializeToString,
        response_deserializer=kserve_pb2.ModelMetadataResponse.FromString,
    )
    request = kserve_pb2.ModelMetadataRequest(name=model)
    response = await call(request, timeout=timeout, metadata=metadata)
    tensor = response.inputs[0]
    output = response.outputs[0].shape if response.outputs else []
    classes = int(output[-1]) if output and output[-1] > 0 else None
    return tensor.name, tuple(int(d) for d in tensor.shape[1:]), classes


async def check_answer(
    chan: aio.Channel,
    request: bytes,
    images: int,
    timeout: float,
    stream: bool = False,
    metadata: Metadata = None,
) -> int:
    """Send ``request`` once (unary, or on a fresh ModelStreamInfer stream) and check the
    answer has ``images`` rows; returns the class count."""
    if stream:
        call = chan.stream_stream(STREAM_INFER)(timeout=timeout, metadata=metadata)
        await call.write(request)
        raw = await call.read()
        await call.done_writing()
        if raw is aio.EOF:
            raise RuntimeError("expected an answer on ModelStreamInfer, got the stream closed")
        answer = kserve_pb2.ModelStreamInferResponse.FromString(raw)
        if answer.error_message:
            raise RuntimeError(f"expected an answer, got {answer.error_message}")
        response = answer.infer_response
        while await call.read() is not aio.EOF:
            pass
    else:
        raw = await chan.unary_unary(INFER)(request, timeout=timeout, metadata=metadata)
        response = kserve_pb2.ModelInferResponse.FromString(raw)
    shape = list(response.outputs[0].shape)
    if len(shape) != 2 or shape[0] != images:
        raise RuntimeError(f"expected an output of shape [{images}, K], got {shape}")
    return shape[1]


class _Window:
    """The measurement window's state, shared by the callers of one setting."""

    def __init__(self) -> None:
        self.recording = False
        self.stopping = False
        self.opens = self.closes = math.inf  # closes: planned when it opens, actual once closed

    def holds(self, moment: float) -> bool:
        return self.opens <= moment < self.closes


async def run_load(
    channels: list[aio.Channel],
    requests: list[bytes],
    load: Load,
    on_window: Callable[[bool], Awaitable[None]] | None = None,
    progress: Callable[[Outcome, float], None] | None = None,
    metadata: Metadata = None,
) -> Outcome:
    """Run one setting and return what it measured.

    ``on_window(True)`` is awaited just before the window opens and ``on_window(False)`` just
    after it closes (the bench scrapes the server's metrics there). Errors are counted by
    status name over warm-up and window alike, so an error-free report means no call failed.
    ``metadata`` goes with every call (every stream), e.g. a bearer token.
    """
    outcome = Outcome(load)
    window = _Window()
    loop = asyncio.get_running_loop()
    send = (
        StreamSender(channels, load, outcome, metadata)
        if load.stream
        else unary_sender(channels, load, metadata)
    )

    async def one(index: int, scheduled: float) -> None:
        # A call due in the window has its latency counted even when answered after it
        # closes: under overload those are the slowest, and dropping them flattered p99.
        measured = window.holds(scheduled)
        outcome.sent += measured
        try:
            error = await send(index, requests[index % len(requests)])
        except grpc.RpcError as e:
            code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
            outcome.errors[code.name] += 1
            return
        if error is not None:
            outcome.errors[error] += 1
            return
        answered = time.perf_counter()
        outcome.requests += window.recording
        if measured:
            outcome.latencies.append(answered - scheduled)
            outcome.late += not window.recording

    async def closed(worker: int) -> None:
        index = worker
        while not window.stopping:
            await one(index, time.perf_counter())
            index += load.concurrency

    async def opened() -> None:
        interval = 1.0 / (load.rate or 1.0)
        start = time.perf_counter()
        sent = 0
        tasks: set[asyncio.Task[None]] = set()
        # Scheduled up to the window's planned end and no further: an event loop slowed down
        # by a rate it cannot sustain once went on scheduling for many seconds past it.
        while start + sent * interval < window.closes:
            now = min(time.perf_counter(), window.closes)
            # Latency counts from the scheduled send time, so a slow server cannot hide
            # queueing by slowing the sender down (coordinated omission).
            while start + sent * interval < now:
                task = loop.create_task(one(sent, start + sent * interval))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                sent += 1
            await asyncio.sleep(max(0.0, start + sent * interval - time.perf_counter()))
        if tasks:
            await asyncio.gather(*tasks)

    async def tick() -> None:
        while progress is not None:
            await asyncio.sleep(0.5)
            progress(outcome, time.perf_counter() - opened_at)

    if load.rate is not None:
        senders = [loop.create_task(opened())]
    else:
        senders = [loop.create_task(closed(i)) for i in range(load.concurrency)]
    ticker: asyncio.Task[None] | None = None
    try:
        await asyncio.sleep(load.warmup)
        if on_window is not None:
            await on_window(True)
        opened_at = window.opens = time.perf_counter()
        window.closes = opened_at + load.seconds
        window.recording = True
        ticker = loop.create_task(tick())
        await asyncio.sleep(load.seconds)
        window.closes = time.perf_counter()
        window.recording = False
        outcome.window = window.closes - opened_at
        if on_window is not None:
            await on_window(False)
    finally:
        window.stopping = True
        window.closes = min(window.closes, time.perf_counter())  # also when it never opened
        if ticker is not None:
            ticker.cancel()
        await asyncio.gather(*senders, return_exceptions=True)
        close = getattr(send, "close", None)
        if close is not None:
            await close()
    return outcome


def print_progress(label: str) -> Callable[[Outcome, float], None]:
    """A progress callback writing one overwritten line to stderr."""

    def show(outcome: Outcome, elapsed: float) -> None:
        rate = outcome.requests * outcome.load.images / elapsed if elapsed else 0.0
        errors = sum(outcome.errors.values())
        sys.stderr.write(
            f"\r{label}: {elapsed:5.1f}/{outcome.load.seconds:g} s  {rate:8.0f} img/s  "
            f"{outcome.requests} calls  {errors} errors   "
        )
        sys.stderr.flush()

    return show
