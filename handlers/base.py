"""What every handler shares: options, the error type, the lookup by name, and field access.

A handler maps ONE raw record to the segments of ONE training sample; it never tokenizes:

    {"instruction": "Add 2 and 3.", "input": "", "output": "5"}
        -> [Segment("Below is an instruction ... ### Response:\\n"), Segment("5", target=True)]

The pipeline joins the segment texts, tokenizes once with offsets and marks a token as a target iff the
last character of its span lies in a target segment, then appends EOD itself. Hence handlers put the
separator whitespace at the END of a prompt segment, keep answers byte-exact, and never emit BOS/EOS text.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from packer.records import Segment

HANDLERS: tuple[str, ...] = ("alpaca", "belle", "messages", "moss", "text")


class RecordError(ValueError):
    """A malformed record. `field` is the input column that was read; `message` says what is wrong and the fix.

    The pipeline adds the file and record number; handlers only know the record.
    """

    def __init__(self, field: str, message: str):
        super().__init__(f"{field!r}: {message}")
        self.field = field
        self.message = message


EMPTY_RESPONSE = "empty response: nothing to train on"


class EmptyResponse(RecordError):
    """The record's answer is empty. Not malformed: what happens to it is --empty-response's choice (skip and
    count it, keep it, or fail), not --on-error's."""

    def __init__(self, field: str):
        super().__init__(field, EMPTY_RESPONSE)


@dataclass(frozen=True)
class HandlerOptions:
    template: str | None = None  # None -> the handler's default template
    map_keys: Mapping[str, str] = field(default_factory=dict)  # handler field -> input column
    json_keys: tuple[str, ...] = ("text",)  # text handler only
    last_turn_only: bool = False  # multi-turn handlers: train only on the final answer
    system: str | None = None  # system prompt for records that carry none
    # An empty answer is rendered like any other (the sample's targets are then the template's end-of-turn text,
    # if any, and the EOD) instead of raising EmptyResponse.
    keep_empty_response: bool = False
    chat: Any = None  # packer.chat_template.ChatRenderer: the model's chat template (messages; alpaca/belle on request)


class Handler(Protocol):
    name: str
    default_overflow: str  # "truncate" (instruction data) or "split" (pretraining text)

    @property
    def input_columns(self) -> frozenset[str]:
        """The input columns the handler reads (after --map-keys); a reader may leave every other one out."""
        ...

    @property
    def template_text(self) -> str:
        """Every piece of text the handler's template writes around the record's own text ("" for none), so the
        pipeline can tell template text from record text (e.g. a turn terminator used as EOD)."""
        ...

    def __call__(self, record: Mapping[str, Any]) -> list[Segment]: ...


def template_names(name: str) -> tuple[str, ...]:
    """The `--template` names handler `name` accepts (empty for handlers without templates)."""
    if name not in HANDLERS:
        raise ValueError(f"unknown handler {name!r}; choose one of: {', '.join(HANDLERS)}")
    return tuple(importlib.import_module(f"{__package__}.{name}").TEMPLATES)


def get_handler(name: str, options: HandlerOptions | None = None) -> Handler:
    """The handler called `name`, built from `handlers/<name>.py`'s `make(options)`."""
    if name not in HANDLERS:
        raise ValueError(f"unknown handler {name!r}; choose one of: {', '.join(HANDLERS)}")
    module = importlib.import_module(f"{__package__}.{name}")
    return module.make(options or HandlerOptions())


