"""`packer build` end to end on real data (skipped where ../shared/data is absent) and on small synthetic inputs.

Mapping samples back to records: with `--pack none` sample i is pack i, in input order, so the i-th pack holds
the i-th record that the handler accepted (the others are skipped and counted).
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import packer.build as build_mod
import packer.spill as spill_mod
from packer.build import build
from packer.config import BuildConfig, BuildError
from packer.dataset import PackedDataset
from packer.handlers import RecordError, get_handler
from packer.indexed import IndexedDataset, IndexedDatasetWriter
from packer.manifest import loss_mask_prefix, manifest_path, output_files, read_manifest
from packer.tokenize import load_tokenizer
from packer.verify import verify

ALPACA = "alpaca/stanford_alpaca_pr152_alpaca_5000.json"
BELLE = "belle/belle_train_utils_data_dev1K.json"
MOSS = "moss/moss_003_sft_samples_combined.jsonl"
DATA_FILES = ("bin", "idx", "json")


def accepted(handler: str, records: list[dict]) -> list[tuple[dict, list]]:
    """(record, segments) of every record the handler accepts, in input order."""
    h = get_handler(handler)
    out = []
    for r in records:
        with contextlib.suppress(RecordError):
            out.append((r, h(r)))
    return out


def assert_verifies(prefix: str) -> None:
    rep = verify(prefix)
    assert rep.ok, rep.errors


def check_samples_against_records(prefix: str, handler: str, data: str, tokenizer: str, helpers) -> int:
    """Every sample of a `--pack none` build: ends with EOD, fits, and its targets decode to the record's answers.
    Returns how many target runs straddle a prompt/target token boundary (see helpers.check_targets)."""
    ds = PackedDataset(prefix)
    tok, info = load_tokenizer(helpers.data_file(f"tokenizers/{tokenizer}/tokenizer.json"))
    kept = accepted(handler, helpers.read_records(data))
    m = ds.manifest
    assert len(ds) == len(kept) == m["counts"]["samples"]
    assert m["counts"]["records"] == len(helpers.read_records(data))
    assert m["counts"]["skipped"] + m["counts"]["empty_response"] == m["counts"]["records"] - len(kept)
    straddling = truncated = 0
    for (record, segments), p in zip(kept, ds, strict=True):
        assert p.doc_lens.tolist() == [p.ids.size] and p.ids.size <= ds.seq_length
        assert p.ids[-1] == info.eod_id and p.loss_mask[-1] == 1
        assert (p.ids == info.eod_id).sum() == 1
        if info.bos_id is not None:
            assert p.ids[0] == info.bos_id and p.loss_mask[0] == 0
        full = tok.encode("".join(s.text for s in segments)).ids + [info.eod_id]
        if len(full) > ds.seq_length:  # --overflow truncate: the first n-1 tokens, then the EOD
            truncated += 1
            assert p.ids.tolist() == full[: ds.seq_length - 1] + [info.eod_id]
            continue
        assert p.ids.tolist() == full
        straddling += helpers.check_targets(tok, p.ids, p.loss_mask, segments, info.eod_id)
        if handler == "alpaca":
            assert helpers.decode_exact(tok, p.ids[p.loss_mask == 1][:-1].tolist()) == record["output"]
    assert truncated == m["counts"]["truncated"]
    return straddling


# -- real data, one sample per pack: contents ------------------------------------------------------------------


@pytest.mark.parametrize("tokenizer", ["gpt2", "llama2"])
def test_alpaca_5000_targets_are_the_outputs(real_build, helpers, tokenizer):
    prefix = real_build("alpaca", ALPACA, tokenizer, 2048, "none", on_error="skip")
    assert check_samples_against_records(prefix, "alpaca", ALPACA, tokenizer, helpers) == 0
    m = read_manifest(prefix)
    # two records have an empty output: skipped and counted by --empty-response skip, not rejects
    assert (m["counts"]["skipped"], m["counts"]["empty_response"]) == (0, 2)
    assert not Path(f"{prefix}.rejects.jsonl").exists()
    assert_verifies(prefix)


@pytest.mark.parametrize("tokenizer", ["gpt2", "llama2"])
def test_belle_targets_are_the_outputs(real_build, helpers, tokenizer):
    prefix = real_build("belle", BELLE, tokenizer, 2048, "none")
    straddling = check_samples_against_records(prefix, "belle", BELLE, tokenizer, helpers)
    # the last-character rule may pull a prompt newline into the first answer token (answers starting "\n")
    assert straddling <= 5
    assert_verifies(prefix)


def test_moss_8192(real_build, helpers):
    prefix = real_build("moss", MOSS, "gpt2", 8192, "none", workers=2)
    assert check_samples_against_records(prefix, "moss", MOSS, "gpt2", helpers) == 0
    assert_verifies(prefix)


def test_moss_2048_truncates(real_build, helpers):
    prefix = real_build("moss", MOSS, "llama2", 2048, "none", workers=2)
    check_samples_against_records(prefix, "moss", MOSS, "llama2", helpers)
    m = read_manifest(prefix)
    assert m["counts"]["truncated"] > 100
    assert m["counts"]["samples"] + m["counts"]["dropped_no_target"] == 1120
    assert_verifies(prefix)


# -- real data, packed ---------------------------------------------------------------------------------------


def samples_of(prefix: str) -> list[tuple[bytes, bytes]]:
    tok, mask = IndexedDataset(prefix), IndexedDataset(loss_mask_prefix(prefix))
    return sorted((tok.get(i).tobytes(), mask.get(i).tobytes()) for i in range(len(tok)))


@pytest.mark.parametrize("seq_length", [2048, 4096])
def test_alpaca_5000_packs_near_the_bound(real_build, seq_length):
    prefix = real_build("alpaca", ALPACA, "gpt2", seq_length, "bfd", on_error="skip")
    m = read_manifest(prefix)
    bound = -(-m["counts"]["tokens"] // seq_length)
    assert m["packing"]["lower_bound"] == bound
    assert bound <= m["counts"]["packs"] <= bound + 1
    ds = PackedDataset(prefix)
    assert len(ds) == m["counts"]["packs"]
    for p in ds:
        assert p.ids.size == p.doc_lens.sum() <= seq_length
        ends = np.cumsum(p.doc_lens) - 1
        assert (p.ids[ends] == ds.eod_id).all() and (p.loss_mask[ends] == 1).all()
        assert (p.ids == ds.eod_id).sum() == p.doc_lens.size  # EODs only at boundaries
        assert (p.loss_mask[ends[:-1] + 1] == 0).all()  # every sample starts with prompt: no target crosses
    assert_verifies(prefix)
    # packing moves samples, never changes them: the same samples as the unpacked build
    assert samples_of(prefix) == samples_of(real_build("alpaca", ALPACA, "gpt2", 2048, "none", on_error="skip"))


# -- overflow policies -------------------------------------------------------------------------------------------

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog", "and", "keeps", "running", "far", "away"]


def alpaca_records(n: int, seed: int = 0, long_every: int = 4) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        k = 200 if i % long_every == 0 else int(rng.integers(1, 20))
        out.append({"instruction": f"Task {i}: " + " ".join(rng.choice(WORDS, 5)), "input": "",
                    "output": " ".join(rng.choice(WORDS, k))})
    return out


def small_build(tmp_path: Path, tokenizer: Path, records: list[dict] | None = None, name: str = "o", **kw):
    if "inputs" not in kw:
        inp = tmp_path / f"{name}.jsonl"
        with open(inp, "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        kw["inputs"] = (str(inp),)
    kw.setdefault("handler", "alpaca")
    kw.setdefault("seq_length", 128)
    config = BuildConfig(tokenizer=str(tokenizer), output_prefix=str(tmp_path / "out" / name), **kw)
    return build(config, progress=False)


def encoded(records: list[dict], tokenizer: Path):
    from packer.tokenize import SampleEncoder

    tok, info = load_tokenizer(tokenizer)
    h = get_handler("alpaca")
    return SampleEncoder(tok, info).encode_batch([h(r) for r in records])


def full_samples(records: list[dict], tokenizer: Path) -> list[list[int]]:
    return [s.ids.tolist() for s in encoded(records, tokenizer)]


@pytest.mark.parametrize("policy", ["truncate", "split", "drop"])
def test_overflow_policies(tmp_path, gpt2_tokenizer, policy):
    records = alpaca_records(40)
    full = full_samples(records, gpt2_tokenizer)
    n = 128
    long = [i for i, ids in enumerate(full) if len(ids) > n]
    assert len(long) == 10
    res = small_build(tmp_path, gpt2_tokenizer, records, overflow=policy, pack="none", seq_length=n)
    c = res.manifest["counts"]
    assert res.manifest["config"]["overflow_effective"] == policy
    ds = PackedDataset(res.prefix)
    got = [p.ids.tolist() for p in ds]
    assert all(len(g) <= n for g in got)
    if policy == "truncate":
        assert c["truncated"] == 10 and c["samples"] == 40
        assert got == [ids if len(ids) <= n else ids[: n - 1] + [ids[-1]] for ids in full]
    elif policy == "drop":
        assert c["dropped"] == 10 and c["samples"] == 30
        assert got == [ids for ids in full if len(ids) <= n]
    else:
        chunks = [[ids[a : a + n] for a in range(0, len(ids), n)] for ids in full]
        assert c["split"] == 10
        assert got == [ch for cs in chunks for ch in cs]  # no chunk here lacks a target
        assert c["unterminated"] == sum(len(cs) - 1 for cs in chunks)
        assert c["samples"] == len(got)
    assert c["packs"] == len(ds)
    assert_verifies(res.prefix)


@pytest.mark.parametrize("algorithm", ["bfd", "ffd", "nf"])
def test_every_algorithm_writes_the_same_samples(tmp_path, gpt2_tokenizer, helpers, algorithm):
    records = helpers.read_records(ALPACA)[:1000]
    none = small_build(tmp_path, gpt2_tokenizer, records, name="none", seq_length=1024, pack="none", on_error="skip")
    res = small_build(tmp_path, gpt2_tokenizer, records, name=algorithm, seq_length=1024, pack=algorithm,
                      on_error="skip")
    assert samples_of(res.prefix) == samples_of(none.prefix)
    assert res.manifest["packing"]["algorithm"] == algorithm
    assert res.num_packs >= res.lower_bound
    assert_verifies(res.prefix)


def test_split_drops_chunks_without_targets(tmp_path, gpt2_tokenizer):
    records = [{"instruction": "word " * 200, "input": "", "output": "the answer is here"}]
    res = small_build(tmp_path, gpt2_tokenizer, records, seq_length=64, overflow="split", pack="none")
    c = res.manifest["counts"]
    full = encoded(records, gpt2_tokenizer)[0]
    chunks = [(full.ids[a : a + 64].tolist(), full.loss_mask[a : a + 64]) for a in range(0, full.ids.size, 64)]
    kept = [ids for ids, mask in chunks if mask.any()]
    assert 1 <= len(kept) < len(chunks)
    assert c["split"] == 1
    assert c["dropped_no_target"] == len(chunks) - len(kept)
    assert c["unterminated"] == len(kept) - 1
    assert [p.ids.tolist() for p in PackedDataset(res.prefix)] == kept
    assert_verifies(res.prefix)


def test_overflow_error_names_the_record(tmp_path, gpt2_tokenizer):
    records = alpaca_records(8)
    with pytest.raises(BuildError, match=r"o\.jsonl: record 1 \(line 1\): sample is \d+ tokens.*--overflow"):
        small_build(tmp_path, gpt2_tokenizer, records, overflow="error")
    assert not manifest_path(tmp_path / "out" / "o").exists()


def test_truncation_without_targets_is_dropped(tmp_path, gpt2_tokenizer):
    records = [{"instruction": "word " * 300, "input": "", "output": "yes"},
               {"instruction": "short", "input": "", "output": "no"}]
    res = small_build(tmp_path, gpt2_tokenizer, records, seq_length=64)
    c = res.manifest["counts"]
    assert (c["dropped_no_target"], c["truncated"], c["samples"]) == (1, 0, 1)


def test_nothing_left_is_a_clear_error(tmp_path, gpt2_tokenizer):
    records = [{"instruction": "x", "output": ""}, {"instruction": "y"}]
    with pytest.raises(BuildError, match="no samples to write: 2 records read, 2 skipped"):
        small_build(tmp_path, gpt2_tokenizer, records, on_error="skip", empty_response="fail")


# -- inputs: map-keys, bad records, parquet --------------------------------------------------------------------


def test_map_keys_on_a_renamed_copy(tmp_path, gpt2_tokenizer, helpers):
    records = helpers.read_records(ALPACA)[:300]
    renamed = [{"instruction": r["instruction"], "input": r["input"], "response": r["output"]} for r in records]
    a = small_build(tmp_path, gpt2_tokenizer, records, name="a", seq_length=1024, on_error="skip")
    b = small_build(tmp_path, gpt2_tokenizer, renamed, name="b", seq_length=1024, on_error="skip",
                    map_keys={"output": "response"})
    for pa_, pb in zip(output_files(a.prefix), output_files(b.prefix), strict=True):
        assert pa_.read_bytes() == pb.read_bytes()
    with pytest.raises(BuildError, match=r"record 1 \(line 1\): field 'output'.*--map-keys"):
        small_build(tmp_path, gpt2_tokenizer, renamed, name="c", seq_length=1024)


def bad_jsonl(path: Path) -> Path:
    good = {"instruction": "Say hi", "input": "", "output": "hi"}
    lines = [json.dumps(good), "", json.dumps(good), '{"instruction": "broken",', json.dumps(good),
             json.dumps({"instruction": "no output"}), json.dumps({**good, "output": 42}), json.dumps(good)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path  # bad: record 3 (line 4) JSON, record 5 (line 6) missing output, record 6 (line 7) int output


@pytest.mark.parametrize(("first_bad", "pattern"), [
    (None, r"bad\.jsonl: record 3 \(line 4\): field '<line>': invalid JSON"),
    ("missing", r"bad\.jsonl: record 5 \(line 6\): field 'output'.*no 'output' column"),
    ("wrong_type", r"bad\.jsonl: record 6 \(line 7\): field 'output'.*must be a string, got int"),
])
def test_bad_records_fail(tmp_path, gpt2_tokenizer, first_bad, pattern):
    path = bad_jsonl(tmp_path / "bad.jsonl")
    if first_bad:  # remove the earlier bad lines so that this one is the first error
        lines = path.read_text().split("\n")
        lines[3] = lines[0]
        if first_bad == "wrong_type":
            lines[5] = lines[0]
        path.write_text("\n".join(lines))
    with pytest.raises(BuildError, match=pattern) as e:
        small_build(tmp_path, gpt2_tokenizer, inputs=(str(path),))
    assert "--on-error skip" in str(e.value)
    assert not any(p.name.startswith("o.") for p in (tmp_path / "out").iterdir())


def test_bad_record_in_json_array_names_record(tmp_path, gpt2_tokenizer, helpers):
    p = helpers.write_json(tmp_path / "arr.json", [{"instruction": "a", "output": "b"}, {"instruction": "a"}])
    with pytest.raises(BuildError, match=r"arr\.json: record 2 \(line 1\): field 'output'"):
        small_build(tmp_path, gpt2_tokenizer, inputs=(str(p),))


def test_bad_records_skip(tmp_path, gpt2_tokenizer):
    path = bad_jsonl(tmp_path / "bad.jsonl")
    res = small_build(tmp_path, gpt2_tokenizer, inputs=(str(path),), on_error="skip")
    c = res.manifest["counts"]
    assert (c["records"], c["skipped"], c["samples"]) == (7, 3, 4)
    rejects = [json.loads(x) for x in Path(f"{res.prefix}.rejects.jsonl").read_text().splitlines()]
    assert [(r["source"], r["record"], r["line"], r["field"]) for r in rejects] == [
        (str(path), 3, 4, "<line>"), (str(path), 5, 6, "output"), (str(path), 6, 7, "output")]
    assert rejects[1]["data"] == {"instruction": "no output"}
    assert rejects[0]["data"].startswith('{"instruction": "broken"')
    assert_verifies(res.prefix)
    # a later clean build to the same prefix removes the stale rejects file
    clean = tmp_path / "clean.jsonl"
    clean.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n")
    small_build(tmp_path, gpt2_tokenizer, inputs=(str(clean),))
    assert not Path(f"{res.prefix}.rejects.jsonl").exists()


def test_parquet_equals_jsonl(tmp_path, gpt2_tokenizer, helpers):
    records = [r for r in helpers.read_records(ALPACA)[:400] if r["output"].strip()]
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "a.parquet", row_group_size=128)
    a = small_build(tmp_path, gpt2_tokenizer, records, name="a", seq_length=2048)
    b = small_build(tmp_path, gpt2_tokenizer, name="b", seq_length=2048, inputs=(str(tmp_path / "a.parquet"),))
    for fa, fb in zip(output_files(a.prefix), output_files(b.prefix), strict=True):
        assert fa.read_bytes() == fb.read_bytes(), fa.name
    assert a.manifest["counts"] == b.manifest["counts"]


# -- determinism ---------------------------------------------------------------------------------------------


def test_identical_runs_identical_bytes(tmp_path, gpt2_tokenizer, helpers):
    records = helpers.read_records(ALPACA)[:1500]
    runs = [small_build(tmp_path, gpt2_tokenizer, records, name=n, seq_length=2048, on_error="skip", **kw)
            for n, kw in (("a", {}), ("b", {}), ("c", {"workers": 2, "batch_size": 100}))]
    for other in runs[1:]:
        for fa, fb in zip(output_files(runs[0].prefix), output_files(other.prefix), strict=True):
            assert fa.read_bytes() == fb.read_bytes(), (fa.name, other.prefix)
        ma, mb = runs[0].manifest, other.manifest
        assert ma["counts"] == mb["counts"] and ma["packing"] == mb["packing"] and ma["tokenizer"] == mb["tokenizer"]
        assert [v["sha256"] for v in ma["files"].values()] == [v["sha256"] for v in mb["files"].values()]


def test_bounded_gather_writes_the_same_bytes(tmp_path, gpt2_tokenizer, helpers, monkeypatch):
    """Small gather groups, each read from the spill on its own (a corpus of many groups), change nothing."""
    records = helpers.read_records(ALPACA)[:1500]
    a = small_build(tmp_path, gpt2_tokenizer, records, name="a", seq_length=2048, on_error="skip")
    gathers = []
    monkeypatch.setattr(spill_mod.SpillReader, "gather", lambda self, *args, f=spill_mod.SpillReader.gather: (
        gathers.append(1), f(self, *args))[1])
    write = build_mod.write_global
    monkeypatch.setattr(build_mod, "write_global", lambda *a, **k: write(*a, **k, chunk_tokens=3000,
                                                                           chunk_samples=7))
    b = small_build(tmp_path, gpt2_tokenizer, records, name="b", seq_length=2048, on_error="skip")
    assert len(gathers) >= b.num_packs // 2  # groups of a few packs
    for fa, fb in zip(output_files(a.prefix), output_files(b.prefix), strict=True):
        assert fa.read_bytes() == fb.read_bytes(), fa.name


# -- interrupted builds ------------------------------------------------------------------------------------------


def _boom(*args, **kwargs):
    raise KeyboardInterrupt


@pytest.mark.parametrize("where", ["pack", "finalize", "commit"])
def test_interrupted_build_leaves_no_file_set(tmp_path, gpt2_tokenizer, monkeypatch, where):
    records = alpaca_records(30, long_every=1000)
    if where == "pack":
        monkeypatch.setattr(build_mod, "pack", _boom)
    elif where == "finalize":
        monkeypatch.setattr(IndexedDatasetWriter, "finalize", _boom)
    else:  # the loss mask is committed first; fail on the token files, after it
        real_commit = IndexedDatasetWriter.commit

        def commit(self):
            if not self.prefix.endswith("_loss_mask"):
                raise KeyboardInterrupt
            real_commit(self)

        monkeypatch.setattr(IndexedDatasetWriter, "commit", commit)
    with pytest.raises(KeyboardInterrupt):
        small_build(tmp_path, gpt2_tokenizer, records)
    left = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert "o.idx" not in left  # the set's key goes in last: without it no reader takes the set as whole
    assert where == "commit" or ("o.json" not in left and "o.bin" not in left)
    assert not [n for n in left if ".tmp" in n or n.startswith(".packer")], left
    assert not verify(tmp_path / "out" / "o").ok


@pytest.mark.parametrize("where", ["pack", "finalize"])
def test_failed_rebuild_never_leaves_a_verifying_mix(tmp_path, gpt2_tokenizer, monkeypatch, where):
    first = small_build(tmp_path, gpt2_tokenizer, alpaca_records(30, seed=1, long_every=1000))
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    monkeypatch.setattr(*((build_mod, "pack", _boom) if where == "pack" else (IndexedDatasetWriter, "finalize", _boom)))
    with pytest.raises(KeyboardInterrupt):
        small_build(tmp_path, gpt2_tokenizer, alpaca_records(50, seed=2, long_every=1000))
    after = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    assert not [n for n in after if ".tmp" in n or n.startswith(".packer")], list(after)
    # either the earlier build is untouched (and still verifies) or what is left does not verify
    assert after == before or not verify(first.prefix).ok
    if after != before:  # docs/format.md: the stale manifest goes before any data file is replaced
        assert not manifest_path(first.prefix).exists()
    assert after["o.idx"] == before["o.idx"]  # the earlier data files themselves are not touched


def test_rebuild_replaces_a_previous_build(tmp_path, gpt2_tokenizer):
    small_build(tmp_path, gpt2_tokenizer, alpaca_records(30, seed=1))
    second = small_build(tmp_path, gpt2_tokenizer, alpaca_records(50, seed=2))
    assert read_manifest(second.prefix)["counts"]["records"] == 50
    assert_verifies(second.prefix)
    assert sorted(os.listdir(tmp_path / "out")) == ["o.bin", "o.idx", "o.json", "o_loss_mask.bin", "o_loss_mask.idx"]


def test_config_validation(tmp_path, gpt2_tokenizer):
    for kw, pattern in (({"seq_length": 1}, "--seq-length"), ({"overflow": "wrap"}, "--overflow"),
                        ({"pack": "magic"}, "--pack"), ({"on_error": "ignore"}, "--on-error"),
                        ({"workers": 0}, "--workers"), ({"inputs": ()}, "no input"),
                        ({"template": "nope"}, "no template 'nope'")):
        with pytest.raises(BuildError, match=pattern):
            small_build(tmp_path, gpt2_tokenizer, [{"instruction": "a", "output": "b"}], **kw)


def test_llama2_bos_once_with_bos_text_and_train_on_prompt(tmp_path, llama2_tokenizer, helpers):
    """A system prompt written with "<s>" must not double the BOS, nor make it a target."""
    records = [r for r in helpers.read_records(ALPACA)[:200] if r["output"].strip()]
    res = small_build(tmp_path, llama2_tokenizer, records, seq_length=1024, system="<s>Be brief.",
                      train_on_prompt=True, pack="bfd")
    ds = PackedDataset(res.prefix)
    assert ds.bos_id == 1
    n = 0
    for p in ds:
        for a, b in zip(np.cumsum(p.doc_lens) - p.doc_lens, np.cumsum(p.doc_lens), strict=True):
            ids, mask = p.ids[a:b], p.loss_mask[a:b]
            assert ids[0] == 1 and (ids == 1).sum() == 1 and mask[0] == 0
            assert mask[1:].all()  # --train-on-prompt: everything else is a target
            assert ids[-1] == ds.eod_id and (ids == ds.eod_id).sum() == 1
            n += 1
    assert n == len(records)
    assert_verifies(res.prefix)


def test_lone_surrogate_is_a_record_error(tmp_path, gpt2_tokenizer):
    """A JSON escape of half a surrogate pair parses, but no tokenizer takes it: name the record, or skip it."""
    p = tmp_path / "s.jsonl"
    p.write_text('{"text": "ok one"}\n{"text": "bad \\ud800 half"}\n{"text": "ok two"}\n', encoding="utf-8")
    cfg = dict(handler="text", inputs=(str(p),), tokenizer=str(gpt2_tokenizer), seq_length=64)
    with pytest.raises(BuildError, match=r"s\.jsonl: record 2 \(line 2\): .*surrogate"):
        build(BuildConfig(**cfg, output_prefix=str(tmp_path / "f")), progress=False)
    r = build(BuildConfig(**cfg, output_prefix=str(tmp_path / "k"), on_error="skip"), progress=False)
    assert (r.counters.samples, r.counters.skipped) == (2, 1)
    (reject,) = [json.loads(line) for line in (tmp_path / "k.rejects.jsonl").read_text(encoding="utf-8").splitlines()]
    assert reject["record"] == 2 and reject["data"] == {"text": "bad \ud800 half"}


def test_padding_saved_in_tokenizer_json_is_ignored(tmp_path, gpt2_tokenizer, helpers):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(gpt2_tokenizer))
    tok.enable_padding(pad_id=50256, pad_token="<|endoftext|>")
    tok.enable_truncation(8)
    tok.save(str(tmp_path / "padded.json"))
    records = helpers.read_records(ALPACA)[:200]
    for handler in ("alpaca", "text"):
        kw = dict(seq_length=2048, on_error="skip", handler=handler)
        if handler == "text":
            kw["json_keys"] = ("output",)
        a = small_build(tmp_path, gpt2_tokenizer, records, name=f"a{handler}", **kw)
        b = small_build(tmp_path, str(tmp_path / "padded.json"), records, name=f"b{handler}", **kw)
        for fa, fb in zip(output_files(a.prefix), output_files(b.prefix), strict=True):
            if fa.suffix != ".json":
                assert fa.read_bytes() == fb.read_bytes(), fa.name


# -- the EOD never lies about a boundary ---------------------------------------------------------------------

ALPACA_ZH = "alpaca/llamafactory_alpaca_zh_demo.json"


def test_chat_tokenizer_eod_ends_documents_and_the_scan_agrees(real_build, helpers, tmp_path):
    """Qwen-style: eos_token <|im_end|> is the chatml turn terminator; the EOD is <|endoftext|>, so an EOD
    scan finds exactly the index's boundaries (1,034 false ones in 50 packs before)."""
    prefix = real_build("alpaca", ALPACA_ZH, tokenizer="qwen2.5-instruct", template="chatml")
    m = read_manifest(prefix)
    assert (m["eod"]["token"], m["eod"]["source"]) == ("<|endoftext|>", "document-end token")
    assert m["eod"]["interior"] == 0 and m["eod_scan"] == {"agrees": m["counts"]["packs"], "packs": m["counts"]["packs"]}
    rep = verify(prefix)
    assert rep.ok and rep.stats["eod_scan"]["agrees"] == m["counts"]["packs"] and not rep.warnings


