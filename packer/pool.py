"""The tokenizer worker pool: batches of raw records in, `Chunk`s out, in input order, with back-pressure.

    parent: batch i -> tasks queue ----> worker k: RecordEncoder.encode -> results queue -> parent (reorders)

A forked worker encodes with the parent's `RecordEncoder`, which it inherits with the parent's memory (loading
the tokenizer again cost each worker 0.1-0.15 s of start-up, on every build); a spawned one (macOS) builds its
own. No state travels with the tasks, and at most 4 x workers batches are in flight, so memory does not grow
with the input. With one worker everything runs in the calling process.

Stopping is the parent's job, and it cannot hang. Workers ignore SIGINT (a Ctrl-C reaches the whole process
group; only the parent acts on it) and die silently on SIGTERM; the parent ends them by pid: SIGTERM, a
bounded join, then SIGKILL. multiprocessing.Pool is not used because its terminate() can hang for ever
(measured: 2 of 20 Ctrl-Cs with --workers 2, 4 of 10 with 4): it takes the task queue's lock, which a worker
killed mid-read never gives back. A thread reads the answers, so the parent only ever waits with a timeout and
notices a worker that died (the kernel's OOM killer): the build fails instead of waiting for its batch.
Workers also die with the parent (Linux: PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import pickle
import queue
import signal
import sys
import threading
import time
from collections.abc import Iterable, Iterator

from packer.config import BuildConfig, BuildError
from packer.encode import Chunk, RecordEncoder

_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}
_GRACE_S = 2.0  # how long workers get to exit after SIGTERM (or after the end of the input) before SIGKILL
_POLL_S = 0.5  # how often a parent waiting for a result checks that no worker died


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Hold SIGINT/SIGTERM back while workers are forked: a child inherits the mask, so no signal can reach it
    before it has chosen to ignore SIGINT (it would print a KeyboardInterrupt traceback). The parent gets any
    signal that arrived meanwhile when the mask is restored."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _detach_signals(parent: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a handler inherited from the parent would raise here
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before prctl
        os._exit(1)


def _dumps(value) -> bytes:
    """Pickled here, in the caller's thread: a multiprocessing.Queue pickles in a background thread, which
    drops what it cannot pickle, and the other side would wait for it for ever."""
    return pickle.dumps(value, pickle.HIGHEST_PROTOCOL)


def _dump_answer(ok: bool, value) -> bytes:
    try:
        raw = _dumps((ok, value))
        if not ok:
            pickle.loads(raw)  # an exception class whose __init__ needs other arguments does not unpickle
        return raw
    except Exception:  # keep the message
        return _dumps((False, BuildError(f"{type(value).__name__}: {value}")))


def _worker(
    config: BuildConfig,
    twin_proven: bool,
    tasks,
    results,
    parent: int,
    inherited: RecordEncoder | None = None,
) -> None:
    """`inherited`: the parent's encoder, in a forked worker (it holds the parent's decision on the tiktoken
    twin already); None: build one from `config`."""
    _detach_signals(parent)
    # The pool is the parallelism: rayon threads inside each worker's encode_batch would only oversubscribe
    # the cores (measured: ~10% slower with 2 workers on 2 cores).
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        encoder = inherited if inherited is not None else RecordEncoder(config, twin_proven)
    except Exception as e:
        results.put((-1, _dump_answer(False, e)))
        return
    for i, raw in iter(tasks.get, None):
        try:
            answer = _dump_answer(True, encoder.encode(pickle.loads(raw)))
        except Exception as e:
            answer = _dump_answer(False, e)
        results.put((i, answer))


def _stop(procs: list, grace_s: float = _GRACE_S) -> None:
    """End the workers by pid: SIGTERM, a bounded join, then SIGKILL."""
    for p in procs:
        if p.exitcode is None:
            p.terminate()
    _join(procs, grace_s)
    for p in procs:
        if p.exitcode is None:
            p.kill()
    _join(procs, grace_s)


def _join(procs: list, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))


@contextlib.contextmanager
def encoded_chunks(config: BuildConfig, batches: Iterable, local: RecordEncoder) -> Iterator[Iterator[Chunk]]:
    """`with encoded_chunks(config, batches, encoder) as chunks:` the Chunks of `batches`, in order; in
    config.workers processes, or through `local` (the caller's encoder) when there is one worker."""
    if config.workers == 1:
        yield map(local.encode, batches)
        return
    ctx = mp.get_context("spawn" if sys.platform == "darwin" else "fork")
    tasks, results = ctx.Queue(), ctx.Queue()
    _widen_pipes(tasks, results)
    inherited = local if ctx.get_start_method() == "fork" else None  # spawn would have to pickle it
    args = (config, local.backend == "tiktoken", tasks, results, os.getpid(), inherited)
    procs: list = []
    answers: queue.Queue = queue.Queue()
    pump = threading.Thread(target=_pump, args=(results, answers), daemon=True, name="packer-answers")
    finished = False
    try:
        with _signals_held():
            for _ in range(config.workers):
                procs.append(ctx.Process(target=_worker, args=args, daemon=True))
                procs[-1].start()
        pump.start()  # after the forks: no child may inherit a lock this thread holds
        # 4 batches in flight per worker, not 2: answers come back in input order, so one slow batch held the
        # next ones back and the other worker ran dry (0.2-0.4 s of waiting per worker at 2, 0.1-0.2 at 4 with
        # the wide pipes; about 1 MB a batch).
        yield ordered(tasks, answers, procs, batches, 4 * config.workers)
        finished = True
    finally:
        # Neither queue may keep the parent waiting at exit for a feeder thread that cannot flush.
        tasks.cancel_join_thread()
        results.cancel_join_thread()
        if finished:
            for _ in procs:
                tasks.put(None)
            _join(procs, _GRACE_S)
        _stop(procs)
        tasks.close()
        results.put(None)  # ends the pump, unless a killed worker left it waiting on half an answer
        pump.join(_POLL_S)
        if not pump.is_alive():
            results.close()


def _widen_pipes(*queues) -> None:
    """1 MiB pipe buffers (Linux; the default unprivileged limit), not 64 KiB: a batch or an answer (0.4-0.6 MB of
    JSON Lines or samples) crosses in one write, not ten, each of which waited for the parent's feeder or pump
    thread to get the GIL back. Where the kernel refuses, the pipes stay as they are."""
    if not sys.platform.startswith("linux"):
        return
    import fcntl

    for q in queues:
        with contextlib.suppress(OSError, AttributeError, ValueError):
            fcntl.fcntl(q._writer.fileno(), getattr(fcntl, "F_SETPIPE_SZ", 1031), 1 << 20)


def _pump(results, answers: queue.Queue) -> None:
    """Move the workers' answers from their pipe to `answers`, in a thread of its own: a worker killed while
    writing one leaves the reader blocked for ever on the rest (the other workers hold the pipe open, so no
    end of file comes), and only a thread can be left behind so. The main thread polls `answers` and checks
    that the workers live."""
    with contextlib.suppress(Exception):  # a pipe a killed worker left broken
        while (answer := results.get()) is not None:
            answers.put(answer)


def ordered(tasks, answers: queue.Queue, procs: list, items: Iterable, max_in_flight: int) -> Iterator:
    """The workers' answers for `items`, in input order, with at most max_in_flight items sent and not yet
    yielded (a pool's imap reads its whole input ahead, so memory would grow with the input)."""
    items = iter(items)
    arrived: dict[int, bytes] = {}
    sent = done = 0
    more = True
    while True:
        while more and sent - done < max_in_flight:
            item = next(items, _END)
            if item is _END:
                more = False
            else:
                tasks.put((sent, _dumps(item)))
                sent += 1
        if done == sent:
            return
        while done not in arrived:
            i, raw = _next_result(answers, procs)
            if i < 0:  # a worker could not build its encoder
                raise pickle.loads(raw)[1]
            arrived[i] = raw
        ok, value = pickle.loads(arrived.pop(done))
        if not ok:
            raise value
        done += 1
        yield value


_END = object()


def _next_result(answers: queue.Queue, procs: list) -> tuple[int, bytes]:
    while True:
        try:
            return answers.get(timeout=_POLL_S)
        except queue.Empty:
            for p in procs:
                if p.exitcode is not None:
                    how = f"exit code {p.exitcode}"
                    with contextlib.suppress(ValueError):
                        how = f"killed by {signal.Signals(-p.exitcode).name}" if p.exitcode < 0 else how
                    raise BuildError(f"a tokenizer worker (pid {p.pid}) died ({how}; out of memory?); run again, "
                                     "with fewer --workers or a smaller --batch-size") from None
