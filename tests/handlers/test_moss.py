from __future__ import annotations

import copy

import pytest

from packer.handlers import HandlerOptions, RecordError, get_handler
from packer.records import Segment

MODEL_FIELDS = ("Inner Thoughts", "Commands", "MOSS")
ORDER = ("Human", "Inner Thoughts", "Commands", "Tool Responses", "MOSS")
CONVERSATION = {
    "conversation_id": 7,
    "meta_instruction": "You are MOSS.\n",
    "num_turns": 2,
    "chat": {
        # Out of order on purpose: turns and fields follow the format's order, not the dict's.
        "turn_2": {
            "MOSS": "<|MOSS|>: 4<eom>\n",
            "Human": "<|Human|>: 2+2?<eoh>\n",
        },
        "turn_1": {
            "Human": "<|Human|>: 1+1?<eoh>\n",
            "Tool Responses": '<|Results|>:\nCalculate("1+1") => 2\n<eor>\n',
            "Inner Thoughts": "<|Inner Thoughts|>: use the calculator<eot>\n",
            "Commands": '<|Commands|>: Calculate("1+1")<eoc>\n',
            "MOSS": "<|MOSS|>: 2<eom>\n",
        },
    },
}


def handle(record, **options):
    return get_handler("moss", HandlerOptions(**options))(record)


def test_conversation_becomes_one_sample():
    assert handle(CONVERSATION) == [
        Segment("You are MOSS.\n<|Human|>: 1+1?<eoh>\n"),
        Segment("<|Inner Thoughts|>: use the calculator<eot>\n", target=True),
        Segment('<|Commands|>: Calculate("1+1")<eoc>\n', target=True),
        Segment('<|Results|>:\nCalculate("1+1") => 2\n<eor>\n'),
        Segment("<|MOSS|>: 2<eom>\n", target=True),
        Segment("<|Human|>: 2+2?<eoh>\n"),
        Segment("<|MOSS|>: 4<eom>\n", target=True),
    ]


def test_last_turn_only():
    assert handle(CONVERSATION, last_turn_only=True) == [
        Segment(
            "You are MOSS.\n<|Human|>: 1+1?<eoh>\n<|Inner Thoughts|>: use the calculator<eot>\n"
            '<|Commands|>: Calculate("1+1")<eoc>\n<|Results|>:\nCalculate("1+1") => 2\n<eor>\n'
            "<|MOSS|>: 2<eom>\n<|Human|>: 2+2?<eoh>\n"
        ),
        Segment("<|MOSS|>: 4<eom>\n", target=True),
    ]


def test_turns_sort_numerically():
    chat = {f"turn_{n}": {"Human": f"H{n}", "MOSS": f"M{n}"} for n in (10, 2, 1, 9, 3, 4, 5, 6, 7, 8)}
    segments = handle({"chat": chat})
    assert [s.text for s in segments if s.target] == [f"M{n}" for n in range(1, 11)]


def test_meta_instruction_is_optional_and_falls_back_to_the_system_option():
    record = {"chat": {"turn_1": {"Human": "h", "MOSS": "m", "Commands": None}}}
    assert handle(record) == [Segment("h"), Segment("m", target=True)]
    assert handle(record, system="sys\n") == [Segment("sys\nh"), Segment("m", target=True)]
    assert handle({**record, "meta_instruction": "meta\n"}, system="sys\n")[0] == Segment("meta\nh")


@pytest.mark.parametrize(
    ("change", "field", "problem"),
    [
        (lambda r: r.pop("chat"), "chat", "no 'chat' column"),
        (lambda r: r.update(chat=[]), "chat", "must be an object"),
        (lambda r: r.update(chat={}), "chat", "has no turns"),
        (lambda r: r["chat"].update(turn_4={"Human": "h", "MOSS": "m"}), "chat", "without gaps"),
        (lambda r: r["chat"].update(round_3={"Human": "h", "MOSS": "m"}), "chat", "has key 'round_3'"),
        (lambda r: r["chat"].update(turn_0={"Human": "h", "MOSS": "m"}), "chat", "has key 'turn_0'"),
        (lambda r: r["chat"]["turn_2"].pop("MOSS"), "chat", "turn_2 has no 'MOSS' text"),
        (lambda r: r["chat"]["turn_1"].update(Human=None), "chat", "turn_1 has no 'Human' text"),
        (lambda r: r["chat"]["turn_1"].update(Commands=["x"]), "chat", "turn_1.Commands must be a string"),
        (lambda r: r["chat"]["turn_1"].update(Bot="x"), "chat", "unknown field 'Bot'"),
        (lambda r: r["chat"].update(turn_2="text"), "chat", "turn_2 must be an object"),
        (lambda r: r.update(num_turns=3), "num_turns", "'num_turns' is 3 but chat has 2 turns"),
        (lambda r: r.update(num_turns="2"), "num_turns", "must be an integer"),
        (lambda r: r.update(meta_instruction=1), "meta_instruction", "must be a string"),
    ],
)
def test_malformed_conversations_name_the_field(change, field, problem):
    record = copy.deepcopy(CONVERSATION)
    change(record)
    with pytest.raises(RecordError) as info:
        handle(record)
    assert info.value.field == field
    assert problem in info.value.message, info.value.message


def test_num_turns_may_be_absent_and_columns_may_be_mapped():
    record = copy.deepcopy(CONVERSATION)
    del record["num_turns"]
    record["dialogue"] = record.pop("chat")
    assert handle(record, map_keys={"chat": "dialogue"}) == handle(CONVERSATION)
    with pytest.raises(RecordError) as info:
        handle(record)
    assert info.value.field == "chat" and "--map-keys" in info.value.message


def test_nothing_to_train_on():
    record = {"chat": {"turn_1": {"Human": "h", "MOSS": ""}}}
    with pytest.raises(RecordError, match="empty response"):
        handle(record)
    last_empty = {"chat": {"turn_1": {"Human": "h", "MOSS": "m"}, "turn_2": {"Human": "h", "MOSS": " "}}}
    assert handle(last_empty)[1] == Segment("m", target=True)
    with pytest.raises(RecordError, match="empty response"):
        handle(last_empty, last_turn_only=True)


def test_moss_003_sft_samples(moss_1120):
    """Every conversation converts; targets are exactly what the model writes, never Human or tool text."""
    every, last_only = get_handler("moss"), get_handler("moss", HandlerOptions(last_turn_only=True))
    assert len(moss_1120) == 1120
    for record in moss_1120:
        turns = [record["chat"][f"turn_{n}"] for n in range(1, record["num_turns"] + 1)]
        segments = every(record)
        targets = [s.text for s in segments if s.target]
        assert "".join(targets) == "".join(t[f] for t in turns for f in MODEL_FIELDS if t.get(f))
        assert "".join(s.text for s in segments) == record["meta_instruction"] + "".join(
            t[f] for t in turns for f in ORDER if t.get(f)
        )
        prompt_only = {t[f] for t in turns for f in ("Human", "Tool Responses") if t.get(f)}
        assert not prompt_only & set(targets)
        assert not any(s.target and ("<|Human|>" in s.text or "<|Results|>" in s.text) for s in segments)
        last = [s.text for s in last_only(record) if s.target]
        assert "".join(last) == "".join(turns[-1][f] for f in MODEL_FIELDS if turns[-1].get(f))
