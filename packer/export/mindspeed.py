"""`--to mindspeed`: the three datasets MindSpeed-LLM's packed instruction posttrain reads unchanged.

    OUT_packed_input_ids_document.{bin,idx}       ids of the pack's samples, then padding       int32
    OUT_packed_labels_document.{bin,idx}          unshifted labels (export/labels.py), -100     int32
    OUT_packed_attention_mask_document.{bin,idx}  neat-pack: sample number 1..k, 0 on padding;  int32
                                                  EOD boundaries: all 1
    (`--data-path OUT`; one pack = one sequence = one document, exactly as MindSpeed's own writer stores it)

For seq_length 8 and a pack of samples [3, 2] (E = EOD, P = pad; neat-pack):

    input_ids       a0 a1 E  b0 E  P  P  P
    labels          -  a1 E  -  E  -  -  -
    attention_mask  1  1  1  2  2  0  0  0
    MindSpeed then derives position_ids 0 1 2 0 1 0 0 0 and actual_seq_len [3, 5, 8] (micro-batch size 1).

Pitfalls of MindSpeed's reader that this layout avoids (../shared/peers/README.md):
- the model's shift crosses sample boundaries: every sample's first token is -100;
- `recompute_valid_actual_seq_len` folds every segment after the first 1-token one into one segment, so a
  1-token sample (a split sample's lone EOD) is moved to the end of its pack, next to the padding, where that
  fold is harmless (it holds no target);
- with EOD boundaries (MindSpeed without --neat-pack) segments end after every EOD id: the export pads with the
  EOD id (so the padding tail is one segment, as with neat-pack), and falls back to neat-pack, saying why, when
  an EOD scan of the build would not find exactly the index's boundaries (EOD ids inside samples, or split
  chunks without EOD);
- padded packs at micro-batch size > 1 merge rows: train with --micro-batch-size 1 (all MindSpeed pack recipes do).

A `--cp-size` build (docs/context-parallel.md) is written with every sample padded to the build's multiple m, so
that every actual_seq_len entry is already a multiple of m and MindSpeed's pad_data has nothing to pad. For
m = 4, seq_length 12 and the pack above:

    input_ids       a0 a1 E  P  b0 E  P  P  P  P  P  P
    labels          -  a1 E  -  -  E  -  -  -  -  -  -
    attention_mask  1  1  1  1  2  2  2  2  3  3  3  3     the tail is segment 3, not zeros (1-token segments)
    MindSpeed then derives position_ids 0 1 2 3 0 1 2 3 0 1 2 3 and actual_seq_len [4, 8, 12].
"""

from __future__ import annotations

import numpy as np
from tqdm import tqdm

from packer.boundaries import cumulative_ends, eod_scan_agrees
from packer.cp import padded_lengths
from packer.export.labels import IGNORE, unshifted_labels
from packer.write import token_positions

FIELDS = ("input_ids", "labels", "attention_mask")  # the first is committed last (see OutputSet)
GROUP_TOKENS = 1 << 20  # packs per round: ~10 int64 arrays of this many tokens (~100 MiB) are alive at once


def suffix(field: str) -> str:
    return f"_packed_{field}_document"


def _eod_fallback(ds, progress: bool) -> str | None:
    """Why EOD boundaries would lie for this build, or None when an EOD scan finds exactly the index's."""
    counts = ds.manifest["counts"]
    if counts.get("unterminated", 0):
        return (f"{counts['unterminated']:,} split chunks do not end with EOD (--overflow split): each fills a pack "
                "alone, in which MindSpeed's EOD scan finds no segment end at all")
    bad = 0
    for g in tqdm(ds.groups(), total=None, desc="eod scan", unit="group", disable=not progress):
        bad += int((~eod_scan_agrees(g.ids, g.seq_lens, g.samples_per_pack, ds.eod_id)).sum())
    if bad:
        return (f"an EOD scan disagrees with the index on {bad:,} of {len(ds):,} packs (EOD id {ds.eod_id} occurs "
                "inside samples; `packer verify` names the cause)")
    return None


# MindSpeed finds the three files with a regex built from the unescaped --data-path: these would break it.
REGEX_METACHARACTERS = frozenset("+()[]?*{}^$|\\")


