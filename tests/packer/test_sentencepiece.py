"""SentencePiece tokenizer.model files: the protobuf reader, the conversion, and builds identical to tokenizer.json."""

from __future__ import annotations

import json
import shutil
import struct
from dataclasses import fields, replace
from pathlib import Path

import pytest
from click.testing import CliRunner
from tokenizers import Tokenizer

from packer import sentencepiece as sp
from packer.build import build
from packer.cli import main
from packer.config import BuildConfig
from packer.manifest import output_files
from packer.tokenize import TokenizerError, load_tokenizer
from packer.verify import verify

ALPACA = "alpaca/stanford_alpaca_pr152_alpaca_5000.json"
BELLE = "belle/belle_train_utils_data_dev1K.json"
MOSS = "moss/moss_003_sft_samples_combined.jsonl"

HARD = [
    "", " ", "  ", "a", " a", "a ", "  leading", "trailing  ", "multiple   spaces  inside", "\n", "\n\n", "a\nb",
    " \n ", "\t", "tab\tinside", "\ttabbed\t", "\r\n", "mixed \t\n whitespace \u3000 ideographic\u00a0nbsp",
    "emoji 😀🎉👍🏽👨‍👩‍👧", "中文文本测试，标点符号。", "日本語のテキスト、カタカナ。한국어", "Ελληνικά Русский العربية עברית हिन्दी",
    "rare bytes \u0000\u0001\u001f \U0001f9ff \U000e0041 \ufffd \u2581 ▁▁ ▁x", "<s>", "</s>", "<unk>", "a<s>b", " <s> ",
    "<s><s></s>", "<0x41>", "x" * 5000, "Hello, world! It's 3.14159; don't you think?",
    "def f(x):\n    return x ** 2  # comment\n", "combining e\u0301 a\u0308", "zero\u200bwidth\u200djoiner",
]


@pytest.fixture(scope="module")
def llama2_model(helpers) -> Path:
    return helpers.data_file("tokenizers/llama2/tokenizer.model")


@pytest.fixture(scope="module")
def llama2_pair(llama2_model) -> tuple[Tokenizer, Tokenizer]:
    """(tokenizer.json as shipped, the same tokenizer converted here from tokenizer.model)."""
    return Tokenizer.from_file(str(llama2_model.with_name("tokenizer.json"))), sp.load(llama2_model)


def _texts(read_records) -> list[str]:
    texts = [r["instruction"] + "\n" + r["input"] + "\n" + r["output"] for r in read_records(ALPACA)]
    texts += [r["instruction"] + r["input"] + r["output"] for r in read_records(BELLE)]
    for r in read_records(MOSS):
        texts.append(r.get("meta_instruction", "") + "".join(v for t in r["chat"].values() for v in t.values() if v))
    return texts


# -- the protobuf reader ----------------------------------------------------------------------------------------


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _message(*items: tuple[int, object]) -> bytes:
    """A protobuf message, written independently of the reader: bytes/str -> wire 2, float -> 5, int/bool -> 0."""
    out = b""
    for number, value in items:
        if isinstance(value, str):
            value = value.encode("utf-8")
        if isinstance(value, bytes):
            out += _varint(number << 3 | 2) + _varint(len(value)) + value
        elif isinstance(value, float):
            out += _varint(number << 3 | 5) + struct.pack("<f", value)
        else:
            out += _varint(number << 3) + _varint(int(value))
    return out


def _model(pieces: list[tuple[str, float, int]], model_type: int = 2, byte_fallback: bool = False,
           trainer: tuple = (), normalizer: tuple = ((3, True), (4, False), (5, True))) -> bytes:
    return (b"".join(_message((1, _message((1, p), (2, s), (3, t)))) for p, s, t in pieces)
            + _message((2, _message((3, model_type), (35, byte_fallback), *trainer)))
            + _message((3, _message((1, "identity"), *normalizer))))


TINY = [("<unk>", 0.0, sp.UNKNOWN), ("<s>", 0.0, sp.CONTROL), ("</s>", 0.0, sp.CONTROL), ("<sep>", 0.0, sp.USER_DEFINED),
        ("▁a", -1.0, sp.NORMAL), ("ab", -2.0, sp.NORMAL), ("▁ab", -3.0, sp.NORMAL), ("▁", -4.0, sp.NORMAL),
        ("a", -5.0, sp.NORMAL), ("b", -6.0, sp.NORMAL)]


