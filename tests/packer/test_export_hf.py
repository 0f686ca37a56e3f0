"""`packer export --to hf`, read back by its real clients: datasets, a transformers Llama, TRL's padding-free
collator and transformers' DataCollatorWithFlattening.

The expected rows come from packer's reader alone, written out per document here (not with packer's label
helpers): labels = [-100] + the target ids of tokens 1.. of each document, position ids 0..n-1 per document.
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

import packer.export.hf as hf
from packer.cli import main
from packer.dataset import PackedDataset
from packer.export import ExportConfig, ExportError, export
from packer.manifest import sha256_file
from packer.output import OutputSet

from .conftest import ALPACA

try:
    import torch
except ImportError:  # the Parquet checks run without it
    torch = None
needs_torch = pytest.mark.skipif(torch is None, reason="needs torch: pip install 'packer[test]'")

# eod = 0, seq_length 16. First tokens marked as targets (packs 0, 2, 5 and the 1-token samples: the export must
# drop them), 1-token samples (pack 1, and last in pack 4), a pack filled to seq_length (pack 3).
PACKS = [
    [([5, 6, 0], [1, 1, 1]), ([7, 0], [0, 1])],
    [([0], [1])],
    [([9, 10, 11, 12, 0], [0, 0, 1, 1, 1]), ([13, 0], [1, 1]), ([14, 15, 0], [0, 1, 1])],
    [([21, 22, 23, 24, 25, 26, 27, 0], [0, 0, 0, 0, 1, 1, 1, 1]), ([30, 31, 32, 33, 34, 35, 36, 0], [0] * 7 + [1])],
    [([40, 41, 0], [0, 1, 1]), ([0], [1])],
    [([42, 43, 44, 0], [1, 0, 1, 1])],
    [([45, 0], [0, 1]), ([46, 47, 0], [0, 0, 1]), ([48, 0], [0, 1]), ([49, 0], [0, 1])],
]


@pytest.fixture
def hand(tmp_path, helpers) -> str:
    prefix = tmp_path / "in" / "hand"
    prefix.parent.mkdir()
    helpers.write_dataset(prefix, PACKS, eod=0, vocab=50, seq_length=16)
    return str(prefix)


@pytest.fixture
def alpaca(real_build) -> str:
    return real_build("alpaca", ALPACA, seq_length=512, on_error="skip")


@pytest.fixture
def text(real_build) -> str:
    """Every token a target, first tokens included, and split chunks without EOD."""
    return real_build("text", ALPACA, seq_length=512, json_keys=("output",), on_error="skip")


@pytest.fixture(params=["hand", "alpaca", "text"])
def build(request) -> str:
    return request.getfixturevalue(request.param)


def expected_docs(pack) -> list[dict[str, list[int]]]:
    """Per document of a pack: its ids, labels and positions, by the rule in the module docstring."""
    docs, start = [], 0
    for n in pack.doc_lens.tolist():
        ids, mask = pack.ids[start:start + n].tolist(), pack.loss_mask[start:start + n].tolist()
        labels = [-100] + [t if m else -100 for t, m in zip(ids[1:], mask[1:], strict=True)]
        docs.append({"input_ids": ids, "labels": labels[:n], "position_ids": list(range(n))})
        start += n
    return docs


def expected_row(pack) -> dict[str, list[int]]:
    docs = expected_docs(pack)
    row = {k: [x for d in docs for x in d[k]] for k in ("input_ids", "labels", "position_ids")}
    return row | {"seq_lengths": pack.doc_lens.tolist()}


def load(out: Path, tmp_path: Path):
    return datasets.load_dataset("parquet", data_dir=str(out), split="train", cache_dir=str(tmp_path / "hf_cache"))


def shards_of(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir())


def test_shard_names():
    assert hf.shard_names(7, 3) == [f"train-0000{i}-of-00003.parquet" for i in range(3)]
    assert hf.shard_names(6, 3) == ["train-00000-of-00002.parquet", "train-00001-of-00002.parquet"]
    assert hf.shard_names(0, 3) == ["train-00000-of-00001.parquet"]  # no rows: one empty shard carries the schema


def test_no_rows_is_one_empty_shard(tmp_path):
    with OutputSet(tmp_path / "hf") as out:
        with hf._Shards(out, tmp_path / "hf", hf.shard_names(0, 3), 3, hf.PACK_SCHEMA):
            pass
        out.commit(lambda files: {"files": files})
    assert pq.read_table(tmp_path / "hf" / "train-00000-of-00001.parquet").schema == hf.PACK_SCHEMA


@pytest.mark.parametrize("group_tokens", [1, 1 << 22])  # one pack per group / the whole build in one group
def test_round_trip(build, tmp_path, monkeypatch, group_tokens):
    monkeypatch.setattr(hf, "GROUP_TOKENS", group_tokens)
    monkeypatch.setattr(hf, "ROW_GROUP_ROWS", 4)
    ds = PackedDataset(build)
    rows_per_shard = 3 if len(ds) < 100 else 97
    out = tmp_path / "hf"
    m = export(ExportConfig(build, "hf", str(out), rows_per_shard=rows_per_shard))
    n = -(-len(ds) // rows_per_shard)
    names = [f"train-{i:05d}-of-{n:05d}.parquet" for i in range(n)]
    assert shards_of(out) == names
    assert sorted(m["files"]) == [f"hf/{name}" for name in names]
    assert json.loads((tmp_path / "hf.json").read_text()) == m
    for rel, entry in m["files"].items():  # checksums of the files as they are on disk (writers closed first)
        assert entry == {"bytes": (tmp_path / rel).stat().st_size, "sha256": sha256_file(tmp_path / rel)}, rel
    for i, name in enumerate(names):
        meta = pq.ParquetFile(out / name).metadata
        rows = min(rows_per_shard, len(ds) - i * rows_per_shard)
        assert meta.num_rows == rows and meta.num_row_groups >= -(-rows // 4)
        assert max(meta.row_group(g).num_rows for g in range(meta.num_row_groups)) <= 4  # streamed, bounded

    loaded = load(out, tmp_path)
    assert {k: str(v) for k, v in loaded.features.items()} == {k: "List(Value('int32'))" for k in
                                                               ("input_ids", "labels", "position_ids", "seq_lengths")}
    assert len(loaded) == len(ds)
    targets = first_targets = 0
    for i, (pack, row) in enumerate(zip(ds, loaded, strict=True)):
        want = expected_row(pack)
        assert row == want, i
        targets += sum(x != -100 for x in want["labels"])
        first_targets += int(pack.loss_mask[np.cumsum(pack.doc_lens) - pack.doc_lens].sum())
    section = m["hf"]
    assert section["summary"] == {"rows": len(ds), "tokens": int(ds.manifest["counts"]["tokens"]),
                                  "target_tokens": targets}
    assert (section["rows"], section["shards"], section["per_sample"]) == (len(ds), n, False)
    assert section["document_first_targets"] == first_targets
    assert targets + first_targets == ds.manifest["counts"]["target_tokens"]


def test_first_tokens_are_never_labels(hand, text, tmp_path):
    """The rule on purpose-built data (packs 0, 2, 5 and both 1-token samples mark their first token) and on real
    text (every token marked)."""
    section = export(ExportConfig(hand, "hf", str(tmp_path / "a")))["hf"]
    assert section["document_first_targets"] == 5
    assert load(tmp_path / "a", tmp_path)[0]["labels"] == [-100, 6, 0, -100, 0]
    section = export(ExportConfig(text, "hf", str(tmp_path / "b")))["hf"]
    assert section["document_first_targets"] == len(PackedDataset(text).tokens)  # one per sample


@pytest.mark.parametrize("name", ["hand", "alpaca"])
def test_per_sample_round_trip(name, request, tmp_path):
    prefix = request.getfixturevalue(name)
    ds = PackedDataset(prefix)
    out = tmp_path / "hf"
    m = export(ExportConfig(prefix, "hf", str(out), per_sample=True, rows_per_shard=5 if name == "hand" else 1000))
    samples = [d for pack in ds for d in expected_docs(pack)]
    n = -(-len(samples) // (5 if name == "hand" else 1000))
    assert m["hf"]["rows"] == len(samples) == len(ds.tokens) and len(shards_of(out)) == m["hf"]["shards"] == n
    loaded = load(out, tmp_path)
    assert list(loaded.features) == ["input_ids", "labels"]
    for j, (row, want) in enumerate(zip(loaded, samples, strict=True)):
        assert row == {"input_ids": want["input_ids"], "labels": want["labels"]}, j


# ---- transformers: one packed row, fed with position ids and no attention mask, isolates its documents ----


def tiny_llama(vocab: int, attn: str):
    transformers = pytest.importorskip("transformers")
    LlamaConfig, LlamaForCausalLM = transformers.LlamaConfig, transformers.LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         attn_implementation=attn)
    return LlamaForCausalLM(config).float().eval()


def busiest(prefix: str, tmp_path: Path):
    """(packer's pack, the exported row) for the pack with the most documents."""
    ds = PackedDataset(prefix)
    export(ExportConfig(prefix, "hf", str(tmp_path / "hf")))
    i = max(range(len(ds)), key=lambda i: (ds.doc_lens(i).size, i))
    return ds[i], load(tmp_path / "hf", tmp_path)[i]


@needs_torch
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("name", ["hand", "alpaca"])
def test_llama_isolates_documents(name, attn, request, tmp_path):
    prefix = request.getfixturevalue(name)
    pack, row = busiest(prefix, tmp_path)
    assert len(row["seq_lengths"]) > 1
    model = tiny_llama(PackedDataset(prefix).vocab_size, attn)
    ids_1T, pos_1T, labels_1T = (torch.tensor([row[k]], dtype=torch.long)
                                 for k in ("input_ids", "position_ids", "labels"))
    with torch.no_grad():
        # use_cache=False: with a KV cache transformers does not look for packed sequences (module docstring)
        packed = model(input_ids=ids_1T, position_ids=pos_1T, labels=labels_1T, use_cache=False)
        loss_sum, n_targets, start = 0.0, 0, 0
        for n in row["seq_lengths"]:
            alone = model(input_ids=ids_1T[:, start:start + n], use_cache=False).logits
            assert (packed.logits[:, start:start + n] - alone).abs().max().item() <= 1e-4, (start, n)
            # the document's own targets, from packer's reader: token t+1 predicted from tokens ..t where the
            # mask marks t+1 (t+1 >= 1: its first token has nothing before it)
            next_T = torch.from_numpy(pack.ids[start + 1:start + n])
            is_target_T = torch.from_numpy(pack.loss_mask[start + 1:start + n] == 1)
            loss_sum += torch.nn.functional.cross_entropy(alone[0, :-1][is_target_T], next_T[is_target_T],
                                                          reduction="sum").item()
            n_targets += int(is_target_T.sum())
            start += n
    assert n_targets > 0
    assert packed.loss.item() == pytest.approx(loss_sum / n_targets, rel=1e-5, abs=1e-6)


@needs_torch
def test_default_use_cache_joins_documents(hand, tmp_path):
    """Why the export's docs insist on use_cache=False: in transformers 5.2.0 LlamaConfig's use_cache=True makes
    the model build a DynamicCache, and masking_utils then skips the packed-sequence mask. If this starts to
    fail, transformers changed: update the hf.py docstring."""
    _, row = busiest(hand, tmp_path)
    model = tiny_llama(50, "sdpa")
    ids_1T, pos_1T = (torch.tensor([row[k]]) for k in ("input_ids", "position_ids"))
    with torch.no_grad():
        cached = model(input_ids=ids_1T, position_ids=pos_1T).logits
        isolated = model(input_ids=ids_1T, position_ids=pos_1T, use_cache=False).logits
    first = row["seq_lengths"][0]
    assert torch.equal(cached[:, :first], isolated[:, :first])  # the first document sees nothing before it
    assert (cached[:, first:] - isolated[:, first:]).abs().max().item() > 1e-3


def max_diff_to_alone(model, ids_BT, pos_BT, lens_per_row) -> float:
    """Largest |logit| difference between each document in the batch and the same document run alone."""
    with torch.no_grad():
        logits_BTV = model(input_ids=ids_BT, position_ids=pos_BT, use_cache=False).logits
        worst = 0.0
        for r, lens in enumerate(lens_per_row):
            for start, n in zip(np.cumsum(lens) - lens, lens, strict=True):
                alone = model(input_ids=ids_BT[r:r + 1, start:start + n], use_cache=False).logits
                worst = max(worst, (logits_BTV[r, start:start + n] - alone[0]).abs().max().item())
    return worst


@needs_torch
def test_padded_batch_without_mask_isolates_documents(hand, tmp_path):
    """Rows of different lengths, right-padded with pad_id at position 0 and NO attention mask: every document
    still sees only itself (each pad is a segment of its own)."""
    export(ExportConfig(hand, "hf", str(tmp_path / "hf")))
    rows = load(tmp_path / "hf", tmp_path).to_list()[2:4]  # 10 and 16 tokens
    T = max(len(r["input_ids"]) for r in rows)
    ids_BT = torch.tensor([r["input_ids"] + [0] * (T - len(r["input_ids"])) for r in rows])
    pos_BT = torch.tensor([r["position_ids"] + [0] * (T - len(r["input_ids"])) for r in rows])
    model = tiny_llama(50, "sdpa")
    assert max_diff_to_alone(model, ids_BT, pos_BT, [r["seq_lengths"] for r in rows]) <= 1e-4


# ---- collators ----


@needs_torch
@pytest.mark.parametrize("name", ["hand", "alpaca"])
def test_trl_padding_free_collator(name, request, tmp_path):
    DataCollatorForLanguageModeling = pytest.importorskip("trl.trainer.sft_trainer").DataCollatorForLanguageModeling

    prefix = request.getfixturevalue(name)
    ds = PackedDataset(prefix)
    export(ExportConfig(prefix, "hf", str(tmp_path / "hf")))
    rows = load(tmp_path / "hf", tmp_path).to_list()
    collate = DataCollatorForLanguageModeling(pad_token_id=ds.pad_id, padding_free=True)
    singles = range(0, len(rows), -(-len(rows) // 100))  # every row of hand, 100 spread over alpaca's
    batches = [[i] for i in singles] + [list(range(i, i + 3)) for i in range(0, len(rows) - 3, 3)][:4]
    for idx in batches:
        examples = [rows[i] for i in idx]  # the rows unchanged, seq_lengths included
        got = collate(examples)
        flat = {k: [x for e in examples for x in e[k]] for k in ("input_ids", "labels", "position_ids")}
        lens = [n for e in examples for n in e["seq_lengths"]]
        assert got["input_ids"].tolist() == [flat["input_ids"]], idx
        assert got["position_ids"].tolist() == [flat["position_ids"]], idx
        assert got["labels"].tolist() == [flat["labels"]], idx
        assert got["cu_seq_lens_q"].tolist() == np.concatenate([[0], np.cumsum(lens)]).tolist(), idx
        assert got["max_length_q"] == max(lens)
    if name == "hand":  # what the collator hands the model keeps the documents apart
        got = collate(rows[:4])
        lens = [n for e in rows[:4] for n in e["seq_lengths"]]
        assert max_diff_to_alone(tiny_llama(50, "sdpa"), got["input_ids"], got["position_ids"], [lens]) <= 1e-4


@needs_torch
@pytest.mark.parametrize("name", ["hand", "alpaca"])
def test_flattening_collator_on_per_sample_rows(name, request, tmp_path):
    DataCollatorWithFlattening = pytest.importorskip("transformers").DataCollatorWithFlattening

    prefix = request.getfixturevalue(name)
    ds = PackedDataset(prefix)
    export(ExportConfig(prefix, "hf", str(tmp_path / "packs")))
    export(ExportConfig(prefix, "hf", str(tmp_path / "samples"), per_sample=True))
    packs, samples = load(tmp_path / "packs", tmp_path), load(tmp_path / "samples", tmp_path)
    collate = DataCollatorWithFlattening(return_flash_attn_kwargs=True)
    docs = ds.tokens.document_indices
    for p in [*range(len(ds)), slice(0, 3)]:  # each pack's samples, and the samples of packs 0-2 in one batch
        ps = range(len(ds))[p] if isinstance(p, slice) else [p]
        features = [samples[s] for q in ps for s in range(docs[q], docs[q + 1])]
        got = collate(features)
        want = {k: [x for q in ps for x in packs[q][k]] for k in ("input_ids", "labels", "position_ids")}
        lens = [n for q in ps for n in packs[q]["seq_lengths"]]
        for k in want:
            assert got[k].tolist() == [want[k]], (p, k)
        assert got["cu_seq_lens_q"].tolist() == np.concatenate([[0], np.cumsum(lens)]).tolist(), p


# ---- bad input, interruption, stale output ----


def no_output_at(out: Path) -> None:
    assert not out.with_name(out.name + ".json").exists()
    leftovers = [p for p in out.parent.rglob("*") if ".parquet" in p.name or ".tmp-" in p.name]
    assert not leftovers and not (out.exists() and any(out.iterdir()))


def set_byte(path: Path, offset: int, value: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] = value
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("checksums, value, check", [
    (True, 4, "hand.bin: sha256 differs"),  # token 0: 5 -> 4, caught by the checksum alone
    (False, 64, "token ids are >= the vocabulary size 50"),  # token 0: 5 -> 64 (uint16 ids), by the contents
])
def test_unverified_input_is_refused(hand, copy_build, tmp_path, checksums, value, check):
    prefix = copy_build(hand)
    set_byte(Path(prefix + ".bin"), 0, value)
    out = tmp_path / "out" / "hf"
    with pytest.raises(ExportError, match=check) as e:
        export(ExportConfig(prefix, "hf", str(out), checksums=checksums))
    assert "packer verify" in str(e.value)
    no_output_at(out)


def test_interrupted_export_leaves_nothing_valid(hand, tmp_path, monkeypatch):
    out = tmp_path / "out" / "hf"
    calls = []
    real_write = pq.ParquetWriter.write_table

    def interrupted(self, table, *args, **kw):
        calls.append(table.num_rows)
        if len(calls) == 2:  # the first shard is complete, the second begun
            raise KeyboardInterrupt
        return real_write(self, table, *args, **kw)

    monkeypatch.setattr(pq.ParquetWriter, "write_table", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export(ExportConfig(hand, "hf", str(out), rows_per_shard=3))
    assert len(calls) == 2
    no_output_at(out)

    # over an earlier export: that one stays whole and loadable
    monkeypatch.setattr(pq.ParquetWriter, "write_table", real_write)
    first = export(ExportConfig(hand, "hf", str(out), rows_per_shard=3))
    before = {p.name: p.read_bytes() for p in out.parent.rglob("*") if p.is_file()}
    calls.clear()
    monkeypatch.setattr(pq.ParquetWriter, "write_table", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export(ExportConfig(hand, "hf", str(out), rows_per_shard=3))
    assert {p.name: p.read_bytes() for p in out.parent.rglob("*") if p.is_file()} == before
    assert len(load(out, tmp_path)) == first["hf"]["rows"] == len(PACKS)


def test_earlier_shards_are_replaced_and_foreign_ones_refused(hand, tmp_path):
    """`data_dir=OUT` loads every parquet file there: a re-export removes the earlier export's shards it does not
    replace (its manifest lists them), and refuses to run beside parquet files no manifest accounts for."""
    out = tmp_path / "hf"
    export(ExportConfig(hand, "hf", str(out), rows_per_shard=2))  # 4 shards
    export(ExportConfig(hand, "hf", str(out), rows_per_shard=100))  # 1 shard: the other 3 go
    assert shards_of(out) == ["train-00000-of-00001.parquet"] and len(load(out, tmp_path)) == len(PACKS)
    foreign = out / "train-00007-of-00009.parquet"
    foreign.write_bytes((out / "train-00000-of-00001.parquet").read_bytes())
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(ExportError, match=r"train-00007-of-00009.parquet that this export would not replace"):
        export(ExportConfig(hand, "hf", str(out), rows_per_shard=2))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_cli(hand, tmp_path):
    out = tmp_path / "hf"
    r = CliRunner().invoke(main, ["export", hand, "--to", "hf", "--output", str(out), "--rows-per-shard", "3"])
    assert r.exit_code == 0, r.output
    assert "rows 7, tokens 49, target_tokens 22" in r.output and len(shards_of(out)) == 3
    r = CliRunner().invoke(main, ["export", hand, "--to", "hf", "--output", str(tmp_path / "s"), "--per-sample"])
    assert r.exit_code == 0 and "rows 15," in r.output, r.output
    (out / "other.parquet").write_bytes(b"")
    r = CliRunner().invoke(main, ["export", hand, "--to", "hf", "--output", str(out)])
    assert r.exit_code == 1 and "would not replace" in r.output, r.output


def test_cp_build_exports_its_samples_unpadded(real_build, tmp_path):
    """transformers/TRL have no context-parallel split over document-masked rows: a --cp-size build's rows are its
    packs as stored (no padding), and the export says so."""
    prefix = real_build("alpaca", ALPACA, seq_length=1024, on_error="skip", cp_size=4, tp_size=2)
    m = export(ExportConfig(prefix, "hf", str(tmp_path / "hf")))
    assert len(m["hf"]["warnings"]) == 1 and "exported unpadded" in m["hf"]["warnings"][0]
    ds = PackedDataset(prefix)
    rows = datasets.load_dataset("parquet", data_dir=str(tmp_path / "hf"), split="train")
    assert len(rows) == len(ds)
    for i in (0, len(ds) // 2, len(ds) - 1):
        assert rows[i]["input_ids"] == ds[i].ids.tolist() and rows[i]["seq_lengths"] == ds[i].doc_lens.tolist()
    r = CliRunner().invoke(main, ["export", prefix, "--to", "hf", "--output", str(tmp_path / "hf2")])
    assert r.exit_code == 0 and "warning: the build is padded for context parallelism (CP 4" in r.output, r.output
