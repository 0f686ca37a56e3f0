"""Context-parallel builds (`packer build --cp-size N --tp-size M`, packer/cp.py): packs by padded lengths.

The invariants, over random sample lengths, several (CP, TP, seq_length), every packer, streaming, shards + merge
and every --overflow policy: each pack's samples padded to the multiple fit in seq_length; the stored samples
are exactly a plain build's (the same multiset); the manifest's figures are the index's and verify checks them;
--cp-size 1 is byte-for-byte the build without the option.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from packer import cp
from packer.balance import pack_attention_costs
from packer.build import build
from packer.cli import main
from packer.config import BuildConfig, BuildError
from packer.dataset import DatasetError, PackedDataset
from packer.manifest import manifest_path, output_files
from packer.merge import MergeError, merge
from packer.verify import verify

WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "lazy",
    "dog",
    "hello",
    "there",
    "how",
    "are",
    "you",
    "I",
    "am",
    "fine",
    "thank",
    "very",
    "much",
    "Add",
    "numbers",
    "0123456789",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, helpers) -> tuple[Path, Path]:
    """(a text JSONL of 400 records of 1..90 words, a tiny BPE tokenizer directory): samples of ~2..200 tokens."""
    root = tmp_path_factory.mktemp("cp_corpus")
    rng = random.Random(0)
    records = [{"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 90)))} for _ in range(400)]
    data = helpers.write_jsonl(root / "text.jsonl", records)
    tok = root / "tok"
    tok.mkdir()
    helpers.train_bpe(["<|endoftext|>"]).save(str(tok / "tokenizer.json"))
    return data, tok


def make(corpus, out: Path, seq_length: int, **kw) -> str:
    data, tok = corpus
    config = BuildConfig(
        handler="text",
        inputs=(str(data),),
        tokenizer=str(tok),
        seq_length=seq_length,
        output_prefix=str(out),
        **kw,
    )
    build(config, progress=False)
    return config.prefix


def samples(prefix: str) -> Counter:
    """Every stored sample of a build, as (ids, mask) bytes: what a non-CP consumer reads."""
    ds = PackedDataset(prefix)
    out: Counter = Counter()
    for p in ds:
        for ids, mask in zip(
            np.split(p.ids, np.cumsum(p.doc_lens)[:-1]),
            np.split(p.loss_mask, np.cumsum(p.doc_lens)[:-1]),
            strict=True,
        ):
            out[(ids.tobytes(), mask.tobytes())] += 1
    return out


def check_fits(prefix: str, cp_size: int, tp_size: int) -> PackedDataset:
    """Every pack's padded samples fit, every padded length is the rule's, verify passes."""
    ds = PackedDataset(prefix)
    m = cp.pad_multiple(cp_size, tp_size)
    assert (ds.cp_size, ds.tp_size, ds.pad_multiple) == (cp_size, tp_size, m)
    assert ds.seq_length % m == 0 and ds.seq_length % tp_size == 0
    for i in range(len(ds)):
        real, padded = ds.doc_lens(i).astype(np.int64), ds.padded_doc_lens(i).astype(np.int64)
        assert padded.dtype == np.int64 and ds.padded_doc_lens(i).dtype == np.int32
        assert (padded % m == 0).all() and (padded >= real).all() and (padded - real < m).all()
        assert padded.sum() <= ds.seq_length, (i, padded.tolist())
    rep = verify(prefix)
    assert rep.ok, rep.errors
    assert rep.stats["context_parallel"]["multiple"] == m
    return ds


def test_pad_multiple_rule():
    # MindSpeed's pad_data: lcm(2, TP) * CP; at CP 1 nothing pads a document for TP alone
    table = {
        (1, 1): 1,
        (2, 1): 4,
        (4, 1): 8,
        (8, 1): 16,
        (2, 2): 4,
        (2, 4): 8,
        (2, 3): 12,
        (4, 6): 24,
        (1, 4): 1,
    }
    assert {k: cp.pad_multiple(*k) for k in table} == table
    assert all(cp.pad_multiple(c, t) % (2 * c) == 0 for c in range(2, 9) for t in range(1, 9))  # TE: 2 x CP
    for bad in (0, -1, True, 2.0):
        with pytest.raises(cp.CPError, match="must be an integer >= 1"):
            cp.pad_multiple(bad)
    assert cp.padded_lengths(np.array([5, 3, 8, 1]), 4).tolist() == [8, 4, 8, 4]
    assert cp.padded_lengths(np.array([5, 3]), 1).tolist() == [5, 3]


def test_attention_cost_hand_example():
    """pack_figures on the index: [5, 3] [8] at m 4 -> padded [8, 4] [8], costs [64 + 16, 64]."""
    padded, per_pack, costs = cp.pack_figures(np.array([5, 3, 8], np.int32), np.array([0, 2, 3]), 4)
    assert (padded, per_pack.tolist(), costs.tolist()) == (20, [12, 8], [80, 64])
    summary = cp.attention_summary(costs, 4)
    assert summary | {"p50": 0, "p99": 0} == {
        "multiple": 4,
        "total": 144,
        "max": 80,
        "mean": 72.0,
        "p50": 0,
        "p99": 0,
    }
    # the chunked pass equals one call over the whole index
    rng = np.random.default_rng(1)
    lens = rng.integers(1, 300, 5000).astype(np.int32)
    docs = np.unique(np.concatenate([[0, 5000], rng.integers(0, 5000, 900)]))
    got = cp.pack_figures(lens, docs, 8, chunk=37)
    assert got[0] == int(cp.padded_lengths(lens, 8).sum())
    np.testing.assert_array_equal(got[2], pack_attention_costs(lens, docs, 8))


@pytest.mark.parametrize(
    "seq_length,cp_size,tp_size,fix",
    [
        (98, 2, 1, "pass --seq-length 96 or 100"),
        (64, 2, 3, "pass --seq-length 60 or 72"),
        (6, 4, 1, "pass --seq-length 8"),
        (66, 1, 4, "sequence parallelism .* pass --seq-length 64 or 68"),
    ],
)
def test_seq_length_must_be_a_multiple(corpus, tmp_path, seq_length, cp_size, tp_size, fix):
    with pytest.raises(BuildError, match=rf"--seq-length {seq_length} is not a multiple of .*{fix}"):
        make(corpus, tmp_path / "x", seq_length, cp_size=cp_size, tp_size=tp_size)
    assert not list(tmp_path.iterdir())
    for suggested in map(int, fix.split("--seq-length ")[1].split(" or ")):  # the fix the message names works
        BuildConfig(
            handler="text",
            inputs=("x",),
            tokenizer="t",
            seq_length=suggested,
            output_prefix="o",
            cp_size=cp_size,
            tp_size=tp_size,
        ).validate()


SIZES = [(2, 1, 64), (4, 1, 128), (2, 3, 96), (8, 1, 64), (1, 4, 64)]


@pytest.mark.parametrize("cp_size,tp_size,seq_length", SIZES)
@pytest.mark.parametrize("mode", ["bfd", "ffd", "nf", "none", "streaming", "streaming-tokens"])
def test_every_pack_fits_padded_and_stores_the_plain_samples(
    corpus, tmp_path, cp_size, tp_size, seq_length, mode
):
    kw = {"streaming": True} if mode.startswith("streaming") else {"pack": mode}
    if mode == "streaming-tokens":
        kw["pack_window"] = (4 * seq_length, True)
    elif mode == "streaming":
        kw["pack_window"] = (64, False)
    prefix = make(corpus, tmp_path / "cp", seq_length, cp_size=cp_size, tp_size=tp_size, **kw)
    ds = check_fits(prefix, cp_size, tp_size)
    plain = make(corpus, tmp_path / "plain", seq_length, **kw)
    assert samples(prefix) == samples(plain)  # the same samples, only packed by their padded lengths
    m = ds.manifest
    section = m["context_parallel"]
    lens = ds.tokens.sequence_lengths
    assert section["real_tokens"] == m["counts"]["tokens"] == int(lens.sum())
    assert section["padded_tokens"] == int(cp.padded_lengths(lens, ds.pad_multiple).sum())
    assert section["max_padded_pack_tokens"] == max(int(ds.padded_doc_lens(i).sum()) for i in range(len(ds)))
    assert m["config"]["cp_size"] == cp_size and m["config"]["tp_size"] == tp_size
    costs = [int((ds.padded_doc_lens(i).astype(np.int64) ** 2).sum()) for i in range(len(ds))]
    assert m["attention_cost"]["total"] == sum(costs) and m["attention_cost"]["max"] == max(costs)
    assert m["attention_cost"]["multiple"] == ds.pad_multiple
    if ds.pad_multiple > 1:  # the fixture's lengths are not all multiples
        assert section["padded_tokens"] > section["real_tokens"]


@pytest.mark.parametrize("overflow", ["truncate", "split", "drop"])
def test_overflow_policies_fit_padded(corpus, tmp_path, overflow):
    """Samples longer than seq_length (up to ~200 tokens here) cut to seq_length still fit once padded:
    seq_length is a multiple of the padding."""
    prefix = make(corpus, tmp_path / "cp", 48, cp_size=4, tp_size=3, overflow=overflow)  # m = 24
    ds = check_fits(prefix, 4, 3)
    key = {"truncate": "truncated", "split": "split", "drop": "dropped"}[overflow]
    assert ds.manifest["counts"][key] > 0
    assert samples(prefix) == samples(make(corpus, tmp_path / "plain", 48, overflow=overflow))


def test_streaming_shards_and_merge_agree(corpus, tmp_path):
    whole = make(corpus, tmp_path / "global", 64, cp_size=2)
    streamed = make(corpus, tmp_path / "stream", 64, cp_size=2, streaming=True)
    shards = [make(corpus, tmp_path / "sh", 64, cp_size=2, num_shards=3, shard_index=i) for i in range(3)]
    merged = merge(str(tmp_path / "merged"), shards)
    check_fits(str(tmp_path / "merged"), 2, 1)
    assert samples(whole) == samples(streamed) == samples(str(tmp_path / "merged"))
    a = PackedDataset(whole).manifest["context_parallel"]
    b = merged["context_parallel"]
    assert (b["real_tokens"], b["padded_tokens"], b["multiple"]) == (a["real_tokens"], a["padded_tokens"], 4)
    assert merged["attention_cost"]["multiple"] == 4


def test_merge_refuses_other_padding(corpus, tmp_path):
    two = make(corpus, tmp_path / "two", 64, cp_size=2)
    four = make(corpus, tmp_path / "four", 64, cp_size=4)
    plain = make(corpus, tmp_path / "plain", 64)
    with pytest.raises(
        MergeError,
        match=r"four: built for --cp-size 4 --tp-size 1, .*two for --cp-size 2 "
        r"--tp-size 1: .* rebuild the inputs with the same --cp-size",
    ):
        merge(str(tmp_path / "m"), [two, four])
    with pytest.raises(
        MergeError, match=r"built for --cp-size 2 --tp-size 1, .*plain for no context parallelism"
    ):
        merge(str(tmp_path / "m"), [plain, two])


def test_cp_size_1_is_byte_identical(corpus, tmp_path):
    """`--cp-size 1` (and its alias spellings) writes exactly what the build without the option writes."""
    data, tok = corpus
    runner = CliRunner()
    base = [
        "build",
        "--handler",
        "text",
        "--input",
        str(data),
        "--tokenizer",
        str(tok),
        "--seq-length",
        "64",
        "-q",
    ]
    for name, extra in (
        ("none", []),
        ("one", ["--cp-size", "1", "--tp-size", "1"]),
        ("alias", ["--context-parallel-size", "1", "--tensor-model-parallel-size", "1"]),
    ):
        r = runner.invoke(main, [*base, "--output-prefix", str(tmp_path / name), *extra])
        assert r.exit_code == 0, r.output
        assert "context parallel" not in r.output
    manifests = {}
    for name in ("none", "one", "alias"):
        m = json.loads(manifest_path(tmp_path / name).read_text())
        for key in ("created", "seconds"):
            del m[key]
        m["config"]["output_prefix"] = None
        # the same sizes and sha256s under each build's own file names
        m["files"] = {k.replace(name, "PREFIX", 1): v for k, v in m["files"].items()}
        manifests[name] = m
        assert "context_parallel" not in m and "cp_size" not in m["config"]
    assert manifests["none"] == manifests["one"] == manifests["alias"]
    for a, b, c in zip(*(output_files(tmp_path / n) for n in ("none", "one", "alias")), strict=True):
        assert a.read_bytes() == b.read_bytes() == c.read_bytes(), a.name
    # with CP 2 the same data packs differently, and the summary says how
    r = runner.invoke(main, [*base, "--output-prefix", str(tmp_path / "two"), "--context-parallel-size", "2"])
    assert r.exit_code == 0, r.output
    assert "context parallel: CP 2, TP 1: samples padded to multiples of 4" in r.output
    v = runner.invoke(main, ["verify", str(tmp_path / "two")])
    assert v.exit_code == 0 and "context parallel: CP 2, TP 1" in v.output, v.output
    i = runner.invoke(main, ["inspect", str(tmp_path / "two")])
    assert i.exit_code == 0 and i.output.count("context parallel: CP 2, TP 1") == 1, i.output
    bad = runner.invoke(main, [*base, "--output-prefix", str(tmp_path / "bad"), "--cp-size", "3"])
    assert bad.exit_code == 1 and "--seq-length 64 is not a multiple of 6" in bad.output


def _edit(prefix: str, helpers, edit) -> None:
    m = json.loads(manifest_path(prefix).read_text())
    edit(m)
    manifest_path(prefix).write_text(json.dumps(m))


@pytest.mark.parametrize(
    "edit,problem",
    [
        (
            lambda m: m["context_parallel"].update(multiple=2),
            "context_parallel.multiple = 2, but CP 2 and TP 1 need 4",
        ),
        (
            lambda m: m["context_parallel"].update(cp_size=4, multiple=8),
            "config.cp_size = 2, but context_parallel.cp_size = 4",
        ),
        (
            lambda m: m["context_parallel"].update(padded_tokens=1),
            "context_parallel.padded_tokens = 1, but the index",
        ),
        (
            lambda m: m["context_parallel"].update(real_tokens=1),
            "context_parallel.real_tokens = 1, but the index",
        ),
        (
            lambda m: m["context_parallel"].update(rule="any"),
            "context_parallel.rule = 'any', but packer pads by",
        ),
        (lambda m: m["attention_cost"].update(total=1), "attention_cost.total = 1, but the index says"),
        (lambda m: m["attention_cost"].update(p99=0.5), "attention_cost.p99 = 0.5, but the index says"),
        (
            lambda m: m["attention_cost"].update(multiple=1),
            "attention_cost.multiple = 1, but the build pads to multiples of 4",
        ),
        (
            lambda m: m.pop("context_parallel"),
            "config.cp_size = 2, but context_parallel.cp_size = 1 (the section is missing)",
        ),
        (
            lambda m: m["config"].update(seq_length=66) or m["packing"].update(seq_length=66),
            "config.seq_length does not fit context_parallel: --seq-length 66 is not a multiple of 4",
        ),
    ],
)
def test_verify_checks_the_cp_manifest(corpus, tmp_path, helpers, copy_build, edit, problem):
    prefix = copy_build(make(corpus, tmp_path / "b" / "cp", 64, cp_size=2))
    _edit(prefix, helpers, edit)
    helpers.refresh_checksums(prefix)
    rep = verify(prefix)
    assert not rep.ok and any(problem in e for e in rep.errors), rep.errors


def test_a_pack_that_does_not_fit_padded_is_refused(tmp_path, helpers):
    """Hand data: packs that fit seq_length 8 unpadded, but [3, 3] padded to multiples of 4 needs 8 and [5, 2]
    needs 12: a manifest that claims CP 2 for them is refused by the reader and by verify."""
    prefix = tmp_path / "hand"
    m = helpers.write_dataset(
        prefix,
        [[([1, 0], [1, 1]), ([2, 3, 0], [0, 1, 1])], [([1, 2, 3, 4, 0], [0] * 4 + [1]), ([5, 0], [1, 1])]],
        eod=0,
        vocab=10,
        seq_length=8,
    )
    lens, docs = np.array([2, 3, 5, 2]), np.array([0, 2, 4])
    padded, per_pack, costs = cp.pack_figures(lens, docs, 4)
    m["context_parallel"] = cp.section(2, 1, 0, int(lens.sum()), padded, int(per_pack.max()))
    m["attention_cost"] = cp.attention_summary(costs, 4)
    helpers.refresh_checksums(prefix, m)
    want = (
        "1 packs hold more than --seq-length 8 tokens once their samples are padded to multiples of 4 (the "
        "fullest 12); rebuild with --cp-size 2 --tp-size 1"
    )
    rep = verify(prefix)
    assert any(want in e for e in rep.errors), rep.errors
    with pytest.raises(DatasetError, match=r"padded to multiples of 4"):
        PackedDataset(prefix)


def test_percentiles_are_numpys_to_the_bit():
    """`cp.percentiles` stands in for np.percentile (which imports numpy.ma at every build): the same floats."""
    rng = np.random.default_rng(0)
    for _ in range(2000):
        n = int(rng.integers(1, 300))
        values = rng.integers(0, int(rng.choice([7, 1000, 2**20, 2**40])), size=n)
        for qs in ((50, 99), (0, 100), (33.3, 66.6, 12.5)):
            np.testing.assert_array_equal(cp.percentiles(values, qs), np.percentile(values, qs))
