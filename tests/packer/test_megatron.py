"""packer.megatron: PackedGPTDataset serves one pack per sample through megatron-core's builder."""

from __future__ import annotations

import importlib
import json
import pickle
import sys
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch

with warnings.catch_warnings():  # megatron-core warns about optional dependencies on import
    warnings.simplefilter("ignore")
    pytest.importorskip("megatron.core", reason="megatron-core is not installed")
    from megatron.core.datasets.blended_dataset import BlendedDataset
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import (
        GPTDataset,
        GPTDatasetConfig,
        _get_ltor_masks_and_position_ids,
    )
    from megatron.core.datasets.utils import Split
    from megatron.core.utils import get_thd_batch_on_this_cp_rank

    from packer import megatron as pm

from packer.dataset import PackedDataset
from packer.manifest import manifest_path

ALPACA = "alpaca/stanford_alpaca_pr152_alpaca_5000.json"
E, PAD, VOCAB, S = 0, 99, 100, 32  # synthetic builds: eod, pad (build A only), vocab, seq_length


def config(prefixes, split="100,0,0", weights=None, seed=1234, seq_length=S, **kw) -> pm.PackedGPTDatasetConfig:
    return pm.PackedGPTDatasetConfig(random_seed=seed, sequence_length=seq_length,
                                     blend=([str(p) for p in prefixes], weights), split=split, **kw)


def build(cls, sizes, cfg):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return BlendedMegatronDatasetBuilder(cls, sizes, lambda: True, cfg).build()


def set_pad(prefix, pad_id, helpers) -> None:
    m = json.loads(manifest_path(prefix).read_text())
    m["tokenizer"]["pad_id"] = pad_id
    helpers.refresh_checksums(prefix, m)


def random_packs(rng: np.random.Generator, n: int) -> list:
    """n packs of 1-4 samples (1-8 tokens, EOD-terminated, EOD a target, random masks); pack 0 is exactly S."""
    packs = []
    for k in range(n):
        lens = [8, 8, 8, 8] if k == 0 else rng.integers(1, 9, size=rng.integers(1, 5)).tolist()
        samples = []
        for L in lens:
            ids = [*rng.integers(1, PAD, size=L - 1).tolist(), E]
            mask = [*rng.integers(0, 2, size=L - 1).tolist(), 1]
            samples.append((ids, mask))
        packs.append(samples)
    return packs


@pytest.fixture(scope="module")
def synth(tmp_path_factory, helpers):
    """Two hand-written builds: A (40 packs, pad id 99) and B (25 packs, no pad id: pads with EOD)."""
    root = tmp_path_factory.mktemp("megatron")
    rng = np.random.default_rng(0)
    a, b = root / "a", root / "b"
    helpers.write_dataset(a, random_packs(rng, 40), eod=E, vocab=VOCAB, seq_length=S)
    helpers.write_dataset(b, random_packs(rng, 25), eod=E, vocab=VOCAB, seq_length=S)
    set_pad(a, PAD, helpers)
    return SimpleNamespace(a=a, b=b)