def test_reader_reads_what_an_independent_writer_wrote(llama2_model):
    model = sp.parse(llama2_model.read_bytes())
    assert (len(model.pieces), model.model_type, model.byte_fallback) == (32000, sp.BPE_TYPE, True)
    assert (model.unk_id, model.bos_id, model.eos_id, model.pad_id) == (0, 1, 2, -1)
    assert (model.add_dummy_prefix, model.remove_extra_whitespaces, model.escape_whitespaces) == (True, False, True)
    assert [p.piece for p in model.pieces[:4]] == ["<unk>", "<s>", "</s>", "<0x00>"]
    assert sum(p.type == sp.BYTE for p in model.pieces) == 256
    again = sp.parse(_model([(p.piece, p.score, p.type) for p in model.pieces], byte_fallback=True,
                            trainer=((40, 0), (41, 1), (42, 2), (43, -1)), normalizer=((3, True), (4, False))))
    assert again == replace(model, normalizer_name="identity")


def test_defaults_and_negative_ids():
    """Absent fields take sentencepiece_model.proto's defaults; int32 -1 is a 10-byte varint."""
    model = sp.parse(_message((1, _message((1, "a")))))
    defaults = {f.name: f.default for f in fields(sp.SentencePieceModel) if f.name != "pieces"}
    assert {k: getattr(model, k) for k in defaults} == defaults and model.pieces == (sp.Piece("a", 0.0, sp.NORMAL),)
    assert sp.parse(_model(TINY, trainer=((41, -1), (43, 7)))).bos_id == -1
    assert _varint(-1) == b"\xff" * 9 + b"\x01"


def test_tiny_bpe_model_merges_by_score_and_matches_user_symbols():
    tok = sp.to_tokenizer(sp.parse(_model(TINY)))
    assert sp.merges(sp.parse(_model(TINY))) == [("▁", "a"), ("a", "b"), ("▁a", "b"), ("▁", "ab")]
    # "<sep>" is matched in the text, a plain token; the text after it gets its own "▁" prefix, as in every
    # legacy-mode conversion (llama2's tokenizer.json does the same after "<s>")
    enc = tok.encode("ab a<sep>b")
    assert enc.tokens == ["<s>", "▁ab", "▁a", "<sep>", "▁", "b"]
    assert tok.decode(enc.ids) == "ab a<sep> b"
    no_prefix = sp.to_tokenizer(sp.parse(_model(TINY, normalizer=((3, False), (4, False)))))
    assert no_prefix.encode("ab a", add_special_tokens=False).tokens == ["ab", "▁a"]
    no_bos = sp.to_tokenizer(sp.parse(_model(TINY, trainer=((41, -1),))))
    assert no_bos.encode("a").tokens == ["▁a"]


@pytest.mark.parametrize(("spec", "why"), [
    (dict(model_type=1), "Unigram model"),
    (dict(model_type=3), "word model"),
    (dict(normalizer=((2, b"\x01\x02"),)), "normalization rules"),
    (dict(normalizer=()), "remove_extra_whitespaces"),  # the proto default: true
    (dict(normalizer=((4, False), (5, False))), "escape_whitespaces off"),
    (dict(trainer=((24, True),)), "treat_whitespace_as_suffix"),
])
def test_what_is_not_reproduced_is_refused_with_the_conversion(tmp_path, spec, why):
    path = tmp_path / "tokenizer.model"
    path.write_bytes(_model(TINY, **spec))
    with pytest.raises(TokenizerError) as e:
        load_tokenizer(path)
    assert str(path) in str(e.value) and why in str(e.value)
    assert "AutoTokenizer.from_pretrained(DIR).save_pretrained(OUT)" in str(e.value)


