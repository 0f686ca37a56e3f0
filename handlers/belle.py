"""BELLE records: instruction, optional input, output -- single-turn, or a whole dialogue in `instruction`.

Single-turn, formatted as BELLE's SFT code does (instruction and input concatenated, no separator):

    {"instruction": "写一首诗", "input": "", "output": "春眠不觉晓"}
    template "belle" (default; LianjiaTech/BELLE train/src/sample_generator.py, the current trainer):
        Segment("Human: \\n写一首诗\\n\\nAssistant: \\n")  Segment("春眠不觉晓", target=True)
    template "belle_legacy" (BELLE's first train/finetune.py):
        Segment("Human: 写一首诗\\n\\nAssistant: ")      Segment("春眠不觉晓", target=True)

Multi-turn, BelleGroup/multiturn_chat_0.8M style: `instruction` holds the dialogue so far, with `Human:` and
`Assistant:` markers at line starts, ending with `Assistant:`; `output` is the last answer. The text is kept
verbatim (no template); every earlier answer is a target too, unless `last_turn_only`:

    {"instruction": "Human:你好\\nAssistant:你好！\\nHuman:1+1=?\\nAssistant:", "output": "2"}
        -> Segment("Human:你好\\nAssistant:")  Segment("你好！", target=True)
           Segment("\\nHuman:1+1=?\\nAssistant:")  Segment("2", target=True)

Detection rule: the record is multi-turn iff instruction + input, leading whitespace aside, starts with a
line-start `Human:` marker and, trailing whitespace aside, ends with a line-start `Assistant:` marker.
Between markers, an answer's surrounding whitespace stays prompt; a marker inside an answer that does not
start a line is plain text.
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
    SegmentBuilder,
    check_options,
)

FIELDS: tuple[str, ...] = ("instruction", "input", "output")
PROMPTS: dict[str, str] = {
    "belle": "Human: \n{query}\n\nAssistant: \n",
    "belle_legacy": "Human: {query}\n\nAssistant: ",
}
TEMPLATES: tuple[str, ...] = tuple(PROMPTS)
DEFAULT_TEMPLATE = "belle"

_MARKER = re.compile(r"^[ \t]*(Human|Assistant):", re.MULTILINE)


@dataclass(frozen=True)
class BelleHandler(ReadsFields):
    fields: ClassVar[tuple[str, ...]] = FIELDS
    prompt: str
    columns: Columns
    last_turn_only: bool = False
    keep_empty_response: bool = False
    chat: Any = None  # the model's chat template (--chat-template): the dialogue renders as messages
    name: str = "belle"
    default_overflow: str = "truncate"

    @property
    def template_text(self) -> str:
        return self.prompt.replace("{query}", "\n")

    def __call__(self, record: Mapping[str, Any]) -> list[Segment]:
        instruction = self.columns.text(record, "instruction")
        query = instruction + (self.columns.text(record, "input", required=False) or "")
        output = self.columns.text(record, "output")
        if not output.strip() and not self.keep_empty_response:
            raise EmptyResponse(self.columns.column("output"))
        markers = list(_MARKER.finditer(query))
        if self.chat is not None:
            from .alpaca import chat_segments

            turns = _turns(query, markers, output) if is_dialogue(query, markers) else [(query, output)]
            return chat_segments(self.chat, turns, None, self.last_turn_only)
        if is_dialogue(query, markers):
            return self._dialogue(query, markers, output)
        before, after = self.prompt.split("{query}")
        return [Segment(before + query + after), Segment(output, target=True)]

    def _dialogue(self, dialogue: str, markers: list[re.Match[str]], output: str) -> list[Segment]:
        b = SegmentBuilder()
        b.prompt(dialogue[: markers[0].end()])
        for marker, following in zip(markers, markers[1:], strict=False):
            text = dialogue[marker.end() : following.start()]
            if marker.group(1) == "Assistant":
                core = text.strip()
                lead = text[: len(text) - len(text.lstrip())]
                b.prompt(lead)
                b.target(core, train=not self.last_turn_only)
                b.prompt(text[len(lead) + len(core) :])
            else:
                b.prompt(text)
            b.prompt(dialogue[following.start() : following.end()])
        b.prompt(dialogue[markers[-1].end() :])
        b.target(output)
        return b.segments


def _turns(dialogue: str, markers: list[re.Match[str]], output: str) -> list[tuple[str, str]]:
    """A `Human:`/`Assistant:` dialogue as (query, answer) turns; the final answer is `output`."""
    said = [(m.group(1), dialogue[m.end() : n.start() if n else len(dialogue)].strip())
            for m, n in zip(markers, [*markers[1:], None], strict=True)]
    turns, query = [], None
    for role, text in said:
        if role == "Assistant" and query is not None:
            turns.append((query, text))
            query = None
        elif role != "Assistant":
            query = text if query is None else query + "\n" + text
    last_query = query if query is not None else (turns.pop()[0] if turns else "")
    return [*turns, (last_query, output)]


def is_dialogue(text: str, markers: list[re.Match[str]] | None = None) -> bool:
    """True when `text` is a `Human:` ... `Assistant:` dialogue (see the module docstring)."""
    markers = list(_MARKER.finditer(text)) if markers is None else markers
    return (
        bool(markers)
        and markers[0].group(1) == "Human"
        and not text[: markers[0].start()].strip()
        and markers[-1].group(1) == "Assistant"
        and not text[markers[-1].end() :].strip()
    )


def make(options: HandlerOptions) -> BelleHandler:
    check_options("belle", options, fields=FIELDS, templates=TEMPLATES, last_turn_only=True)
    return BelleHandler(
        prompt=PROMPTS[options.template or DEFAULT_TEMPLATE],
        columns=Columns(dict(options.map_keys)),
        last_turn_only=options.last_turn_only,
        keep_empty_response=options.keep_empty_response,
        chat=options.chat,
    )
