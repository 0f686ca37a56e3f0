"""A model's own chat template, rendered as Hugging Face renders it, and the spans of the assistant turns.

Rendering (`ChatRenderer.render`) follows `transformers.apply_chat_template(..., tokenize=False)`: a Jinja2
`ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)` with `loopcontrols`, the
`{% generation %}` tag, `tojson` as `json.dumps(ensure_ascii=False, ...)`, `raise_exception`, `strftime_now`,
and the variables `messages`, `tools`, `documents`, `add_generation_prompt`, the tokenizer's special tokens
(`bos_token`, `eos_token`, ...) and `--chat-template-kwargs`. Tests hold it equal to transformers byte for byte.

Targets (`ChatRenderer.segments`) come from the rendering itself, never from re-assembling turns:

    Qwen2.5, [system s, user u, assistant a]:
    "<|im_start|>system\\ns<|im_end|>\\n<|im_start|>user\\nu<|im_end|>\\n<|im_start|>assistant\\n" "a<|im_end|>" "\\n"
     prompt ..................................................................................  target ......  prompt

- A template with `{% generation %}` blocks: exactly those blocks are targets (TRL/transformers'
  `return_assistant_tokens_mask` semantics).
- Otherwise the template is rendered a second time with every message's strings wrapped in invisible
  marks (Unicode noncharacters U+FDD0..U+FDD3); with the marks removed, that rendering must equal the
  first, else the record fails (the template rewrites text in a way no span can follow). An assistant turn's
  target then starts where the template's generation prompt (what `add_generation_prompt` writes, e.g.
  "<|im_start|>assistant\\n") ends, and ends with the template's turn terminator (the special token written
  right after an assistant message, e.g. "<|im_end|>"): what the model writes after the prompt, and where it
  stops. Earlier turns that the template rewrites (e.g. reasoning dropped from past turns) are found where
  this rendering puts them, so their spans are exact too. A turn whose start or end cannot be found fails
  the record, naming the template; nothing is guessed.
"""

from __future__ import annotations

import bisect
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from packer.records import Segment

GEN_START, GEN_END = "\ufdd0", "\ufdd1"  # around {% generation %} output
MSG_START, MSG_END = "\ufdd2", "\ufdd3"  # around each string of message i: MSG_START i MSG_START text MSG_END
_ANY_MARK = re.compile("[\ufdd0-\ufdd3]")
_MARK = re.compile("\ufdd0|\ufdd1|\ufdd2([0-9]+)\ufdd2|\ufdd3([0-9]+)\ufdd3")
_HAS_GENERATION = re.compile(r"\{%-?\s*generation\s*-?%\}")
SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
BUILTIN_DIR = Path(__file__).resolve().parent / "assets" / "chat_templates"


class TemplateError(ValueError):
    """The template itself cannot be used (not found, not valid Jinja)."""


class SpanError(ValueError):
    """A record whose rendering cannot be mapped to targets, or that the template refuses (raise_exception)."""


@lru_cache(maxsize=8)
def _compile(source: str, marks: bool):
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_generation"), [], [], body).set_lineno(lineno)

        def _generation(self, caller):
            text = caller()
            return GEN_START + text + GEN_END if marks else text

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise TemplateError(f"not a valid Jinja template (line {e.lineno}: {e.message})") from e


def builtin_names() -> tuple[str, ...]:
    return tuple(sorted(p.stem for p in BUILTIN_DIR.glob("*.jinja")))


