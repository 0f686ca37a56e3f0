from __future__ import annotations

import pytest

from packer.handlers import HandlerOptions, RecordError, get_handler
from packer.handlers.belle import is_dialogue
from packer.records import Segment

# BelleGroup/multiturn_chat_0.8M style: markers at line starts, no space after the colon, " \n" between turns.
DIALOGUE = {
    "instruction": "Human:写一首关于春天的诗。 \nAssistant:春风拂面，\n花开满园。 \nHuman:再写一句。\nAssistant:",
    "input": "",
    "output": "燕子归来。",
}


def handle(record, **options):
    return get_handler("belle", HandlerOptions(**options))(record)


def test_single_turn_templates():
    record = {"instruction": "翻译成英文：", "input": "你好", "output": "\nHello"}
    assert handle(record) == [
        Segment("Human: \n翻译成英文：你好\n\nAssistant: \n"),
        Segment("\nHello", target=True),
    ]
    assert handle(record, template="belle_legacy") == [
        Segment("Human: 翻译成英文：你好\n\nAssistant: "),
        Segment("\nHello", target=True),
    ]
    assert handle({"instruction": "hi", "output": "yo"})[0].text == "Human: \nhi\n\nAssistant: \n"


def test_multi_turn_keeps_text_verbatim_and_targets_every_answer():
    segments = handle(DIALOGUE)
    assert segments == [
        Segment("Human:写一首关于春天的诗。 \nAssistant:"),
        Segment("春风拂面，\n花开满园。", target=True),
        Segment(" \nHuman:再写一句。\nAssistant:"),
        Segment("燕子归来。", target=True),
    ]
    assert "".join(s.text for s in segments) == DIALOGUE["instruction"] + DIALOGUE["output"]


def test_multi_turn_last_turn_only():
    assert handle(DIALOGUE, last_turn_only=True) == [
        Segment(DIALOGUE["instruction"]),
        Segment("燕子归来。", target=True),
    ]


def test_multi_turn_whitespace_around_markers_stays_prompt():
    record = {"instruction": "\n Human: a\n Assistant:  b \n\nHuman: c\nAssistant: \n", "output": " d"}
    assert handle(record) == [
        Segment("\n Human: a\n Assistant:  "),
        Segment("b", target=True),
        Segment(" \n\nHuman: c\nAssistant: \n"),
        Segment(" d", target=True),
    ]


def test_markers_inside_a_line_are_plain_text():
    record = {
        "instruction": "Human:quote 'Assistant: hi'\nAssistant:ok Human: bye\nHuman:again\nAssistant:",
        "output": "x",
    }
    targets = [s.text for s in handle(record) if s.target]
    assert targets == ["ok Human: bye", "x"]


def test_dialogue_detection_rule():
    assert is_dialogue("Human:hi\nAssistant:")
    assert is_dialogue("  Human:hi\nAssistant:hello\nHuman:more\nAssistant: \n")
    assert not is_dialogue("Translate: Human: hi\nAssistant:")  # does not start with a marker
    assert not is_dialogue("Human:hi\nAssistant:hello")  # does not end with the assistant marker
    assert not is_dialogue("Assistant:hi\nHuman:")
    assert not is_dialogue("Human: hi Assistant:")  # the closing marker does not start a line
    assert not is_dialogue("写一首诗")
    # A dialogue that does not match stays single-turn and gets the template.
    record = {"instruction": "Human:hi\nAssistant:hello", "output": "x"}
    assert handle(record)[0].text == "Human: \nHuman:hi\nAssistant:hello\n\nAssistant: \n"


def test_dialogue_may_continue_into_input():
    record = {"instruction": "Human:hi\n", "input": "Assistant:", "output": "hello"}
    assert handle(record) == [Segment("Human:hi\nAssistant:"), Segment("hello", target=True)]


def test_errors_name_the_column_and_the_fix():
    cases = [
        ({"instruction": "x"}, "output", "no 'output' column"),
        ({"output": "y"}, "instruction", "no 'instruction' column"),
        ({"instruction": ["x"], "output": "y"}, "instruction", "must be a string, got list"),
        ({"instruction": "x", "input": 3, "output": "y"}, "input", "must be a string, got int"),
    ]
    for record, field, problem in cases:
        with pytest.raises(RecordError) as info:
            handle(record)
        assert (info.value.field, problem in info.value.message) == (field, True), info.value.message
        assert "--map-keys" in info.value.message
    with pytest.raises(RecordError, match="empty response"):
        handle({"instruction": "x", "output": "\n"})
    with pytest.raises(RecordError, match="empty response"):
        handle({**DIALOGUE, "output": ""})


def test_map_keys():
    record = {"q": "hi", "a": "yo"}
    assert handle(record, map_keys={"instruction": "q", "output": "a"}) == [
        Segment("Human: \nhi\n\nAssistant: \n"),
        Segment("yo", target=True),
    ]


@pytest.mark.parametrize("data", ["belle_dev1k", "belle_medical_1k"])
def test_real_belle_files(data, request):
    records = request.getfixturevalue(data)
    handler = get_handler("belle")
    for record in records:
        assert not is_dialogue(record["instruction"] + record["input"])  # these files are single-turn
        assert handler(record) == [
            Segment(f"Human: \n{record['instruction']}{record['input']}\n\nAssistant: \n"),
            Segment(record["output"], target=True),
        ]
