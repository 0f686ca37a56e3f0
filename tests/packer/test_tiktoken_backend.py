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


def _one_by_one(twin, texts):
    """The reference: one tiktoken call per text."""
    arrays = twin.encode_batch(texts)
    return (np.asarray([i for ids in arrays for i in ids], dtype=np.int64),
            np.asarray([len(ids) for ids in arrays], dtype=np.int64))


def _boundary_texts(specials: list[str]) -> list[str]:
    """Texts that end or begin with special tokens, halves of them, and the empty text, beside ordinary ones."""
    out = ["", "plain", " ", "\n", "x"]
    for s in specials[:6]:
        half = len(s) // 2
        out += [s, f"ends with {s}", f"{s} begins", s[:half], s[half:], f"a{s[:half]}", f"{s[half:]}b", s + s, ""]
    return out


@pytest.mark.parametrize("name", QUALIFYING)
def test_one_call_per_batch_gives_the_ids_of_one_call_per_text(name):
    """`encode_joined` (texts joined at a special token, one call) against one call per text, with texts that
    end, begin or are special tokens or halves of them; and the samples of the all-target fast path (joined at
    the EOD, which it keeps) against tokenizers'."""
    path = tokenizer_file(name)
    tok, info = load_tokenizer(path.parent)
    twin, why = tiktoken_backend.load(path, tok)
    assert twin is not None, why
    texts = [*HARD_TEXTS, *_boundary_texts(list(twin.special)), *(r["output"] for r in read_records(ALPACA)[:40])]
    rng = np.random.default_rng(1)
    for _ in range(4):
        batch = [texts[i] for i in rng.permutation(len(texts))]
        for got, want in zip(twin.encode_flat(batch), _one_by_one(twin, batch), strict=True):
            np.testing.assert_array_equal(got, want)
        joined = twin.encode_joined(batch, info.eod_token) if info.eod_token in twin.special else None
        if joined is not None:
            ids, where = joined
            assert (ids[where] == twin.special[info.eod_token]).all() and where.size == len(batch)
        segments = [[Segment(t, target=True)] for t in batch]
        hf, tt = SampleEncoder(tok, info), SampleEncoder(tok, info, twin=twin)
        for got, want in zip(tt.encode_flat(segments), hf.encode_flat(segments), strict=True):
            np.testing.assert_array_equal(got, want)
    # Without the joiner's text in any text, an isolated joiner is found by its id alone (no byte check).
    isolated = [j for j in dict.fromkeys([info.eod_token, *list(twin.special)[:3]]) if j in twin.special
                and twin.joiner_isolated(j)]
    assert isolated  # the fast path is exercised on every qualifying tokenizer
    for joiner in isolated:
        for batch in ([t for t in texts if joiner not in t], [t for t in texts if joiner not in t][::-1]):
            ids, where = twin.encode_joined(batch, joiner)
            alone = [twin.encode_flat([t])[0] for t in batch]
            np.testing.assert_array_equal(ids, np.concatenate([np.append(a, twin.special[joiner]) for a in alone]))
            np.testing.assert_array_equal(where, np.cumsum([a.size + 1 for a in alone]) - 1)


@pytest.mark.parametrize(("specials", "joiner", "isolated"), [
    (["<|endoftext|>"], "<|endoftext|>", True),
    (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "<|endoftext|>", True),
    (["<|endoftext|>", "x<|end"], "<|endoftext|>", False),  # begins before, runs into it
    (["<|endoftext|>", "<|endoftext|>!"], "<|endoftext|>", False),  # begins with it
    (["<|endoftext|>", "<|end"], "<|endoftext|>", False),  # a prefix of it, at its start
    (["<|endoftext|>", "a<|endoftext|>b"], "<|endoftext|>", False),  # covers it
    (["~~"], "~~", False),  # its end begins it again
    (["<s>", "</s>"], "</s>", True),
    (["<s>", "</s>", "s>x"], "</s>", True),  # could begin inside it, but the joiner, leftmost, matches first
    (["<s>", "</s>", "a</"], "</s>", False),
])
def test_joiner_isolated(specials, joiner, isolated):
    twin = tiktoken_backend.TiktokenEncoder(None, nfc=False, token_bytes=np.zeros(0, np.int64),
                                            special={s: i for i, s in enumerate(specials)})
    assert twin.joiner_isolated(joiner) is isolated


def test_a_special_token_across_a_boundary_falls_back_to_one_call_per_text(make_tokenizer):
    """A special token that begins inside one text and runs into the joiner ("x<|end" before "<|endoftext|>"),
    or that begins with the joiner ("<|endoftext|>!"), would change the joined ids: the byte check sees it, and
    the batch is encoded one text at a time, as tokenizers encodes it."""
    d = make_tokenizer(["<|endoftext|>", "x<|end", "<|endoftext|>!", "~~"])
    tok, info = load_tokenizer(d)
    twin, why = tiktoken_backend.load(d / "tokenizer.json", tok)
    assert twin is not None, why
    for batch in (["ax", "b"], ["a", "!b"], ["ax", "!b", ""]):
        assert twin.encode_joined(batch, "<|endoftext|>") is None
        for got, want in zip(twin.encode_flat(batch), _one_by_one(twin, batch), strict=True):
            np.testing.assert_array_equal(got, want)
        segments = [[Segment(t, target=True)] for t in batch]
        hf, tt = SampleEncoder(tok, info), SampleEncoder(tok, info, twin=twin)
        for got, want in zip(tt.encode_flat(segments), hf.encode_flat(segments), strict=True):
            np.testing.assert_array_equal(got, want)
    assert twin.encode_joined(["a", "b"], "<|endoftext|>") is not None
    # A joiner whose end can begin it again ("~~" after a text ending with "~") matches one byte early: the
    # token has the joiner's id, but not its place.
    assert twin.encode_joined(["a~", "b"], "~~") is None and twin.encode_joined(["a", "b"], "~~") is not None