def _corrupt(good: bytes) -> dict[str, bytes]:
    return {
        "empty": b"", "truncated": good[: len(good) // 2], "one byte short": good[:-1], "json": b'{"version": "1.0"}',
        "text": b"hello world\n", "bad wire type": b"\x0b\x00", "field zero": b"\x02\x00",
        "runaway varint": b"\x08" + b"\xff" * 11, "piece not utf-8": _message((1, _message((1, b"\xff\xfe")))),
        "piece without text": _message((1, _message((2, 1.0)))), "unknown piece type": _message(
            (1, _message((1, "a"), (3, 9)))), "score as varint": _message((1, _message((1, "a"), (2, 3)))),
        "no pieces": _message((2, _message((3, 2)))),
        "unk not unknown": _model([("a", 0.0, sp.NORMAL), ("<s>", 0.0, sp.CONTROL)]),
        "duplicate piece": _model([*TINY, ("ab", -7.0, sp.NORMAL)]),
    }


def test_a_corrupt_model_is_a_clear_error_naming_the_file(tmp_path, llama2_model):
    for name, data in _corrupt(llama2_model.read_bytes()).items():
        path = tmp_path / f"{name.replace(' ', '_')}.model"
        path.write_bytes(data)
        with pytest.raises(TokenizerError) as e:
            load_tokenizer(path)
        assert str(e.value).startswith(f"{path}: "), (name, str(e.value))


def test_a_model_file_under_another_name_says_to_name_it_model(tmp_path, llama2_model):
    path = tmp_path / "tokenizer.bin"
    shutil.copy(llama2_model, path)
    with pytest.raises(TokenizerError, match=r"valid UTF-8.*must be named \*\.model"):
        load_tokenizer(path)


# -- the conversion against llama2's tokenizer.json ------------------------------------------------------------


def test_the_conversion_is_the_shipped_tokenizer_json(llama2_pair):
    """Every part of the pipeline (normalizer, model with vocab and merges in order, added tokens,
    post-processor, decoder) as the shipped tokenizer.json, which transformers' LlamaConverter made."""
    shipped, converted = (json.loads(t.to_str()) for t in llama2_pair)
    assert converted == shipped


def test_ids_and_offsets_as_the_shipped_tokenizer_json(llama2_pair, helpers):
    shipped, converted = llama2_pair
    texts = HARD + _texts(helpers.read_records)
    assert len(texts) > 7000
    want, got = shipped.encode_batch(texts), converted.encode_batch(texts)
    for text, a, b in zip(texts, want, got, strict=True):
        assert (a.ids, a.offsets) == (b.ids, b.offsets), text[:80]
    assert converted.encode("<s>", add_special_tokens=False).ids == [1]
    assert converted.encode("\U0001f9ff", add_special_tokens=False).tokens[1:] == ["<0xF0>", "<0x9F>", "<0xA7>",
                                                                                     "<0xBF>"]  # byte fallback
    assert [converted.decode(e.ids) for e in got[: len(HARD)]] == [shipped.decode(e.ids) for e in want[: len(HARD)]]


def test_load_tokenizer_takes_the_file_or_a_directory_with_only_the_model(tmp_path, llama2_model):
    from_json = load_tokenizer(llama2_model.parent)[1]  # tokenizer.json wins where both are there
    assert from_json.path.endswith("tokenizer.json")
    only_model = tmp_path / "m"
    only_model.mkdir()
    shutil.copy(llama2_model, only_model / "tokenizer.model")
    for path in (llama2_model, only_model, only_model / "tokenizer.model"):
        info = load_tokenizer(path)[1]
        assert info.path.endswith("tokenizer.model")
        assert replace(info, path="", sha256="") == replace(from_json, path="", sha256="")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TokenizerError, match="without tokenizer.json or tokenizer.model"):
        load_tokenizer(tmp_path / "empty")


def test_build_from_the_model_is_byte_identical_to_tokenizer_json(tmp_path, llama2_model, helpers):
    """`packer build --tokenizer llama2/tokenizer.model` == `--tokenizer llama2/` (its tokenizer.json)."""
    data = helpers.data_file(ALPACA)
    runner = CliRunner()
    prefixes = []
    for name, tokenizer in (("model", llama2_model), ("json", llama2_model.parent)):
        prefix = tmp_path / name / "alpaca"
        res = runner.invoke(main, ["build", "--handler", "alpaca", "--input", str(data), "--tokenizer", str(tokenizer),
                                   "--output-prefix", str(prefix), "-q"])
        assert res.exit_code == 0, res.output
        prefixes.append(prefix)
    for a, b in zip(*map(output_files, prefixes), strict=True):
        assert a.read_bytes() == b.read_bytes(), a.name
    rep = verify(prefixes[0])  # reloads the .model named in the manifest and checks every id it gave
    assert rep.ok, rep.errors


@pytest.mark.parametrize(("handler", "data", "extra"), [("moss", MOSS, {}), ("belle", BELLE, {}),
                                                        ("alpaca", ALPACA, {"train_on_prompt": True})])
def test_other_handlers_build_alike(tmp_path, llama2_model, helpers, handler, data, extra):
    """moss (special-token text), belle (CJK) and every token a target (no offsets needed: another path)."""
    inp = helpers.write_jsonl(tmp_path / "in.jsonl", helpers.read_records(data)[:1500])
    outs = []
    for name, tokenizer in (("model", llama2_model), ("json", llama2_model.with_name("tokenizer.json"))):
        cfg = BuildConfig(handler=handler, inputs=(str(inp),), tokenizer=str(tokenizer), seq_length=4096,
                          output_prefix=str(tmp_path / name / handler), on_error="skip", **extra)
        outs.append(build(cfg, progress=False).prefix)
    for a, b in zip(*map(output_files, outs), strict=True):
        assert a.read_bytes() == b.read_bytes(), a.name
