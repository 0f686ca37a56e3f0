"""The tokenizer worker pool's pipes and its bound on batches in flight."""

from __future__ import annotations

import multiprocessing as mp
import sys
from pathlib import Path

import pytest

from packer import pool


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="F_SETPIPE_SZ is Linux's")
def test_queues_get_wide_pipes():
    """A batch (~0.4-0.6 MB) crosses a widened pipe in one write; a refusal leaves the pipe as it was."""
    import fcntl

    q = mp.get_context("fork").Queue()
    before = fcntl.fcntl(q._writer.fileno(), 1032)  # F_GETPIPE_SZ
    pool._widen_pipes(q)
    after = fcntl.fcntl(q._writer.fileno(), 1032)
    limit = int(Path("/proc/sys/fs/pipe-max-size").read_text())
    assert after >= 1 << 20 if limit >= 1 << 20 else after == before
    pool._widen_pipes(object())  # not a queue: nothing happens


def test_ordered_keeps_at_most_max_in_flight(monkeypatch):
    """`ordered` never has more than max_in_flight items sent and not yet yielded, and yields in input order
    whatever order the answers arrive in."""
    import pickle
    import queue

    sent: list[int] = []

    class Tasks:
        def put(self, item):
            sent.append(item[0])

    answers: queue.Queue = queue.Queue()
    out = []
    gen = pool.ordered(Tasks(), answers, [], range(10), max_in_flight=4)

    def answer(i):
        answers.put((i, pickle.dumps((True, i * 10))))

    for i in (1, 0, 3, 2):  # out of order
        answer(i)
    for _ in range(4):
        out.append(next(gen))
        assert len(sent) - len(out) <= 4
    for i in range(4, 10):
        answer(i)
    out += list(gen)
    assert out == [i * 10 for i in range(10)] and sent == list(range(10))
