"""Chat templates against transformers (the oracle), and the assistant spans taken from the rendering."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from packer.chat_template import ChatRenderer, SpanError, TemplateError, find_template, special_tokens
from packer.handlers import HandlerOptions, get_handler

from .conftest import DATA

TOKENIZERS = DATA / "tokenizers"
FOLDERS = ["qwen2.5-instruct", "phi-3-mini-instruct", "mistral-nemo-instruct-2407", "granite-vision-3.x"]
CONVERSATIONS = sorted((DATA / "sharegpt").glob("*.json*")) if (DATA / "sharegpt").exists() else []
TWO_TURNS = [{"role": "system", "content": "You are a concise assistant."},
             {"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"},
             {"role": "user", "content": "And 3+3?"}, {"role": "assistant", "content": " 6 \n"}]

transformers = pytest.importorskip("transformers")
needs_data = pytest.mark.skipif(not TOKENIZERS.exists(), reason=f"{TOKENIZERS} not found (shared data)")


def renderer(folder: str, source: str | None = None, **kwargs) -> ChatRenderer:
    from tokenizers import Tokenizer

    path = TOKENIZERS / folder
    found = find_template(None, path)
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    specials = frozenset(t.content for t in tok.get_added_tokens_decoder().values() if t.special)
    return ChatRenderer(source or found[0], folder, special_tokens(path) | kwargs, specials)


def records(path: Path, n: int = 40) -> list:
    if path.suffix == ".json":
        return json.loads(path.read_text(encoding="utf-8"))[:n]
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()[:n]]


def conversations(chat: ChatRenderer):
    handler = get_handler("messages", HandlerOptions(chat=chat))
    for path in CONVERSATIONS:
        for rec in records(path):
            rec = {"messages": rec} if isinstance(rec, list) else rec
            messages, _ = handler.messages(rec)
            yield path.name, messages, handler._tools(rec)


def targets(segments) -> list[str]:
    return [s.text for s in segments if s.target]


@needs_data
@pytest.mark.parametrize("folder", FOLDERS)
def test_rendering_equals_transformers_on_the_shared_conversations(folder: str) -> None:
    chat = renderer(folder)
    hf = transformers.AutoTokenizer.from_pretrained(TOKENIZERS / folder)
    same = refused = 0
    for name, messages, tools in conversations(chat):
        try:
            want = hf.apply_chat_template(messages, tools=tools, tokenize=False)
        except Exception:  # the template's raise_exception (e.g. Mistral: roles must alternate)
            with pytest.raises(SpanError, match="refuses"):
                chat.render(messages, tools)
            refused += 1
            continue
        assert chat.render(messages, tools) == want, name
        assert chat.render(messages, tools, add_generation_prompt=True) == hf.apply_chat_template(
            messages, tools=tools, tokenize=False, add_generation_prompt=True), name
        same += 1
    assert same >= 150 and same + refused == 40 * len(CONVERSATIONS)


@needs_data
@pytest.mark.parametrize("folder", FOLDERS)
def test_targets_are_exactly_the_assistant_turns(folder: str) -> None:
    """Every assistant text and the turn terminator are targets; no system/user/tool text is."""
    chat = renderer(folder)
    _, terminator = chat._prompt_and_terminator()
    checked = 0
    for _, messages, tools in conversations(chat):
        try:
            segments = chat.segments(messages, tools)
        except SpanError as e:  # templates that cannot render tool calls, or refuse the roles
            assert "does not render" in str(e) or "refuses" in str(e)
            continue
        assert "".join(s.text for s in segments) == chat.render(messages, tools)
        trained = targets(segments)
        answers = [m for m in messages if m["role"] == "assistant"]
        assert len(trained) == len(answers)
        for text, m in zip(trained, answers, strict=True):
            assert text.endswith(terminator)
            assert m["content"].strip() in text
            assert not any(o["content"].strip() and o["content"].strip() in text
                           for o in messages if o["role"] != "assistant" and len(o["content"].strip()) > 20)
        checked += 1
    assert checked >= 100


@needs_data
@pytest.mark.parametrize(("folder", "prompt", "want"), [
    ("qwen2.5-instruct", "<|im_start|>assistant\n", ["4<|im_end|>", " 6 \n<|im_end|>"]),
    ("phi-3-mini-instruct", "<|assistant|>\n", ["4<|end|>", " 6 \n<|end|>"]),
    ("mistral-nemo-instruct-2407", "", ["4</s>", " 6 \n</s>"]),
    ("granite-vision-3.x", "<|assistant|>\n", ["4<|end_of_text|>", " 6 \n<|end_of_text|>"]),
])
def test_exact_targets_of_a_two_turn_conversation(folder: str, prompt: str, want: list[str]) -> None:
    chat = renderer(folder)
    assert chat._prompt_and_terminator()[0] == prompt
    segments = chat.segments(TWO_TURNS)
    assert targets(segments) == want
    assert targets(chat.segments(TWO_TURNS, train=[False, False, False, False, True])) == want[1:]


@needs_data
@pytest.mark.parametrize(("template", "folder"), [("trl_qwen2_5_training.jinja", "qwen2.5-instruct"),
                                                  ("trl_phi3_training.jinja", "phi-3-mini-instruct"),
                                                  ("smollm3-3b_chat_template.jinja", "qwen2.5-instruct")])
def test_generation_blocks_equal_transformers_assistant_mask(template: str, folder: str) -> None:
    from transformers.utils.chat_template_utils import render_jinja_template

    source = (TOKENIZERS / "chat_templates" / template).read_text(encoding="utf-8")
    for kwargs in ({}, {"enable_thinking": False}):
        chat = renderer(folder, source, **kwargs)
        (want,), (spans,) = render_jinja_template([TWO_TURNS], chat_template=source, return_assistant_tokens_mask=True,
                                                  **chat.variables)
        segments = chat.segments(TWO_TURNS)
        assert "".join(s.text for s in segments) == want
        got, pos = [], 0
        for s in segments:
            if s.target:
                got.append((pos, pos + len(s.text)))
            pos += len(s.text)
        assert got == [tuple(s) for s in spans]


@needs_data
def test_a_template_that_rewrites_past_turns_still_gets_exact_spans() -> None:
    """DeepSeek-R1's template drops the reasoning of every assistant turn: spans follow its rendering."""
    config = json.loads((TOKENIZERS / "chat_templates" / "deepseek-r1-distill-qwen_tokenizer_config.json")
                        .read_text(encoding="utf-8"))
    special = {k: (v["content"] if isinstance(v, dict) else v) for k, v in config.items()
               if k in ("bos_token", "eos_token") and v}
    chat = ChatRenderer(config["chat_template"], "deepseek", special, frozenset(special.values()))
    messages = [{"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "<think>\nadd\n</think>\n\n4"},
                {"role": "user", "content": "3+3?"}, {"role": "assistant", "content": "6"}]
    from transformers.utils.chat_template_utils import render_jinja_template

    (want,), _ = render_jinja_template([messages], chat_template=config["chat_template"], **special)
    segments = chat.segments(messages)
    assert "".join(s.text for s in segments) == want
    assert targets(segments) == ["\n\n4<｜end▁of▁sentence｜>", "6<｜end▁of▁sentence｜>"]


def test_builtin_templates_render_the_models_own() -> None:
    chatml, _ = find_template("chatml", ".")
    llama3, _ = find_template("llama3", ".")
    qwen = ChatRenderer(chatml, "chatml", {}, frozenset({"<|im_end|>"}))
    assert qwen.render(TWO_TURNS) == ("<|im_start|>system\nYou are a concise assistant.<|im_end|>\n<|im_start|>user\n"
                                      "What is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n<|im_start|>user\n"
                                      "And 3+3?<|im_end|>\n<|im_start|>assistant\n 6 \n<|im_end|>\n")
    meta = ChatRenderer(llama3, "llama3", {"bos_token": "<|begin_of_text|>"}, frozenset({"<|eot_id|>"}))
    text = meta.render(TWO_TURNS[1:3])
    assert text == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n4<|eot_id|>")
    assert targets(meta.segments(TWO_TURNS)) == ["4<|eot_id|>", "6<|eot_id|>"]  # content | trim: still exact


def test_a_template_that_changes_content_is_refused_not_guessed() -> None:
    source = "{% for m in messages %}{{ m.role }}: {{ m.content[2:] }}\n{% endfor %}"
    chat = ChatRenderer(source, "odd.jinja", {}, frozenset())
    assert chat.render([{"role": "assistant", "content": "xyz"}]) == "assistant: z\n"
    with pytest.raises(SpanError, match="changes the message text"):  # slicing cuts into the marks
        chat.segments([{"role": "user", "content": "q"}, {"role": "assistant", "content": "banana"}])
    echo = ChatRenderer("{% for m in messages %}{{ m.content }}|{% endfor %}{{ messages[-1].content }}", "e", {},
                        frozenset())
    with pytest.raises(SpanError, match="more than once"):
        echo.segments([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}])
    swap = ChatRenderer("{% for m in messages %}{{ m.content | replace('a', 'b') }}|{% endfor %}", "r", {},
                        frozenset())
    assert targets(swap.segments([{"role": "user", "content": "q"}, {"role": "assistant", "content": "banana"}])
                   ) == ["bbnbnb"]  # rewritten inside the marks: still located exactly
    with pytest.raises(SpanError, match="noncharacter"):
        chat.segments([{"role": "user", "content": "q"}, {"role": "assistant", "content": "x\ufdd0"}])
    with pytest.raises(SpanError, match="refuses"):
        ChatRenderer("{{ raise_exception('no system') }}", "x", {}, frozenset()).render([])
    with pytest.raises(TemplateError, match="not a valid Jinja"):
        ChatRenderer("{% for %}", "bad.jinja", {}, frozenset()).render([])


def test_find_template(tmp_path: Path) -> None:
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": [{"name": "default", "template": "D"}, {"name": "tool_use", "template": "T"}]}))
    assert find_template(None, tmp_path) == ("D", f"{tmp_path / 'tokenizer_config.json'} chat_template 'default'")
    assert find_template("tool_use", tmp_path)[0] == "T"
    (tmp_path / "chat_template.jinja").write_text("J")
    assert find_template("auto", tmp_path)[0] == "J"  # chat_template.jinja wins, as in transformers
    with pytest.raises(TemplateError, match="no such file"):
        find_template("missing.jinja", tmp_path)
    with pytest.raises(TemplateError, match="chatml, llama3"):
        find_template("nope", tmp_path)
