from __future__ import annotations

import pytest

from packer.handlers import HandlerOptions, RecordError, get_handler
from packer.handlers.alpaca import TEMPLATES
from packer.records import Segment

# Written out by hand from tatsu-lab/stanford_alpaca's PROMPT_DICT (+ the usual "\n" after "### Response:").
STANFORD_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nAdd the numbers.\n\n### Input:\n2, 3\n\n### Response:\n"
)
STANFORD_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nSay hi.\n\n### Response:\n"
)
WITH_INPUT = {"instruction": "Add the numbers.", "input": "2, 3", "output": "5"}
HISTORY = {"instruction": "And 2+3?", "output": "5", "history": [["1+1?", "2"], ["2+2?", "4"]]}


def handle(record, **options):
    return get_handler("alpaca", HandlerOptions(**options))(record)


def test_stanford_template_with_and_without_input():
    assert handle(WITH_INPUT) == [Segment(STANFORD_INPUT), Segment("5", target=True)]
    for no_input in (
        {"instruction": "Say hi.", "input": "", "output": "Hi!"},
        {"instruction": "Say hi.", "output": "Hi!"},
    ):
        assert handle(no_input) == [Segment(STANFORD_NO_INPUT), Segment("Hi!", target=True)]
    assert handle({"instruction": "Say hi.", "input": None, "output": "Hi!"})[0].text == STANFORD_NO_INPUT


def test_alpaca_history_and_system():
    assert handle(HISTORY, system="You add.") == [
        Segment("You add.\n\n### Instruction:\n1+1?\n\n### Response:\n"),
        Segment("2", target=True),
        Segment("\n\n### Instruction:\n2+2?\n\n### Response:\n"),
        Segment("4", target=True),
        Segment("\n\n### Instruction:\nAnd 2+3?\n\n### Response:\n"),
        Segment("5", target=True),
    ]


def test_chatml():
    assert handle({**WITH_INPUT, "system": "Be brief."}, template="chatml") == [
        Segment(
            "<|im_start|>system\nBe brief.<|im_end|>\n"
            "<|im_start|>user\nAdd the numbers.\n2, 3<|im_end|>\n<|im_start|>assistant\n"
        ),
        Segment("5", target=True),
        Segment("<|im_end|>", target=True),
        Segment("\n"),  # every message ends "<|im_end|>\n", the last one too, as in Qwen2.5's own template
    ]
    assert handle(HISTORY, template="chatml") == [
        Segment("<|im_start|>user\n1+1?<|im_end|>\n<|im_start|>assistant\n"),
        Segment("2", target=True),
        Segment("<|im_end|>", target=True),
        Segment("\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"),
        Segment("4", target=True),
        Segment("<|im_end|>", target=True),
        Segment("\n<|im_start|>user\nAnd 2+3?<|im_end|>\n<|im_start|>assistant\n"),
        Segment("5", target=True),
        Segment("<|im_end|>", target=True),
        Segment("\n"),
    ]


def test_llama2():
    assert handle(WITH_INPUT, template="llama2") == [
        Segment("[INST] Add the numbers.\n2, 3 [/INST] "),
        Segment("5", target=True),
    ]
    assert handle(HISTORY, template="llama2", system="You add.") == [
        Segment("[INST] <<SYS>>\nYou add.\n<</SYS>>\n\n1+1? [/INST] "),
        Segment("2", target=True),
        Segment(" [INST] 2+2? [/INST] "),
        Segment("4", target=True),
        Segment(" [INST] And 2+3? [/INST] "),
        Segment("5", target=True),
    ]


def test_llama3():
    head = "<|start_header_id|>{}<|end_header_id|>\n\n"
    assert handle({**HISTORY, "history": [["1+1?", "2"]], "system": "You add."}, template="llama3") == [
        Segment(
            "<|begin_of_text|>"  # Meta's template starts with bos_token; the pipeline keeps one BOS
            + head.format("system")
            + "You add.<|eot_id|>"
            + head.format("user")
            + "1+1?<|eot_id|>"
            + head.format("assistant")
        ),
        Segment("2", target=True),
        Segment("<|eot_id|>", target=True),
        Segment(head.format("user") + "And 2+3?<|eot_id|>" + head.format("assistant")),
        Segment("5", target=True),
        Segment("<|eot_id|>", target=True),
    ]


def test_plain():
    assert handle(WITH_INPUT, template="plain") == [
        Segment("Add the numbers.\n2, 3\n"),
        Segment("5", target=True),
    ]
    assert handle({"instruction": "Hi", "output": "Hello"}, template="plain") == [
        Segment("Hi\n"),
        Segment("Hello", target=True),
    ]


def test_system_prompt_precedence():
    record = {"instruction": "Hi", "output": "Hello"}
    assert handle(record, template="chatml")[0].text.startswith("<|im_start|>user")  # chatml has no default
    from_options = handle(record, template="chatml", system="Opt.")[0].text
    assert from_options.startswith("<|im_start|>system\nOpt.<|im_end|>\n")
    from_record = handle({**record, "system": "Rec."}, template="chatml", system="Opt.")[0].text
    assert from_record.startswith("<|im_start|>system\nRec.<|im_end|>\n")
    # An explicit system prompt replaces Alpaca's preamble.
    assert handle(record, system="Opt.")[0].text == "Opt.\n\n### Instruction:\nHi\n\n### Response:\n"


