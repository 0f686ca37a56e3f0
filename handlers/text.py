"""Pretraining text: the `json_keys` columns of a record, joined, all of it a target.

    json_keys ("title", "text"):  {"title": "Cats", "text": "Cats purr."}
        -> [Segment("Cats\\n\\nCats purr.", target=True)]

Every key must hold a string; empty ones are left out of the join. Long documents are split across
samples rather than truncated (`default_overflow = "split"`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from packer.records import Segment

from .base import Columns, HandlerOptions, RecordError, check_options

TEMPLATES: tuple[str, ...] = ()
SEPARATOR = "\n\n"


@dataclass(frozen=True)
class TextHandler:
    keys: tuple[str, ...]
    columns: Columns
    name: str = "text"
    default_overflow: str = "split"

    @property
    def input_columns(self) -> frozenset[str]:
        return self.columns.of(self.keys)

    @property
    def template_text(self) -> str:
        return SEPARATOR

    def batch(self, records: list[Any]) -> list[list[Segment]] | None:
        """`[self(r) for r in records]` where every record is an object whose one key holds a non-blank string
        (the common case, without the per-record checks); None where any is not: ask each record then."""
        if len(self.keys) != 1:
            return None
        column = self.columns.column(self.keys[0])
        try:
            texts = [r[column] for r in records if type(r) is dict]
        except KeyError:
            return None
        if len(texts) != len(records) or not all(type(t) is str and t and not t.isspace() for t in texts):
            return None
        return [[Segment(t, target=True)] for t in texts]

    def __call__(self, record: Mapping[str, Any]) -> list[Segment]:
        if len(self.keys) == 1:  # fast path for the common case; anything unusual takes the checked path
            value = record.get(self.columns.column(self.keys[0])) if isinstance(record, Mapping) else None
            if type(value) is str and value and not value.isspace():
                return [Segment(value, target=True)]
        parts = [self.columns.text(record, key) for key in self.keys]
        text = SEPARATOR.join(part for part in parts if part)
        if not text.strip():
            columns = ", ".join(repr(self.columns.column(key)) for key in self.keys)
            raise RecordError(
                self.columns.column(self.keys[0]), f"empty text in {columns}: nothing to train on"
            )
        return [Segment(text, target=True)]


def make(options: HandlerOptions) -> TextHandler:
    keys = tuple(options.json_keys)
    if not keys or not all(isinstance(k, str) and k for k in keys):
        raise ValueError(f"json keys must be one or more column names, got {options.json_keys!r}")
    check_options("text", options, fields=keys, json_keys=True)
    return TextHandler(keys=keys, columns=Columns(dict(options.map_keys)))
