"""`packer export PREFIX --to {mindspeed,bridge,hf} --output OUT`: a verified build, in another trainer's format.

    verify(PREFIX) ──> PackedDataset.groups() ──> format writer ──> OutputSet.commit ──> OUT.json (last)

Streaming (a group of whole packs at a time, so memory is bounded by the group) and atomic like `build`: every
file goes to a temporary name and is renamed into place only once all of them are complete, with the export's
manifest `OUT.json` (checksums of every file) written last. An input that fails `packer verify` is refused,
naming the failed check. What each format writes, and the trainer flags that read it: docs/interop.md.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from packer import __version__
from packer.config import EXPORT_TARGETS
from packer.dataset import PackedDataset
from packer.manifest import manifest_path, sha256_file
from packer.output import OutputConflict, OutputSet

FORMAT = "packer.export.v1"
TARGETS = EXPORT_TARGETS


class ExportError(ValueError):
    """A user-facing failure: the message names the input, the failed check and the fix."""


@dataclass(frozen=True)
class ExportConfig:
    prefix: str  # a `packer build` (or `packer merge`) output prefix
    to: str  # one of TARGETS
    output: str  # OUT: mindspeed OUT_packed_*_document.{bin,idx}; bridge OUT.idx.parquet; hf OUT/*.parquet
    neat_pack: bool = True  # mindspeed: explicit segment ids (--neat-pack); False: EOD boundaries
    pad_to_multiple_of: int | None = None  # mindspeed: pad packs to a multiple of N, not to seq_length
    per_sample: bool = False  # hf: one row per sample (transformers' DataCollatorWithFlattening), not per pack
    rows_per_shard: int = 10_000  # hf: rows per Parquet file
    checksums: bool = True  # verify the input's sha256 checksums first

    def __post_init__(self) -> None:
        object.__setattr__(self, "output", os.path.normpath(self.output))  # "OUT/" and "OUT" are one output

    def validate(self) -> None:
        if self.to not in TARGETS:
            raise ExportError(f"--to {self.to!r}: choose one of {', '.join(TARGETS)}")
        if self.pad_to_multiple_of is not None and self.pad_to_multiple_of < 1:
            raise ExportError(f"--pad-to-multiple-of must be >= 1, got {self.pad_to_multiple_of}")
        if self.pad_to_multiple_of is not None and self.to != "mindspeed":
            raise ExportError("--pad-to-multiple-of applies to --to mindspeed only")
        if not self.neat_pack and self.to != "mindspeed":
            raise ExportError("--eod-boundaries applies to --to mindspeed only")
        if self.per_sample and self.to != "hf":
            raise ExportError("--per-sample applies to --to hf only")
        if self.rows_per_shard < 1:
            raise ExportError(f"--rows-per-shard must be >= 1, got {self.rows_per_shard}")
        if Path(self.output).resolve() == Path(self.prefix).resolve():
            raise ExportError(f"--output {self.output} is the input prefix; choose another output")


def open_verified(prefix: str, checksums: bool = True) -> PackedDataset:
    """The build at `prefix`, after `packer verify` found nothing wrong with it."""
    from packer.verify import verify

    if not manifest_path(prefix).is_file():
        raise ExportError(f"no build at {prefix}: {manifest_path(prefix)} does not exist (the manifest is written "
                          "last, so the build did not complete, or the prefix is wrong)")
    report = verify(prefix, checksums=checksums)
    if not report.ok:
        raise ExportError(f"{prefix} fails `packer verify` ({report.errors[0]}"
                          + (f"; and {len(report.errors) - 1} more" if len(report.errors) > 1 else "")
                          + "); rebuild it, or run `packer verify` for the full report")
    return PackedDataset(prefix)


def export(config: ExportConfig, progress: bool = False) -> dict[str, Any]:
    """Write the export; returns its manifest (also written to OUT.json)."""
    config.validate()
    ds = open_verified(config.prefix, config.checksums)
    writer = importlib.import_module(f"packer.export.{config.to}")
    try:
        out = OutputSet(config.output, kind=FORMAT)
    except OutputConflict as e:
        raise ExportError(str(e)) from e
    with out:
        section = writer.write(ds, out, config, progress)
        source = {"prefix": str(Path(config.prefix).resolve()),
                  "manifest_sha256": sha256_file(manifest_path(config.prefix)),
                  "packs": len(ds), "samples": len(ds.tokens), "seq_length": ds.seq_length,
                  "tokenizer": ds.manifest["tokenizer"]}
        return out.commit(lambda files: {
            "format": FORMAT,
            "packer_version": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "to": config.to,
            "config": asdict(config),
            "source": source,
            config.to: section,
            "files": files,
        })