def dataset(prefix, seq_length=S, **kw) -> pm.PackedGPTDataset:
    """All packs of one build, one epoch, built directly (no builder)."""
    cfg = config([prefix], seq_length=seq_length, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        low = pm.PackedGPTDataset.build_low_level_dataset(str(prefix), cfg)
        return pm.PackedGPTDataset(low, str(prefix), np.arange(len(low)), None, Split.train, cfg)


def by_pack(ds) -> dict[int, dict]:
    return {int(ds.pack_index[i]): ds[i] for i in range(len(ds))}


def reference(ids, mask, doc_lens, seq_length, pad):
    """The item computed document by document from a PackedDataset pack, independently of pack_item."""
    T = len(ids)
    tokens = np.full(seq_length, pad, np.int64)
    tokens[:T] = ids
    labels = np.append(tokens[1:], pad)
    loss = np.zeros(seq_length, np.float32)
    positions, cu, start = [], [0], 0
    for L in [*doc_lens.tolist(), *([seq_length - T] if seq_length > T else [])]:
        if start < T:  # a document: label j predicts token j+1 of the same document
            loss[start : start + L - 1] = mask[start + 1 : start + L]
        positions.extend(range(L))
        start += L
        cu.append(start)
    return tokens, labels, loss, np.array(positions), np.array(cu)


def check_every_pack(prefix, seq_length) -> int:
    ds, packed = dataset(prefix, seq_length, create_attention_mask=False), PackedDataset(prefix)
    items = by_pack(ds)
    assert sorted(items) == list(range(len(packed)))
    for d, item in items.items():
        p = packed[d]
        tokens, labels, loss, positions, cu = reference(p.ids, p.loss_mask, p.doc_lens, seq_length, packed.pad_id)
        assert "attention_mask" not in item
        np.testing.assert_array_equal(item["tokens"], tokens)
        np.testing.assert_array_equal(item["labels"], labels)
        np.testing.assert_array_equal(item["loss_mask"], loss)
        np.testing.assert_array_equal(item["position_ids"], positions)
        np.testing.assert_array_equal(item["cu_seqlens"], cu)
        assert item["cu_seqlens"].dtype == torch.int32 and item["max_seqlen"].dtype == torch.int32
        assert int(item["max_seqlen"]) == int(np.diff(cu).max())
        assert item["tokens"].dtype == item["labels"].dtype == item["position_ids"].dtype == torch.int64
        assert item["loss_mask"].dtype == torch.float32

        # loss tokens = packer targets minus each document's first token (a label would cross the boundary)
        starts = np.cumsum(p.doc_lens) - p.doc_lens
        assert item["loss_mask"].sum() == p.loss_mask.sum() - p.loss_mask[starts].sum()
        # no label crosses a boundary: a loss position and its label's position share a segment
        seg = np.repeat(np.arange(len(cu) - 1), np.diff(cu))
        t = np.flatnonzero(item["loss_mask"].numpy())
        assert (t + 1 < len(p.ids)).all() and (seg[t] == seg[t + 1]).all()
        # the EOD ending each sample stays a target
        ends = np.cumsum(p.doc_lens) - 1
        for end, L in zip(ends, p.doc_lens, strict=True):
            if L >= 2 and p.ids[end] == packed.eod_id and p.loss_mask[end]:
                assert item["loss_mask"][end - 1] == 1 and item["labels"][end - 1] == packed.eod_id
        # padding is never a target (nor is the last real token, whose label is past the pack)
        assert (item["loss_mask"][len(p.ids) - 1 :] == 0).all()
    return len(items)


def test_hand_example(tmp_path, helpers):
    """Two packs, EOD E = 0, pad p = 9, sequence_length 6.

    pack 0: samples [5 6 E] mask [0 1 1] and [7 E] mask [1 1] (7 is a target but a document's first token)
        t             0  1  2  3  4  5
        tokens        5  6  E  7  E  p
        labels        6  E  7  E  p  p
        loss_mask     1  1  0  1  0  0
        position_ids  0  1  2  0  1  0
        cu_seqlens    [0, 3, 5, 6]        max_seqlen 3
        attention_mask (x = masked out):
                      . x x x x x
                      . . x x x x
                      . . . x x x
                      x x x . x x
                      x x x . . x
                      x x x x x .
    pack 1: samples [8 3 E] mask [0 0 1] and [4 2 E] mask [0 1 1]: exactly 6 tokens, no padding
        tokens        8  3  E  4  2  E
        labels        3  E  4  2  E  p
        loss_mask     0  1  0  1  1  0
        position_ids  0  1  2  0  1  2
        cu_seqlens    [0, 3, 6]           max_seqlen 3
    """
    prefix = tmp_path / "hand"
    helpers.write_dataset(prefix, [[([5, 6, 0], [0, 1, 1]), ([7, 0], [1, 1])],
                                   [([8, 3, 0], [0, 0, 1]), ([4, 2, 0], [0, 1, 1])]], eod=0, vocab=10, seq_length=6)
    set_pad(prefix, 9, helpers)
    items = by_pack(dataset(prefix, 6, create_attention_mask=True))
    expected = {
        0: dict(tokens=[5, 6, 0, 7, 0, 9], labels=[6, 0, 7, 0, 9, 9], loss_mask=[1, 1, 0, 1, 0, 0],
                position_ids=[0, 1, 2, 0, 1, 0], cu_seqlens=[0, 3, 5, 6], max_seqlen=3),
        1: dict(tokens=[8, 3, 0, 4, 2, 0], labels=[3, 0, 4, 2, 0, 9], loss_mask=[0, 1, 0, 1, 1, 0],
                position_ids=[0, 1, 2, 0, 1, 2], cu_seqlens=[0, 3, 6], max_seqlen=3),
    }
    for d, want in expected.items():
        assert {k: items[d][k].tolist() for k in want} == want
    grid = test_hand_example.__doc__.split("(x = masked out):")[1].split("pack 1")[0].split()
    drawn = np.array([c == "x" for c in grid]).reshape(6, 6)
    assert items[0]["attention_mask"].dtype == torch.bool
    np.testing.assert_array_equal(items[0]["attention_mask"].numpy(), drawn[None])


def test_every_synthetic_pack(synth):
    assert check_every_pack(synth.a, S) == 40
    assert check_every_pack(synth.b, S + 5) == 25  # pads with EOD (no pad id); longer rows than the build


def test_every_real_pack(real_build):
    prefix = real_build("alpaca", ALPACA, "gpt2", 2048, "bfd", on_error="skip")
    assert check_every_pack(prefix, 2048) > 100


def test_attention_mask_and_positions_match_megatron(synth):
    """Where every sample ends with EOD and the pad id is not EOD, GPTDataset's EOD-scanning mask and positions
    (reset_attention_mask, reset_position_ids) find the same segments: same convention, True = masked out."""
    for item in by_pack(dataset(synth.a, create_attention_mask=True)).values():
        mask, _, positions = _get_ltor_masks_and_position_ids(item["tokens"], E, True, True, False, True)
        assert torch.equal(item["attention_mask"], mask)
        assert torch.equal(item["position_ids"], positions)


def test_builder_split_and_epochs(synth):
    """One prefix, split 90,5,5 of 40 packs: pack ranges [0,36) [36,38) [38,40); num_samples -> whole epochs,
    each a fresh seeded permutation; epoch 0 is the same however many epochs are built."""
    one = build(pm.PackedGPTDataset, [None, None, None], config([synth.a], "90,5,5"))
    assert [sorted(ds.pack_index.tolist()) for ds in one] == [list(range(36)), [36, 37], [38, 39]]
    assert all(type(ds) is pm.PackedGPTDataset for ds in one)

    train, valid, test = build(pm.PackedGPTDataset, [100, 5, 1], config([synth.a], "90,5,5"))
    assert (len(train), len(valid), len(test)) == (108, 6, 2)
    epochs = train.pack_index.reshape(3, 36)
    assert all(sorted(e.tolist()) == list(range(36)) for e in epochs)
    assert len({tuple(e) for e in epochs}) == 3  # reshuffled every epoch
    np.testing.assert_array_equal(epochs[0], one[0].pack_index)
    again = build(pm.PackedGPTDataset, [100, 5, 1], config([synth.a], "90,5,5"))[0]
    np.testing.assert_array_equal(again.pack_index, train.pack_index)
    other = build(pm.PackedGPTDataset, [100, 5, 1], config([synth.a], "90,5,5", seed=7))[0]
    assert not np.array_equal(other.pack_index, train.pack_index)

    packed = PackedDataset(synth.a)
    for i in (0, 50, 107):
        p = packed[int(train.pack_index[i])]
        np.testing.assert_array_equal(train[i]["tokens"][: len(p.ids)], p.ids)


@pytest.mark.parametrize("weights", [[0.3, 0.7], None])
def test_builder_blend(synth, weights):
    """A blend of two builds: a BlendedDataset whose every sample is one pack of the build it names."""
    splits = build(pm.PackedGPTDataset, [30, 4, 4], config([synth.a, synth.b], "90,5,5", weights))
    packed = [PackedDataset(synth.a), PackedDataset(synth.b)]
    for blended in splits:
        assert isinstance(blended, BlendedDataset)
        assert {type(d) for d in blended.datasets} == {pm.PackedGPTDataset}
    train = splits[0]
    assert len(train) == 30 and set(train.dataset_index.tolist()) == {0, 1}
    for i in range(len(train)):
        item = train[i]
        source = train.datasets[item["dataset_id"]]
        pack = int(source.pack_index[train.dataset_sample_index[i]])
        p, pad = packed[item["dataset_id"]][pack], packed[item["dataset_id"]].pad_id
        np.testing.assert_array_equal(item["tokens"], reference(p.ids, p.loss_mask, p.doc_lens, S, pad)[0])
    assert [packed[0].pad_id, packed[1].pad_id] == [PAD, E]


def test_gpt_dataset_mixes_packs_ours_does_not(synth, tmp_path):
    """GPTDataset on the same build: its seq_length+1 windows run across packs. Ours: one pack per sample."""
    tok = SimpleNamespace(vocab_size=VOCAB, eod=E, unique_identifiers={"class": "stub"})
    gpt_cfg = GPTDatasetConfig(random_seed=1, sequence_length=S, blend=([str(synth.a)], None), split="100,0,0",
                               tokenizer=tok, reset_position_ids=True, reset_attention_mask=True,
                               eod_mask_loss=True, create_attention_mask=False, path_to_cache=str(tmp_path))
    gpt = build(GPTDataset, [None, None, None], gpt_cfg)[0]
    docs = PackedDataset(synth.a).tokens.document_indices
    packs_per_window = [len(set(np.searchsorted(docs, gpt._query_document_sample_shuffle_indices(i)[1], "right")))
                        for i in range(len(gpt))]
    assert max(packs_per_window) > 1

    # a plain GPTDatasetConfig (what Megatron-LM's core_gpt_dataset_config_from_args makes) works for ours
    gpt_cfg.eod_mask_loss = False
    ours = build(pm.PackedGPTDataset, [None, None, None], gpt_cfg)[0]
    packed = PackedDataset(synth.a)
    for i in range(len(ours)):
        p = packed[int(ours.pack_index[i])]
        np.testing.assert_array_equal(ours[i]["tokens"][: len(p.ids)], p.ids)
        assert (ours[i]["tokens"][len(p.ids) :] == PAD).all()


def test_megatron_get_batch_contract(synth):
    """Default collate at micro-batch 1 gives what Megatron-LM's get_batch_on_this_tp_rank asserts (int32
    cu_seqlens of shape (1, n), 1-d max_seqlen), megatron-core builds THD PackedSeqParams from it, and the
    dataset survives pickling."""
    ds = dataset(synth.a)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=1)))
    assert batch["tokens"].shape == batch["labels"].shape == batch["loss_mask"].shape == (1, S)
    assert batch["attention_mask"].shape == (1, 1, S, S) and batch["attention_mask"].dtype == torch.bool
    cu, max_seqlen = batch.pop("cu_seqlens"), batch.pop("max_seqlen")
    assert cu.dtype == torch.int32 and cu.shape[0] == 1 and max_seqlen.dim() == 1
    _, params = get_thd_batch_on_this_cp_rank(batch, cu[0], None, max_seqlen, cp_size=1, cp_rank=0)
    assert params.qkv_format == "thd" and params.cu_seqlens_q.tolist() == ds[0]["cu_seqlens"].tolist()
    assert params.max_seqlen_q == int(np.diff(params.cu_seqlens_q.numpy()).max())
    # DataLoader workers (Megatron-LM's --num-workers) get the dataset pickled
    clone = pickle.loads(pickle.dumps(ds))
    assert all(torch.equal(clone[3][k], v) for k, v in ds[3].items())