def test_forced_turn_terminator_eod_is_reported_with_its_cause(real_build, tmp_path):
    prefix = real_build("alpaca", ALPACA_ZH, tokenizer="qwen2.5-instruct", template="chatml", eod_token="<|im_end|>")
    m = read_manifest(prefix)
    ds = PackedDataset(prefix)
    # chatml ends every turn "<|im_end|>\n", the last one too (as Qwen's template does): the user's and the
    # assistant's <|im_end|> are interior, and the EOD follows the final "\n"
    assert m["eod"]["interior"] == 2 * m["counts"]["samples"]
    assert m["eod"]["interior_cause"].startswith("template text: the alpaca template writes '<|im_end|>'")
    assert all(int((p.ids == ds.eod_id).sum()) == 3 * p.doc_lens.size for p in ds)
    assert m["eod_scan"]["agrees"] == 0
    rep = verify(prefix)
    assert rep.ok and "template text" in rep.warnings[0]
    from packer.export import ExportConfig, export

    section = export(ExportConfig(prefix, "mindspeed", str(tmp_path / "ms"), neat_pack=False))["mindspeed"]
    assert section["convention"] == "neat-pack" and "EOD scan disagrees" in section["warnings"][0]


def test_claimed_scan_agreement_is_checked(real_build, copy_build):
    bad = copy_build(real_build("alpaca", ALPACA_ZH, tokenizer="qwen2.5-instruct", template="chatml",
                                eod_token="<|im_end|>"))
    m = read_manifest(bad)
    m["eod_scan"]["agrees"] = m["eod_scan"]["packs"]  # a build that claims agreement it does not have
    manifest_path(bad).write_text(json.dumps(m))
    assert any("manifest eod_scan claims" in e for e in verify(bad).errors)


def test_summary_names_tokenizer_eod_bos_and_template(tmp_path, gpt2_tokenizer, helpers):
    from click.testing import CliRunner

    from packer.cli import main

    out = CliRunner().invoke(main, ["build", "--handler", "alpaca", "--tokenizer", str(gpt2_tokenizer),
                                    "--template", "chatml", "--output-prefix", str(tmp_path / "o"), "-q"])
    assert out.exit_code == 0, out.output
    assert "EOD '<|endoftext|>' (id 50256, well-known)  BOS none  handler alpaca, template chatml" in out.output
    assert "EOD scan agrees with the index on" in out.output
