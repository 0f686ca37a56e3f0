"""Streaming, workers, shards and merge: the same samples, whatever the way the build runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from packer.build import build
from packer.cli import main
from packer.config import BuildConfig, BuildError
from packer.dataset import PackedDataset
from packer.merge import MergeError, merge
from packer.verify import verify

ASSETS = Path(__file__).resolve().parents[2] / "packer" / "assets"
DEMO = str(ASSETS / "demo_alpaca.json")
GPT2 = str(ASSETS / "gpt2")


def config(tmp_path: Path, name: str, **kw) -> BuildConfig:
    base = dict(handler="alpaca", inputs=(DEMO,), tokenizer=GPT2, seq_length=1024,
                output_prefix=str(tmp_path / name))
    return BuildConfig(**(base | kw))


def samples(prefix: str) -> list[bytes]:
    """Every sample (ids + mask bytes) of a build, in no particular order."""
    ds = PackedDataset(prefix)
    out = []
    for pack in ds:
        ends = np.cumsum(pack.doc_lens)
        for n, e in zip(pack.doc_lens.tolist(), ends.tolist(), strict=True):
            out.append(pack.ids[e - n : e].tobytes() + b"|" + pack.loss_mask[e - n : e].tobytes())
    return sorted(out)


def data_bytes(prefix: str) -> list[bytes]:
    return [Path(prefix + suffix).read_bytes() for suffix in (".bin", ".idx", "_loss_mask.bin", "_loss_mask.idx")]


@pytest.fixture(scope="module")
def jsonl_demo(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("demo") / "demo.jsonl"
    records = json.loads(Path(DEMO).read_text(encoding="utf-8"))
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


def test_streaming_matches_global(tmp_path: Path, jsonl_demo: str) -> None:
    g = build(config(tmp_path, "global", inputs=(jsonl_demo,)), progress=False)
    s = build(config(tmp_path, "stream", inputs=(jsonl_demo,), streaming=True, pack_window=(64, False)),
              progress=False)
    assert verify(s.prefix).ok
    assert samples(g.prefix) == samples(s.prefix), "same samples, token for token"
    assert s.num_packs <= g.num_packs * 1.005 + 1
    assert s.manifest["packing"]["algorithm"].startswith("window-bfd")


def test_workers_do_not_change_bytes(tmp_path: Path, jsonl_demo: str) -> None:
    one = build(config(tmp_path, "w1", inputs=(jsonl_demo,), batch_size=37), progress=False)
    two = build(config(tmp_path, "w2", inputs=(jsonl_demo,), batch_size=37, workers=2), progress=False)
    assert data_bytes(one.prefix) == data_bytes(two.prefix)
    s1 = build(config(tmp_path, "s1", inputs=(jsonl_demo,), streaming=True, batch_size=37), progress=False)
    s2 = build(config(tmp_path, "s2", inputs=(jsonl_demo,), streaming=True, batch_size=37, workers=2),
               progress=False)
    assert data_bytes(s1.prefix) == data_bytes(s2.prefix)


def test_shards_and_merge_hold_every_sample_once(tmp_path: Path) -> None:
    whole = build(config(tmp_path, "whole"), progress=False)
    shards = [build(config(tmp_path, "part", num_shards=3, shard_index=i), progress=False).prefix for i in range(3)]
    assert shards[1].endswith("part_shard00001_of_00003")
    counts = [PackedDataset(p).manifest["counts"]["samples"] for p in shards]
    assert sum(counts) == whole.counters.samples and min(counts) > 0
    merged = merge(str(tmp_path / "merged"), shards)
    rep = verify(tmp_path / "merged")
    assert rep.ok, rep.errors
    assert samples(str(tmp_path / "merged")) == samples(whole.prefix)
    assert merged["counts"]["packs"] == sum(PackedDataset(p).manifest["counts"]["packs"] for p in shards)


def test_merge_keeps_pack_boundaries(tmp_path: Path, megatron_indexed) -> None:
    a = build(config(tmp_path, "a"), progress=False).prefix
    b = build(config(tmp_path, "b", seq_length=1024, pack="none"), progress=False).prefix
    merge(str(tmp_path / "ab"), [a, b])
    ab, da, db = PackedDataset(tmp_path / "ab"), PackedDataset(a), PackedDataset(b)
    assert len(ab) == len(da) + len(db)
    for i in (0, len(da) - 1, len(da), len(ab) - 1):
        src = da[i] if i < len(da) else db[i - len(da)]
        got = ab[i]
        assert np.array_equal(got.ids, src.ids) and np.array_equal(got.doc_lens, src.doc_lens)
        assert np.array_equal(got.loss_mask, src.loss_mask)
    m = megatron_indexed(str(tmp_path / "ab"))
    assert np.array_equal(m.document_indices, ab.tokens.document_indices)


def test_merge_rejects_mismatched_builds(tmp_path: Path) -> None:
    a = build(config(tmp_path, "a"), progress=False).prefix
    b = build(config(tmp_path, "b", seq_length=512), progress=False).prefix
    with pytest.raises(MergeError, match="seq_length"):
        merge(str(tmp_path / "ab"), [a, b])
    with pytest.raises(MergeError, match="also an input"):
        merge(a, [a])
    assert not Path(tmp_path / "ab.idx").exists()


def test_shards_from_environment(tmp_path: Path, monkeypatch) -> None:
    runner = CliRunner()
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "2")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "1")
    r = runner.invoke(main, ["build", "--handler", "alpaca", "--output-prefix", str(tmp_path / "s"), "-q"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "s_shard00001_of_00002.idx").exists()
    monkeypatch.delenv("SLURM_ARRAY_TASK_COUNT")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    r = runner.invoke(main, ["build", "--handler", "alpaca", "--output-prefix", str(tmp_path / "t"), "-q"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "t_shard00003_of_00004.idx").exists()
    r = runner.invoke(main, ["build", "--handler", "alpaca", "--output-prefix", str(tmp_path / "u"), "-q",
                             "--num-shards", "2"])
    assert r.exit_code != 0 and "together" in r.output


def test_cli_merge_and_streaming(tmp_path: Path, jsonl_demo: str) -> None:
    runner = CliRunner()
    for i in range(2):
        r = runner.invoke(main, ["build", "--handler", "alpaca", "--input", jsonl_demo, "--streaming",
                                 "--pack-window", "100", "--num-shards", "2", "--shard-index", str(i),
                                 "--output-prefix", str(tmp_path / "p"), "-q"])
        assert r.exit_code == 0, r.output
    r = runner.invoke(main, ["merge", str(tmp_path / "m"), str(tmp_path / "p_shard00000_of_00002"),
                             str(tmp_path / "p_shard00001_of_00002"), "-q"])
    assert r.exit_code == 0, r.output
    assert runner.invoke(main, ["verify", str(tmp_path / "m")]).exit_code == 0


def test_streaming_glob_and_params(tmp_path: Path, jsonl_demo: str) -> None:
    lines = Path(jsonl_demo).read_text(encoding="utf-8").splitlines(keepends=True)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text("".join(lines[:200]), encoding="utf-8")
    (tmp_path / "in" / "b.jsonl").write_text("".join(lines[200:]), encoding="utf-8")
    r = build(config(tmp_path, "g", inputs=(str(tmp_path / "in" / "*.jsonl"),), streaming=True), progress=False)
    assert r.counters.records == len(lines)
    params = tmp_path / "params.json"
    params.write_text(json.dumps({"field": "data"}), encoding="utf-8")
    with pytest.raises(BuildError, match="applies to --hf-dataset only"):  # never silently ignored
        build(config(tmp_path, "p", inputs=(str(tmp_path / "in" / "*.jsonl"),), streaming=True,
                     hf_datasets_params=str(params)), progress=False)
    with pytest.raises(Exception, match="matches no file"):
        build(config(tmp_path, "x", inputs=(str(tmp_path / "none" / "*.jsonl"),), streaming=True), progress=False)


SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"


@pytest.mark.parametrize(("handler", "relative", "seq"), [
    ("moss", "moss/moss_003_sft_samples_combined.jsonl", 8192),  # nested `chat`: datasets stores it as Json
    ("belle", "belle/belle_train_utils_data_dev1K.json", 1024),  # JSON Lines under a .json name
])
def test_streaming_real_data_matches_global(tmp_path: Path, handler: str, relative: str, seq: int) -> None:
    path = SHARED / relative
    if not path.exists():
        pytest.skip(f"{path} not found (shared data lives next to the repo)")
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)[:150]
    subset = tmp_path / ("subset" + path.suffix)
    subset.write_text("".join(lines), encoding="utf-8")
    kw = dict(handler=handler, inputs=(str(subset),), seq_length=seq)
    g = build(config(tmp_path, "g", **kw), progress=False)
    s = build(config(tmp_path, "s", streaming=True, **kw), progress=False)
    assert s.counters.records == g.counters.records == 150 and s.counters.skipped == 0
    assert samples(s.prefix) == samples(g.prefix)
    sh = [build(config(tmp_path, "sh", streaming=True, num_shards=2, shard_index=i, **kw), progress=False).prefix
          for i in range(2)]
    merge(str(tmp_path / "m"), sh)
    assert samples(str(tmp_path / "m")) == samples(g.prefix)


def write_lines(path: Path, records: list) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return str(path)


GOOD = {"instruction": "Say hi.", "input": "", "output": "Hi!"}


def test_streaming_errors_name_the_file_and_its_own_record_number(tmp_path: Path) -> None:
    a = write_lines(tmp_path / "a.jsonl", [GOOD] * 5)
    b = write_lines(tmp_path / "b.jsonl", [GOOD, GOOD, {"instruction": "x", "input": ""}, GOOD])
    from packer.config import BuildError

    with pytest.raises(BuildError, match=r"b\.jsonl: record 3 \(line 3\): field 'output'"):
        build(config(tmp_path, "e", inputs=(a, b), streaming=True), progress=False)


def test_streaming_without_the_handlers_columns_is_a_record_error(tmp_path: Path) -> None:
    from packer.config import BuildError

    path = write_lines(tmp_path / "t.jsonl", [{"body": "some text"}] * 3)
    with pytest.raises(BuildError, match=r"no 'text' column \(columns: 'body'\)"):
        build(config(tmp_path, "t", handler="text", inputs=(path,), streaming=True), progress=False)


def test_bad_options_are_build_errors(tmp_path: Path) -> None:
    from packer.config import BuildError

    with pytest.raises(BuildError, match="pack-window"):
        build(config(tmp_path, "o", streaming=True, pack_window=(1, False)), progress=False)
    with pytest.raises(BuildError, match="two packs"):
        build(config(tmp_path, "o", streaming=True, pack_window=(1000, True)), progress=False)
    with pytest.raises(BuildError, match="batch-size"):
        build(config(tmp_path, "o", batch_size=0), progress=False)


def test_all_records_skipped_keeps_the_rejects(tmp_path: Path) -> None:
    from packer.config import BuildError

    path = write_lines(tmp_path / "bad.jsonl", [{"instruction": "x"}, "{not json", {"output": 3}])
    with pytest.raises(BuildError, match="rejects.jsonl"):
        build(config(tmp_path, "allbad", inputs=(path,), on_error="skip"), progress=False)
    rejects = (tmp_path / "allbad.rejects.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(rejects) == 3 and not (tmp_path / "allbad.idx").exists()


def test_one_line_wrapper_and_globs(tmp_path: Path) -> None:
    (tmp_path / "w.json").write_text(json.dumps({"data": [GOOD, GOOD]}), encoding="utf-8")
    assert build(config(tmp_path, "w", inputs=(str(tmp_path / "w.json"),)), progress=False).counters.records == 2
    write_lines(tmp_path / "g1.jsonl", [GOOD])
    write_lines(tmp_path / "g2.jsonl", [GOOD] * 2)
    r = build(config(tmp_path, "g", inputs=(str(tmp_path / "g*.jsonl"),)), progress=False)
    assert r.counters.records == 3


def test_merge_rejects_duplicates_and_partial_shard_sets(tmp_path: Path) -> None:
    parts = [build(config(tmp_path, "p", num_shards=3, shard_index=i), progress=False).prefix for i in range(3)]
    with pytest.raises(MergeError, match="given twice"):
        merge(str(tmp_path / "m"), [parts[0], parts[0] + ".json", parts[1], parts[2]])
    with pytest.raises(MergeError, match=r"shards \[2\] are missing"):
        merge(str(tmp_path / "m"), parts[:2])
    m = merge(str(tmp_path / "m"), parts[:2], allow_partial=True)
    assert "num_shards" not in m["config"]
    m = merge(str(tmp_path / "m2"), [p + ".json" for p in parts])  # what a shell glob on *.json gives
    assert m["counts"]["records"] == 500


def test_slurm_array_with_a_step(tmp_path: Path, monkeypatch) -> None:
    for k, v in {"SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_ID": "8", "SLURM_ARRAY_TASK_MIN": "0",
                 "SLURM_ARRAY_TASK_STEP": "4"}.items():
        monkeypatch.setenv(k, v)
    r = CliRunner().invoke(main, ["build", "--handler", "alpaca", "--output-prefix", str(tmp_path / "s"), "-q"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "s_shard00002_of_00004.idx").exists()


def test_streaming_skips_unparsable_lines_like_the_global_build(tmp_path: Path) -> None:
    from packer.config import BuildError

    path = write_lines(tmp_path / "bad.jsonl", [GOOD] * 3 + ['{"instruction": broken'] + [GOOD] * 700)
    g = build(config(tmp_path, "g", inputs=(path,), on_error="skip"), progress=False)
    s = build(config(tmp_path, "s", inputs=(path,), on_error="skip", streaming=True, batch_size=64),
              progress=False)
    assert s.counters.skipped == g.counters.skipped == 1 and s.counters.records == g.counters.records == 704
    assert samples(s.prefix) == samples(g.prefix)
    reject = json.loads((tmp_path / "s.rejects.jsonl").read_text(encoding="utf-8"))
    assert (reject["record"], reject["line"]) == (4, 4)
    with pytest.raises(BuildError, match=r"record 4 \(line 4\).*invalid JSON.*--on-error skip"):
        build(config(tmp_path, "f", inputs=(path,), streaming=True), progress=False)


def test_hub_dataset_call_and_errors(tmp_path: Path, jsonl_demo: str, monkeypatch) -> None:
    """No network here: `load_dataset` is replaced by a local stream, to check what --hf-dataset asks of it."""
    import datasets

    from packer.sources import InputError
    from packer.streaming import open_stream

    real = datasets.load_dataset
    calls = []

    def fake(name, config_name=None, **kw):
        calls.append((name, config_name, kw))
        if name == "missing/dataset":
            raise FileNotFoundError("Dataset 'missing/dataset' doesn't exist on the Hub")
        ds = real("json", data_files=[jsonl_demo], split="train", streaming=True)
        ds.info.splits = datasets.SplitDict({"validation": datasets.SplitInfo("validation", num_examples=500)})
        return ds

    monkeypatch.setattr(datasets, "load_dataset", fake)
    params = tmp_path / "params.json"
    params.write_text(json.dumps({"streaming": False, "revision": "main"}), encoding="utf-8")
    cfg = config(tmp_path, "hub", inputs=(), streaming=True, hf_dataset="org/alpaca-like", hf_config="en",
                 split="validation", hf_datasets_params=str(params), num_shards=2, shard_index=1)
    _, total = open_stream(cfg)
    assert total == 250  # the split's size, this shard's half: the progress bar's total
    r = build(cfg, progress=False)
    assert calls[-1] == ("org/alpaca-like", "en", {"split": "validation", "streaming": True, "revision": "main"})
    assert r.counters.records == 250 and r.manifest["config"]["hf_dataset"] == "org/alpaca-like"
    assert verify(r.prefix).ok
    with pytest.raises(InputError, match=r"--hf-dataset missing/dataset: FileNotFoundError: .*doesn't exist"):
        build(config(tmp_path, "m", inputs=(), streaming=True, hf_dataset="missing/dataset"), progress=False)


def test_streaming_json_whose_columns_change_after_the_first_mebibyte(tmp_path: Path) -> None:
    """datasets takes the schema from its first chunk (10 MiB by default); a smaller chunk breaks valid files."""
    path = tmp_path / "grow.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for i in range(30_000):
            f.write(json.dumps({"text": f"line {i} " * 6} | ({"meta": "m"} if i >= 15_000 else {})) + "\n")
    assert path.stat().st_size > 2 << 20
    r = build(config(tmp_path, "grow", handler="text", inputs=(str(path),), streaming=True), progress=False)
    assert r.counters.records == 30_000 and r.counters.skipped == 0
