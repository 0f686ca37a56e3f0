"""`packer export --to bridge`, read back by Megatron-Bridge's own reader (../shared/peers/megatron_bridge).

For every pack, what Bridge's collate_fn hands the model must equal what packer's reader says: per sample
(1-token samples left out) tokens = ids[:-1], labels = ids[1:], loss = packer's mask of the label token,
positions 0..len-2; rows padded with the EOD id to Bridge's collate length.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from packer.dataset import PackedDataset
from packer.export import ExportConfig, export
from packer.verify import verify

from .conftest import ALPACA, MOSS, read_with_peer


def bridge_reads(path: str, *flags: str) -> list[dict]:
    return read_with_peer("megatron_bridge/read_export.py", path, *flags)


def expected_row(pack) -> dict:
    tokens, labels, loss, positions, cu = [], [], [], [], [0]
    for d in np.split(np.arange(pack.ids.size), np.cumsum(pack.doc_lens)[:-1]):
        if d.size < 2:
            continue
        tokens += pack.ids[d[:-1]].tolist()
        labels += pack.ids[d[1:]].tolist()
        loss += pack.loss_mask[d[1:]].tolist()
        positions += list(range(d.size - 1))
        cu.append(cu[-1] + d.size - 1)
    return {"tokens": tokens, "labels": labels, "loss_mask": loss, "position_ids": positions, "cu": cu}


def check(source: str, records: list[dict], eos: int, seq_length: int, pad_to_max: bool = False) -> int:
    ds = PackedDataset(source)
    rows = [expected_row(p) for p in ds]
    rows = [r for r in rows if r["tokens"]]
    n = 0
    for rec in records:
        want = [rows[i] for i in rec["rows"]]
        longest = max(len(w["tokens"]) for w in want)
        T = seq_length if pad_to_max else min(seq_length, -(-longest // 16) * 16)
        for j, w in enumerate(want):
            pad = T - len(w["tokens"])
            assert rec["tokens"][j] == w["tokens"] + [eos] * pad
            assert rec["labels"][j] == w["labels"] + [eos] * pad
            assert rec["loss_mask"][j] == w["loss_mask"] + [0] * pad
            assert rec["position_ids"][j] == w["position_ids"] + [0] * pad
            assert rec["token_count"][j] == len(w["tokens"])
            cu = w["cu"] + ([T] if pad else [])
            got = rec["cu_seqlens_q"][j]
            assert got[: len(cu)] == cu and set(got[len(cu):]) <= {cu[-1]}  # ragged rows repeat the last value
            assert rec["cu_seqlens_kv"][j] == got
            n += 1
    assert n == len(rows)
    return n


@pytest.fixture
def alpaca(real_build) -> str:
    return real_build("alpaca", ALPACA, seq_length=1024, on_error="skip")


def test_bridge_reads_exactly_the_packs(alpaca, tmp_path):
    m = export(ExportConfig(alpaca, "bridge", str(tmp_path / "br")))
    eos = m["bridge"]["eos_id"]
    table = pq.read_table(tmp_path / "br.idx.parquet")
    assert table.schema.names == ["input_ids", "loss_mask", "seq_start_id"]
    assert table.schema.field("loss_mask").type.value_type == pa.int8()
    assert table.num_rows == len(PackedDataset(alpaca))
    check(alpaca, bridge_reads(str(tmp_path / "br.idx.parquet"), "--eos-id", str(eos), "--seq-length", "1024"),
          eos, 1024)
    meta = json.loads((tmp_path / "br_metadata.jsonl").read_text())
    assert isinstance(meta, list) and meta[0]["pack_size"] == 1024 and meta[0]["max_samples_per_bin"] >= 1
    # Bridge reads pack_size from the metadata; full-length rows.
    check(alpaca, bridge_reads(str(tmp_path / "br.idx.parquet"), "--eos-id", str(eos), "--metadata",
                               str(tmp_path / "br_metadata.jsonl"), "--pad-to-max-length"), eos, 1024, pad_to_max=True)


def test_bridge_collates_several_rows(real_build, tmp_path):
    prefix = real_build("moss", MOSS, seq_length=4096, on_error="skip")
    m = export(ExportConfig(prefix, "bridge", str(tmp_path / "br")))
    eos = m["bridge"]["eos_id"]
    path = str(tmp_path / "br.idx.parquet")
    check(prefix, bridge_reads(path, "--eos-id", str(eos), "--seq-length", "4096", "--rows-per-collate", "4"),
          eos, 4096)


def test_single_token_samples_are_left_out(real_build, tmp_path):
    prefix = real_build("text", ALPACA, seq_length=64, json_keys=("instruction", "output"))
    ds = PackedDataset(prefix)
    singles = sum(int((ds.doc_lens(i) == 1).sum()) for i in range(len(ds)))
    assert singles
    m = export(ExportConfig(prefix, "bridge", str(tmp_path / "br")))
    assert m["bridge"]["single_token_samples_dropped"] == singles and m["bridge"]["warnings"]
    eos = m["bridge"]["eos_id"]
    check(prefix, bridge_reads(str(tmp_path / "br.idx.parquet"), "--eos-id", str(eos), "--seq-length", "64"),
          eos, 64)


# -- a --cp-size build: Bridge's own pad_seq_to_mult layout, read with pad_seq_to_mult = the build's multiple -------
def expected_cp_row(pack, m: int, eos: int, seq_length: int) -> dict:
    """Bridge's collate_fn on one row of a CP export (pad_to_max_length): per sample of n >= 2 tokens, stored as
    the sample then eos up to ceil((n-1)/m)*m + 1 tokens; inputs/labels/loss from that, the logical length n-1."""
    tokens, labels, loss, positions, padded, logical = [], [], [], [], [0], [0]
    for d in np.split(np.arange(pack.ids.size), np.cumsum(pack.doc_lens)[:-1]):
        if d.size < 2:
            continue
        stored = -(-(d.size - 1) // m) * m + 1
        seq = pack.ids[d].tolist() + [eos] * (stored - d.size)
        tokens += seq[:-1]
        labels += seq[1:]
        loss += pack.loss_mask[d[1:]].tolist() + [0] * (stored - d.size)
        positions += list(range(stored - 1))
        padded.append(padded[-1] + stored - 1)
        logical.append(logical[-1] + d.size - 1)
    pad = seq_length - len(tokens)
    if pad:
        padded.append(seq_length)
        logical.append(logical[-1])  # the row's tail holds no real token
    return {"tokens": tokens + [eos] * pad, "labels": labels + [eos] * pad, "loss_mask": loss + [0] * pad,
            "position_ids": positions + [0] * pad, "cu_seqlens_q_padded": padded, "cu_seqlens_q": logical}


def test_cp_build_reads_as_bridge_pad_seq_to_mult(real_build, tmp_path):
    prefix = real_build("alpaca", ALPACA, seq_length=1024, on_error="skip", cp_size=4, tp_size=2)  # m = 8
    ds = PackedDataset(prefix)
    m = export(ExportConfig(prefix, "bridge", str(tmp_path / "br")))
    section = m["bridge"]
    assert section["context_parallel"]["pad_seq_to_mult"] == 8
    assert section["context_parallel"]["bridge_config"]["dataset.packed_sequence_specs.pad_seq_to_mult"] == 8
    eos = section["eos_id"]
    records = bridge_reads(str(tmp_path / "br.idx.parquet"), "--eos-id", str(eos), "--seq-length", "1024",
                           "--pad-seq-to-mult", "8", "--pad-to-max-length")
    rows = [expected_cp_row(p, 8, eos, 1024) for p in ds]
    assert len(records) == len(rows)
    for rec in records:
        (r,) = rec["rows"]
        want = rows[r]
        for key in ("tokens", "labels", "loss_mask", "position_ids"):
            assert rec[key][0] == want[key], (r, key)
        padded, logical = rec["cu_seqlens_q_padded"][0], rec["cu_seqlens_q"][0]
        assert padded == want["cu_seqlens_q_padded"] and logical == want["cu_seqlens_q"], r
        assert all(b % 8 == 0 for b in padded)  # TE's THD split over CP 4 (2 x 4 chunks) and sequence parallel
        # no target outside a sample's logical tokens: the alignment padding and the tail never train
        seg_pad = np.diff(padded)[: len(logical) - 1]
        real = np.zeros(1024, bool)
        for a, n in zip(padded[:-1], np.diff(logical), strict=False):
            real[a : a + n] = True
        assert not np.asarray(rec["loss_mask"][0], bool)[~real].any() and (seg_pad % 8 == 0).all()
        assert np.array_equal(~np.asarray(rec["padding_mask"][0], bool), real)
    assert verify(str(tmp_path / "br")).ok
