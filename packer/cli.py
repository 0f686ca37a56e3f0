"""The `packer` command line: thin wiring from options to typed functions, errors to clean messages."""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import signal
import sys
import threading
import time
from importlib import resources
from pathlib import Path

import click
import numpy as np

from packer import __version__
from packer.aliases import BuildCommand, megatron_flags
from packer.config import EMPTY_RESPONSE, EXPORT_TARGETS, ON_ERROR, TOKENIZER_BACKENDS
from packer.handlers import HANDLERS, template_names
from packer.overflow import POLICIES
from packer.packing import ALGORITHMS

OUT_DEFAULT = "out"


def _asset(name: str) -> str:
    return str(resources.files("packer") / "assets" / name)


# Exit codes (the table is in README.md): 0 done, 1 the input, options or a file to read are wrong (or
# `packer verify` found a problem), 2 usage, 74 (sysexits' EX_IOERR) the filesystem refused a write (disk full,
# read-only, permissions, a file where a folder goes), 128 + N ended by signal N (130 Ctrl-C, 143 SIGTERM).
EXIT_IO = 74
_HINTS = {errno.ENOSPC: "free some space there or write elsewhere", errno.EDQUOT: "the disk quota is used up",
          errno.EROFS: "choose a writable output location", errno.EACCES: "choose a writable output location",
          errno.EPERM: "choose a writable output location", errno.ENOTDIR: "choose another output location",
          errno.EISDIR: "remove it or choose another output location"}


class Interrupted(KeyboardInterrupt):
    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def _stop_on_signals():
    """SIGINT and SIGTERM raise `Interrupted` in the main thread, so every `with` on the way out removes its
    temporary files (the pool's workers ignore both; the parent ends them). A second signal while that runs is
    ignored, unless the cleanup has taken over 5 s: then the process leaves at once (the next run at the prefix
    removes what is left)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    first: list[float] = []

    def handler(signum, frame):
        if not first:
            first.append(time.monotonic())
            raise Interrupted(signum)
        if time.monotonic() - first[0] > 5:
            os._exit(128 + signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _state(e: BaseException) -> str:
    """What is at the output prefix after `e` (set by OutputSet when the error passed through it)."""
    state, prefix = getattr(e, "output_state", (None, None))
    if state == "unchanged":
        return f"; nothing written at {prefix} (an earlier output there is unchanged)"
    if state == "incomplete":
        return f"; {prefix} holds no complete output now: run the command again"
    return ""


def clean_exits(command):
    """One line and a documented exit code for what is not a bug: a signal, or the filesystem refusing a write
    (an OSError with an errno; one raised with a message only, or ENOENT, is the input's fault: exit 1)."""

    @functools.wraps(command)
    def run(*args, **kwargs):
        try:
            with _stop_on_signals():
                return command(*args, **kwargs)
        except KeyboardInterrupt as e:
            signum = e.signum if isinstance(e, Interrupted) else signal.SIGINT
            click.echo(f"interrupted by {signal.Signals(signum).name}{_state(e)}", err=True)
            raise click.exceptions.Exit(128 + signum) from None
        except OSError as e:
            if e.errno is None:
                raise click.ClickException(str(e) + _state(e)) from None
            code = 1 if e.errno == errno.ENOENT else EXIT_IO  # a path to read that is not there: the input's fault
            path = e.filename2 if e.filename2 is not None else e.filename
            hint = _HINTS.get(e.errno)
            click.echo(f"Error: {os.fsdecode(path) if path is not None else 'output'}: {e.strerror} "
                       f"[{errno.errorcode.get(e.errno, e.errno)}]" + (f"; {hint}" if hint else "") + _state(e),
                       err=True)
            raise click.exceptions.Exit(code) from None

    return run


class _LazyGroup(click.Group):
    """Loads `packer train` (which needs torch) only when it is asked for."""

    lazy = {"train": ("packer.trainer.cli", "train_command")}

    def list_commands(self, ctx):
        return sorted([*super().list_commands(ctx), *self.lazy])

    def get_command(self, ctx, name):
        if name in self.lazy:
            module, attr = self.lazy[name]
            try:
                mod = __import__(module, fromlist=[attr])
            except ImportError as e:
                raise click.ClickException(
                    f"`packer {name}` needs PyTorch ({e}); install it with: pip install 'packer[train]'"
                ) from e
            return getattr(mod, attr)
        return super().get_command(ctx, name)


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="packer")
def main() -> None:
    """Turn instruction and text data into packed, boundary-indexed training data (Megatron .bin/.idx)."""


