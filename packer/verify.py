"""`packer verify` and `packer inspect`: check every invariant of a build, and describe it.

verify runs every check and lists every failure (a failed checksum does not hide a broken index):

    manifest   the schema (`check_manifest`): every field present, of its type, in range
    files      present, listed, of the recorded size and sha256 (`file_problems`)
    indexes    each index against itself and its .bin (`IndexedDataset`), then both against each other and the
               manifest: dtypes, counts, packing figures, special ids (`structure_problems`), the same checks
               `PackedDataset` makes on open
    counts     the manifest's counters against each other and the data: records = samples written + skipped +
               dropped, what each --overflow policy may leave, the rejects file's lines
    cp         a --cp-size/--tp-size build: the multiple is the rule's, seq_length a multiple of it, every pack's
               padded samples fit in seq_length, padded tokens and attention costs are the index's (packer/cp.py)
    contents   one streamed pass over tokens and mask: EOD ends every sample but the split chunks, ids in the
               vocabulary, mask 0/1, target tokens, EOD ids inside samples, the EOD-scan agreement
    tokenizer  when the tokenizer file is at hand: its sha256, and every id and name the build took from it
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from packer.boundaries import eod_scan_agrees
from packer.boundaries import pack_tokens as tokens_per_pack
from packer.dataset import file_problems, pack_groups, structure_problems
from packer.indexed import IndexedDataset
from packer.manifest import (
    DatasetError,
    MissingFileError,
    check_manifest,
    load_json_object,
    loss_mask_prefix,
    manifest_path,
    read_manifest,
)
from packer.packing import efficiency, lower_bound

_CHUNK_TOKENS = 1 << 20  # tokens read per step of the contents check: memory stays flat whatever the build
UNFINISHED = "verify could not finish"  # the last-resort guard's message; the fuzz test asserts it never shows


@dataclass
class Report:
    prefix: str
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.errors


def verify(prefix: str | os.PathLike, checksums: bool = True) -> Report:
    """Check the manifest, checksums, both indexes and the token/mask contents. Never raises on bad data."""
    prefix = os.fspath(prefix)
    rep = Report(prefix)
    try:
        if manifest_path(prefix).exists():
            from packer.export import FORMAT as EXPORT_FORMAT

            head = load_json_object(manifest_path(prefix))
            if head.get("format") == EXPORT_FORMAT:  # `packer export` output: its files and its format's invariants
                from packer.export.check import check_export

                rep.stats["export"] = head.get("to")
                check_export(prefix, head, checksums, rep.errors, rep.stats)
                return rep
        manifest = read_manifest(prefix)
    except DatasetError as e:
        rep.errors.extend(e.problems)
        return rep
    try:
        _verify(rep, prefix, manifest, checksums)
    except (KeyError, TypeError, AttributeError, ValueError, OverflowError, RecursionError, OSError) as e:
        # Not reached by any manifest or file the schema and reader checks know of (an I/O error mid-read may);
        # a clean error all the same.
        rep.errors.append(f"{manifest_path(prefix)}: {UNFINISHED} ({type(e).__name__}: {e})")
    return rep


def _verify(rep: Report, prefix: str, manifest: dict, checksums: bool) -> None:
    fields, problems = check_manifest(manifest, manifest_path(prefix))
    rep.errors += problems
    rep.errors += file_problems(prefix, manifest, fields, checksums)
    indexes = []
    for p in (prefix, loss_mask_prefix(prefix)):
        try:
            indexes.append(IndexedDataset(p, build=prefix))
        except MissingFileError:
            pass  # file_problems said so
        except DatasetError as e:
            rep.errors += e.problems
    rep.errors += _manifest_relations(prefix, fields)
    rep.errors += _tokenizer_problems(prefix, manifest, fields, rep.stats)
    if len(indexes) < 2:
        return
    tok, mask = indexes
    rep.errors += structure_problems(prefix, fields, tok, mask)
    if "context_parallel.multiple" in fields:
        rep.stats["context_parallel"] = {k: fields.get(f"context_parallel.{k}") for k in
                                         ("cp_size", "tp_size", "multiple", "real_tokens", "padded_tokens")}
    rep.errors += _count_problems(prefix, fields, tok)
    lens = tok.sequence_lengths
    same_layout = (mask.dtype.itemsize == 1 and np.array_equal(lens, mask.sequence_lengths)
                   and np.array_equal(tok.document_indices, mask.document_indices) and (lens.size == 0 or lens.min() > 0))
    if same_layout:  # the payload can be read pack by pack, whatever else is wrong
        _check_contents(rep, fields, tok, mask)


def _overflow_policies(fields: dict[str, Any]) -> set[str] | None:
    """The --overflow policies the data was built with (a merge: every input's); None where one is unknown."""
    configs = [m["config"] for m in fields["merged_from"]] if "merged_from" in fields else []
    policies = {c.get("overflow_effective") for c in configs}
    if "merged_from" not in fields:
        policies.add(fields.get("config.overflow_effective"))
    return None if None in policies else policies


def _manifest_relations(prefix: str, fields: dict[str, Any]) -> list[str]:
    """Fields that must agree with each other, whatever the data."""
    where = manifest_path(prefix)
    problems = []
    for key in ("id", "token", "source", "reason"):
        a, b = fields.get(f"eod.{key}"), fields.get(f"tokenizer.eod_{key}")
        if a is not None and b is not None and a != b:
            problems.append(f"{where}: eod.{key} = {a!r}, but tokenizer.eod_{key} = {b!r}")
    if fields.get("eod.interior_cause") is not None and fields.get("eod.interior") == 0:
        problems.append(f"{where}: eod.interior_cause names a cause, but eod.interior is 0")
    shards, shard = fields.get("config.num_shards"), fields.get("config.shard_index")
    if shards is not None and shard is not None and shard >= shards:
        problems.append(f"{where}: config.shard_index = {shard}, but config.num_shards = {shards}")
    for key in ("cp_size", "tp_size"):  # the build's options (where recorded) against the section readers pad by
        option, recorded = fields.get(f"config.{key}"), fields.get(f"context_parallel.{key}", 1)
        if option is not None and option != recorded:
            problems.append(f"{where}: config.{key} = {option}, but context_parallel.{key} = {recorded}"
                            + ("" if "context_parallel.multiple" in fields else " (the section is missing)"))
    algorithm = fields.get("packing.algorithm")
    if algorithm is not None:
        if "merged_from" in fields:
            expected = "merge(...)" if not algorithm.startswith("merge(") else algorithm
        elif fields.get("config.streaming") is True:
            expected = "window-bfd(...)" if not algorithm.startswith("window-bfd(") else algorithm
        else:
            expected = fields.get("config.pack", algorithm)
        if algorithm != expected:
            problems.append(f"{where}: packing.algorithm = {algorithm!r}, but the build's config says {expected!r}")
    return problems


def _count_problems(prefix: str, fields: dict[str, Any], tok: IndexedDataset) -> list[str]:
    """The counters against each other: every record read is skipped, dropped, or ends exactly one sample with
    its EOD (a split record's other chunks are `unterminated`); a policy not used leaves its counter at 0."""
    where = manifest_path(prefix)
    problems = []
    c = {k.removeprefix("counts."): v for k, v in fields.items() if k.startswith("counts.")}
    samples, u = len(tok), c.get("unterminated", 0)
    policies = _overflow_policies(fields)
    if policies is not None:
        for key, policy in (("truncated", "truncate"), ("split", "split"), ("unterminated", "split"),
                            ("dropped", "drop")):
            if c.get(key) and policy not in policies:
                problems.append(f"{where}: counts.{key} = {c[key]}, but the build used --overflow "
                                f"{'/'.join(sorted(policies))}, not {policy}")
        if c.get("dropped_no_target") and not policies & {"truncate", "split"}:
            problems.append(f"{where}: counts.dropped_no_target = {c['dropped_no_target']}, but only --overflow "
                            f"truncate or split drop samples for want of a target (the build used "
                            f"{'/'.join(sorted(policies))})")
    if u and c.get("split") == 0:
        problems.append(f"{where}: counts.unterminated = {u} split chunks, but counts.split = 0")
    if c.get("split") is not None and c["split"] > samples - u:
        problems.append(f"{where}: counts.split = {c['split']}, more than the {samples - u} samples that end a "
                        "record (each split record ends with one)")
    if all(k in c for k in ("records", "skipped", "dropped", "dropped_no_target")):
        ended = samples - u  # samples that end a record with its EOD
        empty = c.get("empty_response", 0)  # skipped empty answers (builds before the counter have none)
        hi = c["records"] - c["skipped"] - empty - c["dropped"]
        lo = hi - (c["dropped_no_target"] if policies is None or "truncate" in policies else 0)
        if not lo <= ended <= hi:
            problems.append(
                f"{where}: counts: {c['records']} records - {c['skipped']} skipped"
                + (f" - {empty} empty responses" if empty else "") + f" - {c['dropped']} dropped"
                + (f" - up to {hi - lo} truncated to no target" if hi > lo else "")
                + f" should end {lo if lo == hi else f'{lo}..{hi}'} samples, but the index has {ended} "
                f"({samples} samples, {u} unterminated split chunks)")
    rejects = Path(f"{prefix}.rejects.jsonl")
    if "counts.skipped" in fields and "merged_from" not in fields and rejects.is_file():
        with open(rejects, "rb") as f:
            lines = sum(block.count(b"\n") for block in iter(lambda: f.read(1 << 20), b""))
        if lines != c["skipped"]:
            problems.append(f"{rejects}: {lines} skipped records, but the manifest's counts.skipped = {c['skipped']}")
    return problems


@functools.lru_cache(maxsize=8)
def _tokenizer_info(path: str, size: int, mtime_ns: int, eod_token: str | None) -> Any:
    """load_tokenizer's TokenizerInfo, or why it failed (size and mtime make the cache see a changed file)."""
    from packer.tokenize import TokenizerError, load_tokenizer

    try:
        return load_tokenizer(path, eod_token)[1]
    except (TokenizerError, OSError) as e:
        return f"cannot be loaded ({e})"


@functools.lru_cache(maxsize=8)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    from packer.manifest import sha256_file

    return sha256_file(path)


def _tokenizer_problems(prefix: str, manifest: dict, fields: dict[str, Any], stats: dict[str, Any]) -> list[str]:
    """The tokenizer section against the tokenizer file, when it is at hand: sha256 first, then (the file being
    the one that built the data) every field the build derived from it."""
    path = fields.get("tokenizer.path")
    if path is None or "tokenizer.sha256" not in fields:
        return []
    where = manifest_path(prefix)
    manifest_tokenizer = manifest["tokenizer"]  # a dict: tokenizer.path is a valid field
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        st = None
    if st is None or not Path(path).is_file():
        stats["tokenizer"] = f"{path} not at hand: its sha256 and ids are checked against the data only"
        return []
    stats["tokenizer"] = f"{path}: checked"
    sha = _sha256(path, st.st_size, st.st_mtime_ns)
    if sha != fields["tokenizer.sha256"]:
        return [f"{where}: tokenizer.sha256 = {fields['tokenizer.sha256'][:16]!r}..., but {path} hashes to "
                f"{sha[:16]}...: the tokenizer changed since the build, or the manifest was edited (train with "
                "the tokenizer that built the data)"]
    # The EOD choice depends on --eod-token: without it in the config (hand-written manifests) only the
    # fields that do not depend on it are compared.
    eod_known = "config.eod_token" in fields
    info = _tokenizer_info(path, st.st_size, st.st_mtime_ns, fields.get("config.eod_token"))
    if isinstance(info, str):
        return [f"{path}: {info}"]
    problems = []
    for key, value in info.to_json().items():
        if key in ("path", "sha256") or (key.startswith("eod_") and not eod_known):
            continue
        if key in ("bos_id", "pad_id") and value is not None and key not in manifest_tokenizer:
            # readers take a missing id for "none" (pad falls back to the EOD): the data would be read otherwise
            problems.append(f"{where}: tokenizer.{key} is missing, but {path} gives {value!r}")
        got = fields.get(f"tokenizer.{key}", value)
        if got != value:
            problems.append(f"{where}: tokenizer.{key} = {got!r}, but {path} gives {value!r}")
    return problems


def _check_contents(rep: Report, fields: dict[str, Any], tok: IndexedDataset, mask: IndexedDataset) -> None:
    where = manifest_path(rep.prefix)
    seq_length = fields.get("config.seq_length")
    eod = fields.get("tokenizer.eod_id", -1)  # -1: no id is the EOD, so every sample "lacks" one
    vocab = fields.get("tokenizer.vocab_size")
    counts = {k.removeprefix("counts."): v for k, v in fields.items() if k.startswith("counts.")}
    not_eod = glued = short_chunks = full_eod = bad_ids = bad_mask = eod_untrained = targets = interior_eod = agree = 0
    for g in pack_groups(tok, mask, _CHUNK_TOKENS):
        ids, m = g.ids, g.mask
        last = np.cumsum(g.seq_lens) - 1  # each sample's last token
        pack_last = np.zeros(g.seq_lens.size, dtype=bool)  # is sample i the last of its pack
        pack_last[np.cumsum(g.samples_per_pack)[g.samples_per_pack > 0] - 1] = True
        ends_eod = ids[last] == eod
        not_eod += int((~ends_eod).sum())
        glued += int((~ends_eod & ~pack_last).sum())
        short_chunks += int((~ends_eod & (g.seq_lens != seq_length)).sum())
        full_eod += int((ends_eod & (g.seq_lens == seq_length)).sum())
        interior_eod += int((ids == eod).sum()) - int(ends_eod.sum())
        eod_untrained += int((ends_eod & (m[last] != 1)).sum())
        if vocab is not None:
            bad_ids += int((ids >= vocab).sum()) + (int((ids < 0).sum()) if ids.dtype.kind in "if" else 0)
        bad_mask += int((m > 1).sum()) + (int((m < 0).sum()) if m.dtype.kind == "i" else 0)
        targets += int(m.sum(dtype=np.int64))
        agree += int(eod_scan_agrees(ids, g.seq_lens, g.samples_per_pack, eod).sum())
    packs, u, truncated = tok.num_documents, counts.get("unterminated", 0), counts.get("truncated", 0)
    if interior_eod:
        cause = fields.get("eod.interior_cause") or "the record text spelled the EOD token"
        rep.warnings.append(
            f"{interior_eod} EOD ids occur inside samples ({cause}); trainers that find boundaries by scanning for "
            "EOD would split those samples, the index does not (`packer export` uses explicit boundaries then)"
        )
    if glued:
        rep.errors.append(f"{glued} samples without EOD (split chunks) are followed by another sample in their pack, "
                          "so an EOD scan would merge them with it; a split chunk must end its pack")
    if short_chunks and seq_length is not None:
        rep.errors.append(f"{short_chunks} samples without EOD are not {seq_length} tokens long, as a split chunk "
                          "(all but the last of a split sample) is")
    if not_eod > u:
        rep.errors.append(f"{not_eod} samples do not end with EOD id {eod} (only {u} split chunks may, "
                          "counts.unterminated)")
    elif u + truncated > not_eod + full_eod:
        # A split chunk or a truncated sample holds exactly seq_length tokens; a chunk ends without EOD unless
        # its text spelled the EOD there.
        rep.errors.append(f"{where}: counts.unterminated = {u} and counts.truncated = {truncated}, but only "
                          f"{not_eod + full_eod} samples can be either ({not_eod} without EOD, {full_eod} of "
                          f"seq_length {seq_length} tokens ending with it)")
    if eod_untrained:
        rep.errors.append(f"{eod_untrained} EOD tokens have loss mask 0")
    if bad_ids:
        rep.errors.append(f"{bad_ids} token ids are >= the vocabulary size {vocab}")
    if bad_mask:
        rep.errors.append(f"{bad_mask} loss-mask values are not 0/1")
    for key, actual in (("counts.target_tokens", targets), ("counts.interior_eod", interior_eod),
                        ("eod.interior", interior_eod)):
        if key in fields and fields[key] != actual:
            rep.errors.append(f"{where}: {key} = {fields[key]}, but the data has {actual}")
    if "eod_scan.agrees" in fields and fields["eod_scan.agrees"] != agree:
        rep.errors.append(f"manifest eod_scan claims an EOD scan agrees with the index on "
                          f"{fields['eod_scan.agrees']}/{fields.get('eod_scan.packs')} packs, but it does on "
                          f"{agree}/{packs}")
    if seq_length is not None:
        lens = tok.sequence_lengths.astype(np.int64)
        docs = tok.document_indices
        rep.stats |= describe({"config": {"seq_length": seq_length}}, lens, tokens_per_pack(lens, docs),
                             np.diff(docs), targets)
    rep.stats["eod_scan"] = {"agrees": agree, "packs": int(packs)}


def describe(manifest: dict, lens: np.ndarray, pack_tokens: np.ndarray, docs_per_pack: np.ndarray,
             targets: int) -> dict[str, Any]:
    seq_length = manifest["config"]["seq_length"]
    return {
        "samples": int(lens.size),
        "tokens": int(lens.sum()),
        "target_tokens": int(targets),
        "packs": int(pack_tokens.size),
        "lower_bound": lower_bound(lens, seq_length),
        "efficiency": efficiency(lens, pack_tokens.size, seq_length),
        "sample_length": _summary(lens),
        "pack_tokens": _summary(pack_tokens),
        "docs_per_pack": _summary(docs_per_pack),
    }


def _summary(x: np.ndarray) -> dict[str, float]:
    if x.size == 0:
        return {}
    q = np.percentile(x, [50, 90, 99])
    return {"min": int(x.min()), "mean": round(float(x.mean()), 2), "p50": float(q[0]), "p90": float(q[1]),
            "p99": float(q[2]), "max": int(x.max())}


def histogram(x: np.ndarray, bins: int = 12, width: int = 40) -> list[str]:
    """Text histogram lines over integer data: '[lo, hi]  count  ####' (bins never split an integer)."""
    if x.size == 0:
        return ["(empty)"]
    lo, hi = int(x.min()), int(x.max())
    step = max(1, -(-(hi - lo + 1) // bins))
    edges = np.arange(lo, hi + step + 1, step)
    counts, _ = np.histogram(x, bins=edges)
    top = counts.max() or 1
    return [f"[{edges[i]:>8}, {edges[i + 1] - 1:>8}]  {counts[i]:>9,}  {'#' * round(width * counts[i] / top)}"
            for i in range(len(counts))]
