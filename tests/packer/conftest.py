"""Fixtures for the packer tests: tiny in-memory tokenizers, real data (skipped where absent), cached builds."""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from packer.records import Segment

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
ALPACA = "alpaca/stanford_alpaca_pr152_alpaca_5000.json"
BELLE = "belle/belle_train_utils_data_dev1K.json"  # JSON Lines despite the .json suffix
MOSS = "moss/moss_003_sft_samples_combined.jsonl"

CORPUS = [
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction:\nAdd the numbers.\n\n### Input:\n2, 3\n\n### Response:\n5",
    "Hello there, how are you today? I am fine, thank you very much.",
    "The quick brown fox jumps over the lazy dog. 0123456789 !?,.;:'\"()[]{}",
]


PEERS = DATA.parent / "peers"


def read_with_peer(driver: str, path: str, *flags: str, needs: Sequence[str] = ("megatron.core",)) -> list[dict]:
    """Run another trainer's own reader (../shared/peers/<driver>, see its README) on the export at `path`:
    one JSON record per batch it would hand its model. Skips where the peers or their packages are absent."""
    import subprocess
    import sys

    script = PEERS / driver
    if not script.is_file():
        pytest.skip(f"{script} not found (../shared/peers lives next to the repo)")
    for module in needs:
        pytest.importorskip(module, reason=f"{driver} needs {module}")
    out = Path(path + ".driver.jsonl")
    proc = subprocess.run([sys.executable, str(script), path, *flags, "--json", str(out)], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in out.read_text().splitlines()]


def data_file(relative: str) -> Path:
    path = DATA / relative
    if not path.is_file():
        pytest.skip(f"real data {relative} not found under {DATA} (the shared data lives next to the repo)")
    return path


def read_records(relative: str) -> list[dict[str, Any]]:
    path = data_file(relative)
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def train_bpe(specials: Sequence[str], bos: str | None = None, eos_post: str | None = None) -> Tokenizer:
    """A byte-level BPE trained in memory on CORPUS (vocab ~300), with `specials` as special tokens.

    `bos` makes the post-processor prepend that token (as Llama's does); `eos_post` makes it append one.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=list(specials), initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    if bos or eos_post:
        single = " ".join(([f"{bos}:0"] if bos else []) + ["$A:0"] + ([f"{eos_post}:0"] if eos_post else []))
        tok.post_processor = processors.TemplateProcessing(
            single=single,
            special_tokens=[(t, tok.token_to_id(t)) for t in (bos, eos_post) if t],
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


@pytest.fixture
def make_tokenizer(tmp_path: Path) -> Callable[..., Path]:
    """Save a tiny BPE to a fresh directory; returns the directory (tokenizer.json [+ tokenizer_config.json])."""
    counter = iter(range(1000))

    def make(specials: Sequence[str] = ("<|endoftext|>",), config: dict | None = None, bos: str | None = None,
             eos_post: str | None = None) -> Path:
        d = tmp_path / f"tok{next(counter)}"
        d.mkdir()
        train_bpe(specials, bos, eos_post).save(str(d / "tokenizer.json"))
        if config is not None:
            (d / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
        return d

    return make


@pytest.fixture(scope="session")
def gpt2_tokenizer() -> Path:
    return data_file("tokenizers/gpt2/tokenizer.json")


@pytest.fixture(scope="session")
def llama2_tokenizer() -> Path:
    return data_file("tokenizers/llama2/tokenizer.json")


@pytest.fixture(scope="session", params=["gpt2", "llama2"])
def real_tokenizer(request) -> Path:
    return data_file(f"tokenizers/{request.param}/tokenizer.json")


def write_jsonl(path: Path, records: Sequence[Any]) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


def write_json(path: Path, records: Sequence[Any]) -> Path:
    path.write_text(json.dumps(list(records), ensure_ascii=False), encoding="utf-8")
    return path


def target_runs(ids: np.ndarray, mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, stop) of every maximal run of mask == 1."""
    m = np.concatenate([[0], np.asarray(mask, dtype=np.int8), [0]])
    edges = np.flatnonzero(np.diff(m))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True))


def target_texts(segments: Sequence[Segment]) -> list[tuple[str, str]]:
    """(prompt text before, target text) for every maximal run of target segments."""
    out: list[tuple[str, str]] = []
    prompt, prev_target = "", False
    for s in segments:
        if s.target and not s.text:
            continue
        if s.target and prev_target:
            out[-1] = (out[-1][0], out[-1][1] + s.text)
        elif s.target:
            out.append((prompt, s.text))
            prompt = ""
        else:
            prompt += s.text
        prev_target = s.target
    return out


def decode_exact(tokenizer: Tokenizer, ids: Sequence[int]) -> str:
    """Decode a slice of ids as it reads inside the text.

    SentencePiece decoders strip the leading space of the first token; a letter prefix keeps it.
    """
    anchor = tokenizer.encode("a", add_special_tokens=False).ids
    text = tokenizer.decode(list(anchor) + list(ids), skip_special_tokens=False)
    head = tokenizer.decode(list(anchor), skip_special_tokens=False)
    assert text.startswith(head)
    return text[len(head):]