def _parse_map_keys(ctx, param, value: str | None) -> dict[str, str]:
    if not value:
        return {}
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as e:
        raise click.BadParameter(f"not JSON ({e.msg}); example: '{{\"output\": \"response\"}}'") from e
    if not isinstance(parsed, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in parsed.items()):
        raise click.BadParameter('must be a JSON object of field -> column names, e.g. \'{"output": "response"}\'')
    return parsed


def _tune_malloc() -> None:
    """Fix glibc's thresholds for this process (the pool's workers inherit them). By default glibc raises its
    mmap threshold to the largest block freed so far and keeps up to twice that at the top of its heap: once
    `datasets` has read a few 10 MiB chunks, tens of MiB stay resident, and the streaming reader's peak drifted
    up with the input (50k -> 200k Alpaca records: 267 -> 279-330 MiB over runs). With blocks >= 8 MiB mapped
    on their own and the heap trimmed past 16 MiB: 271 -> 275 MiB, same speed. Process-wide, so the CLI makes
    this choice, not `packer.build`; where there is no glibc nothing happens."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        mallopt = ctypes.CDLL(None).mallopt
        mallopt(-3, 8 << 20)  # M_MMAP_THRESHOLD
        mallopt(-1, 16 << 20)  # M_TRIM_THRESHOLD
    except (ImportError, OSError, AttributeError):
        pass


@main.command(cls=BuildCommand)
@click.option("--handler", type=click.Choice(HANDLERS),
              help="Input format (required, or MindSpeed-LLM's --handler-name).")
@click.option("--input", "inputs", multiple=True, type=click.Path(dir_okay=False),
              help="A .json (array), .jsonl or .parquet file; repeat for several. Default: the bundled demo data.")
@click.option("--tokenizer", "--tokenizer-name-or-path", "tokenizer", type=click.Path(),
              help="tokenizer.json or a SentencePiece tokenizer.model, or a directory holding one (+ "
                   "tokenizer_config.json). Default: bundled GPT-2.")
@click.option("--seq-length", type=int, default=2048, show_default=True, help="Max tokens per pack.")
@click.option("--output-prefix", type=click.Path(), help=f"Output prefix. Default: {OUT_DEFAULT}/<handler>.")
@click.option("--eod-token", help="End-of-document token (default: tokenizer_config eos_token, else a known one).")
@click.option("--map-keys", callback=_parse_map_keys, help="JSON object renaming handler fields to your columns.")
@click.option("--json-keys", default="text", show_default=True,
              help="text handler: the columns holding the text, comma- or (as Megatron's) space-separated.")
@click.option("--template", help="Prompt template (" + "; ".join(
    f"{h}: {', '.join(template_names(h))}" for h in HANDLERS if template_names(h)) + ").")
@click.option("--chat-template", "chat_template", metavar="auto|NAME|FILE.jinja",
              help="The model's Jinja chat template: auto = the tokenizer's own (chat_template.jinja or "
                   "tokenizer_config.json), a name (chatml, llama3, or one of the tokenizer's named templates), or a "
                   "file. Default for --handler messages: auto; alpaca/belle use it only when given.")
@click.option("--chat-template-kwargs", "chat_template_kwargs", default="", metavar="JSON",
              help='Extra template variables, e.g. \'{"enable_thinking": false}\'.')
@click.option("--system", help="System prompt for records that carry none (templates that have one).")
@click.option("--train-on-prompt", is_flag=True, help="Loss on every token, not only the responses.")
@click.option("--last-turn-only", is_flag=True, help="Multi-turn data: loss on the final answer only.")
@click.option("--overflow", type=click.Choice(POLICIES),
              help="Samples longer than --seq-length. Default: truncate (instruction data), split (text).")
@click.option("--pack", "pack_algorithm", default="bfd", show_default=True,
              type=click.Choice(ALGORITHMS),
              help="bfd/ffd: best/first-fit-decreasing; nf: next-fit in data order; none: one sample per pack.")
@click.option("--on-error", default="fail", show_default=True, type=click.Choice(ON_ERROR),
              help="Malformed records: fail, or skip, count and write them to PREFIX.rejects.jsonl.")
@click.option("--empty-response", default="skip", show_default=True, type=click.Choice(EMPTY_RESPONSE),
              help="Records whose answer is empty: skip and count them (no sample), keep them (trained on their "
                   "EOD only), or fail as a malformed record.")
@click.option("--workers", type=int, default=1, show_default=True, help="Tokenizer processes.")
@click.option("--streaming", is_flag=True,
              help="Read inputs as a `datasets` stream and pack online over a window, in bounded memory.")
@click.option("--hf-dataset", help="Stream a Hugging Face Hub dataset (with --streaming).")
@click.option("--hf-config", help="Hub dataset configuration name.")
@click.option("--split", default="train", show_default=True, help="Hub dataset split.")
@click.option("--hf-datasets-params", type=click.Path(dir_okay=False),
              help="JSON file of extra load_dataset keyword arguments.")
@click.option("--pack-window", default="16384", show_default=True,
              help="Streaming packer window: samples (16384, 16k) or tokens (8M-tokens).")
@click.option("--num-shards", type=int, help="Build one of K disjoint shards (default: from torchrun/SLURM env).")
@click.option("--shard-index", type=int, help="Which shard, 0-based.")
@click.option("--batch-size", type=int, default=512, show_default=True, help="Records per encode_batch call, at most.")
@click.option("--tokenizer-backend", type=click.Choice(TOKENIZER_BACKENDS), default="auto", show_default=True,
              help="auto: tiktoken where it is proven to give this tokenizer's exact ids (byte-level BPE: GPT-2, "
                   "Llama-3, Qwen, ...), else tokenizers; the output is byte-identical either way.")
@click.option("--cp-size", "--context-parallel-size", "cp_size", type=click.IntRange(min=1), default=1,
              show_default=True,
              help="Context parallelism the data is for: every sample is packed as if padded to a multiple of "
                   "CP x lcm(2, TP) (MindSpeed, TransformerEngine THD); the stored samples stay unpadded and the "
                   "manifest records the multiple (docs/context-parallel.md).")
@click.option("--tp-size", "--tensor-model-parallel-size", "tp_size", type=click.IntRange(min=1), default=1,
              show_default=True,
              help="Tensor parallelism of the trainer: part of MindSpeed's padding multiple at CP > 1; "
                   "--seq-length must be a multiple of it.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
@click.option("--json-summary", is_flag=True, help="Print the summary as JSON.")
@megatron_flags
@clean_exits
def build(handler, inputs, tokenizer, seq_length, output_prefix, eod_token, map_keys, json_keys, template,
          chat_template, chat_template_kwargs, system,
          train_on_prompt, last_turn_only, overflow, pack_algorithm, on_error, empty_response, workers, streaming, hf_dataset,
          hf_config, split, hf_datasets_params, pack_window, num_shards, shard_index, batch_size, tokenizer_backend,
          cp_size, tp_size, quiet, json_summary) -> None:
    """Tokenize, pack and write PREFIX.bin/.idx, PREFIX_loss_mask.bin/.idx and PREFIX.json."""
    from packer.build import build as run_build
    from packer.config import BuildConfig, BuildError, parse_window
    from packer.sources import InputError
    from packer.tokenize import TokenizerError

    try:
        window = parse_window(pack_window)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--pack-window") from e
    num_shards, shard_index, shard_source = _resolve_shards(num_shards, shard_index)
    if not inputs and not hf_dataset:
        if handler != "alpaca":
            raise click.UsageError(f"--input is required for --handler {handler} (only alpaca has bundled demo data)")
        inputs = (_asset("demo_alpaca.json"),)
    config = BuildConfig(
        handler=handler,
        inputs=tuple(inputs),
        tokenizer=tokenizer or _asset("gpt2"),
        seq_length=seq_length,
        output_prefix=output_prefix or str(Path(OUT_DEFAULT) / handler),
        eod_token=eod_token,
        map_keys=map_keys,
        json_keys=tuple(k.strip() for k in json_keys.split(",") if k.strip()),
        template=template,
        chat_template=chat_template,
        chat_template_kwargs=chat_template_kwargs,
        system=system,
        train_on_prompt=train_on_prompt,
        last_turn_only=last_turn_only,
        overflow=overflow,
        pack=pack_algorithm,
        on_error=on_error,
        empty_response=empty_response,
        workers=workers,
        batch_size=batch_size,
        streaming=streaming,
        hf_dataset=hf_dataset,
        hf_config=hf_config,
        split=split,
        hf_datasets_params=hf_datasets_params,
        pack_window=window,
        num_shards=num_shards,
        shard_index=shard_index,
        tokenizer_backend=tokenizer_backend,
        cp_size=cp_size,
        tp_size=tp_size,
    )
    if num_shards > 1:
        click.echo(f"building shard {shard_index} of {num_shards} ({shard_source})", err=True)
    # `datasets` imports torch when it can (1.5 s, for DataLoader support we never use); its documented switch
    # is read once, at its import. A process-wide choice, so the CLI makes it; a user's own setting wins.
    if "datasets" not in sys.modules:
        os.environ.setdefault("USE_TORCH", "0")
    try:
        _tune_malloc()
        result = run_build(config, progress=not quiet and sys.stderr.isatty())
    except (BuildError, InputError, TokenizerError) as e:
        raise click.ClickException(str(e)) from e
    if json_summary:
        keys = ("counts", "packing", "context_parallel", "attention_cost", "seconds")
        click.echo(json.dumps({k: result.manifest[k] for k in keys if k in result.manifest}, indent=2))
        return
    c = result.counters
    m = result.manifest
    tok, eod = m["tokenizer"], m["eod"]
    bos = "none" if tok["bos_id"] is None else f"id {tok['bos_id']}"
    template = m["config"]["template"] or "default"
    if m["config"].get("chat_template_origin"):
        template = f"chat template {m['config']['chat_template_origin']}"
        if m["config"].get("chat_template_note"):
            template += f" ({m['config']['chat_template_note']})"
    click.echo(
        f"wrote {result.prefix}.{{bin,idx,json}} and {result.prefix}_loss_mask.{{bin,idx}}\n"
        f"  tokenizer {tok['path']}  EOD {eod['token']!r} (id {eod['id']}, {eod['source']})  BOS {bos}  "
        f"handler {m['config']['handler']}, template {template}, backend {m['config']['tokenizer_backend_effective']}\n"
        f"  records {c.records:,}  skipped {c.skipped:,}  empty responses skipped {c.empty_response:,}  "
        f"samples {c.samples:,}  tokens {c.tokens:,} "
        f"(targets {c.target_tokens:,})\n"
        f"  packs {result.num_packs:,} (lower bound {result.lower_bound:,})  efficiency {result.efficiency:.2%}  "
        f"EOD scan agrees with the index on {m['eod_scan']['agrees']:,}/{m['eod_scan']['packs']:,} packs\n"
        f"  overflow ({m['config']['overflow_effective']}): truncated {c.truncated:,}  "
        f"split {c.split:,}  dropped {c.dropped:,}  dropped without target {c.dropped_no_target:,}\n"
        f"  {result.seconds['total']:.1f}s ({c.tokens / max(result.seconds['tokenize'], 1e-9):,.0f} tokens/s "
        "tokenizing)"
        + (f"\n  skipped records written to {result.prefix}.rejects.jsonl" if c.skipped else "")
        + (f"\n{_cp_line(m['context_parallel'])}" if "context_parallel" in m else "")
    )
    if m["config"]["tokenizer_backend_note"]:
        click.echo(f"note: {m['config']['tokenizer_backend_note']}; tokenized with tokenizers", err=True)
    if eod["source"] == "document-end token":
        click.echo(f"note: EOD is {eod['token']!r}, not the config's eos_token: {eod['reason']}", err=True)
    if c.interior_eod:
        click.echo(f"warning: {c.interior_eod:,} EOD ids occur inside samples, from {eod['interior_cause']}; an EOD "
                   "scan (Megatron --reset-position-ids, MindSpeed without --neat-pack) would cut those samples, "
                   "the index does not; `packer export` then uses explicit boundaries", err=True)


def _resolve_shards(num_shards: int | None, shard_index: int | None) -> tuple[int, int, str]:
    """Explicit options win; else SLURM job arrays, else torchrun's RANK/WORLD_SIZE; else one shard."""
    if num_shards is not None or shard_index is not None:
        if num_shards is None or shard_index is None:
            raise click.UsageError("pass --num-shards and --shard-index together")
        return num_shards, shard_index, "--num-shards/--shard-index"
    env = os.environ
    if "SLURM_ARRAY_TASK_COUNT" in env and "SLURM_ARRAY_TASK_ID" in env:
        lo, step = int(env.get("SLURM_ARRAY_TASK_MIN", 0)), int(env.get("SLURM_ARRAY_TASK_STEP", 1) or 1)
        offset = int(env["SLURM_ARRAY_TASK_ID"]) - lo
        if offset % step:
            raise click.UsageError(f"SLURM_ARRAY_TASK_ID {env['SLURM_ARRAY_TASK_ID']} is not on the array's step "
                                   f"{step} from {lo}; pass --num-shards/--shard-index explicitly")
        return (int(env["SLURM_ARRAY_TASK_COUNT"]), offset // step, "SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT")
    if "WORLD_SIZE" in env and "RANK" in env:
        return int(env["WORLD_SIZE"]), int(env["RANK"]), "RANK/WORLD_SIZE"
    return 1, 0, "single shard"


@main.command()
@click.argument("out_prefix")
@click.argument("in_prefixes", nargs=-1, required=True)
@click.option("--allow-partial", is_flag=True, help="Merge shards of a sharded build even if some are missing.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@clean_exits
def merge(out_prefix: str, in_prefixes: tuple[str, ...], allow_partial: bool, quiet: bool) -> None:
    """Merge builds (e.g. shards) into OUT_PREFIX by streaming copies; packs keep their boundaries."""
    from packer.merge import MergeError
    from packer.merge import merge as run_merge

    try:
        m = run_merge(out_prefix, list(in_prefixes), progress=not quiet and sys.stderr.isatty(),
                      allow_partial=allow_partial)
    except (MergeError, ValueError) as e:  # OSErrors: clean_exits
        raise click.ClickException(str(e)) from e
    c = m["counts"]
    click.echo(f"merged {len(in_prefixes)} builds into {out_prefix}: {c['packs']:,} packs, {c['samples']:,} samples, "
               f"{c['tokens']:,} tokens, efficiency {m['packing']['efficiency']:.2%}")


@main.command()
@click.argument("prefix")
@click.option("--to", "to", required=True, type=click.Choice(EXPORT_TARGETS),
              help="mindspeed: MindSpeed-LLM packed SFT; bridge: Megatron-Bridge/NeMo packed Parquet; hf: Parquet "
                   "rows for transformers/TRL padding-free training.")
@click.option("--output", required=True, type=click.Path(),
              help="mindspeed: OUT_packed_*_document.{bin,idx}; bridge: OUT.idx.parquet; hf: OUT/*.parquet. "
                   "The manifest is OUT.json.")
@click.option("--eod-boundaries", is_flag=True,
              help="mindspeed: segments end at EOD (MindSpeed without --neat-pack) instead of explicit segment ids.")
@click.option("--pad-to-multiple-of", type=int,
              help="mindspeed: pad each pack to a multiple of N (MindSpeed --no-pad-to-seq-lengths) instead of to "
                   "the sequence length.")
@click.option("--per-sample", is_flag=True,
              help="hf: one row per sample (for transformers' DataCollatorWithFlattening) instead of one per pack.")
@click.option("--rows-per-shard", type=int, default=10_000, show_default=True, help="hf: rows per Parquet file.")
@click.option("--no-checksums", is_flag=True, help="Verify the input without its sha256 checksums.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@clean_exits
def export(prefix, to, output, eod_boundaries, pad_to_multiple_of, per_sample, rows_per_shard, no_checksums,
           quiet) -> None:
    """Convert a verified build for another trainer: MindSpeed-LLM, Megatron-Bridge/NeMo, or HF/TRL."""
    from packer.export import ExportConfig, ExportError
    from packer.export import export as run_export

    config = ExportConfig(prefix=prefix, to=to, output=output, neat_pack=not eod_boundaries,
                          pad_to_multiple_of=pad_to_multiple_of, per_sample=per_sample,
                          rows_per_shard=rows_per_shard, checksums=not no_checksums)
    try:
        m = run_export(config, progress=not quiet and sys.stderr.isatty())
    except ExportError as e:  # OSErrors: clean_exits
        raise click.ClickException(str(e)) from e
    section = m[to]
    for w in section.get("warnings", []):
        click.echo(f"warning: {w}", err=True)
    click.echo(f"exported {prefix} for {to} to {output} ({len(m['files'])} files, manifest {output}.json): "
               + ", ".join(f"{k} {v:,}" if isinstance(v, int) else f"{k} {v}"
                           for k, v in section.get("summary", {}).items()))


@main.command()
@click.argument("prefix")
@click.option("--no-checksums", is_flag=True, help="Skip the sha256 comparison (faster on huge builds).")
@clean_exits
def verify(prefix: str, no_checksums: bool) -> None:
    """Check every structural invariant and checksum of a build; exit 1 on any inconsistency."""
    from packer.verify import verify as run_verify

    rep = run_verify(prefix, checksums=not no_checksums)
    for w in rep.warnings:
        click.echo(f"warning: {w}", err=True)
    if not rep.ok:
        for e in rep.errors:
            click.echo(f"error: {e}", err=True)
        raise SystemExit(1)
    s = rep.stats
    if "export" in s:
        click.echo(f"OK {prefix}: a --to {s['export']} export, " + ", ".join(
            f"{v:,} {k}" for k, v in s.items() if isinstance(v, int))
            + ("; checksums not compared (--no-checksums)" if no_checksums else "; every file matches its checksum"))
        return
    click.echo(f"OK {prefix}: {s['packs']:,} packs, {s['samples']:,} samples, {s['tokens']:,} tokens; EOD scan "
               f"agrees with the index on {s['eod_scan']['agrees']:,}/{s['eod_scan']['packs']:,} packs")
    if "context_parallel" in s:
        click.echo(_cp_line(s["context_parallel"]))


def _cp_line(c: dict) -> str:
    """One line for a --cp-size/--tp-size build (verify, inspect, build)."""
    grown = c["padded_tokens"] / c["real_tokens"] - 1 if c.get("real_tokens") else 0.0
    return (f"  context parallel: CP {c['cp_size']}, TP {c['tp_size']}: samples padded to multiples of "
            f"{c['multiple']} ({c['padded_tokens']:,} padded tokens, +{grown:.2%}); every padded pack fits")


@main.command()
@click.argument("prefix")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--pack", "pack", type=int, default=None, metavar="N",
              help="Print pack N (from 0) as text: each document after a marker, targets marked.")
@click.option("--html", "html_out", type=click.Path(dir_okay=False), default=None, metavar="OUT.html",
              help="Write one self-contained page: summary, histograms of pack fill and documents per pack, packs.")
@click.option("--packs", default=None, metavar="I,J,...", help="The packs --html renders (default: the first 3).")
@click.option("--tokenizer", "tokenizer_path", default=None, metavar="PATH",
              help="Decode with this tokenizer instead of the one the manifest names.")
@click.option("--color/--no-color", default=None, help="--pack: ANSI colours (default: when stdout is a terminal).")
@clean_exits
def inspect(prefix: str, as_json: bool, pack: int | None, html_out: str | None, packs: str | None,
            tokenizer_path: str | None, color: bool | None) -> None:
    """Counts, packing efficiency and length histograms of a build; --pack N and --html show what it trains on."""
    from packer import inspect as view
    from packer.boundaries import pack_tokens as tokens_per_pack
    from packer.dataset import PackedDataset
    from packer.verify import describe, histogram

    if as_json and (pack is not None or html_out is not None):
        raise click.UsageError("--json is the summary's; leave it out with --pack or --html")
    if packs is not None and html_out is None:
        raise click.UsageError("--packs chooses the packs of --html OUT.html; pass --html too (or --pack N)")
    try:
        ds = PackedDataset(prefix)
    except (OSError, ValueError) as e:
        raise click.ClickException(str(e)) from e
    if pack is not None or html_out is not None:
        try:
            chosen = view.choose_packs(ds, packs) if html_out is not None else []
            if pack is not None:
                view.check_pack(ds, pack)
            decoder = view.open_decoder(ds, tokenizer_path)
            for w in decoder.warnings:
                click.echo(f"warning: {w}", err=True)
            if html_out is not None:
                view.write_html(ds, html_out, chosen, decoder)
                click.echo(f"wrote {html_out}: summary, histograms and packs {', '.join(map(str, chosen))}",
                           err=pack is not None)
            if pack is not None:
                if color is None:
                    color = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
                text = view.render_pack(ds, pack, decoder, color=color)
                try:
                    click.echo(text, nl=False, color=color)
                except BrokenPipeError:  # `| head` read what it wanted; the exit flush must not fail again
                    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except view.InspectError as e:
            raise click.ClickException(str(e)) from e
        return
    lens = ds.tokens.sequence_lengths.astype(np.int64)
    docs = ds.tokens.document_indices
    pack_tokens = tokens_per_pack(lens, docs)
    m = ds.manifest
    stats = describe(m, lens, pack_tokens, np.diff(docs), m["counts"]["target_tokens"])
    if as_json:
        click.echo(json.dumps({"manifest": m, "stats": stats}, indent=2))
        return
    tok = m["tokenizer"]
    click.echo(f"{prefix}  (packer {m['packer_version']}, built {m['created']})")
    click.echo(f"  handler {m['config']['handler']}  seq_length {ds.seq_length}  pack {m['packing']['algorithm']}  "
               f"tokens {m['token_dtype']}")
    click.echo(f"  tokenizer {tok['path']}  vocab {tok['vocab_size']}  EOD {tok['eod_token']!r}={tok['eod_id']}  "
               f"BOS {tok['bos_id']}")
    c = m["counts"]
    click.echo(f"  records {c['records']:,}  skipped {c['skipped']:,}  samples {c['samples']:,}  "
               f"tokens {c['tokens']:,}  targets {c['target_tokens']:,}")
    click.echo(f"  truncated {c['truncated']:,}  split {c['split']:,}  dropped {c['dropped']:,}  "
               f"dropped without target {c['dropped_no_target']:,}")
    click.echo(f"  packs {stats['packs']:,}  lower bound {stats['lower_bound']:,}  efficiency {stats['efficiency']:.2%}")
    if ds.context_parallel is not None:
        click.echo(_cp_line(ds.context_parallel))
    for title, x in (("sample length", lens), ("tokens per pack", pack_tokens), ("samples per pack", np.diff(docs))):
        summary = "  ".join(f"{k} {v:,.1f}" if isinstance(v, float) else f"{k} {v:,}" for k, v in stats[_key(title)].items())
        click.echo(f"\n{title}: {summary}")
        for line in histogram(x):
            click.echo("  " + line)


def _key(title: str) -> str:
    return {"sample length": "sample_length", "tokens per pack": "pack_tokens",
            "samples per pack": "docs_per_pack"}[title]


if __name__ == "__main__":
    main()