def find_template(choice: str | None, tokenizer_path: str | Path) -> tuple[str, str] | None:
    """(template source, where it came from) for --chat-template `choice` ("auto" or None: the tokenizer's own,
    None if it has none), a built-in NAME, a name in the tokenizer's named template list, or a .jinja file."""
    tok = Path(tokenizer_path)
    directory = tok if tok.is_dir() else tok.parent
    config_file = directory / "tokenizer_config.json"
    named: dict[str, str] = {}
    own: tuple[str, str] | None = None
    if (directory / "chat_template.jinja").is_file():
        own = ((directory / "chat_template.jinja").read_text(encoding="utf-8"), str(directory / "chat_template.jinja"))
    if config_file.is_file():
        try:
            value = json.loads(config_file.read_text(encoding="utf-8")).get("chat_template")
        except (json.JSONDecodeError, AttributeError) as e:
            raise TemplateError(f"{config_file}: cannot read chat_template ({e})") from e
        if isinstance(value, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
            named = {t["name"]: t["template"] for t in value if isinstance(t, dict) and "name" in t}
            if own is None and "default" in named:
                own = (named["default"], f"{config_file} chat_template 'default'")
        elif isinstance(value, str) and own is None:
            own = (value, f"{config_file} chat_template")
    if choice in (None, "auto"):
        return own
    if choice in named:
        return named[choice], f"{config_file} chat_template {choice!r}"
    if choice in builtin_names():
        path = BUILTIN_DIR / f"{choice}.jinja"
        return path.read_text(encoding="utf-8"), f"built-in {choice}"
    path = Path(choice)
    if path.suffix == ".jinja" or path.is_file():
        if not path.is_file():
            raise TemplateError(f"--chat-template {choice}: no such file")
        return path.read_text(encoding="utf-8"), str(path)
    names = ", ".join([*builtin_names(), *named])
    raise TemplateError(f"--chat-template {choice!r}: not 'auto', a template file, or a template name ({names})")


def special_tokens(tokenizer_path: str | Path) -> dict[str, str]:
    """The tokenizer's special tokens as the template sees them (transformers' `special_tokens_map`)."""
    tok = Path(tokenizer_path)
    config_file = (tok if tok.is_dir() else tok.parent) / "tokenizer_config.json"
    if not config_file.is_file():
        return {}
    config = json.loads(config_file.read_text(encoding="utf-8"))
    out = {}
    for key in SPECIAL_KEYS:
        value = config.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            out[key] = value
    return out


@dataclass(frozen=True)
class ChatRenderer:
    """One chat template with the variables every rendering shares."""

    source: str
    origin: str  # where the template came from, for messages
    variables: Mapping[str, Any] = field(default_factory=dict)  # special tokens, then --chat-template-kwargs
    special: frozenset[str] = frozenset()  # the tokenizer's special-token texts (turn terminators are among them)

    @property
    def has_generation(self) -> bool:
        return bool(_HAS_GENERATION.search(self.source))

    def render(self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Any] | None = None,
               add_generation_prompt: bool = False, marks: bool = False) -> str:
        import jinja2

        template = _compile(self.source, marks)  # TemplateError: the template itself is unusable
        try:
            return template.render(messages=messages, tools=tools, documents=None,
                                                       add_generation_prompt=add_generation_prompt,
                                                       **self.variables)
        except jinja2.exceptions.TemplateError as e:
            raise SpanError(f"the chat template ({self.origin}) refuses the conversation: {e}") from e
        except (TypeError, AttributeError, KeyError, IndexError, ValueError) as e:
            raise SpanError(f"the chat template ({self.origin}) fails on the conversation "
                            f"({type(e).__name__}: {e})") from e

    def segments(self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Any] | None = None,
                 train: Sequence[bool] | None = None) -> list[Segment]:
        """The rendering of `messages` as segments, the assistant turns (those `train` allows) as targets."""
        for m in messages:
            if any(_ANY_MARK.search(v) for v in _strings(m)):
                raise SpanError("the conversation contains a Unicode noncharacter U+FDD0..U+FDD3; remove it")
        text = self.render(messages, tools)
        train = [m.get("role") == "assistant" for m in messages] if train is None else list(train)
        if self.has_generation:
            spans = self._generation_spans(messages, tools, text)
        else:
            spans = [s for k, s in self._turn_spans(messages, tools, text).items() if train[k]]
        return _cut(text, sorted(spans))

    def _generation_spans(self, messages, tools, text: str) -> list[tuple[int, int]]:
        marked = self.render(messages, tools, marks=True)
        plain, found = _strip(marked)
        if plain != text:
            raise SpanError(f"the chat template ({self.origin}) renders {{% generation %}} blocks differently "
                            "when tracked; its targets cannot be mapped")
        starts = [p for kind, _, p in found if kind == GEN_START]
        ends = [p for kind, _, p in found if kind == GEN_END]
        return list(zip(starts, ends, strict=True))

    def _turn_spans(self, messages, tools, text: str) -> dict[int, tuple[int, int]]:
        marked = self.render([_marked(m, i) for i, m in enumerate(messages)], tools)
        plain, found = _strip(marked)
        if plain != text:
            raise SpanError(f"the chat template ({self.origin}) changes the message text it is given (e.g. "
                            "strips or splits it), so the assistant turns cannot be located exactly; use a "
                            "template with {% generation %} blocks (--chat-template FILE.jinja)")
        where: dict[int, list[int]] = {}
        starts: dict[int, int] = {}
        for kind, i, p in found:
            where.setdefault(i, []).append(p)
            starts[i] = starts.get(i, 0) + (kind == MSG_START)
        strings = {i: len(_strings(m)) for i, m in enumerate(messages)}
        for i, n in starts.items():
            if n > strings[i] and messages[i].get("role") == "assistant":
                raise SpanError(f"the chat template ({self.origin}) writes assistant message {i + 1}'s text more "
                                "than once; which copy is the target cannot be told")
        order = sorted((p, i) for _, i, p in found)  # every mark, by position: its neighbours bound a turn
        positions = [p for p, _ in order]
        prompt, terminator = self._prompt_and_terminator()
        spans = {}
        for k, m in enumerate(messages):
            if m.get("role") != "assistant":
                continue
            if k not in where:
                if not any(_strings(m)):
                    continue  # nothing rendered, nothing to train
                what = "its tool calls" if m.get("tool_calls") else "it"
                raise SpanError(f"the chat template ({self.origin}) does not render assistant message {k + 1} "
                                f"({what} would not be trained on); use a template that renders it, or skip "
                                "such records")
            first, last = min(where[k]), max(where[k])
            j = bisect.bisect_right(positions, first) - 1
            while j >= 0 and order[j][1] == k:
                j -= 1
            before = order[j][0] if j >= 0 else 0
            j = bisect.bisect_left(positions, last)
            while j < len(order) and order[j][1] == k:
                j += 1
            after = order[j][0] if j < len(order) else len(text)
            lead = _leading_space(m.get("content"))
            if lead and text[first - len(lead) : first] == lead and first - len(lead) >= before:
                first_text = first - len(lead)  # the content's own leading whitespace, rendered as given
            else:
                first_text = first
            start = _turn_start(text, before, first_text, prompt)
            end = text.find(terminator, last, after) if terminator else -1
            if end < 0:
                if after < len(text) and terminator:
                    raise SpanError(f"assistant message {k + 1} is not followed by the template's turn "
                                    f"terminator {terminator!r} ({self.origin}); its target cannot be located")
                end = last
            else:
                end += len(terminator)
            if start is None:
                raise SpanError(f"assistant message {k + 1}: the template's generation prompt {prompt!r} "
                                f"does not precede it ({self.origin}); its target cannot be located")
            spans[k] = (start, end)
        return spans

    def _prompt_and_terminator(self) -> tuple[str, str]:
        return _probe(self.source, self.origin, json.dumps(dict(self.variables), sort_keys=True, default=str),
                      self.special)


