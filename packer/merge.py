"""`packer merge`: concatenate builds (typically shards) into one, by streaming copies in bounded memory.

Every input must pass `packer verify` (structure, contents and checksums) first: a corrupt input is refused,
named with its first failed check, so a merge never turns a build that fails verify into one that passes.
Packs are copied whole and in order (input 1's packs, then input 2's, ...), so every document boundary
survives; counts are summed and the packing figures recomputed from the copied index. All inputs must share
the tokenizer (sha256), EOD id, token dtype and seq_length.
"""

from __future__ import annotations

import os
from datetime import datetime, timezone
from typing import Any

import numpy as np

from packer import __version__, cp
from packer.indexed import IndexedDataset, IndexedDatasetWriter
from packer.manifest import (
    FORMAT,
    LOSS_MASK_SUFFIX,
    loss_mask_prefix,
    manifest_path,
    read_manifest,
    sha256_file,
)
from packer.output import OutputConflict, OutputSet
from packer.packing import PackStats
from packer.progress import bar as progress_bar
from packer.verify import verify

_TOKENS_PER_COPY = 1 << 24


class MergeError(ValueError):
    pass


def normalize_prefix(path: str) -> str:
    """Accept a prefix or any of its files (PREFIX.json / .idx / .bin), so shell globs work."""
    for suffix in (".json", ".idx", ".bin"):
        if path.endswith(suffix):
            return path[: -len(suffix)]
    return path


def merge(out_prefix: str, in_prefixes: list[str], progress: bool = False, allow_partial: bool = False
          ) -> dict[str, Any]:
    if not in_prefixes:
        raise MergeError("nothing to merge: give at least one input prefix")
    in_prefixes = [normalize_prefix(p) for p in in_prefixes]
    out_abs = os.path.abspath(out_prefix)
    if any(os.path.abspath(p) == out_abs for p in in_prefixes):
        raise MergeError(f"the output {out_prefix} is also an input; choose another output prefix")
    seen: dict[str, str] = {}
    for p in in_prefixes:
        key = sha256_file(manifest_path(p)) if manifest_path(p).exists() else os.path.abspath(p)
        if key in seen or os.path.abspath(p) in seen.values():
            raise MergeError(f"{p} is given twice (or is an identical copy of {seen.get(key, p)}): its samples "
                             "would be merged twice")
        seen[key] = os.path.abspath(p)
    reports = [verify(p, checksums=True) for p in in_prefixes]
    for p, rep in zip(in_prefixes, reports, strict=True):
        if not rep.ok:
            more = f" (and {len(rep.errors) - 1} more)" if len(rep.errors) > 1 else ""
            raise MergeError(f"{p} fails `packer verify`: {rep.errors[0]}{more}; rebuild it, or run "
                             f"`packer verify {p}` for the full report")
    manifests = [read_manifest(p) for p in in_prefixes]
    first = manifests[0]
    for p, m in zip(in_prefixes[1:], manifests[1:], strict=True):
        for what, get in (("tokenizer sha256", lambda m: m["tokenizer"]["sha256"]),
                          ("EOD id", lambda m: m["tokenizer"]["eod_id"]),
                          ("token dtype", lambda m: m["token_dtype"]),
                          ("seq_length", lambda m: m["config"]["seq_length"])):
            if get(m) != get(first):
                raise MergeError(f"{p}: {what} {get(m)!r} differs from {in_prefixes[0]}'s {get(first)!r}; "
                                 "only builds with the same tokenizer and seq_length can be merged")
        if _cp_sizes(m) != _cp_sizes(first):
            raise MergeError(f"{p}: built for {_cp_text(m)}, {in_prefixes[0]} for {_cp_text(first)}: the merged "
                             "manifest records one CP/TP layout, and a trainer checks it at launch (packs fit only "
                             "the padding multiple they were built for); rebuild the inputs with the same --cp-size "
                             "and --tp-size")
    shards = [(m["config"].get("num_shards", 1), m["config"].get("shard_index", 0)) for m in manifests]
    counts_k = {k for k, _ in shards if k > 1}
    if counts_k and not allow_partial:
        k = max(counts_k)
        have = sorted(i for kk, i in shards if kk == k)
        if len(counts_k) > 1 or have != list(range(k)):
            missing = sorted(set(range(k)) - set(have))
            raise MergeError(f"the inputs are shards of a {k}-shard build but shards {missing[:10]} are missing "
                             f"(or shard counts differ: {sorted(counts_k)}); pass --allow-partial to merge anyway")
    dtype = np.dtype(first["token_dtype"])
    multiple = cp.pad_multiple(*_cp_sizes(first)) if _cp_sizes(first) else 1
    counts: dict[str, int] = {}
    stats = PackStats()
    costs: list[np.ndarray] = []  # per pack, in output order
    total = sum(m["counts"]["tokens"] for m in manifests)
    try:
        output = OutputSet(out_prefix)
    except OutputConflict as e:
        raise MergeError(str(e)) from e
    with (output as out,
          progress_bar(progress, total=total, unit="tok", unit_scale=True, desc="merge") as bar):
        tok_w, mask_w = out.dataset("", dtype), out.dataset(LOSS_MASK_SUFFIX, np.uint8)
        for prefix, m in zip(in_prefixes, manifests, strict=True):
            tok, mask = IndexedDataset(prefix), IndexedDataset(loss_mask_prefix(prefix))
            if tok.dtype != dtype or len(tok) != len(mask):
                raise MergeError(f"{prefix}: index does not match its manifest; run `packer verify {prefix}`")
            _copy(tok, mask, tok_w, mask_w, stats, bar)
            costs.append(cp.pack_figures(tok.sequence_lengths, tok.document_indices, multiple)[2])
            for k, v in m["counts"].items():
                counts[k] = counts.get(k, 0) + int(v)
        # A counter some input lacks (a hand-written or older manifest) would be summed short: leave it out.
        counts = {k: v for k, v in counts.items() if all(k in m["counts"] for m in manifests)}
        agrees = sum(rep.stats["eod_scan"]["agrees"] for rep in reports)  # measured by verify, not claimed
        padding = _merged_padding(manifests, multiple, np.concatenate(costs))
        return out.commit(lambda files: _merged_manifest(out_prefix, in_prefixes, manifests, counts, stats, agrees,
                                                         files, padding))


