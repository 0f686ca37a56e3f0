"""`packer verify OUT` on an export: every file against OUT.json's checksums, then the format's own invariants.

    mindspeed  three datasets with the same sequences; lengths = seq_length (or a multiple of pad_to_multiple_of);
               labels -100 or equal to input_ids; ids in the vocabulary; attention_mask 1..k in runs then 0s
               (neat-pack) or all 1 (EOD boundaries); a CP build's: runs 1..k+1, each a multiple of the padding
    bridge     the three columns, equal lengths; seq_start_id rising from 0 inside the row; loss_mask 0/1 and
               0 at each sub-sequence's last token; sum(len - 1) <= packed_sequence_size; a CP build's: every
               len - 1 a multiple of pad_seq_to_mult
    hf         every shard, equal column lengths; labels -100 or equal to input_ids; position_ids restart at
               every document of seq_lengths (pack rows)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from packer.manifest import manifest_path, sha256_file

MAX_ERRORS = 20


def check_export(prefix: str, manifest: dict, checksums: bool, errors: list[str], stats: dict) -> None:
    try:
        _check_export(prefix, manifest, checksums, errors, stats)
    except (KeyError, TypeError, AttributeError, ValueError) as e:  # a hand-edited or foreign manifest
        errors.append(f"{manifest_path(prefix)}: malformed export manifest ({type(e).__name__}: {e})")


def _check_export(prefix: str, manifest: dict, checksums: bool, errors: list[str], stats: dict) -> None:
    here = manifest_path(prefix).parent
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        errors.append(f"{manifest_path(prefix)}: export manifest lists no files")
        return
    for name, want in files.items():
        if not isinstance(want, dict):
            raise TypeError(f"files[{name!r}] is {type(want).__name__}, not an object")
        path = here / name
        if not path.is_file():
            errors.append(f"{path}: missing")
        elif path.stat().st_size != want.get("bytes"):
            errors.append(f"{path}: {path.stat().st_size} bytes, manifest says {want.get('bytes')}")
        elif checksums and sha256_file(path) != want.get("sha256"):
            errors.append(f"{path}: sha256 differs from the manifest (file changed or corrupt)")
    if errors:
        return
    to = manifest.get("to")
    section = manifest.get(to) or {}
    vocab = int(manifest["source"]["tokenizer"]["vocab_size"])  # a KeyError here is a malformed manifest
    listed = {(here / n).resolve() for n in files}
    try:
        if to == "mindspeed":
            # MindSpeed loads every PREFIX_packed_<field>_document file as a field.
            extra = sorted(p.name for p in here.glob(Path(prefix).name + "_packed_*_document*")
                           if p.resolve() not in listed)
            _extra(extra, "MindSpeed-LLM would load them as more fields", errors)
            _mindspeed(prefix, section, manifest, vocab, errors, stats)
        elif to == "bridge":
            _bridge(here / section["parquet"], section, vocab, errors, stats)
        elif to == "hf":
            shards = [here / n for n in files if n.endswith(".parquet")]
            folder = shards[0].parent if shards else Path(prefix)
            extra = sorted(p.name for p in folder.glob("*.parquet") if p.resolve() not in listed) \
                if folder.is_dir() else []
            _extra(extra, "datasets' data_dir would load them with the export", errors)
            _hf(shards, section, vocab, errors, stats)
        else:
            errors.append(f"{manifest_path(prefix)}: unknown export target {to!r}")
    except OSError as e:
        errors.append(f"{prefix}: cannot read the {to} export ({type(e).__name__}: {e})")


def _extra(names: list[str], why: str, errors: list[str]) -> None:
    if names:
        errors.append(f"{names[0]}" + (f" and {len(names) - 1} more" if len(names) > 1 else "")
                      + f" lie beside the export but are not in its manifest; {why}")


def _mindspeed(prefix: str, section: dict, manifest: dict, vocab: int, errors: list[str], stats: dict) -> None:
    from packer.export.mindspeed import FIELDS, suffix
    from packer.indexed import IndexedDataset

    ds = {f: IndexedDataset(prefix + suffix(f)) for f in FIELDS}
    lens = ds["input_ids"].sequence_lengths
    for f in FIELDS[1:]:
        if not np.array_equal(ds[f].sequence_lengths, lens):
            errors.append(f"{prefix}{suffix(f)}: sequence lengths differ from input_ids'")
    seq_length, multiple = int(section["seq_length"]), section.get("pad_to_multiple_of")
    if multiple is None and (lens != seq_length).any():
        errors.append(f"{int((lens != seq_length).sum())} packs are not padded to seq_length {seq_length}")
    if multiple is not None and ((lens % multiple != 0) | (lens > seq_length)).any():
        errors.append(f"packs are not padded to a multiple of {multiple} within {seq_length}")
    if errors:
        return
    neat = section["convention"] == "neat-pack"
    cp_m = int((section.get("context_parallel") or {}).get("multiple", 1))
    bad = 0
    for i in range(len(lens)):
        ids, labels, mask = (ds[f].get(i).astype(np.int64) for f in FIELDS)
        wrong = ((ids < 0) | (ids >= vocab)).any() or ((labels != -100) & (labels != ids)).any()
        if neat:
            used = int((mask > 0).sum())
            runs = mask[:used]
            wrong |= bool((mask[used:] != 0).any() or (runs.size and (runs[0] != 1 or (np.diff(runs) < 0).any()
                                                                       or (np.diff(runs) > 1).any())))
            firsts = np.flatnonzero(np.diff(np.concatenate([[0], runs])) != 0)  # each sample's first token
            wrong |= bool((labels[firsts] != -100).any())
            if cp_m > 1:  # every segment (sample + its padding, and the tail) a multiple; no 1-token pad segments
                wrong |= bool(used != mask.size or (np.unique(runs, return_counts=True)[1] % cp_m).any())
        else:
            wrong |= bool((mask != 1).any())
        bad += int(wrong)
        if bad >= MAX_ERRORS:
            break
    if bad:
        errors.append(f"{bad} packs break the MindSpeed layout (ids outside the vocabulary, labels that are neither "
                      "-100 nor the token, or attention_mask not 1..k then 0s"
                      + (f", or segments that are not multiples of {cp_m}" if cp_m > 1 else "") + ")")
    stats.update(packs=int(len(lens)), tokens=int(lens.sum()))


def _bridge(path: Path, section: dict, vocab: int, errors: list[str], stats: dict) -> None:
    import pyarrow.parquet as pq

    size = int(section["packed_sequence_size"])
    mult = int((section.get("context_parallel") or {}).get("pad_seq_to_mult", 1))
    rows = bad = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=500):
        data = batch.to_pydict()
        for ids, mask, starts in zip(data["input_ids"], data["loss_mask"], data["seq_start_id"], strict=True):
            rows += 1
            bounds = [*starts, len(ids)]
            ok = (len(mask) == len(ids) and starts and starts[0] == 0 and all(b > a for a, b in zip(bounds, bounds[1:], strict=False))
                  and set(mask) <= {0, 1} and all(mask[b - 1] == 0 for b in bounds[1:])
                  and len(ids) - len(starts) <= size and min(ids, default=0) >= 0 and max(ids, default=0) < vocab
                  and all((b - a - 1) % mult == 0 for a, b in zip(bounds, bounds[1:], strict=False)))
            bad += not ok
    if bad:
        errors.append(f"{path}: {bad} rows break Bridge's layout (seq_start_id, loss_mask or capacity"
                      + (f", or sub-sequences whose len - 1 is not a multiple of {mult}" if mult > 1 else "") + ")")
    stats.update(rows=rows)


def _hf(paths: list[Path], section: dict, vocab: int, errors: list[str], stats: dict) -> None:
    import pyarrow.parquet as pq

    rows = bad = 0
    for path in sorted(paths):
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1000):
            data = batch.to_pydict()
            for j, ids in enumerate(data["input_ids"]):
                rows += 1
                ids_a, labels = np.asarray(ids, np.int64), np.asarray(data["labels"][j], np.int64)
                ok = labels.size == ids_a.size and not ((labels != -100) & (labels != ids_a)).any() and \
                    not ((ids_a < 0) | (ids_a >= vocab)).any()
                if ok and "seq_lengths" in data:
                    lens = np.asarray(data["seq_lengths"][j], np.int64)
                    pos = np.asarray(data["position_ids"][j], np.int64)
                    want = np.arange(ids_a.size) - np.repeat(np.cumsum(lens) - lens, lens)
                    ok = lens.sum() == ids_a.size and pos.size == ids_a.size and np.array_equal(pos, want) \
                        and not (labels[pos == 0] != -100).any()  # a document's first token is never a label
                elif ok and labels.size:  # a per-sample row is one document
                    ok = labels[0] == -100
                bad += not ok
    if rows != section.get("rows"):
        errors.append(f"the shards hold {rows} rows, the manifest says {section.get('rows')}")
    if bad:
        errors.append(f"{bad} rows break the hf layout (labels, ids or position_ids vs seq_lengths)")
    stats.update(rows=rows)


def is_export(prefix: str) -> bool:
    try:
        with open(manifest_path(prefix), encoding="utf-8") as f:
            head = json.load(f)
    except (OSError, ValueError, RecursionError):  # a broken or hostile manifest is not an export
        return False
    from packer.export import FORMAT

    return isinstance(head, dict) and head.get("format") == FORMAT