def check_options(
    name: str,
    options: HandlerOptions,
    *,
    fields: Sequence[str],
    templates: Sequence[str] = (),
    system: bool = False,
    last_turn_only: bool = False,
    json_keys: bool = False,
) -> None:
    """Reject options `name` cannot honour, so a typo fails at startup rather than being silently ignored."""
    if options.template is not None and options.template not in templates:
        valid = ", ".join(templates) if templates else "none (leave the template unset)"
        raise ValueError(f"handler {name!r} has no template {options.template!r}; valid templates: {valid}")
    unknown = sorted(set(options.map_keys) - set(fields))
    if unknown:
        raise ValueError(
            f"--map-keys names {', '.join(map(repr, unknown))}, which handler {name!r} does not read; "
            f"its fields are: {', '.join(fields)} (map a field name to your column name, "
            f'e.g. \'{{"{fields[0]}": "<column>"}}\')'
        )
    for column in options.map_keys.values():
        if not isinstance(column, str) or not column:
            raise ValueError(f"--map-keys values must be non-empty column names, got {column!r}")
    if options.system is not None and not system:
        raise ValueError(f"handler {name!r} has no system prompt; drop the system option")
    if options.last_turn_only and not last_turn_only:
        raise ValueError(f"handler {name!r} has no turns; drop the last-turn-only option")
    if options.json_keys != HandlerOptions.json_keys and not json_keys:
        raise ValueError(f"json keys only apply to the 'text' handler, not {name!r}; use --map-keys instead")


class ReadsFields:
    """Mixin for handlers that read the record fields `fields` through `columns` (their --map-keys)."""

    fields: ClassVar[tuple[str, ...]]
    columns: Columns

    @property
    def input_columns(self) -> frozenset[str]:
        return self.columns.of(self.fields)

    @property
    def template_text(self) -> str:
        return ""


@dataclass(frozen=True)
class Columns:
    """Reads handler fields from a record through `--map-keys`, raising `RecordError`s that name the fix.

    Columns({"output": "response"}).text({"instruction": "hi", "response": "hello"}, "output") -> "hello"
    """

    map_keys: Mapping[str, str] = field(default_factory=dict)

    def column(self, name: str) -> str:
        return self.map_keys.get(name, name)

    def of(self, names: Sequence[str]) -> frozenset[str]:
        """The input columns of handler fields `names`."""
        return frozenset(map(self.column, names))

    def fix(self, name: str) -> str:
        column = self.column(name)
        if column != name:
            return f"--map-keys maps {name!r} to {column!r}; check that mapping against your data"
        return f'if your {name} column is named differently pass --map-keys \'{{"{name}": "<column>"}}\''

    def get(self, record: Mapping[str, Any], name: str, *, required: bool = True) -> Any:
        """The raw value of field `name`; None when an optional field is absent or null."""
        if not isinstance(record, Mapping):
            raise RecordError("<record>", f"a record must be a JSON object, got {type(record).__name__}")
        column = self.column(name)
        value = record.get(column)
        if value is None and required:
            found = ", ".join(map(repr, list(record)[:12])) or "none"
            what = "has no" if column not in record else "has a null"
            raise RecordError(column, f"record {what} {column!r} column (columns: {found}); {self.fix(name)}")
        return value

    def text(self, record: Mapping[str, Any], name: str, *, required: bool = True) -> str | None:
        """Field `name` as a string; optional fields give None when absent or null."""
        value = self.get(record, name, required=required)
        if value is not None and not isinstance(value, str):
            raise self.wrong_type(name, "a string", value)
        return value

    def wrong_type(self, name: str, expected: str, value: Any, where: str = "") -> RecordError:
        column = self.column(name)
        return RecordError(
            column,
            f"column {column!r}{where} must be {expected}, got {type(value).__name__} {_preview(value)}; "
            f"{self.fix(name)}",
        )


def _preview(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class SegmentBuilder:
    """Accumulates a sample: consecutive prompt text merges into one segment, empty text is dropped.

    b.prompt("Q: "); b.prompt("hi\\n"); b.target("hello")  ->  [Segment("Q: hi\\n"), Segment("hello", True)]
    """

    def __init__(self) -> None:
        self.segments: list[Segment] = []

    def prompt(self, text: str) -> None:
        if not text:
            return
        if self.segments and not self.segments[-1].target:
            text = self.segments.pop().text + text
        self.segments.append(Segment(text))

    def target(self, text: str, train: bool = True) -> None:
        """A model-written piece; `train=False` (e.g. an earlier turn under last_turn_only) demotes it to prompt."""
        if not train:
            self.prompt(text)
        elif text:
            self.segments.append(Segment(text, target=True))
