"""`--handler messages` and `--chat-template` end to end: formats, masks, BOS, errors, and the other handlers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from packer.build import build
from packer.config import BuildConfig, BuildError
from packer.dataset import PackedDataset

from .conftest import DATA

CHATML_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
OPENAI = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                       {"role": "assistant", "content": "4"}, {"role": "user", "content": "3+3?"},
                       {"role": "assistant", "content": "6"}]}
SHAREGPT = {"system": "Be brief.", "conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"},
                                                     {"from": "human", "value": "3+3?"}, {"from": "gpt", "value": "6"}]}


def run(tmp_path: Path, name: str, records: list, tokenizer: Path, **kw):
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    cfg = dict(handler="messages", inputs=(str(path),), tokenizer=str(tokenizer), seq_length=512,
               output_prefix=str(tmp_path / name), tokenizer_backend="hf", pack="none") | kw
    return build(BuildConfig(**cfg), progress=False)


def spans(prefix: str, tokenizer: Path) -> list[list[tuple[bool, str]]]:
    """Per sample: runs of (is target, decoded text)."""
    tok = Tokenizer.from_file(str(tokenizer / "tokenizer.json"))
    out = []
    for pack in PackedDataset(prefix):
        ends = np.cumsum(pack.doc_lens)
        for n, e in zip(pack.doc_lens.tolist(), ends.tolist(), strict=True):
            ids, mask = pack.ids[e - n : e].tolist(), pack.loss_mask[e - n : e].tolist()
            runs, start = [], 0
            for i in range(1, len(ids) + 1):
                if i == len(ids) or mask[i] != mask[start]:
                    runs.append((bool(mask[start]), tok.decode(ids[start:i], skip_special_tokens=False)))
                    start = i
            out.append(runs)
    return out


@pytest.fixture
def chatml_tokenizer(make_tokenizer) -> Path:
    template = (Path(__file__).resolve().parents[2] / "packer/assets/chat_templates/chatml.jinja").read_text()
    return make_tokenizer(CHATML_SPECIALS, config={"eos_token": "<|im_end|>", "chat_template": template})


def test_openai_sharegpt_and_bare_lists_give_the_same_build(tmp_path: Path, chatml_tokenizer: Path) -> None:
    a = run(tmp_path, "a", [OPENAI], chatml_tokenizer)
    b = run(tmp_path, "b", [SHAREGPT], chatml_tokenizer)
    c = run(tmp_path, "c", [OPENAI["messages"]], chatml_tokenizer)
    data = [Path(r.prefix + ".bin").read_bytes() + Path(r.prefix + "_loss_mask.bin").read_bytes() for r in (a, b, c)]
    assert data[0] == data[1] == data[2]
    assert spans(a.prefix, chatml_tokenizer) == [[
        (False, "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"),
        (True, "4<|im_end|>"), (False, "\n<|im_start|>user\n3+3?<|im_end|>\n<|im_start|>assistant\n"),
        (True, "6<|im_end|>"), (False, "\n"), (True, "<|endoftext|>")]]
    assert a.manifest["config"]["chat_template_origin"].endswith("tokenizer_config.json chat_template")


def test_last_turn_only_and_loss_weight(tmp_path: Path, chatml_tokenizer: Path) -> None:
    r = run(tmp_path, "l", [OPENAI], chatml_tokenizer, last_turn_only=True)
    assert [t for t, _ in spans(r.prefix, chatml_tokenizer)[0] if t] == [True, True]  # "6<|im_end|>", EOD
    weighted = {"messages": [dict(m, loss_weight=0.0 if m.get("content") == "4" else 1.0)
                             for m in OPENAI["messages"]]}
    w = run(tmp_path, "w", [weighted], chatml_tokenizer)
    assert [text for t, text in spans(w.prefix, chatml_tokenizer)[0] if t] == ["6<|im_end|>", "<|endoftext|>"]


def test_tool_calls_and_tool_results(tmp_path: Path) -> None:
    qwen = DATA / "tokenizers" / "qwen2.5-instruct"
    if not qwen.exists():
        pytest.skip(f"{qwen} not found (shared data)")
    record = {"conversations": [{"from": "human", "value": "Weather in Paris?"},
                                {"from": "function_call", "value": json.dumps({"name": "weather",
                                                                               "arguments": {"city": "Paris"}})},
                                {"from": "observation", "value": '{"temp": 21}'},
                                {"from": "gpt", "value": "21 degrees."}],
              "tools": json.dumps([{"name": "weather", "parameters": {"type": "object"}}])}
    r = run(tmp_path, "t", [record], qwen)
    trained = [text for t, text in spans(r.prefix, qwen)[0] if t]
    assert trained == ['<tool_call>\n{"name": "weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
                       "21 degrees.<|im_end|>", "<|endoftext|>"]
    prompt = "".join(text for t, text in spans(r.prefix, qwen)[0] if not t)
    assert '<tools>\n{"name": "weather"' in prompt and '<tool_response>\n{"temp": 21}\n</tool_response>' in prompt


@pytest.mark.parametrize(("record", "error"), [
    ({"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]}, "unknown role 'bot'"),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]}, "has no 'content'"),
    ({"messages": [{"role": "user", "content": "q"}]}, "no assistant message"),
    ({"messages": "hi"}, "non-empty list of messages"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": "x"}]},
     "function_call value must be JSON"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "url": "x"}]},
                   {"role": "assistant", "content": "a"}]}, "content part of type 'image'"),
])
def test_malformed_conversations_are_record_errors(tmp_path: Path, chatml_tokenizer: Path, record, error) -> None:
    with pytest.raises(BuildError, match=rf"record 2 \(line 2\): field .*{error}"):
        run(tmp_path, "e", [OPENAI, record], chatml_tokenizer)
    r = run(tmp_path, "s", [OPENAI, record], chatml_tokenizer, on_error="skip")
    assert (r.counters.samples, r.counters.skipped) == (1, 1)


def test_template_raise_exception_is_a_record_error(tmp_path: Path, make_tokenizer) -> None:
    strict = ("{% for m in messages %}{% if (m.role == 'user') != (loop.index0 % 2 == 0) %}"
              "{{ raise_exception('roles must alternate user/assistant') }}{% endif %}"
              "{{ m.role }}: {{ m.content }}<|im_end|>{% endfor %}")
    tok = make_tokenizer(CHATML_SPECIALS, config={"chat_template": strict})
    bad = {"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "q"},
                        {"role": "assistant", "content": "a"}]}
    with pytest.raises(BuildError, match="refuses the conversation: roles must alternate"):
        run(tmp_path, "x", [OPENAI["messages"][1:3], bad], tok)


def test_no_template_is_a_clear_error(tmp_path: Path, make_tokenizer) -> None:
    tok = make_tokenizer(CHATML_SPECIALS)
    with pytest.raises(BuildError, match="has no chat template.*--chat-template chatml"):
        run(tmp_path, "n", [OPENAI], tok)
    r = run(tmp_path, "b", [OPENAI], tok, chat_template="chatml")
    assert r.manifest["config"]["chat_template_origin"] == "built-in chatml"


def test_bos_exactly_once(tmp_path: Path, make_tokenizer) -> None:
    """Template writes bos_token; tokenizer adds it too (Llama-2 style) or not (Llama-3 style): one BOS."""
    specials = ("<s>", "</s>", "<|im_end|>")
    template = "{{ bos_token }}{% for m in messages %}{{ m.role }}: {{ m.content }}<|im_end|>\n{% endfor %}"
    config = {"bos_token": "<s>", "eos_token": "</s>", "chat_template": template}
    for name, post in (("adds", "<s>"), ("none", None)):
        tok = make_tokenizer(specials, config=config, bos=post)
        r = run(tmp_path, name, [OPENAI], tok)
        ids = PackedDataset(r.prefix)[0].ids
        bos = Tokenizer.from_file(str(tok / "tokenizer.json")).token_to_id("<s>")
        assert ids[0] == bos and int((ids == bos).sum()) == 1, name
    tok = make_tokenizer(specials, config=config | {"chat_template": template.replace("{{ bos_token }}", "")},
                         bos="<s>")
    r = run(tmp_path, "tokonly", [OPENAI], tok)
    assert "does not write it" in r.manifest["config"]["chat_template_note"]
    assert int((PackedDataset(r.prefix)[0].ids == Tokenizer.from_file(str(tok / "tokenizer.json"))
                .token_to_id("<s>")).sum()) == 1


def test_alpaca_in_the_models_template_equals_the_builtin(tmp_path: Path, make_tokenizer) -> None:
    """--chat-template renders alpaca records as user/assistant turns; the built-in --template chatml and
    llama3 write exactly the same text and targets as the models' own (Jinja) templates."""
    specials = (*CHATML_SPECIALS, "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
    tok = make_tokenizer(specials, config={"bos_token": "<|begin_of_text|>"})
    path = tmp_path / "a.jsonl"
    records = [{"instruction": "Add.", "input": "2, 3", "output": "5", "system": "Be brief."},
               {"instruction": " Hi ", "input": "", "output": " Hello! \n", "history": [["a", "b"]]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    for name in ("chatml", "llama3"):
        kw = dict(handler="alpaca", inputs=(str(path),), tokenizer=str(tok), seq_length=512, tokenizer_backend="hf",
                  pack="none")
        jinja = build(BuildConfig(output_prefix=str(tmp_path / f"j{name}"), chat_template=name, **kw), progress=False)
        builtin = build(BuildConfig(output_prefix=str(tmp_path / f"b{name}"), template=name, **kw), progress=False)
        assert spans(jinja.prefix, tok) == spans(builtin.prefix, tok), name
        for suffix in (".bin", "_loss_mask.bin"):
            assert Path(jinja.prefix + suffix).read_bytes() == Path(builtin.prefix + suffix).read_bytes(), name


def test_belle_dialogue_in_a_chat_template(tmp_path: Path, chatml_tokenizer: Path) -> None:
    path = tmp_path / "b.jsonl"
    path.write_text(json.dumps({"instruction": "Human:你好\nAssistant:你好！\nHuman:1+1=?\nAssistant:",
                                "input": "", "output": "2"}) + "\n", encoding="utf-8")
    r = build(BuildConfig(handler="belle", inputs=(str(path),), tokenizer=str(chatml_tokenizer), seq_length=512,
                          output_prefix=str(tmp_path / "b"), chat_template="auto", tokenizer_backend="hf"),
              progress=False)
    assert spans(r.prefix, chatml_tokenizer) == [[
        (False, "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n"), (True, "你好！<|im_end|>"),
        (False, "\n<|im_start|>user\n1+1=?<|im_end|>\n<|im_start|>assistant\n"), (True, "2<|im_end|>"),
        (False, "\n"), (True, "<|endoftext|>")]]


def test_cli_options(tmp_path: Path, chatml_tokenizer: Path) -> None:
    from click.testing import CliRunner

    from packer.cli import main

    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps(OPENAI) + "\n", encoding="utf-8")
    args = ["build", "--handler", "messages", "--input", str(path), "--tokenizer", str(chatml_tokenizer),
            "--output-prefix", str(tmp_path / "c"), "-q"]
    r = CliRunner().invoke(main, [*args, "--chat-template", "chatml", "--chat-template-kwargs", '{"x": 1}'])
    assert r.exit_code == 0, r.output
    assert "chat template built-in chatml" in r.output
    r = CliRunner().invoke(main, [*args, "--chat-template-kwargs", "{x"])
    assert r.exit_code == 1 and "--chat-template-kwargs: not JSON" in r.output
    r = CliRunner().invoke(main, [*args, "--chat-template", "chatml", "--template", "chatml"])
    assert r.exit_code == 1 and "choose one" in r.output
