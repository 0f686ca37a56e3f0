from __future__ import annotations

import pytest

from packer.handlers import HandlerOptions, RecordError, get_handler
from packer.records import Segment


def handle(record, **options):
    return get_handler("text", HandlerOptions(**options))(record)


def test_whole_text_is_one_target():
    assert handle({"text": "  Cats purr.\n", "id": 3}) == [Segment("  Cats purr.\n", target=True)]
    assert get_handler("text").default_overflow == "split"


def test_several_keys_join_with_a_blank_line():
    keys = ("title", "text")
    assert handle({"title": "Cats", "text": "Cats purr."}, json_keys=keys) == [
        Segment("Cats\n\nCats purr.", target=True)
    ]
    assert handle({"title": "", "text": "Cats purr."}, json_keys=keys) == [Segment("Cats purr.", target=True)]


def test_errors():
    cases = [
        ({"content": "x"}, {}, "text", "no 'text' column"),
        ({"text": 3}, {}, "text", "must be a string, got int"),
        ({"text": None}, {}, "text", "null 'text' column"),
        ({"title": "t"}, {"json_keys": ("title", "text")}, "text", "no 'text' column"),
        ({"text": " \n"}, {}, "text", "empty text"),
        (
            {"title": "", "text": ""},
            {"json_keys": ("title", "text")},
            "title",
            "empty text in 'title', 'text'",
        ),
    ]
    for record, options, field, problem in cases:
        with pytest.raises(RecordError) as info:
            handle(record, **options)
        assert info.value.field == field
        assert problem in info.value.message, info.value.message


def test_map_keys_and_json_keys_both_rename():
    record = {"content": "hello"}
    assert handle(record, map_keys={"text": "content"}) == handle(record, json_keys=("content",))
    with pytest.raises(RecordError, match="--map-keys"):
        handle(record)
