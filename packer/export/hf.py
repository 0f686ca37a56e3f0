"""`packer export --to hf`: Parquet rows for transformers / TRL padding-free training.

    OUT/train-00000-of-0000N.parquet ...      datasets.load_dataset("parquet", data_dir=OUT, split="train")

One row per pack (default), columns list<int32>. For a pack with doc_lens [3, 2] (- = -100):

    input_ids     a0 a1 E  b0 E
    loss_mask      1  1  1  1  1        packer's mask (not written)
    labels         -  a1 E  -  E        unshifted: the model's loss scores logits[i] against labels[i+1]
    position_ids   0  1  2  0  1        restart at every document
    seq_lengths   [3, 2]                read by TRL's DataCollatorForLanguageModeling(padding_free=True)

A document's first token is never a label, whatever the mask says: nothing inside its document predicts it, and
after the model's shift the previous document's last token would be trained to (packer/export/labels.py).
`--per-sample`: one row per sample, columns input_ids and labels only, for transformers'
DataCollatorWithFlattening (it flattens one feature per sample and builds the position ids itself).

Documents stay isolated when the model gets input_ids + position_ids with NO attention_mask and no KV cache:
only then does transformers (5.2.0, masking_utils._preprocess_mask_arguments -> find_packed_sequence_indices)
cut the causal mask at every position reset, for sdpa and eager alike (both tested). So:
  * call the model with use_cache=False: LlamaConfig's default use_cache=True makes it create a DynamicCache,
    and the documents attend to each other (Trainer sets config.use_cache from TrainingArguments.use_cache,
    False by default; SFTTrainer passes use_cache=False);
  * pass no attention_mask, not even for a padded batch of rows (pads at position 0 isolate themselves);
  * flash_attention_2 reads the boundaries from position_ids only for a batch of ONE flattened row
    (modeling_flash_attention_utils._is_packed_sequence), or from cu_seq_lens_q: TRL's padding-free collator
    gives both.

A `--cp-size` build is exported with its samples as they are (unpadded), and a warning: transformers and TRL have
no context parallelism over document-masked rows to pad for (accelerate's context parallelism shards a plain
causal SDPA sequence and takes no packed boundaries), so pads would only be tokens every model has to attend to.
The packs are the CP build's (packed by padded length), each within seq_length unpadded too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from packer.boundaries import cumulative_ends
from packer.dataset import PackedDataset, PackGroup
from packer.export import ExportConfig, ExportError
from packer.export.labels import IGNORE, positions, unshifted_labels
from packer.output import OutputSet, previous_files

GROUP_TOKENS = 1 << 20  # tokens per group of packs: 1M x (int64 labels, positions + 3 int32 columns) ~ 30 MiB
ROW_GROUP_ROWS = 1000  # Parquet row group; a group of packs bounds it by tokens too
LABEL_CONVENTION = ("labels[i] = input_ids[i] where packer's loss mask marks token i as a target and i is not the "
                    "first token of its document, else -100; unshifted (the model's loss scores logits[i] against "
                    "labels[i+1]); position_ids restart at 0 in every document")

LIST = pa.list_(pa.int32())
PACK_SCHEMA = pa.schema([("input_ids", LIST), ("labels", LIST), ("position_ids", LIST), ("seq_lengths", LIST)])
SAMPLE_SCHEMA = pa.schema([("input_ids", LIST), ("labels", LIST)])


def shard_names(rows: int, rows_per_shard: int) -> list[str]:
    """HF's `train-{i:05d}-of-{n:05d}.parquet`; one (empty) shard even for no rows, so the schema is on disk."""
    n = max(1, -(-rows // rows_per_shard))
    return [f"train-{i:05d}-of-{n:05d}.parquet" for i in range(n)]


def _lists(offsets: np.ndarray, values: np.ndarray) -> pa.ListArray:
    if offsets[-1] > np.iinfo(np.int32).max:
        raise ExportError(f"a group of {offsets[-1]} values overflows Parquet list<int32> offsets")
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values.astype(np.int32)))


def group_table(g: PackGroup, labels_T: np.ndarray, per_sample: bool) -> pa.Table:
    """The rows of one group of packs: (n_packs,) or, per sample, (n_samples,)."""
    sample_off = cumulative_ends(g.seq_lens, leading_zero=True)  # (n_samples + 1,) token offsets
    if per_sample:
        return pa.Table.from_arrays([_lists(sample_off, g.ids), _lists(sample_off, labels_T)], schema=SAMPLE_SCHEMA)
    pack_off = sample_off[g.doc_index]  # (n_packs + 1,) token offsets
    return pa.Table.from_arrays([_lists(pack_off, g.ids), _lists(pack_off, labels_T),
                                 _lists(pack_off, positions(g.seq_lens)), _lists(g.doc_index, g.seq_lens)],
                                schema=PACK_SCHEMA)


