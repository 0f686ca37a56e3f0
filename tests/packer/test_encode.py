"""RecordEncoder: raw records -> one Chunk; --overflow applied to the over-long samples of a batch only."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

import packer.pool as pool_mod
from packer.build import build
from packer.config import BuildConfig, BuildError
from packer.encode import Counters, RecordEncoder
from packer.overflow import fit
from packer.sources import RawRecord

GPT2 = str(Path(__file__).resolve().parents[2] / "packer" / "assets" / "gpt2")
WORDS = ["alpha", "beta", "gamma", "delta", "eps", "zeta", "eta", "theta", "the", "a", "of", "and"]


def records(n: int, seed: int = 0) -> list[RawRecord]:
    """Texts of 1 to ~120 tokens: at seq_length 32 about half are too long, in runs and alone."""
    rng = np.random.default_rng(seed)
    texts = [" ".join(rng.choice(WORDS, int(rng.integers(1, 60)))) for _ in range(n)]
    return [
        RawRecord("t.jsonl", i + 1, i + 1, json.dumps({"text": t}).encode(), raw=True)
        for i, t in enumerate(texts)
    ]


def encoder(tmp_path: Path, **kw) -> RecordEncoder:
    return RecordEncoder(
        BuildConfig(
            handler="text",
            inputs=("t.jsonl",),
            tokenizer=GPT2,
            output_prefix=str(tmp_path / "o"),
            **({"seq_length": 32} | kw),
        )
    )


@pytest.mark.parametrize("policy", ["split", "truncate", "drop"])
def test_overflow_cuts_only_the_long_samples_in_place(tmp_path, policy):
    """The chunk equals fit() applied to every sample in turn (a sample that fits comes back as it is)."""
    recs = records(200)
    whole = encoder(tmp_path, seq_length=100_000)._encode(recs)  # nothing is too long here
    ends = np.cumsum(whole.lengths)
    want, c = [], Counters()
    for n, e in zip(whole.lengths.tolist(), ends.tolist(), strict=True):
        fitted = fit(whole.ids[e - n : e], whole.mask[e - n : e], 32, policy)
        c.add(fitted)
        want.extend(fitted.pieces)
    assert 0 < (whole.lengths > 32).sum() < 200
    got = encoder(tmp_path, overflow=policy)._encode(recs)
    assert got.lengths.tolist() == [ids.size for ids, _ in want]
    assert got.ids.tolist() == np.concatenate([ids for ids, _ in want]).tolist()
    assert got.mask.tolist() == np.concatenate([m for _, m in want]).tolist()
    for name in ("truncated", "split", "dropped", "dropped_no_target", "unterminated"):
        assert getattr(got.counters, name) == getattr(c, name), name


def test_overflow_error_names_the_first_long_record(tmp_path):
    recs = records(50)
    lengths = encoder(tmp_path, seq_length=100_000)._encode(recs).lengths
    first = int(np.flatnonzero(lengths > 32)[0]) + 1
    with pytest.raises(BuildError, match=rf"t\.jsonl: record {first} \(line {first}\): sample is \d+ tokens"):
        encoder(tmp_path, overflow="error")._encode(recs)


@pytest.mark.skipif(sys.platform == "darwin", reason="spawned workers (macOS) build their own encoder")
def test_forked_workers_encode_with_the_parents_encoder(tmp_path, monkeypatch):
    """Workers that tried to build an encoder would fail here: they use the one the parent built."""
    path = tmp_path / "t.jsonl"
    path.write_text(
        "".join(json.dumps({"text": " ".join(WORDS[: 1 + i % 12])}) + "\n" for i in range(300)),
        encoding="utf-8",
    )
    kw = dict(handler="text", inputs=(str(path),), tokenizer=GPT2, seq_length=64, batch_size=16)
    one = build(BuildConfig(output_prefix=str(tmp_path / "one"), **kw), progress=False)

    def refuse(*args, **kwargs):
        raise RuntimeError("a worker built its own RecordEncoder")

    monkeypatch.setattr(pool_mod, "RecordEncoder", refuse)
    two = build(BuildConfig(output_prefix=str(tmp_path / "two"), workers=2, **kw), progress=False)
    for suffix in (".bin", ".idx", "_loss_mask.bin", "_loss_mask.idx"):
        assert Path(two.prefix + suffix).read_bytes() == Path(one.prefix + suffix).read_bytes(), suffix