def _strings(m: Mapping[str, Any]) -> list[str]:
    out = [v for k in ("content", "reasoning_content") if isinstance(v := m.get(k), str) and v]
    for call in m.get("tool_calls") or ():
        fn = call.get("function", call) if isinstance(call, Mapping) else None
        if isinstance(fn, Mapping) and isinstance(fn.get("name"), str) and fn["name"]:
            out.append(fn["name"])
    return out


def _wrap(text: str, i: int) -> str:
    """Marks inside the outer whitespace, so that a template's `trim`/`strip` sees the same text."""
    core = text.strip()
    if not core:
        return text
    head = text[: len(text) - len(text.lstrip())]
    tail = text[len(text.rstrip()):]
    return f"{head}{MSG_START}{i}{MSG_START}{core}{MSG_END}{i}{MSG_END}{tail}"


def _marked(m: Mapping[str, Any], i: int) -> dict[str, Any]:
    out = dict(m)
    for key in ("content", "reasoning_content"):
        if isinstance(out.get(key), str):
            out[key] = _wrap(out[key], i)
    if out.get("tool_calls"):
        calls = []
        for call in out["tool_calls"]:
            call = dict(call) if isinstance(call, Mapping) else call
            if isinstance(call, dict):
                inner = "function" in call and isinstance(call["function"], Mapping)
                fn = dict(call["function"]) if inner else call
                if isinstance(fn.get("name"), str):
                    fn["name"] = _wrap(fn["name"], i)
                if inner:
                    call["function"] = fn
            calls.append(call)
        out["tool_calls"] = calls
    return out


