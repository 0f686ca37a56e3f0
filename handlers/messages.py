"""Conversations, OpenAI `messages` or ShareGPT `conversations`, rendered in the model's own chat template.

    {"messages": [{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": "2+2?"},
                  {"role": "assistant", "content": "4"}]}
    {"conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}], "system": "Be brief."}
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]      (a bare list of messages)

both become the same messages, rendered by the chat template (packer.chat_template: the tokenizer's own by
default, or --chat-template NAME|FILE.jinja); with Qwen2.5's template:

    Segment("<|im_start|>system\\nBe brief.<|im_end|>\\n<|im_start|>user\\n2+2?<|im_end|>\\n<|im_start|>assistant\\n")
    Segment("4<|im_end|>", target=True)
    Segment("\\n")

Every assistant turn is a target (`--last-turn-only`: the last one; a message with `loss_weight` 0, as in
LLaMA-Factory's format, is not), never system, user or tool text. OpenAI fields kept: role, content (a string,
or text parts joined), tool_calls (`arguments` given as a JSON string are parsed to the object templates
expect), name, tool_call_id, reasoning_content; a `tools` column (a list, or its JSON text) goes to the
template. ShareGPT roles: human/user -> user, gpt/assistant/chatgpt/bard/bing/model -> assistant,
system -> system, function_call -> an assistant tool call (its value the JSON {"name", "arguments"}),
observation/function/tool -> tool. `--map-keys` renames the columns (messages, conversations, tools, system),
the message keys (role, content) and roles (user, assistant, system, tool, function_call: the role name your
data uses, e.g. '{"assistant": "bot"}').
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from packer.records import Segment

from .base import Columns, EmptyResponse, HandlerOptions, RecordError, check_options

FIELDS: tuple[str, ...] = ("messages", "conversations", "tools", "system", "role", "content",
                           "user", "assistant", "tool", "function_call")
COLUMNS: tuple[str, ...] = ("messages", "conversations", "tools", "system")
TEMPLATES: tuple[str, ...] = ()
ROLES: dict[str, str] = {
    "user": "user", "human": "user",
    "assistant": "assistant", "gpt": "assistant", "chatgpt": "assistant", "bard": "assistant", "bing": "assistant",
    "model": "assistant",
    "system": "system",
    "tool": "tool", "observation": "tool", "function": "tool", "ipython": "tool",
    "function_call": "function_call",
}
KEPT = ("name", "tool_call_id", "reasoning_content")


@dataclass(frozen=True)
class MessagesHandler:
    fields: ClassVar[tuple[str, ...]] = FIELDS
    columns: Columns
    chat: Any  # packer.chat_template.ChatRenderer
    system: str | None = None
    last_turn_only: bool = False
    keep_empty_response: bool = False
    name: str = "messages"
    default_overflow: str = "truncate"

    @property
    def list_field(self) -> str:
        """A record that is a bare JSON list is this column's value."""
        return self.columns.column("messages")

    @property
    def input_columns(self) -> frozenset[str]:
        return self.columns.of(COLUMNS)

    @property
    def template_text(self) -> str:
        return self.chat.source

    def roles(self) -> dict[str, str]:
        out = dict(ROLES)
        for role in ("user", "assistant", "system", "tool", "function_call"):
            if role in self.columns.map_keys:
                out[self.columns.map_keys[role].lower()] = role
        return out

    def __call__(self, record: Mapping[str, Any]) -> list[Segment]:
        messages, weights = self.messages(record)
        tools = self._tools(record)
        assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if not assistant:
            raise RecordError(self._where(record), "no assistant message: nothing to train on")
        last = assistant[-1]
        if not _says_anything(messages[last]) and not self.keep_empty_response:
            raise EmptyResponse(self._where(record))
        train = [m["role"] == "assistant" and weights[i] and (not self.last_turn_only or i == last)
                 for i, m in enumerate(messages)]
        from packer.chat_template import SpanError

        try:
            return self.chat.segments(messages, tools, train)
        except SpanError as e:
            raise RecordError("<chat template>", str(e)) from e

    def _where(self, record: Mapping[str, Any]) -> str:
        c = self.columns
        return c.column("messages") if c.column("messages") in record else c.column("conversations")

    def messages(self, record: Mapping[str, Any]) -> tuple[list[dict[str, Any]], list[bool]]:
        """The record's conversation as template messages, and whether each may be trained on."""
        c = self.columns
        column = self._where(record)
        turns = record.get(column)
        if turns is None:
            found = ", ".join(map(repr, list(record)[:12])) or "none"
            raise RecordError(column, f"record has no {c.column('messages')!r} or {c.column('conversations')!r} "
                                      f"column (columns: {found}); {c.fix('messages')}")
        if not isinstance(turns, list) or not turns:
            raise RecordError(column, f"column {column!r} must be a non-empty list of messages, got "
                                      f"{type(turns).__name__}")
        roles = self.roles()
        out: list[dict[str, Any]] = []
        weights: list[bool] = []
        for n, m in enumerate(turns, start=1):
            if not isinstance(m, Mapping):
                raise RecordError(column, f"message {n} must be an object, got {type(m).__name__}")
            out.append(self._message(m, n, column, roles))
            weight = m.get("loss_weight", 1)
            weights.append(not (isinstance(weight, (int, float)) and not isinstance(weight, bool) and weight == 0))
        system = c.text(record, "system", required=False) if c.column("system") in record else None
        system = system or self.system
        if system and out[0]["role"] != "system":
            out.insert(0, {"role": "system", "content": system})
            weights.insert(0, False)
        return out, weights

    def _message(self, m: Mapping[str, Any], n: int, column: str, roles: dict[str, str]) -> dict[str, Any]:
        role_key = self.columns.column("role") if self.columns.column("role") in m else "from"
        content_key = self.columns.column("content") if self.columns.column("content") in m else "value"
        given = m.get(role_key)
        if not isinstance(given, str):
            raise RecordError(column, f"message {n} has no {self.columns.column('role')!r} (or 'from') string")
        role = roles.get(given.lower())
        if role is None:
            raise RecordError(column, f"message {n}: unknown role {given!r}; roles are user, assistant, system, "
                                      f"tool, function_call (map yours with --map-keys '{{\"assistant\": "
                                      f"\"{given}\"}}')")
        content = _text(m.get(content_key), n, column)
        if role == "function_call":  # ShareGPT: the call itself is the value
            return {"role": "assistant", "content": "", "tool_calls": [_call(content, n, column)]}
        out: dict[str, Any] = {"role": role, "content": content}
        if role == "assistant" and m.get("tool_calls"):
            calls = m["tool_calls"]
            if not isinstance(calls, list):
                raise RecordError(column, f"message {n}: tool_calls must be a list")
            out["tool_calls"] = [_openai_call(call, n, column) for call in calls]
        elif content is None:
            raise RecordError(column, f"message {n} ({role}) has no {self.columns.column('content')!r} text")
        if out["content"] is None:
            out["content"] = ""
        for key in KEPT:
            if isinstance(m.get(key), str):
                out[key] = m[key]
        return out

    def _tools(self, record: Mapping[str, Any]) -> list[Any] | None:
        column = self.columns.column("tools")
        tools = record.get(column)
        if tools is None or tools == "" or tools == []:
            return None
        if isinstance(tools, str):
            try:
                tools = json.loads(tools)
            except json.JSONDecodeError as e:
                raise RecordError(column, f"tools is a string but not JSON ({e.msg}); give a list of tool "
                                          "schemas") from e
        if not isinstance(tools, list):
            raise RecordError(column, f"tools must be a list of tool schemas, got {type(tools).__name__}")
        return tools or None


