"""`packer verify` and `packer inspect`: check every invariant of a build, and describe it."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from packer.boundaries import eod_scan_agrees
from packer.boundaries import pack_tokens as tokens_per_pack
from packer.dataset import PackedDataset
from packer.indexed import IndexedDataset
from packer.manifest import loss_mask_prefix, manifest_path, output_files, read_manifest, sha256_file
from packer.packing import efficiency, lower_bound

_CHUNK_TOKENS = 1 << 20  # tokens read per step of the contents check: memory stays flat whatever the build


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
    from packer.export.check import check_export, is_export

    if is_export(prefix):  # `packer export` output: its files and its format's invariants
        manifest = json.loads(manifest_path(prefix).read_text(encoding="utf-8"))
        rep.stats["export"] = manifest.get("to")
        check_export(prefix, manifest, checksums, rep.errors, rep.stats)
        return rep
    try:
        manifest = read_manifest(prefix)
    except (OSError, ValueError) as e:
        rep.errors.append(str(e))
        return rep
    try:
        _verify(rep, prefix, manifest, checksums)
    except (KeyError, TypeError, AttributeError) as e:  # a hand-edited or foreign manifest lacks a field
        rep.errors.append(f"{manifest_path(prefix)}: malformed manifest ({type(e).__name__}: {e})")
    return rep


def _verify(rep: Report, prefix: str, manifest: dict, checksums: bool) -> Report:
    for path in output_files(prefix):
        if not path.exists():
            rep.errors.append(f"{path}: missing")
            continue
        want = manifest["files"].get(path.name)
        if want is None:
            rep.errors.append(f"{path}: not listed in the manifest")
            continue
        if path.stat().st_size != want["bytes"]:
            rep.errors.append(f"{path}: {path.stat().st_size} bytes, manifest says {want['bytes']}")
        elif checksums and sha256_file(path) != want["sha256"]:
            rep.errors.append(f"{path}: sha256 differs from the manifest (file changed or corrupt)")
    if rep.errors:
        return rep
    try:
        tok = IndexedDataset(prefix)
        mask = IndexedDataset(loss_mask_prefix(prefix))
    except (OSError, ValueError) as e:
        rep.errors.append(str(e))
        return rep
    _check_index(rep, tok, "tokens")
    _check_index(rep, mask, "loss mask")
    if tok.dtype.name != manifest["token_dtype"]:
        rep.errors.append(f"token dtype {tok.dtype} but manifest says {manifest['token_dtype']}")
    if mask.dtype != np.uint8:
        rep.errors.append(f"loss mask dtype {mask.dtype}, expected uint8")
    if not np.array_equal(tok.sequence_lengths, mask.sequence_lengths):
        rep.errors.append("token and loss-mask sequence lengths differ")
    if not np.array_equal(tok.document_indices, mask.document_indices):
        rep.errors.append("token and loss-mask document indices differ")
    if rep.errors:
        return rep
    _check_contents(rep, manifest, tok, mask)
    return rep


def _check_index(rep: Report, ds: IndexedDataset, what: str) -> None:
    lens, ptrs, docs = ds.sequence_lengths, ds.sequence_pointers, ds.document_indices
    if lens.size and lens.min() < 1:
        rep.errors.append(f"{what}: {int((lens < 1).sum())} sequences have length < 1")
    expected = np.concatenate([[0], np.cumsum(lens.astype(np.int64))[:-1]]) * ds.dtype.itemsize
    if not np.array_equal(ptrs, expected[: ptrs.size]):
        bad = int(np.flatnonzero(ptrs != expected)[0])
        rep.errors.append(f"{what}: sequence pointer {bad} is {ptrs[bad]}, expected {expected[bad]}")
    total = int(lens.astype(np.int64).sum()) * ds.dtype.itemsize
    if total != ds.bin_bytes:
        rep.errors.append(f"{what}: index covers {total} bytes but {ds.bin_path} has {ds.bin_bytes}")
    if docs.size == 0 or docs[0] != 0 or docs[-1] != lens.size or (np.diff(docs) < 0).any():
        rep.errors.append(f"{what}: document_indices must rise from 0 to the sequence count {lens.size}")


def _check_contents(rep: Report, manifest: dict, tok: IndexedDataset, mask: IndexedDataset) -> None:
    seq_length = manifest["config"]["seq_length"]
    eod = manifest["tokenizer"]["eod_id"]
    vocab = manifest["tokenizer"]["vocab_size"]
    counts = manifest["counts"]
    lens = tok.sequence_lengths.astype(np.int64)
    docs = tok.document_indices
    pack_tokens = tokens_per_pack(lens, docs)
    if (np.diff(docs) == 0).any():
        rep.errors.append(f"{int((np.diff(docs) == 0).sum())} packs are empty")
    if pack_tokens.size and pack_tokens.max() > seq_length:
        rep.errors.append(f"{int((pack_tokens > seq_length).sum())} packs exceed --seq-length {seq_length}")

    ends = np.cumsum(lens)
    pack_last = np.zeros(lens.size, dtype=bool)  # is sample i the last of its pack
    pack_last[docs[1:][np.diff(docs) > 0] - 1] = True
    not_eod = bad_ids = bad_mask = eod_untrained = targets = interior_eod = glued = 0
    a = 0
    while a < lens.size:
        t0 = int(ends[a] - lens[a])
        b = min(max(a + 1, int(np.searchsorted(ends, t0 + _CHUNK_TOKENS, side="right"))), lens.size)
        t1 = int(ends[b - 1])
        ids = tok.read(t0 * tok.dtype.itemsize, t1 - t0)
        m = mask.read(t0, t1 - t0)
        last = ends[a:b] - 1 - t0
        not_eod += int((ids[last] != eod).sum())
        glued += int(((ids[last] != eod) & ~pack_last[a:b]).sum())
        interior_eod += int((ids == eod).sum()) - int((ids[last] == eod).sum())
        eod_untrained += int(((ids[last] == eod) & (m[last] != 1)).sum())
        bad_ids += int((ids >= vocab).sum()) + (int((ids < 0).sum()) if ids.dtype.kind == "i" else 0)
        bad_mask += int((m > 1).sum())
        targets += int(m.sum())
        tok.release()
        mask.release()
        a = b
    if interior_eod:
        cause = (manifest.get("eod") or {}).get("interior_cause") or "the record text spelled the EOD token"
        rep.warnings.append(
            f"{interior_eod} EOD ids occur inside samples ({cause}); trainers that find boundaries by scanning for "
            "EOD would split those samples, the index does not (`packer export` uses explicit boundaries then)"
        )
    if glued:
        rep.errors.append(f"{glued} samples without EOD (split chunks) are followed by another sample in their pack, "
                          "so an EOD scan would merge them with it; a split chunk must end its pack")
    if not_eod > counts.get("unterminated", 0):
        rep.errors.append(f"{not_eod} samples do not end with EOD id {eod} "
                          f"(only {counts.get('unterminated', 0)} split chunks may)")
    if eod_untrained:
        rep.errors.append(f"{eod_untrained} EOD tokens have loss mask 0")
    if bad_ids:
        rep.errors.append(f"{bad_ids} token ids are >= the vocabulary size {vocab}")
    if bad_mask:
        rep.errors.append(f"{bad_mask} loss-mask values are not 0/1")
    for key, actual in (("samples", lens.size), ("tokens", int(lens.sum())), ("packs", tok.num_documents),
                        ("target_tokens", targets)):
        if counts.get(key) != actual:
            rep.errors.append(f"manifest counts.{key} = {counts.get(key)} but the data has {actual}")
    rep.stats = describe(manifest, lens, pack_tokens, np.diff(docs), targets)
    agree = 0
    for g in PackedDataset(rep.prefix).groups(_CHUNK_TOKENS):
        agree += int(eod_scan_agrees(g.ids, g.seq_lens, g.samples_per_pack, eod).sum())
    rep.stats["eod_scan"] = {"agrees": agree, "packs": int(tok.num_documents)}
    claim = manifest.get("eod_scan")
    if claim is not None and (claim.get("agrees"), claim.get("packs")) != (agree, tok.num_documents):
        rep.errors.append(f"manifest eod_scan claims an EOD scan agrees with the index on {claim.get('agrees')}/"
                          f"{claim.get('packs')} packs, but it does on {agree}/{tok.num_documents}")


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