def test_batch_padding_sample(synth):
    ds = dataset(synth.a)
    item = ds[None]
    assert item["loss_mask"].sum() == 0 and torch.equal(item["tokens"], ds[0]["tokens"])


def test_errors(synth, tmp_path):
    with pytest.raises(ValueError, match=r"pack 0 holds 32 tokens .* pass --seq-length >= 32"):
        dataset(synth.a, seq_length=31)
    with pytest.raises(ValueError, match="pass --seq-length >= 40"):
        pm.pack_item(np.ones(40), np.ones(40), np.array([40]), 32, 0)
    with pytest.raises(ValueError, match="drop --eod-mask-loss"):
        config([synth.a], eod_mask_loss=True)
    with pytest.raises(ValueError, match=r"made for CP 1 .* rebuild with `packer build --cp-size 2`, or pass "
                                         r"--context-parallel-size 1"):
        dataset(synth.a, context_parallel_size=2)  # a plain build: no padding for THD context parallelism
    with pytest.raises(ValueError, match="hybrid context parallelism is not supported"):
        config([synth.a], hybrid_context_parallel=True)
    with pytest.raises(ValueError, match="no data"):
        pm.PackedGPTDatasetConfig(random_seed=1, sequence_length=S)
    with pytest.raises(ValueError, match="the build's is 0; pass the tokenizer the build used"):
        dataset(synth.a, tokenizer=SimpleNamespace(eod=50, unique_identifiers={}))
    with pytest.raises(ValueError, match="valid split has no packs .* change --split"):
        build(pm.PackedGPTDataset, [4, 4, 0], config([synth.a], "99,1,0"))  # round(0.01 * 40) packs


