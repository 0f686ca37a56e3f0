"""MOSS moss-003-sft conversations: one sample per conversation, every field kept verbatim.

    {"meta_instruction": "You are an AI assistant whose name is MOSS.\\n...",
     "num_turns": 1,
     "chat": {"turn_1": {"Human": "<|Human|>: 1+1?<eoh>\\n",
                         "Inner Thoughts": "<|Inner Thoughts|>: None<eot>\\n",
                         "Commands": "<|Commands|>: Calculate(\\"1+1\\")<eoc>\\n",
                         "Tool Responses": "<|Results|>:\\nCalculate(\\"1+1\\") => 2\\n<eor>\\n",
                         "MOSS": "<|MOSS|>: 2<eom>\\n"}}}
    -> Segment("You are an AI assistant whose name is MOSS.\\n...<|Human|>: 1+1?<eoh>\\n")
       Segment("<|Inner Thoughts|>: None<eot>\\n", target=True)
       Segment("<|Commands|>: Calculate(\\"1+1\\")<eoc>\\n", target=True)
       Segment("<|Results|>:\\nCalculate(\\"1+1\\") => 2\\n<eor>\\n")
       Segment("<|MOSS|>: 2<eom>\\n", target=True)

Turns run turn_1..turn_N; within a turn the fields go in the order above, absent or null optional fields
(Inner Thoughts, Commands, Tool Responses) skipped. Loss falls on what the model writes (Inner Thoughts,
Commands, MOSS, markers included) and never on meta_instruction, Human or Tool Responses text. (MOSS's own
finetune_moss.py masks only the meta instruction and the inside of Tool Responses, so it also trains on the
Human turns and the `<|Results|>:`/`<eor>` markers; we deliberately do not.) `last_turn_only` keeps only the
final turn's model fields as targets. Records without a meta_instruction get `options.system`, if set.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from packer.records import Segment

from .base import (
    Columns,
    EmptyResponse,
    HandlerOptions,
    ReadsFields,
    RecordError,
    SegmentBuilder,
    check_options,
)

FIELDS: tuple[str, ...] = ("meta_instruction", "num_turns", "chat")
TEMPLATES: tuple[str, ...] = ()
ROLES: tuple[tuple[str, bool], ...] = (  # (turn field, is a target) in the order they are written
    ("Human", False),
    ("Inner Thoughts", True),
    ("Commands", True),
    ("Tool Responses", False),
    ("MOSS", True),
)
REQUIRED_ROLES = frozenset({"Human", "MOSS"})

_TURN = re.compile(r"turn_([1-9][0-9]*)")


@dataclass(frozen=True)
class MossHandler(ReadsFields):
    fields: ClassVar[tuple[str, ...]] = FIELDS
    columns: Columns
    system: str | None = None
    last_turn_only: bool = False
    keep_empty_response: bool = False
    name: str = "moss"
    default_overflow: str = "truncate"

    def __call__(self, record: Mapping[str, Any]) -> list[Segment]:
        meta = self.columns.text(record, "meta_instruction", required=False) or self.system or ""
        turns = self._turns(record)
        b = SegmentBuilder()
        b.prompt(meta)
        for i, turn in enumerate(turns, start=1):
            train = not self.last_turn_only or i == len(turns)
            for role, is_target in ROLES:
                text = turn.get(role)
                if text is None:
                    continue
                if is_target:
                    b.target(text, train)
                else:
                    b.prompt(text)
        if not self.keep_empty_response and not any(s.target and s.text.strip() for s in b.segments):
            raise EmptyResponse(self.columns.column("chat"))
        return b.segments

    def _turns(self, record: Mapping[str, Any]) -> list[Mapping[str, Any]]:
        """chat's turns in numeric order, validated."""
        chat = self.columns.get(record, "chat")
        if not isinstance(chat, Mapping):
            raise self.columns.wrong_type("chat", 'an object {"turn_1": {...}, ...}', chat)
        numbers: dict[int, str] = {}  # turn number -> key
        for key in chat:
            match = _TURN.fullmatch(key)
            if match is None:
                raise self._bad_chat(f"has key {key!r}; turn keys are turn_1, turn_2, ...")
            numbers[int(match.group(1))] = key
        if not numbers:
            raise self._bad_chat("has no turns")
        if sorted(numbers) != list(range(1, len(numbers) + 1)):
            raise self._bad_chat(f"turns must run turn_1..turn_{len(numbers)} without gaps, got {list(chat)}")
        num_turns = self.columns.get(record, "num_turns", required=False)
        if num_turns is not None and (isinstance(num_turns, bool) or not isinstance(num_turns, int)):
            raise self.columns.wrong_type("num_turns", "an integer", num_turns)
        if num_turns is not None and num_turns != len(numbers):
            column = self.columns.column("num_turns")
            raise RecordError(
                column, f"{column!r} is {num_turns} but chat has {len(numbers)} turns; fix one of the two"
            )
        turns = [chat[numbers[n]] for n in range(1, len(numbers) + 1)]
        roles = {role for role, _ in ROLES}
        for n, turn in enumerate(turns, start=1):
            if not isinstance(turn, Mapping):
                raise self._bad_chat(f"turn_{n} must be an object of role -> text, got {type(turn).__name__}")
            for role, text in turn.items():
                if role not in roles:
                    raise self._bad_chat(
                        f"turn_{n} has unknown field {role!r}; known: {', '.join(sorted(roles))}"
                    )
                if text is not None and not isinstance(text, str):
                    raise self._bad_chat(f"turn_{n}.{role} must be a string, got {type(text).__name__}")
            missing = sorted(REQUIRED_ROLES - {role for role, text in turn.items() if text is not None})
            if missing:
                raise self._bad_chat(f"turn_{n} has no {' or '.join(map(repr, missing))} text")
        return turns

    def _bad_chat(self, problem: str) -> RecordError:
        column = self.columns.column("chat")
        return RecordError(column, f"column {column!r} {problem} (moss-003-sft format)")


def make(options: HandlerOptions) -> MossHandler:
    check_options("moss", options, fields=FIELDS, system=True, last_turn_only=True)
    return MossHandler(
        columns=Columns(dict(options.map_keys)),
        system=options.system,
        last_turn_only=options.last_turn_only,
        keep_empty_response=options.keep_empty_response,
    )