def check_targets(tokenizer: Tokenizer, ids: np.ndarray, mask: np.ndarray, segments: Sequence[Segment],
                  eod: int) -> int:
    """Assert the masked-in tokens of a sample decode to its target texts; return how many runs straddle.

    The mask rule (a token is a target iff its last character is) lets a token that spans the prompt/target
    boundary be a target; then its run decodes to (tail of the preceding prompt) + target, never anything else.
    """
    assert ids[-1] == eod and mask[-1] == 1
    runs = target_runs(ids[:-1], mask[:-1])
    expected = target_texts(segments)
    assert len(runs) == len(expected), (runs, expected)
    straddling = 0
    for (a, b), (prompt, target) in zip(runs, expected, strict=True):
        got = decode_exact(tokenizer, ids[a:b].tolist())
        if got != target:
            assert got.endswith(target) and prompt.endswith(got[: len(got) - len(target)]), (got, target)
            straddling += 1
    return straddling


def write_dataset(prefix: Path, packs: Sequence[Sequence[tuple[Sequence[int], Sequence[int]]]], *, eod: int = 0,
                  vocab: int = 100, seq_length: int = 16, unterminated: int = 0) -> dict[str, Any]:
    """A build written by hand: packs of (ids, loss mask) samples, with a manifest whose counts and checksums
    match the files (so `verify` checks the contents, not only the checksums). Returns the manifest."""
    from packer import __version__
    from packer.indexed import IndexedDatasetWriter, token_dtype
    from packer.manifest import FORMAT, loss_mask_prefix

    dtype = token_dtype(vocab)
    with IndexedDatasetWriter(prefix, dtype) as tok_w, IndexedDatasetWriter(loss_mask_prefix(prefix), np.uint8) as m_w:
        for p in packs:
            for ids, mask in p:
                tok_w.add_sequence(np.asarray(ids, dtype=np.int64))
                m_w.add_sequence(np.asarray(mask, dtype=np.int64))
            tok_w.end_document()
            m_w.end_document()
        for w in (m_w, tok_w):
            w.finalize()
            w.commit()
    samples = [s for p in packs for s in p]
    tokens = sum(len(ids) for ids, _ in samples)
    manifest = {
        "format": FORMAT,
        "packer_version": __version__,
        "created": "2026-01-01T00:00:00+00:00",
        "config": {"handler": "hand", "seq_length": seq_length},
        "tokenizer": {"path": "hand", "sha256": "", "vocab_size": vocab, "eod_token": "<eod>", "eod_id": eod,
                      "eod_source": "--eod-token", "bos_id": None, "pad_id": None},
        "token_dtype": np.dtype(dtype).name,
        "counts": {"records": len(samples), "skipped": 0, "samples": len(samples), "tokens": tokens,
                   "target_tokens": int(sum(int(np.sum(m)) for _, m in samples)), "truncated": 0, "split": 0,
                   "dropped": 0, "dropped_no_target": 0, "unterminated": unterminated, "packs": len(packs)},
        "packing": {"algorithm": "none", "seq_length": seq_length, "packs": len(packs),
                    "lower_bound": -(-tokens // seq_length)},
    }
    refresh_checksums(prefix, manifest)
    return manifest


def refresh_checksums(prefix: Path, manifest: dict[str, Any] | None = None) -> dict[str, Any]:
    """Recompute the manifest's file sizes and sha256s (after patching bytes on purpose) and write it."""
    from packer.manifest import manifest_path, output_files, read_manifest, sha256_file, write_json_atomic

    manifest = read_manifest(prefix) if manifest is None else manifest
    manifest["files"] = {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in output_files(prefix)}
    write_json_atomic(manifest_path(prefix), manifest)
    return manifest


@pytest.fixture(scope="session")
def helpers():
    """Plain helper functions for the test modules (conftest modules cannot be imported by name here)."""

    class H:
        pass

    for f in (data_file, read_records, write_jsonl, write_json, target_runs, target_texts, decode_exact,
              check_targets, train_bpe, write_dataset, refresh_checksums):
        setattr(H, f.__name__, staticmethod(f))
    return H


@pytest.fixture(scope="session")
def megatron_indexed():
    """megatron-core's IndexedDataset class (its import and reads warn about optional dependencies)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mod = pytest.importorskip("megatron.core.datasets.indexed_dataset", reason="megatron-core is not installed")
    return mod.IndexedDataset


@pytest.fixture(scope="session")
def real_build(tmp_path_factory):
    """build(...) of real data, cached per configuration for the whole session; returns the output prefix.

    Only for read-only use: tests that modify files copy them first (see `copy_build`).
    """
    from packer.build import build
    from packer.config import BuildConfig

    cache: dict[tuple, str] = {}
    root = tmp_path_factory.mktemp("real_builds")

    def get(handler: str, data: str, tokenizer: str = "gpt2", seq_length: int = 2048, pack: str = "bfd",
            **kw) -> str:
        key = (handler, data, tokenizer, seq_length, pack, tuple(sorted(kw.items())))
        if key not in cache:
            inp = data_file(data)
            tok = data_file(f"tokenizers/{tokenizer}/tokenizer.json")
            prefix = root / f"b{len(cache)}" / handler
            config = BuildConfig(handler=handler, inputs=(str(inp),), tokenizer=str(tok), seq_length=seq_length,
                                 output_prefix=str(prefix), pack=pack, **kw)
            build(config, progress=False)
            cache[key] = str(prefix)
        return cache[key]

    return get


@pytest.fixture
def copy_build(tmp_path: Path) -> Callable[[str], str]:
    """Copy a build's files to tmp_path; returns the new prefix."""
    import shutil

    def copy(prefix: str) -> str:
        src = Path(prefix)
        for f in src.parent.glob(src.name + "*"):
            shutil.copy(f, tmp_path / f.name)
        return str(tmp_path / src.name)

    return copy