def test_missing_megatron_core(monkeypatch):
    monkeypatch.setitem(sys.modules, "megatron.core.datasets.megatron_dataset", None)  # import fails
    monkeypatch.delitem(sys.modules, "packer.megatron")
    with pytest.raises(ImportError, match="pip install megatron-core"):
        importlib.import_module("packer.megatron")


# -- context-parallel builds (packer build --cp-size N): every sample served padded to the build's multiple ---------
def cp_build(tmp_path, helpers, packs, cp_size: int, tp_size: int = 1, seq_length: int = S):
    """A hand build marked as built for CP (the section a `packer build --cp-size` writes), checked by verify."""
    from packer import cp
    from packer.verify import verify

    prefix = tmp_path / f"cp{cp_size}"
    m = helpers.write_dataset(prefix, packs, eod=E, vocab=VOCAB, seq_length=seq_length)
    lens = np.array([len(ids) for p in packs for ids, _ in p])
    docs = np.concatenate([[0], np.cumsum([len(p) for p in packs])])
    padded, per_pack, costs = cp.pack_figures(lens, docs, cp.pad_multiple(cp_size, tp_size))
    m["tokenizer"]["pad_id"] = PAD
    m["context_parallel"] = cp.section(cp_size, tp_size, PAD, int(lens.sum()), padded, int(per_pack.max()))
    m["attention_cost"] = cp.attention_summary(costs, cp.pad_multiple(cp_size, tp_size))
    helpers.refresh_checksums(prefix, m)
    assert verify(prefix).ok, verify(prefix).errors
    return prefix


