"""`--to bridge`: Megatron-Bridge / NeMo offline packed SFT, in its current Parquet form.

    OUT.idx.parquet       one row per pack: input_ids list<int64>, loss_mask list<int8>, seq_start_id list<int64>
    OUT_metadata.jsonl    ONE JSON list of one dict (Bridge's packing metadata; needed only for pad_cu_seqlens)

Bridge's loss mask is LABEL-aligned: within a sub-sequence (one sample) it feeds tokens [b, e-1) and labels
[b+1, e), so loss_mask[j] = 1 iff token j+1 of the same sample is a target; the last entry of every sample is 0.
For a pack of samples [3, 2] (E = EOD):

    input_ids     a0 a1 E  b0 E          seq_start_id [0, 3]
    packer mask   0  1  1  1  1
    loss_mask     1  1  0  1  0          (= packer mask shifted left by one inside each sample)
    Bridge feeds  tokens a0 a1 | b0, labels a1 E | E, cu_seqlens [0, 2, 3]

Each sample loses one input token, so sum(len - 1) <= seq_length always holds. A 1-token sample (a split
sample's lone EOD) would be an empty sub-sequence with nothing to train: it is left out and counted.

A `--cp-size` build (docs/context-parallel.md) is written as Bridge's own writer writes `pad_seq_to_mult = m`
(offline.py::tokenize_dataset / _pre_pad_data_point): each sample is followed by eos ids (loss 0) until its input
length (len - 1) is a multiple of m, so Bridge read with `pad_seq_to_mult = m` gets cu_seqlens_q_padded on
multiples of m and cu_seqlens_q ending at each sample's last non-eos input token. For m = 4 (e = eos pad):

    input_ids     a0 a1 E  e  e  b0 E  e  e  e         seq_start_id [0, 5]
    loss_mask     1  1  0  0  0  1  0  0  0  0
    Bridge feeds  cu_seqlens_q_padded [0, 4, 8], cu_seqlens_q [0, 2, 3]
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

from packer.boundaries import cumulative_ends
from packer.cp import padded_lengths
from packer.write import token_positions

ROW_GROUP = 500  # rows per Parquet row group, as Bridge's own writer


def write(ds, out, config, progress: bool) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("input_ids", pa.list_(pa.int64())), ("loss_mask", pa.list_(pa.int8())),
                        ("seq_start_id", pa.list_(pa.int64()))])
    parquet = out.file(f"{config.output}.idx.parquet")
    rows = dropped = targets = cut = 0
    m = ds.pad_multiple
    input_lens: list[np.ndarray] = []  # per sample, len - 1: what Bridge's metadata counts
    per_pack_inputs: list[np.ndarray] = []
    samples_per_row: list[np.ndarray] = []
    bar = tqdm(total=len(ds), desc="export", unit="pack", disable=not progress)
    with pq.ParquetWriter(parquet, schema) as writer:
        for g in ds.groups(1 << 20):
            keep = g.seq_lens > 1
            dropped += int((~keep).sum())
            token_keep = np.repeat(keep, g.seq_lens)
            ids, mask, seq_lens = g.ids[token_keep].astype(np.int64), g.mask[token_keep], g.seq_lens[keep]
            pack_of = np.repeat(np.arange(g.samples_per_pack.size), g.samples_per_pack)[keep]
            per_pack = np.bincount(pack_of, minlength=g.samples_per_pack.size)
            # Label-aligned mask: entry j is token j+1's mask, 0 at every sample's last token.
            label_mask = np.zeros(ids.size, np.int8)
            label_mask[:-1] = mask[1:]
            label_mask[np.cumsum(seq_lens) - 1] = 0
            if m > 1:  # Bridge's pad_seq_to_mult layout: eos after each sample until len - 1 is a multiple of m
                # Bridge's logical length ends at the last non-eos input token: a sample whose last input token
                # (the one before its EOD) is itself the EOD id would lose that target.
                ends = np.cumsum(seq_lens) - 1
                cut += int((ids[ends - 1] == ds.eod_id).sum())
                stored = padded_lengths(seq_lens - 1, m) + 1
                dest = token_positions(cumulative_ends(stored, leading_zero=True)[:-1], seq_lens, int(stored.sum()) + 1)
                padded_ids = np.full(int(stored.sum()), ds.eod_id, np.int64)
                padded_mask = np.zeros(int(stored.sum()), np.int8)
                padded_ids[dest], padded_mask[dest] = ids, label_mask
                ids, label_mask, seq_lens = padded_ids, padded_mask, stored
            targets += int(label_mask.sum())
            pack_tokens = np.bincount(pack_of, weights=seq_lens, minlength=per_pack.size).astype(np.int64)
            nonempty = per_pack > 0
            token_off = cumulative_ends(pack_tokens, leading_zero=True)
            seq_off = cumulative_ends(per_pack, leading_zero=True)
            starts_in_pack = (np.cumsum(seq_lens) - seq_lens) - np.repeat(token_off[:-1], per_pack)
            table = pa.table({
                "input_ids": pa.ListArray.from_arrays(_offsets(token_off, nonempty), ids),
                "loss_mask": pa.ListArray.from_arrays(_offsets(token_off, nonempty), label_mask),
                "seq_start_id": pa.ListArray.from_arrays(_offsets(seq_off, nonempty), starts_in_pack),
            }, schema=schema)
            writer.write_table(table, row_group_size=ROW_GROUP)
            rows += int(nonempty.sum())
            input_lens.append(seq_lens - 1)
            per_pack_inputs.append((pack_tokens - per_pack)[nonempty])
            samples_per_row.append(per_pack[nonempty])
            bar.update(g.samples_per_pack.size)
    bar.close()
    lens = np.concatenate(input_lens)
    packed = np.concatenate(per_pack_inputs)
    per_row = np.concatenate(samples_per_row)
    metadata = [{  # Bridge's create_packing_strategy fields, over input lengths (len - 1)
        "dataset_max_seqlen": int(lens.max()),
        "max_samples_per_bin": int(per_row.max()),
        "packing_factor": round(lens.size / packed.size, 2),
        "packing_efficiency": round(float(packed.sum()) / packed.size / ds.seq_length * 100, 2),
        "pack_size": ds.seq_length,
        "min_packed_seqlen": int(packed.min()),
    }]
    meta_path = out.file(f"{config.output}_metadata.jsonl")
    meta_path.write_text(json.dumps(metadata) + "\n", encoding="utf-8")
    warnings = [f"{dropped:,} 1-token samples (lone EODs of split samples, nothing to train on) left out"] \
        if dropped else []
    if cut:
        warnings.append(f"{cut:,} samples hold the EOD id just before their final EOD: Bridge (pad_seq_to_mult > 1) "
                        "ends a sub-sequence at its last non-eos input token, so it does not train on that EOD")
    section = {
        "parquet": Path(f"{config.output}.idx.parquet").name,
        "metadata": Path(f"{config.output}_metadata.jsonl").name,
        "eos_id": int(ds.eod_id),
        "packed_sequence_size": ds.seq_length,
        "loss_mask": "label-aligned: loss_mask[j] = packer mask[j+1] within the sample, 0 at its last token",
        "single_token_samples_dropped": dropped,
        "warnings": warnings,
        "summary": {"rows": rows, "samples": int(lens.size), "target_tokens": targets},
    }
    if ds.context_parallel is not None:
        section["context_parallel"] = {
            "cp_size": ds.cp_size, "tp_size": ds.tp_size, "pad_seq_to_mult": m,
            "bridge_config": {"dataset.packed_sequence_specs.pad_seq_to_mult": m,
                              "dataset.packed_sequence_specs.packed_sequence_size": ds.seq_length,
                              "dataset.dataset_kwargs.pad_to_max_length": True,
                              "model.context_parallel_size": ds.cp_size,
                              "model.tensor_model_parallel_size": ds.tp_size}}
    return section


def _offsets(offsets: np.ndarray, nonempty: np.ndarray):
    """List offsets of the non-empty packs only (an empty pack would be an empty Bridge row)."""
    import pyarrow as pa

    starts, ends = offsets[:-1][nonempty], offsets[1:][nonempty]
    if not starts.size:
        return pa.array(np.zeros(1, np.int32))
    keep = np.r_[starts, ends[-1]]
    # Removing empty packs removes no elements, so the remaining offsets stay contiguous.
    return pa.array(keep.astype(np.int32))