def test_last_turn_only_changes_the_mask_not_the_text():
    for template in TEMPLATES:
        every = handle(HISTORY, template=template)
        last = handle(HISTORY, template=template, last_turn_only=True)
        assert "".join(s.text for s in every) == "".join(s.text for s in last)
        assert [s.text for s in last if s.target][0] == "5"
        assert [s.text for s in every if s.target][0] == "2"


def test_braces_in_user_text_are_not_format_fields():
    record = {"instruction": "Print {query} and {system}", "output": "{x}", "system": "{query}"}
    for template in TEMPLATES:
        segments = handle(record, template=template)
        assert "Print {query} and {system}" in segments[0].text
        assert [s.text for s in segments if s.target][0] == "{x}"


@pytest.mark.parametrize("template", TEMPLATES)
def test_answers_are_byte_exact_targets(template):
    record = {
        "instruction": " spaced ",
        "input": "\n",
        "output": "  two spaces, a tab\t\n",
        "history": [["q", "\na"]],
    }
    targets = [s.text for s in handle(record, template=template) if s.target]
    want = ["\na", "  two spaces, a tab\t\n"]
    if template == "llama3":  # Meta's template trims every message (`content | trim`), and so does ours
        want = [w.strip() for w in want]
    assert [t for t in targets if t not in ("<|im_end|>", "<|eot_id|>")] == want


def test_missing_and_wrong_type_fields_name_the_column_and_the_fix():
    cases = [
        ({"instruction": "x"}, "output", "no 'output' column"),
        ({"output": "y"}, "instruction", "no 'instruction' column"),
        ({"instruction": "x", "output": ["y"]}, "output", "must be a string, got list"),
        ({"instruction": "x", "output": None}, "output", "null 'output' column"),
        ({"instruction": "x", "input": 1, "output": "y"}, "input", "must be a string, got int"),
        ({"instruction": "x", "output": "y", "system": 1}, "system", "must be a string"),
        (
            {"instruction": "x", "output": "y", "history": "q a"},
            "history",
            "must be a list of [query, answer] pairs",
        ),
        (
            {"instruction": "x", "output": "y", "history": [["q"]]},
            "history",
            "item 0 must be a [query, answer] pair",
        ),
        ({"instruction": "x", "output": "y", "history": [["q", "a"], ["q", 2]]}, "history", "item 1 must be"),
    ]
    for record, field, problem in cases:
        with pytest.raises(RecordError) as info:
            handle(record)
        assert info.value.field == field, record
        assert problem in info.value.message, info.value.message
        assert "--map-keys" in info.value.message


def test_empty_response_is_a_record_error():
    for output in ("", " \n"):
        with pytest.raises(RecordError, match="empty response: nothing to train on") as info:
            handle({"instruction": "x", "output": output})
        assert info.value.field == "output"
    assert handle({"instruction": "", "output": "y"})[-1] == Segment("y", target=True)


def test_map_keys():
    record = {"prompt": "Say hi.", "response": "Hi!", "turns": [["a", "b"]], "sys": "S"}
    mapping = {"instruction": "prompt", "output": "response", "history": "turns", "system": "sys"}
    segments = handle(record, map_keys=mapping, template="plain")
    assert segments == [
        Segment("S\na\n"),
        Segment("b", target=True),
        Segment("\nSay hi.\n"),
        Segment("Hi!", True),
    ]
    with pytest.raises(RecordError) as info:
        handle(
            {"prompt": "Say hi.", "output": "Hi!"}, map_keys={"instruction": "prompt", "output": "response"}
        )
    assert info.value.field == "response"
    assert "maps 'output' to 'response'" in info.value.message


def test_stanford_alpaca_5000(alpaca_5000):
    """Every record converts except the two with an empty output; targets are exactly the outputs."""
    for template in TEMPLATES:
        handler = get_handler("alpaca", HandlerOptions(template=template))
        empty = []
        for i, record in enumerate(alpaca_5000):
            try:
                segments = handler(record)
            except RecordError as e:
                assert e.message == "empty response: nothing to train on"
                empty.append(i)
                continue
            targets = [s.text for s in segments if s.target]
            assert targets[0] == record["output"]
            assert targets[1:] == {"chatml": ["<|im_end|>"], "llama3": ["<|eot_id|>"]}.get(template, [])
            assert not segments[0].target and segments[1].text == record["output"]
            if template == "alpaca":
                stanford = STANFORD_INPUT if record["input"] else STANFORD_NO_INPUT
                head = stanford.split("### Instruction:\n")[0]
                body = f"### Instruction:\n{record['instruction']}\n\n"
                body += f"### Input:\n{record['input']}\n\n" if record["input"] else ""
                assert segments[0].text == head + body + "### Response:\n"
        assert empty == [2335, 4658]


def test_gpteacher_and_other_alpaca_files_convert(load_json):
    handler = get_handler("alpaca")
    for name in (
        "gpteacher_roleplay_deduped",
        "gpteacher_toolformer_dedupe_only",
        "llamafactory_alpaca_zh_demo",
    ):
        records = load_json(f"alpaca/{name}.json")
        for record in records:
            assert handler(record)[-1] == Segment(record["output"], target=True)