def test_cp_hand_example(tmp_path, helpers):
    """The module docstring's CP example: samples [a0 a1 E] and [b0 E] at CP 2 (m = 4), S = 12, pad p = 99."""
    prefix = cp_build(tmp_path, helpers, [[([5, 6, E], [0, 1, 1]), ([7, E], [1, 1])]], cp_size=2, seq_length=12)
    (item,) = by_pack(dataset(prefix, 12, context_parallel_size=2, create_attention_mask=False)).values()
    p = PAD
    assert {k: v.tolist() for k, v in item.items()} == {
        "tokens": [5, 6, E, p, 7, E, p, p, p, p, p, p],
        "labels": [6, E, p, 7, E, p, p, p, p, p, p, p],
        "loss_mask": [1, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0],
        "position_ids": [0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3],
        "cu_seqlens": [0, 3, 5, 5], "cu_seqlens_padded": [0, 4, 8, 12], "max_seqlen": 4}


@pytest.mark.parametrize("cp_size,tp_size", [(2, 1), (4, 1), (2, 3)])
def test_cp_items_are_the_plain_items_padded(tmp_path, helpers, cp_size, tp_size):
    """Every pack of a CP build, served padded: each document's slot a multiple of m in cu_seqlens_padded, its real
    tokens, labels, targets and positions exactly the plain item's document, pads never a target; the real
    cu_seqlens count exactly the real tokens; every padded document splits into TE's 2 x CP zigzag chunks."""
    from packer import cp

    m = cp.pad_multiple(cp_size, tp_size)
    seq_length = 4 * m * 2
    rng = np.random.default_rng(cp_size * 10 + tp_size)
    packs = []
    for _ in range(30):  # samples of 1..2m tokens whose padded lengths fill at most seq_length
        lens, room = [], seq_length
        while room >= m and len(lens) < 5:
            L = int(rng.integers(1, min(2 * m, room) + 1))
            lens.append(L)
            room -= -(-L // m) * m
        packs.append([([*rng.integers(1, PAD, size=L - 1).tolist(), E], [*rng.integers(0, 2, size=L - 1).tolist(), 1])
                      for L in lens])
    prefix = cp_build(tmp_path, helpers, packs, cp_size, tp_size, seq_length)
    packed = PackedDataset(prefix)
    assert (packed.cp_size, packed.pad_multiple) == (cp_size, m)
    for d, item in by_pack(dataset(prefix, seq_length, context_parallel_size=cp_size,
                                   create_attention_mask=False)).items():
        pk = packed[d]
        slots = packed.padded_doc_lens(d)
        assert (slots % m == 0).all() and (slots >= pk.doc_lens).all() and (slots - pk.doc_lens < m).all()
        padded_cu = item["cu_seqlens_padded"].numpy()
        assert (np.diff(padded_cu) % (2 * cp_size) == 0).all() and (np.diff(padded_cu) % m == 0).all()
        assert padded_cu[-1] == seq_length and padded_cu[: slots.size + 1].tolist() == cu_seqlens_of(slots)
        real_cu = item["cu_seqlens"].numpy()
        assert real_cu.size == padded_cu.size and real_cu[: pk.doc_lens.size + 1].tolist() == cu_seqlens_of(pk.doc_lens)
        assert set(real_cu[pk.doc_lens.size + 1 :]) <= {real_cu[pk.doc_lens.size]}  # the tail holds no real token
        plain = reference(pk.ids, pk.loss_mask, pk.doc_lens, int(pk.doc_lens.sum()), PAD)
        starts = np.cumsum(pk.doc_lens) - pk.doc_lens
        for j, (a, n) in enumerate(zip(padded_cu[:-1].tolist(), pk.doc_lens.tolist(), strict=False)):
            s = starts[j]
            np.testing.assert_array_equal(item["tokens"][a : a + n], pk.ids[s : s + n])
            assert (item["tokens"][a + n : padded_cu[j + 1]] == PAD).all()
            np.testing.assert_array_equal(item["loss_mask"][a : a + n - 1], plain[2][s : s + n - 1])
            np.testing.assert_array_equal(item["labels"][a : a + n - 1], plain[1][s : s + n - 1])
            np.testing.assert_array_equal(item["position_ids"][a : padded_cu[j + 1]], np.arange(slots[j]))
        real = np.zeros(seq_length, bool)
        for a, n in zip(padded_cu[:-1].tolist(), pk.doc_lens.tolist(), strict=False):
            real[a : a + n] = True
        t = np.flatnonzero(item["loss_mask"].numpy())
        assert real[t + 1].all() and real[t].all()  # a target and its input are real tokens of one document
        assert int(item["loss_mask"].sum()) == int(pk.loss_mask.sum() - pk.loss_mask[starts].sum())
        assert int(item["max_seqlen"]) == int(np.diff(padded_cu).max())
        # sequence parallelism: a CP rank's seq_length / CP tokens split evenly over the TP ranks
        assert (seq_length // cp_size) % tp_size == 0


def cu_seqlens_of(lens) -> list[int]:
    return np.concatenate([[0], np.cumsum(lens)]).tolist()


def test_cp_size_must_be_the_builds(tmp_path, helpers):
    prefix = cp_build(tmp_path, helpers, [[([5, 6, E], [0, 1, 1])]], cp_size=2, seq_length=8)
    with pytest.raises(ValueError, match=r"context_parallel_size is 1 but the build was made for CP 2 .* pass "
                                         r"--context-parallel-size 2, or rebuild"):
        dataset(prefix, 8)
    with pytest.raises(ValueError, match=r"context_parallel_size is 4 but the build was made for CP 2"):
        dataset(prefix, 8, context_parallel_size=4)
    with pytest.raises(ValueError, match=r"sequence_length 10 is not a multiple of 4"):
        dataset(prefix, 10, context_parallel_size=2)
