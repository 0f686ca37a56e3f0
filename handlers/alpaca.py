"""Alpaca records: instruction, optional input, output; optional system and history of earlier turns.

    {"instruction": "Add the numbers.", "input": "2, 3", "output": "5"}

with the default `alpaca` template (Stanford Alpaca's PROMPT_DICT; see templates.py) becomes

    Segment("Below is an instruction that describes a task, paired with an input that provides further "
            "context. Write a response that appropriately completes the request.\\n\\n"
            "### Instruction:\\nAdd the numbers.\\n\\n### Input:\\n2, 3\\n\\n### Response:\\n")
    Segment("5", target=True)

`history` [[query, answer], ...] holds earlier turns, rendered before the final one; their answers are
targets too unless `last_turn_only`. Only the final turn has an input. For the other templates the user
query is instruction + "\\n" + input (when input is non-empty). The system prompt is the record's `system`,
else `options.system`, else the template's default (for `alpaca`, the preamble; the others have none).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from packer.records import Segment

from .base import Columns, EmptyResponse, HandlerOptions, ReadsFields, RecordError, check_options
from .templates import CHAT_TEMPLATES, ChatTemplate

FIELDS: tuple[str, ...] = ("instruction", "input", "output", "system", "history")
TEMPLATES: tuple[str, ...] = tuple(CHAT_TEMPLATES)
DEFAULT_TEMPLATE = "alpaca"


@dataclass(frozen=True)
class AlpacaHandler(ReadsFields):
    fields: ClassVar[tuple[str, ...]] = FIELDS
    template: ChatTemplate
    columns: Columns
    system: str | None = None
    last_turn_only: bool = False
    keep_empty_response: bool = False
    chat: Any = None  # the model's chat template (--chat-template): turns render as user/assistant messages
    name: str = "alpaca"
    default_overflow: str = "truncate"

    @property
    def template_text(self) -> str:
        return self.template.text

    def __call__(self, record: Mapping[str, Any]) -> list[Segment]:
        instruction = self.columns.text(record, "instruction")
        input_text = self.columns.text(record, "input", required=False)
        output = self.columns.text(record, "output")
        if not output.strip() and not self.keep_empty_response:
            raise EmptyResponse(self.columns.column("output"))
        if self.chat is not None:  # the user turn is instruction + "\n" + input, as in LLaMA-Factory
            query = instruction + "\n" + input_text if input_text else instruction
            system = self.columns.text(record, "system", required=False) or self.system
            return chat_segments(self.chat, [*self._history(record), (query, output)], system, self.last_turn_only)
        turns = [*self._history(record), (self.template.query(instruction, input_text), output)]
        system = (
            self.columns.text(record, "system", required=False)
            or self.system
            or self.template.default(bool(input_text))
        )
        return self.template.render(turns, system, self.last_turn_only)

    def _history(self, record: Mapping[str, Any]) -> list[tuple[str, str]]:
        history = self.columns.get(record, "history", required=False)
        if history is None:
            return []
        if not isinstance(history, list):
            raise self.columns.wrong_type("history", "a list of [query, answer] pairs", history)
        for i, pair in enumerate(history):
            if not _is_pair(pair):
                raise self.columns.wrong_type(
                    "history", "a [query, answer] pair of strings", pair, f" item {i}"
                )
        return [(q, a) for q, a in history]


def chat_segments(chat: Any, turns: list[tuple[str, str]], system: str | None, last_turn_only: bool) -> list[Segment]:
    """(query, answer) turns as the model's chat template renders them: [system], user, assistant, ..."""
    from packer.chat_template import SpanError

    messages = [{"role": "system", "content": system}] if system else []
    for query, answer in turns:
        messages += [{"role": "user", "content": query}, {"role": "assistant", "content": answer}]
    train = [m["role"] == "assistant" and (not last_turn_only or i == len(messages) - 1)
             for i, m in enumerate(messages)]
    try:
        return chat.segments(messages, None, train)
    except SpanError as e:
        raise RecordError("<chat template>", str(e)) from e


def _is_pair(pair: Any) -> bool:
    return isinstance(pair, list | tuple) and len(pair) == 2 and all(isinstance(s, str) for s in pair)


def make(options: HandlerOptions) -> AlpacaHandler:
    check_options("alpaca", options, fields=FIELDS, templates=TEMPLATES, system=True, last_turn_only=True)
    return AlpacaHandler(
        template=CHAT_TEMPLATES[options.template or DEFAULT_TEMPLATE],
        columns=Columns(dict(options.map_keys)),
        system=options.system,
        last_turn_only=options.last_turn_only,
        keep_empty_response=options.keep_empty_response,
        chat=options.chat,
    )
