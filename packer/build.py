"""`packer build`: the stages wired together.

    read (sources / streaming) -> encode (handler, tokenizer, overflow; pool of workers) ->
        global:    spill -> pack(lengths) -> write in pack order
        streaming: window packing -> write as packs become final
    -> OutputSet.commit: PREFIX.bin/.idx, PREFIX_loss_mask.bin/.idx, then PREFIX.json (last)
"""

from __future__ import annotations

import hashlib
import itertools
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from packer import __version__, cp
from packer.config import BuildConfig, BuildError
from packer.encode import Counters, RecordEncoder
from packer.manifest import FORMAT, LOSS_MASK_SUFFIX
from packer.output import OutputConflict, OutputSet
from packer.packing import pack
from packer.pool import encoded_chunks
from packer.progress import bar as progress_bar
from packer.sources import check_inputs, count_records, read_batches
from packer.spill import SampleSpill
from packer.write import PackWriter, WindowWriter, write_global


@dataclass
class BuildResult:
    prefix: str
    counters: Counters
    num_packs: int
    lower_bound: int
    efficiency: float
    seconds: dict[str, float]
    manifest: dict[str, Any]


def open_input(config: BuildConfig, columns: set[str], count: bool = True):
    """(batches of this shard's raw records, how many records the shard holds if that is cheap to know).
    Local files are read by packer's own readers with or without --streaming (they hold one batch at a time
    either way), so the two modes read the same records, values and errors; `datasets` reads the Hub."""
    if config.hf_dataset:
        from packer.streaming import open_stream

        return open_stream(config, columns)
    if config.hf_datasets_params:
        raise BuildError(f"--hf-datasets-params {config.hf_datasets_params}: applies to --hf-dataset only; local "
                         "files are read by packer's own reader (drop the option)")
    inputs = check_inputs(config.inputs)
    if not count:  # the count is only for the progress bar; it costs a pass over JSON Lines input
        return read_batches(inputs, config.batch_size, config.num_shards, config.shard_index), None
    known = [count_records(p) for p in inputs]
    total = sum(known) if all(k is not None for k in known) else None
    if total is not None and config.num_shards > 1:
        total = len(range(config.shard_index, total, config.num_shards))
    return read_batches(inputs, config.batch_size, config.num_shards, config.shard_index), total


def build(config: BuildConfig, progress: bool = True) -> BuildResult:
    config.validate()
    t0 = time.perf_counter()
    main = RecordEncoder(config)  # validates handler/tokenizer options before any work
    batches, total = open_input(config, main.handler.input_columns, count=progress)
    first = next(iter(batches), None)  # the backend's probe reads the first records too
    if first is not None:
        main.choose_backend(first if isinstance(first, list) else first.records())
        batches = itertools.chain([first], batches)
    counters = Counters()
    seconds: dict[str, float] = {}
    try:
        output = OutputSet(config.prefix)
    except OutputConflict as e:
        raise BuildError(str(e)) from e
    with (output as out,
          encoded_chunks(config, batches, main) as chunks,
          progress_bar(progress, total=total, unit="rec", desc="tokenize", dynamic_ncols=True, smoothing=0.1) as bar):
        writer = PackWriter(out.dataset("", main.dtype), out.dataset(LOSS_MASK_SUFFIX, "uint8"), main.info.eod_id,
                            config.pad_multiple)

        def encoded():
            for chunk in chunks:
                counters.add(chunk.counters)
                out.add_rejects(chunk.rejects)
                bar.update(chunk.counters.records)
                rate = counters.tokens / max(bar.format_dict["elapsed"], 1e-9)
                bar.set_postfix_str(f"{counters.tokens:,} tok, {rate:,.0f} tok/s", refresh=False)
                yield chunk

        if config.streaming:
            window = WindowWriter(writer, config.seq_length, *config.pack_window)
            for chunk in encoded():
                window.add(chunk.ids, chunk.mask, chunk.lengths)
            window.flush()
            seconds["tokenize"] = time.perf_counter() - t0  # packing and writing interleaved
        else:
            with SampleSpill(Path(config.prefix).parent, main.dtype) as spill:
                for chunk in encoded():
                    spill.add(chunk.ids, chunk.mask, chunk.lengths)
                bar.close()
                seconds["tokenize"] = time.perf_counter() - t0
                lengths = spill.seal()
                t = time.perf_counter()
                # A CP build packs the padded lengths (<= seq_length: seq_length is a multiple of the padding).
                plan = pack(cp.padded_lengths(lengths, config.pad_multiple), config.seq_length, config.pack)
                seconds["pack"] = time.perf_counter() - t
                t = time.perf_counter()
                write_global(plan, lengths, spill, writer, progress)
                seconds["write"] = time.perf_counter() - t
        if writer.stats.packs == 0:
            where = out.commit_rejects()
            raise BuildError(
                f"no samples to write: {counters.records} records read, {counters.skipped} skipped, "
                + (f"{counters.empty_response} with an empty response (--empty-response keep trains on them), "
                   if counters.empty_response else "")
                + f"{counters.dropped + counters.dropped_no_target} dropped"
                + (f"; the skipped records and why are in {where}" if where else "")
            )

        def make_manifest(files: dict[str, dict]) -> dict[str, Any]:
            seconds["total"] = time.perf_counter() - t0  # the data is finalized and checksummed by now
            return _manifest(config, main, counters, writer, seconds, files)

        manifest = out.commit(make_manifest)
    p = manifest["packing"]
    return BuildResult(config.prefix, counters, writer.stats.packs, p["lower_bound"], p["efficiency"], seconds,
                       manifest)


