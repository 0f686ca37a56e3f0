"""The tokenizer worker pool: batches of raw records in, `Chunk`s out, in input order, with back-pressure.

Each worker builds its own `RecordEncoder` in the pool's initializer (no state travels with the tasks), and at
most 2 x workers batches are in flight, so memory does not grow with the input. With one worker everything
runs in the calling process.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import sys
from collections import deque
from collections.abc import Iterable, Iterator

from packer.config import BuildConfig
from packer.encode import Chunk, RecordEncoder

_worker_encoder: RecordEncoder | None = None  # one per worker process, set by _init_worker


def _init_worker(config: BuildConfig, twin_proven: bool) -> None:
    global _worker_encoder
    # The pool is the parallelism: rayon threads inside each worker's encode_batch would only oversubscribe
    # the cores (measured: ~10% slower with 2 workers on 2 cores).
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_encoder = RecordEncoder(config, twin_proven)


def _encode_in_worker(batch) -> Chunk:
    if _worker_encoder is None:
        raise RuntimeError("worker used before _init_worker ran")
    return _worker_encoder.encode(batch)


@contextlib.contextmanager
def encoded_chunks(config: BuildConfig, batches: Iterable, local: RecordEncoder) -> Iterator[Iterator[Chunk]]:
    """`with encoded_chunks(config, batches, encoder) as chunks:` the Chunks of `batches`, in order; in
    config.workers processes, or through `local` (the caller's encoder) when there is one worker."""
    if config.workers == 1:
        yield map(local.encode, batches)
        return
    ctx = mp.get_context("spawn" if sys.platform == "darwin" else "fork")
    twin_proven = local.backend == "tiktoken"
    with ctx.Pool(config.workers, initializer=_init_worker, initargs=(config, twin_proven)) as pool:
        yield ordered_map(pool, _encode_in_worker, batches, 2 * config.workers)


def ordered_map(pool, fn, items: Iterable, max_in_flight: int) -> Iterator:
    """pool.imap with back-pressure: imap reads its whole input ahead, so memory would grow with the input."""
    pending: deque = deque()
    for item in items:
        pending.append(pool.apply_async(fn, (item,)))
        if len(pending) >= max_in_flight:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()