def _merged_manifest(out_prefix: str, in_prefixes: list[str], manifests: list[dict], counts: dict[str, int],
                     stats: PackStats, agrees: int, files: dict, padding: dict | None = None) -> dict:
    first = manifests[0]
    algorithm = "merge(" + ",".join(sorted({m["packing"]["algorithm"] for m in manifests})) + ")"
    config = {k: v for k, v in first["config"].items() if k not in ("num_shards", "shard_index")}
    merged = {
        "format": FORMAT,
        "packer_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": config | {"output_prefix": out_prefix},
        "merged_from": [{"prefix": p, "manifest_sha256": sha256_file(manifest_path(p)), "config": m["config"]}
                        for p, m in zip(in_prefixes, manifests, strict=True)],
        "tokenizer": first["tokenizer"],
        "token_dtype": first["token_dtype"],
        "counts": counts,
        "packing": stats.manifest(algorithm, first["config"]["seq_length"]),
        "eod": _merged_eod(manifests, counts.get("interior_eod", 0)),
        "eod_scan": {"agrees": agrees, "packs": stats.packs},
        **(padding or {}),
        "seconds": {},
        "files": files,
    }
    if merged["eod"] is None:  # hand-written inputs without the section
        del merged["eod"]
    return merged


def _cp_sizes(manifest: dict) -> tuple[int, int] | None:
    """(CP, TP) of a build made with --cp-size/--tp-size, None for a plain build."""
    section = manifest.get("context_parallel")
    return (int(section["cp_size"]), int(section["tp_size"])) if isinstance(section, dict) else None


def _cp_text(manifest: dict) -> str:
    sizes = _cp_sizes(manifest)
    return "no context parallelism" if sizes is None else f"--cp-size {sizes[0]} --tp-size {sizes[1]}"


def _merged_padding(manifests: list[dict], multiple: int, costs: np.ndarray) -> dict:
    """The merged `context_parallel` section (token counts summed, the fullest padded pack) and `attention_cost`
    (from the copied packs' costs); a plain build has no `context_parallel` section."""
    out: dict = {}
    first = manifests[0].get("context_parallel")
    if isinstance(first, dict):
        sections = [m["context_parallel"] for m in manifests]
        out["context_parallel"] = first | {
            "real_tokens": sum(int(s["real_tokens"]) for s in sections),
            "padded_tokens": sum(int(s["padded_tokens"]) for s in sections),
            "max_padded_pack_tokens": max(int(s.get("max_padded_pack_tokens", 0)) for s in sections)}
    out["attention_cost"] = cp.attention_summary(costs, multiple)
    return out


def _merged_eod(manifests: list[dict], interior: int) -> dict | None:
    """The first input's `eod` section, with the summed interior count and the first cause an input names."""
    if not isinstance(manifests[0].get("eod"), dict):
        return None
    cause = next((m["eod"]["interior_cause"] for m in manifests if (m.get("eod") or {}).get("interior_cause")), None)
    return manifests[0]["eod"] | {"interior": interior, "interior_cause": cause}


def _copy(tok: IndexedDataset, mask: IndexedDataset, tok_w: IndexedDatasetWriter, mask_w: IndexedDatasetWriter,
          stats: PackStats, bar) -> None:
    """Copy all packs of one build, a bounded number of tokens at a time, splitting only between packs."""
    docs = tok.document_indices
    lens = tok.sequence_lengths
    ends = np.cumsum(lens, dtype=np.int64)
    doc_end_tokens = np.concatenate([[0], ends])[docs[1:]]  # tokens up to the end of each pack
    d = 0
    n_docs = tok.num_documents
    while d < n_docs:
        s0 = int(docs[d])
        t0 = int(ends[s0 - 1]) if s0 else 0
        # Last pack whose end stays within the copy budget (at least one pack).
        limit = t0 + _TOKENS_PER_COPY
        d1 = max(d + 1, int(np.searchsorted(doc_end_tokens, limit, side="right")))
        d1 = min(d1, n_docs)
        s1 = int(docs[d1])
        t1 = int(ends[s1 - 1]) if s1 else 0
        seq_lens = lens[s0:s1]
        tok_w.add_sequences(tok.read(t0 * tok.dtype.itemsize, t1 - t0), seq_lens)
        mask_w.add_sequences(mask.read(t0, t1 - t0), seq_lens)
        per_doc = np.diff(docs[d : d1 + 1])
        tok_w.end_documents(per_doc)
        mask_w.end_documents(per_doc)
        stats.add(seq_lens, per_doc)
        bar.update(t1 - t0)
        d = d1
