"""`OutputSet`: everything one command writes at a prefix, made visible as ONE commit.

`build`, `merge` and `export` write through it, so the crash-safety argument is made here once:

    with OutputSet(prefix) as out:
        tokens = out.dataset("", np.uint16)              # PREFIX.bin / PREFIX.idx
        mask = out.dataset("_loss_mask", np.uint8)       # PREFIX_loss_mask.bin / .idx
        out.add_rejects([...])                           # PREFIX.rejects.jsonl, only if any record was skipped
        ...
        shard = out.file("OUT/part-0.parquet")           # any other file, written to a temporary path
        manifest = out.commit(lambda files: {...})       # files: path (relative to PREFIX.json) -> {bytes, sha256}

Until `commit` every byte goes to temporary files next to the targets, and an earlier output at the prefix is
untouched; leaving the `with` block without a commit removes them. `commit`:
    1. finalizes every dataset (still under temporary names) and checksums every pending file;
    2. builds the manifest from those checksums (so the renames below are the only unprotected window);
    3. removes the earlier manifest and rejects file, so old and new files are never taken together for a
       complete output;
    4. renames the data into place: other files (`file()`) first, then the datasets, the first declared last
       and each `.idx` after its `.bin`; removes the files the earlier manifest listed that this output does not
       replace (another shard count); then puts the rejects file in place, if any record was rejected;
    5. writes the manifest (atomically), whose presence means the output is complete.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from packer.indexed import IndexedDatasetWriter
from packer.manifest import file_entries, manifest_path, write_json_atomic


def rejects_path(prefix: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(prefix)}.rejects.jsonl")


def previous_files(prefix: str | os.PathLike) -> set[Path]:
    """The files an earlier output's manifest at `prefix` lists (resolved, and only inside the manifest's folder):
    a commit removes those it does not replace, so e.g. shards of another shard count never linger."""
    path = manifest_path(prefix)
    try:
        files = json.loads(path.read_text(encoding="utf-8")).get("files")
    except (OSError, ValueError, AttributeError):
        return set()
    here = path.parent.resolve()
    found = set()
    for name in files if isinstance(files, dict) else ():
        p = (here / str(name)).resolve()
        if here in p.parents:
            found.add(p)
    return found


class OutputSet:
    def __init__(self, prefix: str | os.PathLike):
        self.prefix = os.fspath(prefix)
        Path(self.prefix).parent.mkdir(parents=True, exist_ok=True)
        self._datasets: list[IndexedDatasetWriter] = []
        self._files: dict[Path, Path] = {}  # final path -> temporary path, for outputs that are not datasets
        self.rejects_path = rejects_path(self.prefix)
        self._rejects_tmp = self.rejects_path.with_name(
            f"{self.rejects_path.name}.tmp-{os.getpid()}-{os.urandom(4).hex()}")
        self._rejects = None  # opened on the first reject
        self.rejected = 0
        self.committed = False

    def dataset(self, suffix: str, dtype: type[np.number] | np.dtype, min_value: int = 0) -> IndexedDatasetWriter:
        """A new `.bin/.idx` pair at PREFIX + suffix (values >= min_value)."""
        writer = IndexedDatasetWriter(self.prefix + suffix, dtype, min_value)
        self._datasets.append(writer)
        return writer

    def file(self, final: str | os.PathLike) -> Path:
        """A temporary path to write one more output file to (e.g. a Parquet shard); renamed to `final` at commit.
        `final` may lie in a subfolder of the prefix's folder (created here)."""
        final = Path(final)
        final.parent.mkdir(parents=True, exist_ok=True)
        # A leading dot: readers that glob a folder (datasets' data_dir, MindSpeed's PREFIX_packed_*) skip it.
        tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}-{os.urandom(4).hex()}")
        self._files[final] = tmp
        return tmp

    def add_rejects(self, rejects: list[dict]) -> None:
        """Skipped records, one JSON object per line (a lone surrogate stays as its JSON escape)."""
        if not rejects:
            return
        if self._rejects is not None and self._rejects.closed:
            raise RuntimeError("add_rejects() after commit_rejects()")
        if self._rejects is None:
            self._rejects = open(self._rejects_tmp, "w", encoding="utf-8")  # noqa: SIM115 -- closed in commit_rejects/abort
        for r in rejects:
            line = json.dumps(r, ensure_ascii=False)
            try:
                line.encode("utf-8")
            except UnicodeEncodeError:
                line = json.dumps(r)
            self._rejects.write(line + "\n")
        self.rejected += len(rejects)

    def commit_rejects(self) -> Path | None:
        """Put the rejects file in place without committing the data (a run that fails for want of any sample
        still shows what it skipped and why). Returns its path, or None when nothing was rejected."""
        if self._rejects is None:
            return None
        if not self._rejects.closed:
            self._rejects.close()
            os.replace(self._rejects_tmp, self.rejects_path)
        return self.rejects_path

    def commit(self, make_manifest: Callable[[dict[str, dict[str, Any]]], dict[str, Any]]) -> dict[str, Any]:
        """Steps 1-5 of the module docstring; returns the manifest written."""
        pending: dict[str, Path] = {}
        for writer in self._datasets:
            writer.finalize()
            pending |= writer.pending()
        here = manifest_path(self.prefix).parent
        pending |= {os.path.relpath(final, here): tmp for final, tmp in self._files.items()}
        manifest = make_manifest(file_entries(pending))
        earlier = previous_files(self.prefix)
        manifest_path(self.prefix).unlink(missing_ok=True)
        if self._rejects is None:
            self.rejects_path.unlink(missing_ok=True)  # a stale file from an earlier run would mislead
        for final, tmp in self._files.items():
            os.replace(tmp, final)
        for writer in reversed(self._datasets):
            writer.commit()
        replaced = {Path(f).resolve() for f in self._files} | {
            Path(p).resolve() for w in self._datasets for p in (w.bin_path, w.idx_path)}
        for stale in earlier - replaced:
            stale.unlink(missing_ok=True)
        self.commit_rejects()
        write_json_atomic(manifest_path(self.prefix), manifest)
        self.committed = True
        return manifest

    def abort(self) -> None:
        for writer in self._datasets:
            writer.abort()
        for tmp in self._files.values():
            tmp.unlink(missing_ok=True)
        if self._rejects is not None and not self._rejects.closed:
            self._rejects.close()
        self._rejects_tmp.unlink(missing_ok=True)

    def __enter__(self) -> OutputSet:
        return self

    def __exit__(self, *exc) -> None:
        if not self.committed:
            self.abort()