def _strip(marked: str) -> tuple[str, list[tuple[str, int, int]]]:
    """(text without marks, [(mark kind, message index or -1, position in that text)])."""
    out, found, pos, removed = [], [], 0, 0
    for m in _MARK.finditer(marked):
        out.append(marked[pos : m.start()])
        at = m.start() - removed
        kind = m.group()[0]
        index = int(m.group(1) or m.group(2) or -1) if kind in (MSG_START, MSG_END) else -1
        found.append((kind, index, at))
        removed += m.end() - m.start()
        pos = m.end()
    out.append(marked[pos:])
    return "".join(out), found


def _leading_space(content: Any) -> str:
    return content[: len(content) - len(content.lstrip())] if isinstance(content, str) and content.strip() else ""


def _turn_start(text: str, before: int, first: int, prompt: str) -> int | None:
    """Where the assistant turn whose first rendered string is at `first` starts: right after the generation
    prompt, its last occurrence in text[before:first]; else after the last occurrence there of the longest
    part of it (at least 4 characters) that the template writes for this turn (e.g. past turns without the
    prompt's "<think>\n"); at `first` if the template has no generation prompt. None: not found."""
    if not prompt:
        return first
    for n in range(len(prompt), min(4, len(prompt)) - 1, -1):
        at = text.rfind(prompt[:n], before, first)
        if at >= 0:
            return at + n
    return None


@lru_cache(maxsize=8)
def _probe(source: str, origin: str, variables: str, special: frozenset[str]) -> tuple[str, str]:
    """(generation prompt, turn terminator) of a template, from two small renderings:
    the generation prompt is what add_generation_prompt adds after [user]; the terminator is the special
    token the template writes right after an assistant message's text."""
    r = ChatRenderer(source, origin, json.loads(variables), special)
    user = [{"role": "user", "content": "Hi"}]
    try:
        without, with_prompt = r.render(user), r.render(user, add_generation_prompt=True)
    except SpanError:
        without = with_prompt = ""
    # What add_generation_prompt adds: after the common prefix (a template may end a conversation differently
    # without it, e.g. Phi-3 appends eos_token).
    common = len(os.path.commonprefix([without, with_prompt]))
    for token in special:  # never cut a special token: Phi-3's "<|endoftext|>" and "<|assistant|>" share "<|"
        at = with_prompt.rfind(token, 0, common + len(token))
        if 0 <= at < common < at + len(token):
            common = at
    prompt = with_prompt[common:]
    terminator = ""
    try:
        convo = r.render([*user, {"role": "assistant", "content": "\ufdd3A\ufdd3"},
                          {"role": "user", "content": "Bye"}])
    except SpanError:
        convo = ""
    rest = convo.partition("\ufdd3A\ufdd3")[2]
    for token in sorted(special, key=len, reverse=True):
        if token and rest.lstrip(" ").startswith(token):
            terminator = token
            break
    return prompt, terminator


def _cut(text: str, spans: list[tuple[int, int]]) -> list[Segment]:
    out, pos = [], 0
    for start, end in spans:
        start = max(start, pos)
        if start > pos:
            out.append(Segment(text[pos:start]))
        if end > start:
            out.append(Segment(text[start:end], target=True))
        pos = max(pos, end)
    if pos < len(text):
        out.append(Segment(text[pos:]))
    return out
