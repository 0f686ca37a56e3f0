"""The tiktoken twin: proven exact where it is used, byte-identical builds whichever backend runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from packer.build import build
from packer.config import BuildConfig, BuildError
from packer.manifest import output_files, read_manifest
from packer.records import Segment
from packer.tokenize import SampleEncoder, load_tokenizer

from .conftest import ALPACA, BELLE, MOSS, data_file, read_records

tiktoken_backend = pytest.importorskip("packer.tiktoken_backend")
pytest.importorskip("tiktoken", reason="the tiktoken backend needs tiktoken")

QUALIFYING = ("gpt2", "qwen2.5-instruct", "granite-vision-3.x", "mistral-nemo-instruct-2407")
HARD_TEXTS = [
    "Hello<|endoftext|>world <|endoftext|> <|im_end|><|im_start|>user", "é\u4e2d文 😀x 👨‍👩‍👧 🇩🇪", "e\u0301 combining",
    " " * 17 + "\n\n\t\t\r\n " * 5, "a" * 3000, "supercalifragilisticexpialidocious" * 40, "1234567890" * 30,
    "'s'S'll'LL 'Re", "\u200b\u200d\u00a0\u3000", "ٱلْعَرَبِيَّة हिन्दी ไทย ລາວ ᠮᠣᠩᠭᠣᠯ", "",
]


def tokenizer_file(name: str) -> Path:
    return data_file(f"tokenizers/{name}/tokenizer.json")


@pytest.mark.parametrize("name", QUALIFYING)
def test_twin_gives_the_tokenizers_ids_and_masks(name):
    """ids equal HF's on hard texts; masks from byte lengths equal masks from HF's character offsets, for
    segment splits that cut through multi-byte characters' tokens."""
    path = tokenizer_file(name)
    tok, info = load_tokenizer(path.parent)
    twin, why = tiktoken_backend.load(path, tok, HARD_TEXTS)
    assert twin is not None, why
    hf, tt = SampleEncoder(tok, info), SampleEncoder(tok, info, twin=twin)
    assert tt.twin is not None
    rng = np.random.default_rng(0)
    batch = []
    for text in [*HARD_TEXTS, *(r["output"] for r in read_records(ALPACA)[:50])]:
        cuts = sorted(rng.integers(0, len(text) + 1, size=3).tolist())
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        batch.append([Segment(p, target=bool(i % 2)) for i, p in enumerate(pieces)])
    for got, want in zip(tt.encode_flat(batch), hf.encode_flat(batch), strict=True):
        np.testing.assert_array_equal(got, want)


def test_tokenizers_that_do_not_qualify_say_why(make_tokenizer):
    for name, reason in (("llama2", "byte_fallback"), ("phi-3-mini-instruct", "byte_fallback")):
        path = tokenizer_file(name)
        twin, why = tiktoken_backend.load(path, Tokenizer.from_file(str(path)))
        assert twin is None and reason in why
    d = make_tokenizer(["<|endoftext|>"])  # the fixture's BPE is byte-level: it qualifies
    twin, why = tiktoken_backend.load(d / "tokenizer.json", Tokenizer.from_file(str(d / "tokenizer.json")))
    assert twin is not None, why


def test_a_differing_probe_is_refused(monkeypatch):
    path = tokenizer_file("gpt2")
    tok = Tokenizer.from_file(str(path))
    real = tiktoken_backend.TiktokenEncoder.encode_batch
    monkeypatch.setattr(tiktoken_backend.TiktokenEncoder, "encode_batch",
                        lambda self, texts: [ids[:-1] if t == "odd one" else ids
                                             for t, ids in zip(texts, real(self, texts), strict=True)])
    twin, why = tiktoken_backend.load(path, tok, ["fine", "odd one"])
    assert twin is None and "differ from tokenizers' on 'odd one'" in why


def _build(tmp_path, name, handler, data, backend, **kw) -> str:
    prefix = tmp_path / f"{backend}-{name}-{handler}" / "o"
    inp = data_file(data)
    build(BuildConfig(handler=handler, inputs=(str(inp),), tokenizer=str(tokenizer_file(name).parent),
                      seq_length=kw.pop("seq_length", 2048), output_prefix=str(prefix), tokenizer_backend=backend,
                      on_error="skip", **kw), progress=False)
    return str(prefix)


CASES = [
    ("gpt2", "alpaca", ALPACA, {}),
    ("gpt2", "moss", MOSS, {"seq_length": 4096, "workers": 2}),
    ("gpt2", "text", ALPACA, {"json_keys": ("instruction", "output"), "seq_length": 64}),
    ("qwen2.5-instruct", "belle", BELLE, {"streaming": True}),
    ("qwen2.5-instruct", "alpaca", "alpaca/llamafactory_alpaca_zh_demo.json", {"template": "chatml"}),
    ("granite-vision-3.x", "alpaca", "alpaca/gpteacher_toolformer_dedupe_only.json", {"train_on_prompt": True}),
    ("mistral-nemo-instruct-2407", "moss", MOSS, {"seq_length": 4096, "last_turn_only": True}),
]


@pytest.mark.parametrize(("name", "handler", "data", "kw"), CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_builds_are_byte_identical_whichever_backend(tmp_path, name, handler, data, kw):
    a = _build(tmp_path, name, handler, data, "hf", **dict(kw))
    b = _build(tmp_path, name, handler, data, "auto", **dict(kw))
    assert read_manifest(b)["config"]["tokenizer_backend_effective"] == "tiktoken"
    assert read_manifest(a)["config"]["tokenizer_backend_effective"] == "hf"
    for fa, fb in zip(output_files(a), output_files(b), strict=True):
        assert fa.read_bytes() == fb.read_bytes(), fa.name


def test_special_token_text_and_non_nfc_records(tmp_path):
    """Record text that spells special tokens, and (for Qwen's NFC normalizer) text that is not NFC."""
    records = [{"instruction": f"Say {s}", "output": f"{s} it is <|endoftext|> done"} for s in HARD_TEXTS if s]
    path = tmp_path / "hard.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    for name in ("gpt2", "qwen2.5-instruct"):
        out = {}
        for backend in ("hf", "tiktoken"):
            prefix = tmp_path / backend / name
            build(BuildConfig(handler="alpaca", inputs=(str(path),), tokenizer=str(tokenizer_file(name).parent),
                              seq_length=2048, output_prefix=str(prefix), tokenizer_backend=backend), progress=False)
            out[backend] = [f.read_bytes() for f in output_files(prefix)]
        assert out["hf"] == out["tiktoken"], name


def test_explicit_tiktoken_on_a_tokenizer_it_cannot_reproduce_fails_clearly(tmp_path):
    with pytest.raises(BuildError, match="--tokenizer-backend tiktoken cannot reproduce .*byte_fallback"):
        _build(tmp_path, "llama2", "alpaca", ALPACA, "tiktoken")
    prefix = _build(tmp_path, "llama2", "alpaca", ALPACA, "auto")
    cfg = read_manifest(prefix)["config"]
    assert cfg["tokenizer_backend_effective"] == "hf" and "byte_fallback" in cfg["tokenizer_backend_note"]
