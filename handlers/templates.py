"""Chat templates: how a system prompt and (query, answer) turns become prompt and target segments.

One conversation renders as (T = target, everything else prompt):

    system block | user(q1) | T a1 | T end | sep | user(q2) | T a2 | T end

chatml, system "Be brief.", turns [("Hi", "Hello!")]:

    "<|im_start|>system\\nBe brief.<|im_end|>\\n<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n"
    T "Hello!"   T "<|im_end|>"   "\\n"

`chatml` and `llama3` render exactly what the models' own templates render (Qwen2.5's when a system prompt is
given, Meta-Llama-3-Instruct's, whose `<|begin_of_text|>` the pipeline keeps once when the tokenizer adds it
too); tests hold them equal to the Jinja built-ins in packer/assets/chat_templates. Special-token text
(<|im_end|>, <|eot_id|>) is written out; a tokenizer that knows it as a special token maps it to one id.
Other BOS/EOS text (<s>, </s>) is never written: the tokenizer adds BOS and the pipeline appends EOD.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from packer.records import Segment

from .base import SegmentBuilder

ALPACA_PREAMBLE = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
ALPACA_PREAMBLE_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)


@dataclass(frozen=True, slots=True)
class ChatTemplate:
    name: str
    user: str  # "{query}" -> everything between the previous turn and the answer
    system: str  # "{system}" -> rendered only when there is a system prompt
    first_user: str | None = (
        None  # turn 1 after a system block, where it differs (llama2 nests <<SYS>> in [INST])
    )
    end: str = ""  # target text after every answer: the model learns to stop
    sep: str = ""  # prompt text between an answer and the next user turn
    input_sep: str = "\n"  # query = instruction + input_sep + input, when input is non-empty
    default_system: str | None = None
    default_system_input: str | None = (
        None  # default when the record has an input (Alpaca's preamble differs)
    )
    head: str = ""  # prompt text before everything (llama3's <|begin_of_text|>; the pipeline keeps one BOS)
    tail: str = ""  # prompt text after the last answer (chatml's "\n" after the final <|im_end|>)
    trim: bool = False  # strip whitespace around every text, as Meta's Llama 3 template does (`| trim`)

    @property
    def text(self) -> str:
        """All the literal text this template can write, placeholders removed."""
        parts = (self.user, self.system, self.first_user or "", self.end, self.sep, self.input_sep,
                 self.default_system or "", self.default_system_input or "", self.head, self.tail)
        return "\n".join(p.replace("{query}", "").replace("{system}", "") for p in parts)

    def query(self, instruction: str, input_text: str | None) -> str:
        return instruction + self.input_sep + input_text if input_text else instruction

    def default(self, has_input: bool) -> str | None:
        return self.default_system_input if has_input and self.default_system_input else self.default_system

    def render(
        self, turns: Sequence[tuple[str, str]], system: str | None, last_turn_only: bool = False
    ) -> list[Segment]:
        """Segments for `turns` [(query, answer), ...]; every answer is a target unless `last_turn_only`."""
        b = SegmentBuilder()
        clean = str.strip if self.trim else str
        b.prompt(self.head)
        if system:
            b.prompt(_fill(self.system, "{system}", clean(system)))
        for i, (query, answer) in enumerate(turns):
            if i:
                b.prompt(self.sep)
            user = self.first_user if i == 0 and system and self.first_user else self.user
            b.prompt(_fill(user, "{query}", clean(query)))
            train = not last_turn_only or i == len(turns) - 1
            b.target(clean(answer), train)
            b.target(self.end, train)
        b.prompt(self.tail)
        return b.segments


def _fill(template: str, placeholder: str, value: str) -> str:
    # Not str.format: user text is full of braces.
    before, after = template.split(placeholder)
    return before + value + after


CHAT_TEMPLATES: dict[str, ChatTemplate] = {
    t.name: t
    for t in (
        # tatsu-lab/stanford_alpaca PROMPT_DICT, plus the "\n" after "### Response:" that alpaca-lora and
        # LLaMA-Factory add (Stanford's train.py glues the answer to the colon). History repeats the block.
        ChatTemplate(
            name="alpaca",
            system="{system}\n\n",
            user="### Instruction:\n{query}\n\n### Response:\n",
            sep="\n\n",
            input_sep="\n\n### Input:\n",
            default_system=ALPACA_PREAMBLE,
            default_system_input=ALPACA_PREAMBLE_INPUT,
        ),
        ChatTemplate(
            name="chatml",
            system="<|im_start|>system\n{system}<|im_end|>\n",
            user="<|im_start|>user\n{query}<|im_end|>\n<|im_start|>assistant\n",
            end="<|im_end|>",
            sep="\n",
            tail="\n",  # every message ends "<|im_end|>\n", the last one too (Qwen's and ChatML's templates)
        ),
        # Meta's format without the <s>/</s> text: "[INST] <<SYS>>\n{s}\n<</SYS>>\n\n{q} [/INST] {a} [INST] ..."
        ChatTemplate(
            name="llama2",
            system="[INST] <<SYS>>\n{system}\n<</SYS>>\n\n",
            first_user="{query} [/INST] ",
            user="[INST] {query} [/INST] ",
            sep=" ",
        ),
        ChatTemplate(
            name="llama3",
            system="<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>",
            user="<|start_header_id|>user<|end_header_id|>\n\n{query}<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n",
            end="<|eot_id|>",
            head="<|begin_of_text|>",  # Meta's template starts with bos_token
            trim=True,
        ),
        ChatTemplate(name="plain", system="{system}\n", user="{query}\n", sep="\n"),
    )
}