class _Shards:
    """Rows in order into the shards, `rows_per_shard` each, one ParquetWriter open at a time."""

    def __init__(self, out: OutputSet, folder: Path, names: list[str], rows_per_shard: int, schema: pa.Schema):
        self.out, self.folder, self.names, self.schema = out, folder, names, schema
        self.rows_per_shard = rows_per_shard
        self.next = 0  # index of the next shard to open
        self.writer: pq.ParquetWriter | None = None
        self.in_shard = 0

    def write(self, table: pa.Table) -> None:
        while table.num_rows:
            if self.writer is None:
                self._open()
            take = min(table.num_rows, self.rows_per_shard - self.in_shard)
            self.writer.write_table(table.slice(0, take), row_group_size=ROW_GROUP_ROWS)
            table, self.in_shard = table.slice(take), self.in_shard + take
            if self.in_shard == self.rows_per_shard:
                self._close()

    def _open(self) -> None:
        if self.next == len(self.names):
            raise RuntimeError(f"more rows than {len(self.names)} shards x {self.rows_per_shard} hold")
        self.writer = pq.ParquetWriter(self.out.file(self.folder / self.names[self.next]), self.schema)
        self.next, self.in_shard = self.next + 1, 0

    def _close(self) -> None:
        self.writer.close()
        self.writer = None

    def __enter__(self) -> _Shards:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if self.writer is not None:
            self._close()
        if exc_type is None:
            while self.next < len(self.names):  # only for an export of no rows: its one empty shard
                self._open()
                self._close()


def _refuse_stale(folder: Path, names: list[str]) -> None:
    """`data_dir=OUT` loads every train-* file there, so shards of an earlier export that this one would not
    replace (another shard count) would silently join it."""
    if not folder.is_dir():
        return
    replaced = previous_files(folder)  # an earlier export's own files: its commit removes them
    stale = sorted(p.name for p in folder.iterdir() if p.name.endswith(".parquet") and p.name not in names
                   and p.resolve() not in replaced)
    if stale:
        raise ExportError(f"{folder} holds {stale[0]}" + (f" and {len(stale) - 1} more" if len(stale) > 1 else "")
                          + " that this export would not replace, and datasets would load them with it; remove "
                          "them, or pass another --output")


def write(ds: PackedDataset, out: OutputSet, config: ExportConfig, progress: bool = False) -> dict[str, Any]:
    folder = Path(config.output)
    rows = len(ds.tokens) if config.per_sample else len(ds)
    names = shard_names(rows, config.rows_per_shard)
    _refuse_stale(folder, names)
    tokens = targets = first_targets = 0
    with (_Shards(out, folder, names, config.rows_per_shard, SAMPLE_SCHEMA if config.per_sample else PACK_SCHEMA)
          as shards, tqdm(total=len(ds), unit="pack", desc="export hf", disable=not progress) as bar):
        for g in ds.groups(GROUP_TOKENS):
            labels_T = unshifted_labels(g.ids, g.mask, g.seq_lens)
            shards.write(group_table(g, labels_T, config.per_sample))
            n_targets = int(np.count_nonzero(labels_T != IGNORE))
            tokens, targets = tokens + g.ids.size, targets + n_targets
            first_targets += int(np.count_nonzero(g.mask)) - n_targets
            bar.update(g.samples_per_pack.size)
    warnings = []
    if ds.context_parallel is not None:
        warnings.append(f"the build is padded for context parallelism (CP {ds.cp_size}, multiples of "
                        f"{ds.pad_multiple}); transformers/TRL padding-free training has no such split, so the samples "
                        "are exported unpadded (their packs are the CP build's)")
    return {"rows": rows, "shards": len(names), "per_sample": config.per_sample, "warnings": warnings,
            "columns": (SAMPLE_SCHEMA if config.per_sample else PACK_SCHEMA).names,
            "label_convention": LABEL_CONVENTION,
            "document_first_targets": first_targets,  # marked by packer's mask, never labels (module docstring)
            "summary": {"rows": rows, "tokens": tokens, "target_tokens": targets}}
