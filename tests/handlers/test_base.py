from __future__ import annotations

import dataclasses
import importlib
import pickle

import pytest

import packer.handlers as handlers
from packer.handlers import HANDLERS, HandlerOptions, RecordError, get_handler
from packer.handlers.base import Columns, SegmentBuilder
from packer.records import Segment


def _chatml():
    from packer.chat_template import ChatRenderer, find_template

    return ChatRenderer(find_template("chatml", ".")[0], "built-in chatml", {}, frozenset({"<|im_end|>"}))


def test_handlers_are_looked_up_by_name():
    assert HANDLERS == ("alpaca", "belle", "messages", "moss", "text")
    overflow = {"alpaca": "truncate", "belle": "truncate", "messages": "truncate", "moss": "truncate",
                "text": "split"}
    for name in HANDLERS:
        handler = get_handler(name, HandlerOptions(chat=_chatml()) if name == "messages" else None)
        assert handler.name == name
        assert handler.default_overflow == overflow[name]
        assert callable(importlib.import_module(f"handlers.{name}").make)


def test_handlers_pickle_for_worker_processes():
    options = HandlerOptions(template=None, map_keys={"output": "response"}, last_turn_only=True)
    for name in ("alpaca", "belle", "moss"):
        handler = get_handler(name, options if name != "moss" else HandlerOptions(system="S"))
        assert pickle.loads(pickle.dumps(handler)) == handler
    assert pickle.loads(pickle.dumps(get_handler("text"))) == get_handler("text")
    messages = get_handler("messages", HandlerOptions(chat=_chatml()))
    assert pickle.loads(pickle.dumps(messages)) == messages
    with pytest.raises(ValueError, match="needs a chat template"):
        get_handler("messages")


def test_unknown_handler_lists_choices():
    with pytest.raises(ValueError, match="unknown handler 'sharegpt'") as info:
        get_handler("sharegpt")
    for name in HANDLERS:
        assert name in str(info.value)


def test_templates_are_discoverable():
    assert handlers.alpaca.TEMPLATES == ("alpaca", "chatml", "llama2", "llama3", "plain")
    assert handlers.belle.TEMPLATES == ("belle", "belle_legacy")
    assert handlers.moss.TEMPLATES == ()
    assert handlers.text.TEMPLATES == ()
    assert handlers.messages.TEMPLATES == ()  # it takes --chat-template instead


@pytest.mark.parametrize("name", ["alpaca", "belle"])
def test_unknown_template_lists_valid_ones(name):
    module = importlib.import_module(f"handlers.{name}")
    with pytest.raises(ValueError, match="has no template 'vicuna'") as info:
        get_handler(name, HandlerOptions(template="vicuna"))
    for template in module.TEMPLATES:
        assert template in str(info.value)


@pytest.mark.parametrize("name", ["moss", "text"])
def test_handlers_without_templates_reject_one(name):
    with pytest.raises(ValueError, match="valid templates: none"):
        get_handler(name, HandlerOptions(template="chatml"))


@pytest.mark.parametrize(
    ("name", "fields"),
    [
        ("alpaca", ["instruction", "input", "output", "system", "history"]),
        ("belle", ["instruction", "input", "output"]),
        ("moss", ["meta_instruction", "num_turns", "chat"]),
        ("text", ["text"]),
    ],
)
def test_map_keys_for_an_unknown_field_lists_the_fields(name, fields):
    with pytest.raises(ValueError, match="'response', which handler") as info:
        get_handler(name, HandlerOptions(map_keys={"response": "output"}))
    for field in fields:
        assert field in str(info.value)


def test_options_a_handler_cannot_honour_are_rejected():
    with pytest.raises(ValueError, match="no system prompt"):
        get_handler("belle", HandlerOptions(system="Be brief."))
    with pytest.raises(ValueError, match="no system prompt"):
        get_handler("text", HandlerOptions(system="Be brief."))
    with pytest.raises(ValueError, match="no turns"):
        get_handler("text", HandlerOptions(last_turn_only=True))
    with pytest.raises(ValueError, match="json keys only apply"):
        get_handler("alpaca", HandlerOptions(json_keys=("content",)))
    with pytest.raises(ValueError, match="json keys must be"):
        get_handler("text", HandlerOptions(json_keys=()))
    with pytest.raises(ValueError, match="non-empty column names"):
        get_handler("alpaca", HandlerOptions(map_keys={"output": ""}))


def test_options_are_frozen_and_do_not_share_defaults():
    a, b = HandlerOptions(), HandlerOptions()
    assert a.map_keys == {} and a.map_keys is not b.map_keys
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.template = "chatml"  # type: ignore[misc]


def test_record_error_carries_field_and_message():
    err = RecordError("output", "empty response: nothing to train on")
    assert isinstance(err, ValueError)
    assert (err.field, err.message) == ("output", "empty response: nothing to train on")
    assert "output" in str(err) and "empty response" in str(err)


def test_columns_name_the_column_read_and_the_fix():
    plain, mapped = Columns(), Columns({"output": "response"})
    with pytest.raises(RecordError) as info:
        plain.text({"instruction": "x"}, "output")
    assert info.value.field == "output"
    assert '--map-keys \'{"output": "<column>"}\'' in info.value.message
    assert "'instruction'" in info.value.message  # the columns the record does have
    with pytest.raises(RecordError) as info:
        mapped.text({"output": "x"}, "output")
    assert info.value.field == "response"
    assert "maps 'output' to 'response'" in info.value.message
    assert mapped.text({"response": "y"}, "output") == "y"
    assert plain.text({}, "input", required=False) is None
    assert plain.text({"input": None}, "input", required=False) is None
    with pytest.raises(RecordError, match="must be a string, got int 3"):
        plain.text({"input": 3}, "input", required=False)
    with pytest.raises(RecordError, match="must be a JSON object, got list"):
        plain.text(["x"], "output")  # type: ignore[arg-type]


def test_segment_builder_merges_prompts_and_drops_empty_text():
    b = SegmentBuilder()
    b.prompt("Q: ")
    b.prompt("")
    b.prompt("hi\n")
    b.target("hello")
    b.target("")
    b.target("<end>")
    b.target("old answer", train=False)
    b.prompt("\n")
    assert b.segments == [
        Segment("Q: hi\n"),
        Segment("hello", target=True),
        Segment("<end>", target=True),
        Segment("old answer\n"),
    ]
