"""Shared fixtures: an in-memory dataset of random packs, and real Alpaca packs built with the packer CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from packer.records import Pack

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"
ALPACA = SHARED / "alpaca" / "stanford_alpaca_pr152_alpaca_5000.json"
GPT2 = SHARED / "tokenizers" / "gpt2" / "tokenizer.json"


def random_pack(rng: np.random.Generator, doc_lens: list[int], vocab: int, eod: int) -> Pack:
    ids, mask = [], []
    for n in doc_lens:
        doc = rng.integers(0, vocab - 1, n)
        doc[-1] = eod
        prompt = int(rng.integers(0, n))  # the first `prompt` tokens are not targets, as in instruction data
        ids.append(doc)
        mask.append((np.arange(n) >= prompt).astype(np.uint8))
    return Pack(
        ids=np.concatenate(ids).astype(np.int64) if ids else np.zeros(0, np.int64),
        loss_mask=np.concatenate(mask) if mask else np.zeros(0, np.uint8),
        doc_lens=np.array(doc_lens, dtype=np.int32),
    )


class FakePackedDataset:
    """PackedDataset's interface over random packs: len, [i] -> Pack, seq_length, eod/pad id, vocab_size."""

    def __init__(self, n_packs: int = 16, seq_length: int = 32, vocab_size: int = 97, seed: int = 0):
        self.seq_length, self.vocab_size = seq_length, vocab_size
        self.eod_id = self.pad_id = vocab_size - 1
        rng = np.random.default_rng(seed)
        self.packs = []
        for _ in range(n_packs):
            lens, room = [], int(rng.integers(seq_length // 2, seq_length + 1))
            while room > 1:
                n = int(rng.integers(2, min(room, seq_length // 2) + 1))
                lens.append(n)
                room -= n
            self.packs.append(random_pack(rng, lens, vocab_size, self.eod_id))

    def __len__(self) -> int:
        return len(self.packs)

    def __getitem__(self, i: int) -> Pack:
        return self.packs[i]


@pytest.fixture
def fake_dataset() -> FakePackedDataset:
    return FakePackedDataset()


@pytest.fixture(scope="session")
def alpaca_prefix(tmp_path_factory) -> str:
    """300 real Alpaca records packed to 512 tokens with the GPT-2 tokenizer, via `packer build`."""
    if not ALPACA.is_file() or not GPT2.is_file():
        pytest.skip(f"shared data absent: needs {ALPACA} and {GPT2}")
    try:
        import packer.build  # noqa: F401
        from packer.handlers import get_handler  # noqa: F401
    except ImportError as e:
        pytest.skip(f"`packer build` cannot run yet ({e}); it makes the real packed data")
    tmp = tmp_path_factory.mktemp("alpaca")
    subset = tmp / "alpaca_300.json"
    subset.write_text(json.dumps(json.loads(ALPACA.read_text())[:300]))
    packer_exe = shutil.which("packer") or f"{sys.executable} -m packer"
    cmd = [
        *packer_exe.split(),
        "build",
        "--handler",
        "alpaca",
        "--input",
        str(subset),
        "--tokenizer",
        str(GPT2),
        "--seq-length",
        "512",
        "--output-prefix",
        str(tmp / "alpaca"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.fail(f"packer build failed:\n{proc.stdout}\n{proc.stderr}")
    return str(tmp / "alpaca")


@pytest.fixture(scope="session")
def alpaca_cp2_prefix(tmp_path_factory) -> str:
    """The 300 Alpaca records built with `packer build --cp-size 2` at 512 tokens: documents padded to 4."""
    if not ALPACA.is_file() or not GPT2.is_file():
        pytest.skip(f"shared data absent: needs {ALPACA} and {GPT2}")
    from packer.build import build
    from packer.config import BuildConfig

    tmp = tmp_path_factory.mktemp("alpaca_cp2")
    subset = tmp / "alpaca_300.json"
    subset.write_text(json.dumps(json.loads(ALPACA.read_text())[:300]))
    prefix = tmp / "alpaca_cp2"
    config = BuildConfig(handler="alpaca", inputs=(str(subset),), tokenizer=str(GPT2), seq_length=512,
                         output_prefix=str(prefix), cp_size=2)  # fmt: skip
    build(config, progress=False)
    return str(prefix)


@pytest.fixture(scope="session")
def tiny_build(tmp_path_factory):
    """tiny_build(name, seed) -> prefix: `packer build` of 40 random texts over a 62-word WordLevel vocabulary,
    seq_length 32. Builds with different seeds share the tokenizer but not the corpus."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from packer.build import build
    from packer.config import BuildConfig

    root = tmp_path_factory.mktemp("tiny_build")
    words = [f"w{i}" for i in range(60)]
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(
        [" ".join(words)], trainers.WordLevelTrainer(special_tokens=["<unk>", "<|endoftext|>"])
    )
    tok.save(str(root / "tokenizer.json"))

    def make(name: str, seed: int) -> str:
        rng = np.random.default_rng(seed)
        corpus = root / f"{name}.jsonl"
        lines = [
            json.dumps({"text": " ".join(rng.choice(words, int(rng.integers(3, 20))))}) for _ in range(40)
        ]
        corpus.write_text("\n".join(lines) + "\n")
        prefix = str(root / name)
        config = BuildConfig(
            handler="text",
            inputs=(str(corpus),),
            tokenizer=str(root / "tokenizer.json"),
            seq_length=32,
            output_prefix=prefix,
            eod_token="<|endoftext|>",
        )
        build(config, progress=False)
        return prefix

    return make


class FakeCPDataset(FakePackedDataset):
    """Random packs as `packer build --cp-size N` lays them out: every document's length rounded up to a
    multiple of 2N fits the row (so the padded documents sum to <= seq_length), with short documents of 1..2N-1
    tokens (chunks that are pad only), and some rows with a padding tail."""

    def __init__(self, n_packs: int = 8, seq_length: int = 64, cp_size: int = 2, vocab_size: int = 97, seed: int = 0):
        self.seq_length, self.vocab_size = seq_length, vocab_size
        self.eod_id = self.pad_id = vocab_size - 1
        self.cp_size, self.pad_multiple = cp_size, 2 * cp_size
        m = self.pad_multiple
        rng = np.random.default_rng(seed)
        self.packs = []
        for p in range(n_packs):
            lens, room = [], seq_length - (0 if p % 2 else m)  # odd packs full, even ones with a tail
            while room >= m:
                n = int(rng.integers(1, min(room, 3 * m) + 1))
                lens.append(n)
                room -= -(-n // m) * m
            self.packs.append(random_pack(rng, lens, vocab_size, self.eod_id))
