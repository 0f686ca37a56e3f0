"""`packer export --to mindspeed`, read back by MindSpeed-LLM's own reader (../shared/peers/mindspeed_llm).

For every pack, what MindSpeed-LLM would hand its model (tokens, labels, loss mask, position ids, the
actual_seq_len its GPTModel wrapper passes to the kernel) must equal what packer's own reader says: the pack's
samples (1-token samples last), padding, labels = target token ids with every sample's first token ignored.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from packer.dataset import PackedDataset
from packer.export import ExportConfig, ExportError, export
from packer.indexed import IndexedDataset
from packer.verify import verify

from .conftest import ALPACA, read_with_peer


def mindspeed_reads(prefix: str, *flags: str) -> list[dict]:
    """MindSpeed-LLM's packed-SFT data path on the export at `prefix`: one record per micro-batch of size 1."""
    return read_with_peer("mindspeed_llm/read_export.py", prefix, *flags, needs=("megatron.core", "transformers"))


def expected_pack(pack, seq_length: int, pad_id: int, multiple: int | None = None) -> dict:
    """What MindSpeed must see for one pack, from packer's reader alone."""
    docs = np.split(np.arange(pack.ids.size), np.cumsum(pack.doc_lens)[:-1])
    docs = [d for d in docs if d.size > 1] + [d for d in docs if d.size == 1]
    tokens, labels, positions, ends = [], [], [], []
    for d in docs:
        tokens += pack.ids[d].tolist()
        labels += [-100] + [int(pack.ids[t]) if pack.loss_mask[t] else -100 for t in d[1:]]
        positions += list(range(d.size))
        if d.size > 1:
            ends.append(len(tokens))
    length = seq_length if multiple is None else -(-len(tokens) // multiple) * multiple
    pad = length - len(tokens)
    if pad or ends[-1] != len(tokens):
        ends.append(length)  # the padding tail (and 1-token samples before it) is the last segment
    return {"tokens": tokens + [pad_id] * pad, "labels": labels + [-100] * pad, "position_ids": positions + [0] * pad,
            "loss_mask": [int(x != -100) for x in labels + [-100] * pad], "actual_seq_len_model": ends}


def check_against_packer(source: str, records: list[dict], pad_id: int, multiple: int | None = None) -> None:
    ds = PackedDataset(source)
    assert len(records) == len(ds)
    for rec in records:
        (p,) = rec["packs"]
        want = expected_pack(ds[p], ds.seq_length, pad_id, multiple)
        for key in ("tokens", "labels", "loss_mask", "position_ids"):
            assert rec[key][0] == want[key], (p, key)
        assert rec["actual_seq_len_model"] == want["actual_seq_len_model"], p
        assert not rec["warnings"], (p, rec["warnings"])


@pytest.fixture
def alpaca(real_build) -> str:
    return real_build("alpaca", ALPACA, seq_length=1024, on_error="skip")


def test_neat_pack_equals_packer(alpaca, tmp_path):
    m = export(ExportConfig(alpaca, "mindspeed", str(tmp_path / "ms")))
    section = m["mindspeed"]
    assert section["convention"] == "neat-pack" and not section["warnings"]
    assert "--neat-pack" in section["mindspeed_flags"]
    assert {Path(f).name for f in m["files"]} == {f"ms_packed_{f}_document.{e}" for f in
                                                 ("input_ids", "labels", "attention_mask") for e in ("bin", "idx")}
    ds = PackedDataset(alpaca)
    records = mindspeed_reads(str(tmp_path / "ms"), "--neat-pack", "--reset-position-ids")
    check_against_packer(alpaca, records, ds.pad_id)
    # Every target of the build that MindSpeed can train on is there: all but samples' first tokens.
    first_targets = sum(int(p.loss_mask[np.cumsum(p.doc_lens) - p.doc_lens].sum()) for p in ds)
    assert section["summary"]["target_tokens"] == ds.manifest["counts"]["target_tokens"] - first_targets
    assert sum(sum(r["loss_mask"][0]) for r in records) == section["summary"]["target_tokens"]


def test_eod_boundaries_equal_packer(alpaca, tmp_path):
    m = export(ExportConfig(alpaca, "mindspeed", str(tmp_path / "ms"), neat_pack=False))
    assert m["mindspeed"]["convention"] == "eod" and not m["mindspeed"]["warnings"]
    eod = m["mindspeed"]["eos_id"]
    assert m["mindspeed"]["pad_id"] == eod  # the padding tail is then one segment, as with neat-pack
    records = mindspeed_reads(str(tmp_path / "ms"), "--reset-position-ids", "--eos-id", str(eod))
    check_against_packer(alpaca, records, eod)


def test_pad_to_multiple_of(alpaca, tmp_path):
    export(ExportConfig(alpaca, "mindspeed", str(tmp_path / "ms"), pad_to_multiple_of=64))
    lens = IndexedDataset(str(tmp_path / "ms") + "_packed_input_ids_document").sequence_lengths
    assert (lens % 64 == 0).all() and lens.max() <= 1024 and lens.min() < 1024
    records = mindspeed_reads(str(tmp_path / "ms"), "--neat-pack", "--reset-position-ids", "--no-pad-to-seq-lengths",
                              "--pad-to-multiple-of", "64", "--seq-length", "1024")
    check_against_packer(alpaca, records, PackedDataset(alpaca).pad_id, multiple=64)


def test_single_token_samples_never_fold_later_samples(real_build, tmp_path):
    """`--overflow split` can leave a chunk that is a lone EOD; MindSpeed folds every segment after a 1-token one
    into one, so the export puts such samples last in their pack, next to the padding."""
    prefix = real_build("text", ALPACA, seq_length=64, json_keys=("instruction", "output"))
    ds = PackedDataset(prefix)
    singles = [i for i in range(len(ds)) if (ds.doc_lens(i) == 1).any() and ds.doc_lens(i).size > 2]
    assert singles, "the fixture should hold packs with a 1-token sample among others"
    m = export(ExportConfig(prefix, "mindspeed", str(tmp_path / "ms")))
    assert m["mindspeed"]["single_token_samples_placed_last"] >= len(singles)
    check_against_packer(prefix, mindspeed_reads(str(tmp_path / "ms"), "--neat-pack", "--reset-position-ids"),
                         ds.pad_id)


def test_eod_boundaries_fall_back_when_the_scan_would_lie(real_build, tmp_path):
    """Split chunks carry no EOD: MindSpeed's EOD scan would find no boundary after them."""
    prefix = real_build("text", ALPACA, seq_length=64, json_keys=("instruction", "output"))
    m = export(ExportConfig(prefix, "mindspeed", str(tmp_path / "ms"), neat_pack=False))
    section = m["mindspeed"]
    assert section["convention"] == "neat-pack" and section["requested"] == "eod"
    assert "split chunks do not end with EOD" in section["warnings"][0]
    mask = IndexedDataset(str(tmp_path / "ms") + "_packed_attention_mask_document")
    assert mask.get(0).max() >= 1 and mask.get(0).min() >= 0  # segment numbers, not all-ones


def test_refuses_a_build_that_fails_verify(alpaca, copy_build, tmp_path):
    bad = copy_build(alpaca)
    with open(bad + ".bin", "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert not verify(bad).ok
    out = tmp_path / "out" / "ms"
    with pytest.raises(ExportError, match="fails `packer verify` .*sha256"):
        export(ExportConfig(bad, "mindspeed", str(out)))
    assert not out.parent.exists() or not list(out.parent.iterdir())


def test_missing_build_is_a_clean_error(tmp_path):
    with pytest.raises(ExportError, match="did not complete|does not exist"):
        export(ExportConfig(str(tmp_path / "nothing"), "mindspeed", str(tmp_path / "ms")))


def test_interrupted_export_leaves_nothing_that_looks_valid(alpaca, tmp_path, monkeypatch):
    import packer.export.mindspeed as ms

    calls = []

    def boom(*args, **kwargs):
        calls.append(1)
        if len(calls) > 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    real = ms.unshifted_labels
    monkeypatch.setattr(ms, "unshifted_labels", boom)
    monkeypatch.setattr(PackedDataset, "groups", lambda self, max_tokens=1 << 22, f=PackedDataset.groups:
                        f(self, 4096))
    with pytest.raises(KeyboardInterrupt):
        export(ExportConfig(alpaca, "mindspeed", str(tmp_path / "ms")))
    assert list(tmp_path.iterdir()) == []


def test_options_mindspeed_cannot_read_are_refused(alpaca, tmp_path):
    with pytest.raises(ExportError, match="does not divide the build's seq_length 1024"):
        export(ExportConfig(alpaca, "mindspeed", str(tmp_path / "ms"), pad_to_multiple_of=3))
    with pytest.raises(ExportError, match="regex built from --data-path"):
        export(ExportConfig(alpaca, "mindspeed", str(tmp_path / "we+ird(1)")))
    assert list(tmp_path.iterdir()) == []


def test_an_export_never_replaces_a_build_nor_a_build_an_export(alpaca, copy_build, tmp_path):
    from packer.build import build
    from packer.config import BuildConfig, BuildError

    src = copy_build(alpaca)  # a build at tmp_path/alpaca, to export onto
    before = {p.name: p.read_bytes() for p in Path(src).parent.iterdir()}
    with pytest.raises(ExportError, match="belongs to a 'packer.packed.v1' output"):
        export(ExportConfig(alpaca, "bridge", src))
    assert {p.name: p.read_bytes() for p in Path(src).parent.iterdir()} == before
    out = tmp_path / "exp" / "ms"
    export(ExportConfig(alpaca, "mindspeed", str(out)))
    demo = Path(__file__).resolve().parents[2] / "packer" / "assets" / "demo_alpaca.json"
    with pytest.raises(BuildError, match="belongs to a 'packer.export.v1' output"):
        build(BuildConfig(handler="alpaca", inputs=(str(demo),), tokenizer=str(demo.parent / "gpt2"),
                          seq_length=512, output_prefix=str(out)), progress=False)


def test_a_commit_killed_midway_is_finished_by_the_next_run(alpaca, tmp_path, monkeypatch):
    """The earlier export's files are journaled before its manifest goes: a re-run after a kill in the renames
    removes the ones it does not replace, and no reader ever sees an old index beside a new one."""
    import os as os_mod

    out = tmp_path / "hf"
    export(ExportConfig(alpaca, "hf", str(out), rows_per_shard=100))  # 6 shards
    real, calls = os_mod.replace, []

    def dying(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as if killed after the first rename
        return real(src, dst)

    monkeypatch.setattr(os_mod, "replace", dying)
    with pytest.raises(KeyboardInterrupt):
        export(ExportConfig(alpaca, "hf", str(out), rows_per_shard=300))
    monkeypatch.setattr(os_mod, "replace", real)
    assert not (tmp_path / "hf.json").exists()
    m = export(ExportConfig(alpaca, "hf", str(out), rows_per_shard=300))  # no refusal: the journal says whose
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == sorted(
        Path(f).name for f in m["files"])
    assert verify(str(out)).ok and not list(tmp_path.glob(".*replacing"))


def test_temp_files_of_a_dead_run_are_removed(alpaca, tmp_path):
    out = tmp_path / "ms"
    stale = tmp_path / ".ms_packed_labels_document.bin.tmp-999999999-abcd"  # no such process
    stale.write_bytes(b"x" * 100)
    export(ExportConfig(alpaca, "mindspeed", str(out) + "/"))  # a trailing slash names the same output
    assert not stale.exists() and (tmp_path / "ms.json").is_file()


# -- a --cp-size build: every sample padded so that MindSpeed's pad_data has nothing left to pad -------------------
def pad_data(actual_seq_len: list[int], cp_size: int, tp_size: int) -> list[int]:
    """mindspeed/core/context_parallel/utils.py::pad_data's offsets (NPU-only there), in numpy: every segment
    of actual_seq_len padded to a multiple of lcm(2, TP) * CP; returned as is when already divisible."""
    pad_to = math.lcm(2, tp_size) * cp_size
    ends = np.asarray(actual_seq_len)
    if (ends % pad_to == 0).all():
        return ends.tolist()
    lens = np.diff(np.concatenate([[0], ends]))
    return np.cumsum(-(-lens // pad_to) * pad_to).tolist()


def expected_cp_pack(pack, slots, seq_length: int, pad_id: int, size: int | None = None) -> dict:
    """What MindSpeed must see for one pack of a CP build: each sample, pad_id up to its slot, then the tail."""
    size = seq_length if size is None else size
    tokens, labels, positions, ends = [], [], [], []
    for d, slot in zip(np.split(np.arange(pack.ids.size), np.cumsum(pack.doc_lens)[:-1]), slots, strict=True):
        pad = int(slot) - d.size
        tokens += pack.ids[d].tolist() + [pad_id] * pad
        labels += [-100] + [int(pack.ids[t]) if pack.loss_mask[t] else -100 for t in d[1:]] + [-100] * pad
        positions += list(range(int(slot)))
        ends.append(len(tokens))
    tail = size - len(tokens)
    if tail:
        tokens, labels, positions = tokens + [pad_id] * tail, labels + [-100] * tail, positions + list(range(tail))
        ends.append(size)
    return {"tokens": tokens, "labels": labels, "position_ids": positions,
            "loss_mask": [int(x != -100) for x in labels], "actual_seq_len_model": ends}


@pytest.fixture
def alpaca_cp(real_build) -> str:
    return real_build("alpaca", ALPACA, seq_length=1024, on_error="skip", cp_size=4, tp_size=2)  # m = 8


@pytest.mark.parametrize("multiple", [None, 64])
def test_cp_build_every_segment_a_multiple(alpaca_cp, tmp_path, multiple):
    ds = PackedDataset(alpaca_cp)
    assert ds.pad_multiple == 8
    m = export(ExportConfig(alpaca_cp, "mindspeed", str(tmp_path / "ms"), pad_to_multiple_of=multiple))
    section = m["mindspeed"]
    assert section["context_parallel"]["multiple"] == 8 and section["single_token_samples_placed_last"] == 0
    flags = section["mindspeed_flags"]
    for flag in ("--context-parallel-size 4", "--tensor-model-parallel-size 2", "--context-parallel-algo "
                 "megatron_cp_algo", "--attention-mask-type causal", "--neat-pack", "--reset-attention-mask"):
        assert flag in flags
    extra = ["--no-pad-to-seq-lengths", "--pad-to-multiple-of", "64", "--seq-length", "1024"] if multiple else []
    records = mindspeed_reads(str(tmp_path / "ms"), "--neat-pack", "--reset-position-ids", *extra)
    assert len(records) == len(ds)
    pad_tokens = 0
    for rec in records:
        (p,) = rec["packs"]
        slots = ds.padded_doc_lens(p)
        size = None if multiple is None else -(-int(slots.sum()) // multiple) * multiple
        want = expected_cp_pack(ds[p], slots, ds.seq_length, ds.pad_id, size)
        for key in ("tokens", "labels", "loss_mask", "position_ids"):
            assert rec[key][0] == want[key], (p, key)
        ends = rec["actual_seq_len_model"]
        assert ends == want["actual_seq_len_model"] and not rec["warnings"], p
        assert all(e % 8 == 0 for e in ends) and pad_data(ends, 4, 2) == ends  # nothing left for pad_data
        pad_tokens += len(want["tokens"]) - int(ds.doc_lens(p).sum())
    assert section["summary"]["pad_tokens"] == pad_tokens
    assert section["summary"]["target_tokens"] == sum(sum(r["loss_mask"][0]) for r in records)
    assert verify(str(tmp_path / "ms")).ok


def test_cp_build_refuses_eod_boundaries_and_a_foreign_multiple(alpaca_cp, tmp_path):
    m = export(ExportConfig(alpaca_cp, "mindspeed", str(tmp_path / "ms"), neat_pack=False))
    section = m["mindspeed"]
    assert section["convention"] == "neat-pack" and "cannot carry the context-parallel padding" in section["warnings"][0]
    with pytest.raises(ExportError, match=r"--pad-to-multiple-of 4 is not a multiple of 8, the build's context-parallel "
                                          r"padding \(CP 4\)"):
        export(ExportConfig(alpaca_cp, "mindspeed", str(tmp_path / "ms4"), pad_to_multiple_of=4))


def test_verify_sees_a_cp_export_that_is_not_padded(alpaca_cp, tmp_path):
    """An export whose manifest claims more CP padding than its segments have fails verify."""
    import json

    from packer.manifest import manifest_path

    export(ExportConfig(alpaca_cp, "mindspeed", str(tmp_path / "ms")))  # segments: multiples of 8, not all of 16
    path = manifest_path(str(tmp_path / "ms"))
    m = json.loads(path.read_text())
    m["mindspeed"]["context_parallel"]["multiple"] = 16
    path.write_text(json.dumps(m))
    rep = verify(str(tmp_path / "ms"))
    assert any("segments that are not multiples of 16" in e for e in rep.errors), rep.errors
