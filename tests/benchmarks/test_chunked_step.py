"""benchmarks/chunked_step.py: a step fed in chunks of rows is train()'s step (same loss, same gradient)."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from packer.records import Pack
from packer.trainer.train import TrainConfig, train

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "trainer"))
from conftest import FakePackedDataset  # noqa: E402  (tests/trainer's in-memory packs)

_spec = importlib.util.spec_from_file_location(
    "chunked_step", Path(__file__).resolve().parents[2] / "benchmarks" / "chunked_step.py"
)
chunked_step = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(chunked_step)

STEP = {"steps": 3, "lr": 1e-3, "warmup_steps": 2, "device": "cpu", "progress": False}


def pack(doc_lens: list[int], start: int = 0) -> Pack:
    n = sum(doc_lens)
    return Pack(
        ids=np.arange(start, start + n, dtype=np.int64),
        loss_mask=(np.arange(n) % 2).astype(np.uint8),
        doc_lens=np.array(doc_lens, dtype=np.int32),
    )


def test_row_chunks_regroup_rows_in_order():
    a, b = pack([3, 5]), pack([0, 2], start=100)
    padded = chunked_step.row_chunks([a, b], "padded", 2)
    assert [[p.doc_lens.tolist() for p in c] for c in padded] == [[[3, 5]], [[2]]]
    assert padded[0][0].ids.tolist() == list(range(8)) and padded[1][0].ids.tolist() == [100, 101]
    assert padded[1][0].loss_mask.tolist() == [0, 1]
    one_each = chunked_step.row_chunks([a, b], "padded", 1)
    assert [c[0].doc_lens.tolist() for c in one_each] == [[3], [5], [2]]
    assert one_each[1][0].ids.tolist() == [3, 4, 5, 6, 7]
    packed = chunked_step.row_chunks([a, b, a], "packed", 2)
    assert [len(c) for c in packed] == [2, 1] and packed[0][1] is b


def test_row_chunks_refuse_zero_rows():
    with pytest.raises(ValueError, match=r"rows per chunk must be >= 1, got 0; pass --padded-rows-per-chunk"):
        chunked_step.row_chunks([pack([3])], "padded", 0)


@pytest.mark.parametrize(
    ("attention", "rows", "loss_average", "warmup"),
    [
        ("padded", 1, "token", 0),
        ("padded", 3, "token", 2),
        ("padded", 2, "sample", 0),
        ("varlen", 1, "token", 1),
        ("varlen", 0, "token", 0),
        ("blockwise", 0, "sample", 1),
    ],
)
def test_chunked_step_is_the_trainers_step(attention, rows, loss_average, warmup):
    """Loss and pre-clip grad norm per step equal train()'s over 3 steps, so the weights after each step do
    too; a chunk loss divided by its own target count instead of the step's would move the grad norm, and
    warm-up passes that left a gradient behind or consumed packs would move both."""
    ds = FakePackedDataset(n_packs=8)
    cfg = TrainConfig(
        data="unused",
        attention=attention,
        micro_batch_size=2,
        grad_accum=2,
        loss_average=loss_average,
        **STEP,
    )
    want = train(cfg, dataset=ds)
    got, prof = chunked_step.train_chunked(cfg, ds, rows, warmup_passes=warmup)
    assert prof is None
    assert [r["tokens"] for r in got] == [r["tokens"] for r in want]
    assert [r["processed_tokens"] for r in got] == [r["processed_tokens"] for r in want]
    assert [r["grad_norm"] for r in got] == pytest.approx([r["grad_norm"] for r in want], rel=1e-5)
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in want], rel=1e-5)
    if rows:
        assert all(r["rows_max"] <= rows and r["chunks"] > 2 for r in got)
    else:  # one forward per micro-batch, as train() runs it
        assert all(r["rows_max"] == 2 and r["chunks"] == 2 for r in got)
    assert all(r["cpu_s"] > 0 for r in got)


def test_profile_step_returns_the_profiler():
    cfg = TrainConfig(data="unused", attention="varlen", steps=2, device="cpu", progress=False)
    recs, prof = chunked_step.train_chunked(
        cfg, FakePackedDataset(n_packs=4), rows_per_chunk=1, profile_step=1
    )
    assert len(recs) == 2
    assert any(e.key == "aten::mm" for e in prof.key_averages())