def _text(content: Any, n: int, column: str) -> str | None:
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI / LLaMA-Factory content parts
        texts = []
        for part in content:
            if not isinstance(part, Mapping) or part.get("type", "text") != "text":
                kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
                raise RecordError(column, f"message {n}: content part of type {kind!r}; only text parts can "
                                          "be trained on here")
            text = part.get("text", part.get("value"))
            if not isinstance(text, str):
                raise RecordError(column, f"message {n}: a text part without a 'text' string")
            texts.append(text)
        return "".join(texts)
    raise RecordError(column, f"message {n}: content must be a string or a list of text parts, got "
                              f"{type(content).__name__}")


def _call(value: str | None, n: int, column: str) -> dict[str, Any]:
    try:
        call = json.loads(value or "")
    except json.JSONDecodeError as e:
        raise RecordError(column, f"message {n}: a function_call value must be JSON {{\"name\", \"arguments\"}} "
                                  f"({e.msg})") from e
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        raise RecordError(column, f"message {n}: a function_call value must be JSON {{\"name\", \"arguments\"}}")
    return {"type": "function", "function": {"name": call["name"], "arguments": _arguments(call.get("arguments"))}}


def _openai_call(call: Any, n: int, column: str) -> dict[str, Any]:
    fn = call.get("function") if isinstance(call, Mapping) else None
    if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
        raise RecordError(column, f"message {n}: each tool call needs function.name")
    out = {k: v for k, v in call.items() if k != "function"}
    out["function"] = {**fn, "arguments": _arguments(fn.get("arguments"))}
    return out


def _arguments(arguments: Any) -> Any:
    if isinstance(arguments, str):
        try:
            parsed = json.loads(arguments)
        except json.JSONDecodeError:
            return arguments
        return parsed if isinstance(parsed, dict) else arguments
    return {} if arguments is None else arguments


def _says_anything(m: Mapping[str, Any]) -> bool:
    return bool((m.get("content") or "").strip() or m.get("tool_calls") or (m.get("reasoning_content") or "").strip())


def make(options: HandlerOptions) -> MessagesHandler:
    check_options("messages", options, fields=FIELDS, templates=TEMPLATES, system=True, last_turn_only=True)
    if options.chat is None:
        raise ValueError("handler 'messages' needs a chat template: the tokenizer has none; pass --chat-template "
                         "chatml|llama3|FILE.jinja")
    return MessagesHandler(columns=Columns(dict(options.map_keys)), chat=options.chat, system=options.system,
                           last_turn_only=options.last_turn_only,
                           keep_empty_response=getattr(options, "keep_empty_response", False))
