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


@pytest.mark.parametrize("records", [
    [{"text": "a"}, {"text": " b "}, {"text": "c", "other": 1}],
    [{"text": "a"}, {"text": ""}],
    [{"text": "a"}, {"text": "  \n"}],
    [{"text": "a"}, {"text": None}],
    [{"text": "a"}, {"text": 5}],
    [{"text": "a"}, {"body": "b"}],
    [{"text": "a"}, ["text"]],
    [{"text": "a"}, "text"],
    [],
])
def test_batch_is_every_record_handled_or_none(records):
    """`batch` (the fast path for a whole batch) gives what calling the handler on each record gives, or None
    where some record is not plain; the per-record call then says why."""
    h = get_handler("text", HandlerOptions())
    got = h.batch(records)
    if got is not None:
        assert got == [h(r) for r in records]
        return
    assert records[-1] != {"text": " b "}  # the plain batch above must take the fast path
    with pytest.raises((RecordError, AttributeError, TypeError)):
        [h(r) for r in records]  # noqa: B018
    assert get_handler("text", HandlerOptions(json_keys=("title", "text"))).batch([{"title": "t", "text": "x"}]) is None