def write(ds, out, config, progress: bool) -> dict:
    from packer.export import ExportError

    if bad := sorted(set(config.output) & REGEX_METACHARACTERS):
        raise ExportError(f"--output {config.output!r} holds {''.join(bad)!r}: MindSpeed-LLM finds its files with a "
                          "regex built from --data-path, which these characters break; choose another path")
    multiple = config.pad_to_multiple_of
    if multiple is not None and ds.seq_length % multiple:
        raise ExportError(f"--pad-to-multiple-of {multiple} does not divide the build's seq_length "
                          f"{ds.seq_length}: a full pack would be padded past it; pick a divisor")
    cp_m = ds.pad_multiple  # > 1: a --cp-size build, every sample padded to a multiple of it (module docstring)
    if multiple is not None and multiple % cp_m:
        raise ExportError(f"--pad-to-multiple-of {multiple} is not a multiple of {cp_m}, the build's context-parallel "
                          f"padding (CP {ds.cp_size}): the tail of a pack would not split over the CP ranks; pass a "
                          f"multiple of {cp_m}")
    neat = config.neat_pack
    warnings = []
    if not neat and cp_m > 1:
        warnings.append("EOD boundaries cannot carry the context-parallel padding (an EOD scan ends a segment after "
                        "each sample's EOD, so the pad tokens after it would join the next sample); exported with "
                        "explicit segment ids (--neat-pack) instead: train with --neat-pack --reset-attention-mask "
                        "--reset-position-ids")
        neat = True
    elif not neat and (why := _eod_fallback(ds, progress)):
        warnings.append(f"EOD boundaries would be wrong ({why}); exported with explicit segment ids "
                        "(--neat-pack) instead: train with --neat-pack --reset-attention-mask --reset-position-ids")
        neat = True
    pad_id = ds.pad_id if neat else ds.eod_id
    writers = {f: out.dataset(suffix(f), np.int32, min_value=IGNORE if f == "labels" else 0) for f in FIELDS}
    moved = pad_tokens = target_tokens = samples = 0
    bar = tqdm(total=len(ds), desc="export", unit="pack", disable=not progress)
    for g in ds.groups(GROUP_TOKENS):
        n_packs = g.samples_per_pack.size
        pack_of = np.repeat(np.arange(n_packs), g.samples_per_pack)
        # 1-token samples last within their pack (stable: the others keep their order). With CP padding no
        # segment is shorter than the multiple (>= 4), so nothing needs moving.
        single = (g.seq_lens == 1) & (cp_m == 1)
        order = np.lexsort((single, pack_of)) if single.any() else np.arange(g.seq_lens.size)
        moved += int(single.sum())
        seq_lens = g.seq_lens[order]
        starts = cumulative_ends(g.seq_lens, leading_zero=True)[:-1]
        where = token_positions(starts[order], seq_lens, g.ids.size + 1)
        ids, labels = g.ids[where].astype(np.int64), unshifted_labels(g.ids[where], g.mask[where], seq_lens)
        slots = padded_lengths(seq_lens, cp_m)  # each sample's tokens then its CP padding (= seq_lens at CP 1)
        first_sample = cumulative_ends(g.samples_per_pack, leading_zero=True)[:-1]
        used = np.add.reduceat(slots, first_sample)
        size = np.full(n_packs, ds.seq_length) if multiple is None else -(-used // multiple) * multiple
        # Destination of every real token in the padded output: its pack's start there + its slot's start in the
        # pack + its place in the sample.
        out_start = cumulative_ends(size, leading_zero=True)[:-1]
        slot_start = cumulative_ends(slots, leading_zero=True)[:-1] - np.repeat(
            cumulative_ends(used, leading_zero=True)[:-1], g.samples_per_pack)
        slot_at = np.repeat(out_start, g.samples_per_pack) + slot_start  # (n_samples,) in the output
        dest = token_positions(slot_at, seq_lens, int(size.sum()) + 1)
        total = int(size.sum())
        flat = {"input_ids": np.full(total, pad_id, np.int64), "labels": np.full(total, IGNORE, np.int64),
                "attention_mask": np.zeros(total, np.int64) if neat else np.ones(total, np.int64)}
        flat["input_ids"][dest] = ids
        flat["labels"][dest] = labels
        if neat:  # sample number within its pack, 1-based, over the sample's whole slot
            number = np.arange(seq_lens.size) - np.repeat(first_sample, g.samples_per_pack) + 1
            flat["attention_mask"][token_positions(slot_at, slots, total + 1)] = np.repeat(number, slots)
            if cp_m > 1:
                # The tail is one more segment: zeros would make every pad token a 1-token segment, each of which
                # MindSpeed's pad_data would pad to the multiple again.
                tail = size - used
                tail_at = out_start + used
                flat["attention_mask"][token_positions(tail_at, tail, total + 1)] = np.repeat(
                    g.samples_per_pack + 1, tail)
        for f in FIELDS:
            writers[f].add_sequences(flat[f], size)
            writers[f].end_documents(np.ones(n_packs, np.int64))
        pad_tokens += total - ids.size
        target_tokens += int((labels != IGNORE).sum())
        samples += int(seq_lens.size)
        bar.update(n_packs)
    bar.close()
    convention = "neat-pack" if neat else "eod"
    flags = ["--neat-pack", "--reset-attention-mask", "--reset-position-ids"] if neat else \
            ["--reset-attention-mask", "--reset-position-ids"]
    if multiple is not None:
        flags += ["--no-pad-to-seq-lengths", f"--pad-to-multiple-of {multiple}"]
    if ds.context_parallel is not None:
        flags += [f"--context-parallel-size {ds.cp_size}", f"--tensor-model-parallel-size {ds.tp_size}"]
        if ds.cp_size > 1:
            flags += ["--context-parallel-algo megatron_cp_algo", "--attention-mask-type causal"]
    section = {
        "convention": convention,
        "requested": "neat-pack" if config.neat_pack else "eod",
        "pad_id": int(pad_id),
        "eos_id": int(ds.eod_id),
        "seq_length": ds.seq_length,
        "pad_to_multiple_of": multiple,
        "dtype": "int32",
        "mindspeed_flags": flags + [f"--seq-length {ds.seq_length}", "--micro-batch-size 1"],
        "single_token_samples_placed_last": moved,
        "warnings": warnings,
        "summary": {"packs": len(ds), "samples": samples, "target_tokens": target_tokens, "pad_tokens": pad_tokens,
                    "convention": convention},
    }
    if ds.context_parallel is not None:
        section["context_parallel"] = {
            "cp_size": ds.cp_size, "tp_size": ds.tp_size, "multiple": cp_m,
            "layout": "every sample, then pad_id up to a multiple of `multiple` (labels -100, the sample's "
                      "attention_mask number); the pack's tail is one more segment (number k+1): every "
                      "actual_seq_len entry is a multiple, so MindSpeed's pad_data leaves the batch as it is"}
    return section
