"""Megatron-LM / MindSpeed-LLM preprocess_data.py flags on `packer build`: each alias builds byte-identically
to packer's own flag, and the flags packer does not take are refused with what to do instead."""

from __future__ import annotations

import json
import re
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from packer.aliases import ALPACA_KEYS, HANDLER_NAMES, PROMPT_TYPES, REFUSED
from packer.cli import main
from packer.handlers import HANDLERS, template_names
from packer.manifest import output_files

DEMO = Path(__file__).resolve().parents[2] / "packer" / "assets" / "demo_alpaca.json"
GPT2 = Path(__file__).resolve().parents[2] / "packer" / "assets" / "gpt2"
PEER = Path(__file__).resolve().parents[3] / "shared" / "peers" / "mindspeed_llm_preprocess"

MOSS_RECORD = {"meta_instruction": "You are MOSS.\n", "num_turns": 1, "chat": {"turn_1": {
    "Human": "<|Human|>: 1+1?<eoh>\n", "Inner Thoughts": "<|Inner Thoughts|>: None<eot>\n",
    "Commands": "<|Commands|>: None<eoc>\n", "Tool Responses": "<|Results|>: None<eor>\n",
    "MOSS": "<|MOSS|>: 2<eom>\n"}}}
BELLE_RECORD = {"instruction": "Human:你好\nAssistant:你好！\nHuman:1+1=?\nAssistant:", "input": "", "output": "2"}
SHAREGPT_RECORD = {"conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("alias_inputs")
    demo = json.loads(DEMO.read_text(encoding="utf-8"))[:120]
    demo[3] = {**demo[3], "system": "Be brief.", "history": [["Hi", "Hello!"]]}
    files = {"alpaca": demo, "belle": [BELLE_RECORD] * 3, "moss": [MOSS_RECORD] * 3,
             "messages": [SHAREGPT_RECORD] * 3,
             "renamed": [{"q": r["instruction"], "i": r["input"], "a": r["output"],
                          **{k: r[k] for k in ("system", "history") if k in r}} for r in demo]}
    out = {}
    for name, records in files.items():
        path = root / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
        out[name] = str(path)
    return out


@pytest.fixture
def outcome(tmp_path):
    """outcome(*args): the build's four data files, or (exit code, message) where it fails."""
    runner, counter = CliRunner(), iter(range(1000))

    def run(*args: str):
        prefix = tmp_path / f"b{next(counter)}" / "out"
        r = runner.invoke(main, ["build", *args, "--output-prefix", str(prefix), "-q", "--seq-length", "512"])
        if r.exit_code:
            return r.exit_code, r.output.replace(str(prefix), "PREFIX")
        return [p.read_bytes() for p in output_files(prefix)]

    return run


def _same(a, b) -> None:
    assert a == b
    assert isinstance(a, list) or "Traceback" not in a[1], a  # a failure, if any, is the same clean one


def test_tokenizer_name_or_path(outcome, inputs):
    native = outcome("--handler", "alpaca", "--input", inputs["alpaca"], "--tokenizer", str(GPT2))
    assert isinstance(native, list)
    _same(outcome("--handler", "alpaca", "--input", inputs["alpaca"], "--tokenizer-name-or-path", str(GPT2)), native)


@pytest.mark.parametrize("name", sorted(HANDLER_NAMES))
def test_handler_name(outcome, inputs, name):
    handler = HANDLER_NAMES[name]
    data = inputs["alpaca" if handler == "text" else handler]
    extra = ["--json-keys", "instruction,output"] if handler == "text" else []
    if handler == "messages":
        extra = ["--chat-template", "chatml"] if "--chat-template" in _build_options() else []
    alias = outcome("--handler-name", name, "--input", data, *extra)
    if handler not in HANDLERS:  # a handler being written elsewhere: the normal unknown-handler error
        assert alias[0] == 1 and f"unknown handler {handler!r}" in alias[1]
        return
    native = outcome("--handler", handler, "--input", data, *extra)
    if handler in ("alpaca", "belle", "moss", "text"):
        assert isinstance(native, list), native
    _same(alias, native)


def test_json_keys_space_separated(outcome, inputs):
    native = outcome("--handler", "text", "--input", inputs["alpaca"], "--json-keys", "instruction,input,output")
    assert isinstance(native, list)
    _same(outcome("--handler", "text", "--input", inputs["alpaca"], "--json-keys", "instruction", "input", "output"),
          native)
    _same(outcome("--handler", "text", "--json-keys", "instruction", "input", "output", "--input", inputs["alpaca"]),
          native)
    _same(outcome("--handler", "text", "--input", inputs["alpaca"], "--json-keys", "instruction,input", "output"),
          native)


def test_append_eod_changes_nothing(outcome, inputs):
    native = outcome("--handler", "alpaca", "--input", inputs["alpaca"])
    _same(outcome("--handler", "alpaca", "--input", inputs["alpaca"], "--append-eod"), native)


@pytest.mark.parametrize("name", sorted(PROMPT_TYPES))
def test_prompt_type(outcome, inputs, name):
    template, system = PROMPT_TYPES[name]
    native = outcome("--handler", "alpaca", "--input", inputs["alpaca"], "--template", template,
                     *(["--system", system] if system else []))
    assert isinstance(native, list), native
    _same(outcome("--handler", "alpaca", "--input", inputs["alpaca"], "--prompt-type", name), native)
    # a --system of one's own wins over the prompt type's default, as MindSpeed's record system does
    _same(outcome("--handler", "alpaca", "--input", inputs["alpaca"], "--prompt-type", name, "--system", "Hi."),
          outcome("--handler", "alpaca", "--input", inputs["alpaca"], "--template", template, "--system", "Hi."))


def test_prompt_type_for_messages_is_the_chat_template(outcome, inputs):
    if "--chat-template" not in _build_options():
        pytest.skip("packer build has no --chat-template yet")
    native = outcome("--handler", "messages", "--input", inputs["messages"], "--chat-template", "chatml",
                     "--system", PROMPT_TYPES["qwen"][1])
    _same(outcome("--handler-name", "SharegptStyleInstructionHandler", "--input", inputs["messages"],
                  "--prompt-type", "qwen"), native)


def test_mindspeed_map_keys(outcome, inputs):
    ours = {"instruction": "q", "input": "i", "output": "a"}
    theirs = {"prompt": "q", "query": "i", "response": "a"}
    native = outcome("--handler", "alpaca", "--input", inputs["renamed"], "--map-keys", json.dumps(ours))
    assert isinstance(native, list), native
    assert native == outcome("--handler", "alpaca", "--input", inputs["alpaca"])  # the same records
    _same(outcome("--handler", "alpaca", "--input", inputs["renamed"], "--map-keys", json.dumps(theirs)), native)
    _same(outcome("--handler-name", "AlpacaStyleInstructionHandler", "--input", inputs["renamed"],
                  "--map-keys", json.dumps(theirs)), native)
    code, message = outcome("--handler", "alpaca", "--input", inputs["renamed"],
                            "--map-keys", json.dumps({"prompt": "q", "instruction": "x", "output": "a"}))
    assert code == 2 and "'instruction'" in message
    from packer.handlers.alpaca import FIELDS

    assert set(ALPACA_KEYS.values()) == set(FIELDS)


# -- what is refused, and how ------------------------------------------------------------------------------------


def test_unknown_handler_name_names_the_equivalents(outcome, inputs):
    code, message = outcome("--handler-name", "AlpacaStylePairwiseHandler", "--input", inputs["alpaca"])
    assert code == 2 and "'AlpacaStylePairwiseHandler' has no packer equivalent" in message
    assert all(name in message for name in HANDLER_NAMES)


def test_unknown_prompt_type_lists_what_exists(outcome, inputs):
    code, message = outcome("--handler", "alpaca", "--prompt-type", "qwen3", "--input", inputs["alpaca"])
    assert code == 2 and "'qwen3' has no packer equivalent" in message
    assert all(name in message for name in PROMPT_TYPES) and "--template" in message


@pytest.mark.parametrize("args", [
    ("--handler", "text", "--handler-name", "AlpacaStyleInstructionHandler"),
    ("--handler", "alpaca", "--template", "alpaca", "--prompt-type", "qwen"),
    (),
])
def test_conflicts_and_omissions_are_usage_errors(outcome, inputs, args):
    code, message = outcome(*args, "--input", inputs["alpaca"])
    assert code == 2 and ("pass one of them" in message or "Missing option '--handler'" in message), message


@pytest.mark.parametrize("flag", sorted(REFUSED))
def test_refused_flags_say_what_to_do(outcome, inputs, flag):
    code, message = outcome("--handler", "alpaca", "--input", inputs["alpaca"], flag, "x")
    assert code == 2 and f"{flag} is a Megatron-LM / MindSpeed-LLM preprocess_data.py option" in message
    assert REFUSED[flag].split(";")[0][:30] in message.replace("\n", " ")
    assert outcome("--handler", "alpaca", "--input", inputs["alpaca"], f"{flag}=x")[0] == 2


def test_bare_pack_is_mindspeeds(outcome, inputs):
    for args in (("--pack",), ("--pack", "--neat-pack")):
        code, message = outcome("--handler", "alpaca", "--input", inputs["alpaca"], *args)
        assert code == 2 and "MindSpeed's bare --pack is the default" in message


# -- the tables against MindSpeed-LLM's own code -----------------------------------------------------------------


def _build_options() -> set[str]:
    build = main.get_command(click.Context(main), "build")
    return {o for p in build.params for o in p.opts}


def test_mapped_templates_exist():
    for template, _ in PROMPT_TYPES.values():
        assert template in template_names("alpaca")
    assert set(HANDLER_NAMES.values()) - set(HANDLERS) <= {"messages"}


def test_tables_match_mindspeed():
    """Class names from MindSpeed-LLM's data_handler.py; each mapped prompt type's default system and turn text
    as its templates.json has them (../shared/peers/mindspeed_llm_preprocess)."""
    source = PEER / "mindspeed_llm" / "tasks" / "preprocess" / "data_handler.py"
    if not source.is_file():
        pytest.skip(f"{source} not found (../shared/peers lives next to the repo)")
    classes = set(re.findall(r"^class (\w+)\(", source.read_text(encoding="utf-8"), re.MULTILINE))
    assert set(HANDLER_NAMES) <= classes
    templates = {t["name"]: t for t in json.loads((PEER / "configs" / "finetune" / "templates.json").read_text())}
    from packer.handlers.templates import CHAT_TEMPLATES

    for name, (template, system) in PROMPT_TYPES.items():
        theirs, ours = templates[name], CHAT_TEMPLATES[template]
        if name == "alpaca":
            assert theirs["default_system"] == ours.default_system + "\n\n"
        else:
            assert theirs.get("default_system") == system, name
        user = "".join(s for s in theirs["format_user"]["slots"] if isinstance(s, str)).replace("{{content}}",
                                                                                             "{query}")
        if name != "llama2":  # MindSpeed's is "[INST] {query} [/INST]", packer's adds the space before the answer
            assert user == ours.user, name