def eod_summary(encoder: RecordEncoder, c: Counters) -> dict[str, Any]:
    """The manifest's `eod` section: which token ends samples, why, and where else it occurs."""
    info = encoder.info
    cause = None
    if c.interior_eod:
        if info.eod_token in encoder.handler.template_text:
            cause = (f"template text: the {encoder.handler.name} template writes {info.eod_token!r} "
                     f"(--template {encoder.config.template or 'default'}) inside every sample")
        else:
            cause = f"record text: records spell {info.eod_token!r}, which the tokenizer reads as the token itself"
    return {"token": info.eod_token, "id": info.eod_id, "source": info.eod_source, "reason": info.eod_reason,
            "interior": c.interior_eod, "interior_cause": cause}


def _manifest(config: BuildConfig, encoder: RecordEncoder, c: Counters, writer: PackWriter,
              seconds: dict[str, float], files: dict[str, dict]) -> dict[str, Any]:
    stats = writer.stats
    cfg = asdict(config)
    if not config.context_parallel:  # a plain build's manifest stays what it was before these options existed
        del cfg["cp_size"], cfg["tp_size"]
    cfg["inputs"] = [str(Path(p).resolve()) if Path(p).exists() else p for p in config.inputs]
    cfg["overflow_effective"] = encoder.overflow
    cfg["output_prefix"] = config.prefix
    cfg["tokenizer_backend_effective"] = encoder.backend
    cfg["tokenizer_backend_note"] = encoder.backend_note
    if encoder.chat is not None:
        cfg["chat_template_origin"] = encoder.chat.origin
        cfg["chat_template_sha256"] = hashlib.sha256(encoder.chat.source.encode("utf-8")).hexdigest()
        cfg["chat_template_note"] = encoder.chat_note
    manifest = {
        "format": FORMAT,
        "packer_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": cfg,
        "tokenizer": encoder.info.to_json(),
        "token_dtype": encoder.dtype.name,
        "counts": asdict(c) | {"packs": stats.packs},
        "packing": stats.manifest(config.packing_name, config.seq_length),
        "eod": eod_summary(encoder, c),
        "eod_scan": {"agrees": writer.eod_agree, "packs": stats.packs},
    }
    if config.context_parallel:
        pad_id = encoder.info.pad_id if encoder.info.pad_id is not None else encoder.info.eod_id
        manifest["context_parallel"] = cp.section(config.cp_size, config.tp_size, pad_id, stats.tokens,
                                                  writer.padded_tokens, writer.max_padded_pack)
    manifest["attention_cost"] = cp.attention_summary(writer.attention_costs, config.pad_multiple)
    return manifest | {"seconds": {k: round(v, 3) for k, v in seconds.items()}, "files": files}
