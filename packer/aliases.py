"""`packer build` under the flags of Megatron-LM's and MindSpeed-LLM's `preprocess_data.py`.

Each foreign flag becomes packer's own before the build starts, so a build under either spelling is the same:

    --tokenizer-name-or-path DIR                    --tokenizer DIR
    --handler-name AlpacaStyleInstructionHandler    --handler alpaca                        (HANDLER_NAMES)
    --json-keys text title                          --json-keys text,title
    --prompt-type qwen                              --template chatml --system "You are a helpful assistant."
                                                    (PROMPT_TYPES; --chat-template chatml for --handler messages)
    --map-keys '{"prompt": "q", "response": "a"}'   --map-keys '{"instruction": "q", "output": "a"}'  (alpaca)
    --append-eod                                    nothing: every sample already ends with one EOD
    --context-parallel-size N                       --cp-size N      (the trainers' own spellings, taken as
    --tensor-model-parallel-size M                  --tp-size M       click aliases: packer/cli.py)

The other `preprocess_data.py` flags are refused with what to do instead (REFUSED), not click's bare "no such
option". Names from MindSpeed-LLM c77308a1 (mindspeed_llm/tasks/preprocess/data_handler.py, templates.json).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping

import click

# MindSpeed-LLM handler class -> packer handler. Not equivalent in every detail: packer's handlers render the
# text their own way (e.g. moss keeps MOSS's markers verbatim, MindSpeed strips them).
HANDLER_NAMES: dict[str, str] = {
    "AlpacaStyleInstructionHandler": "alpaca",
    "GeneralInstructionHandler": "alpaca",  # MindSpeed's older Alpaca handler (instruction/input/output)
    "SharegptStyleInstructionHandler": "messages",
    "OpenAIInstructionHandler": "messages",
    "GeneralPretrainHandler": "text",
    "MOSSInstructionHandler": "moss",
    "MOSSMultiTurnHandler": "moss",
    "BelleMultiTurnInstructionHandler": "belle",
}

# MindSpeed-LLM --prompt-type -> (packer template, default system prompt). The same text around each turn,
# except where noted.
PROMPT_TYPES: dict[str, tuple[str, str | None]] = {
    # records with an input: MindSpeed appends it to the instruction, packer writes Stanford's "### Input:" block
    "alpaca": ("alpaca", None),
    "chatml": ("chatml", None),
    "qwen": ("chatml", "You are a helpful assistant."),
    "chatml_de": ("chatml", "Du bist ein freundlicher und hilfsbereiter KI-Assistent."),
    "qwen_math_r1": ("chatml", "Please reason step by step, and put your final answer within \\boxed{}."),
    "llama3": ("llama3", None),
    "llama2": ("llama2", None),  # several turns: MindSpeed writes </s><s> between them, packer does not
}

# MindSpeed's Alpaca field names (InstructionDatasetAttr) -> the alpaca handler's.
ALPACA_KEYS: dict[str, str] = {"prompt": "instruction", "query": "input", "response": "output",
                               "system": "system", "history": "history"}

_TOKENIZER = "packer reads the tokenizer's type and files from --tokenizer (tokenizer.json, a SentencePiece .model, "\
             "or a directory holding one): drop it"
REFUSED: dict[str, str] = {
    **dict.fromkeys(("--tokenizer-type", "--vocab-file", "--merge-file", "--tokenizer-model",
                     "--tokenizer-not-use-fast", "--vocab-size"), _TOKENIZER),
    **dict.fromkeys(("--make-vocab-size-divisible-by", "--pad-vocab-size-to"),
                    "vocabulary padding is the trainer's business; packer stores the real vocab_size"),
    "--neat-pack": "packer always packs with explicit boundaries; MindSpeed's neat-pack layout is made by "
                   "`packer export --to mindspeed`",
    "--dataset-impl": "packer writes Megatron's mmap .bin/.idx only: drop it",
    "--log-interval": "progress shows as a bar (-q hides it): drop it",
    "--split-sentences": "packer does not split sentences (the text handler keeps documents whole)",
    "--keep-newlines": "packer keeps the text as it is: drop it",
    "--n-subs": "use --workers",
    "--partitions": "use --workers, or --num-shards/--shard-index and `packer merge`",
    "--keep-sequential-samples": "packer keeps the input order (and --pack nf packs in it)",
    "--cache-dir": "packer keeps no dataset cache: drop it",
    "--overwrite-cache": "packer keeps no dataset cache: drop it",
    "--seed": "packing is deterministic: drop it",
    "--lang": "packer does not split sentences: drop it",
    "--prompt-type-path": "packer's templates are built in (--template, --chat-template FILE.jinja)",
}


def handler_for(name: str) -> str:
    """The packer handler of a MindSpeed-LLM handler class name (packer's own names pass through)."""
    from packer.handlers import HANDLERS

    if name in HANDLER_NAMES:
        return HANDLER_NAMES[name]
    if name in HANDLERS:
        return name
    known = ", ".join(f"{k} (--handler {v})" for k, v in HANDLER_NAMES.items())
    raise click.BadParameter(f"{name!r} has no packer equivalent; the MindSpeed-LLM handlers packer reads: {known}",
                             param_hint="--handler-name")


def template_for(name: str) -> tuple[str, str | None]:
    """(packer template, default system prompt or None) of a MindSpeed-LLM --prompt-type."""
    if name in PROMPT_TYPES:
        return PROMPT_TYPES[name]
    known = ", ".join(f"{k} (--template {t}{' + a default --system' if s else ''})"
                      for k, (t, s) in PROMPT_TYPES.items())
    raise click.BadParameter(f"{name!r} has no packer equivalent; MindSpeed-LLM prompt types packer has: {known}; "
                             "or pick a packer --template", param_hint="--prompt-type")


def alpaca_map_keys(map_keys: Mapping[str, str]) -> dict[str, str]:
    """MindSpeed's Alpaca field names in --map-keys, renamed to the alpaca handler's (packer's own stay)."""
    out: dict[str, str] = {}
    for key, column in map_keys.items():
        field = ALPACA_KEYS.get(key, key)
        if field in out and out[field] != column:
            raise click.BadParameter(f"both {key!r} and another key name the alpaca field {field!r}",
                                     param_hint="--map-keys")
        out[field] = column
    return out


def split_json_keys(args: list[str]) -> list[str]:
    """Megatron's space-separated `--json-keys a b` -> `--json-keys a,b`: the words up to the next option."""
    out, i = [], 0
    while i < len(args):
        out.append(args[i])
        i += 1
        if out[-1] == "--json-keys":
            words = []
            while i < len(args) and not args[i].startswith("-"):
                words.append(args[i])
                i += 1
            if words:
                out.append(",".join(words))
    return out


class BuildCommand(click.Command):
    """`packer build`: foreign flags refused with a hint, and Megatron's space-separated --json-keys."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        for i, arg in enumerate(args):
            if arg == "--":
                break
            flag = arg.split("=", 1)[0]
            if flag in REFUSED:
                raise click.UsageError(f"{flag} is a Megatron-LM / MindSpeed-LLM preprocess_data.py option that "
                                       f"packer build does not take: {REFUSED[flag]}", ctx)
            if arg == "--pack" and (i + 1 == len(args) or args[i + 1].startswith("-")):
                raise click.UsageError("--pack takes the packing algorithm here (bfd, ffd, nf, none); packer always "
                                       "packs, so MindSpeed's bare --pack is the default (--pack bfd)", ctx)
        return super().parse_args(ctx, split_json_keys(args))


def megatron_flags(command: Callable) -> Callable:
    """Adds --handler-name, --prompt-type and --append-eod to `packer build` and turns them (and MindSpeed's
    --map-keys names) into packer's own options before the command runs."""

    @click.option("--handler-name", metavar="CLASS",
                  help="MindSpeed-LLM handler class, for --handler: " + ", ".join(
                      f"{k} = {v}" for k, v in HANDLER_NAMES.items()) + ".")
    @click.option("--prompt-type", metavar="NAME",
                  help="MindSpeed-LLM template, for --template: " + ", ".join(
                      f"{k} = {t}{' + its default system' if s else ''}" for k, (t, s) in PROMPT_TYPES.items())
                  + ".")
    @click.option("--append-eod", is_flag=True,
                  help="Accepted for Megatron-LM / MindSpeed-LLM scripts: packer always ends every sample with "
                       "one EOD (a target), with or without it.")
    @functools.wraps(command)
    def run(handler_name, prompt_type, append_eod, **kwargs):
        handler = kwargs.get("handler")
        if handler_name is not None:
            mapped = handler_for(handler_name)
            if handler is not None and handler != mapped:
                raise click.UsageError(f"--handler {handler} and --handler-name {handler_name} (= {mapped}): "
                                       "pass one of them")
            kwargs["handler"] = handler = mapped
        if handler is None:
            raise click.UsageError("Missing option '--handler' (or MindSpeed-LLM's --handler-name).")
        if prompt_type is not None:
            template, system = template_for(prompt_type)
            key = "chat_template" if handler == "messages" and "chat_template" in kwargs else "template"
            if kwargs.get(key) is not None and kwargs[key] != template:
                raise click.UsageError(f"--{key.replace('_', '-')} {kwargs[key]} and --prompt-type {prompt_type} "
                                       f"(= {template}): pass one of them")
            kwargs[key] = template
            if system is not None and kwargs.get("system") is None:
                kwargs["system"] = system
        if handler == "alpaca" and kwargs.get("map_keys"):
            kwargs["map_keys"] = alpaca_map_keys(kwargs["map_keys"])
        return command(**kwargs)

    return run
