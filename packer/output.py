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
    3. notes the earlier output's files in a journal (`.PREFIX.json.replacing`), removes its manifest and rejects
       file, so old and new files are never taken together for a complete output, and every `.idx` this output
       replaces, so no reader can open a mix of old and new datasets;
    4. renames the data into place: other files (`file()`) first, then the datasets, the first declared last
       and each `.idx` after its `.bin`; removes the files the earlier output listed that this output does not
       replace (another shard count); then puts the rejects file in place, if any record was rejected;
    5. writes the manifest (atomically), whose presence means the output is complete, and drops the journal.

An output of another kind at the prefix (an export over a build, a build over an export) is refused, never
replaced; temporary files of killed runs (`.NAME.tmp-PID-*`, PID gone) are removed by the next run.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from packer.indexed import IndexedDatasetWriter
from packer.manifest import FORMAT, file_entries, manifest_path, write_json_atomic


def _manifest_format(path: Path) -> str | None:
    """The `format` of the manifest at `path`; None where there is none (or it is unreadable: a broken output
    is replaced)."""
    try:
        head = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return head.get("format") if isinstance(head, dict) and isinstance(head.get("format"), str) else None


def rejects_path(prefix: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(prefix)}.rejects.jsonl")


def _journal(prefix: str | os.PathLike) -> Path:
    """Where a commit notes the earlier output's files while it replaces them (a kill mid-commit leaves it)."""
    path = manifest_path(prefix)
    return path.with_name(f".{path.name}.replacing")


def _listed(path: Path) -> set[Path]:
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


def previous_files(prefix: str | os.PathLike) -> set[Path]:
    """The files an earlier output at `prefix` lists (its manifest, or the journal of a commit that was killed;
    resolved, and only inside the manifest's folder): a commit removes those it does not replace, so e.g.
    shards of another shard count never linger."""
    return _listed(manifest_path(prefix)) | _listed(_journal(prefix))


class OutputConflict(ValueError):
    """The prefix holds another kind of output, which a commit there would destroy."""


def _remove_stale_temps(final: Path) -> None:
    """Temporary files of `final` left by runs that were killed (their process is gone)."""
    for tmp in final.parent.glob(f".{final.name}.tmp-*"):
        try:
            pid = int(tmp.name[len(final.name) + 6 :].split("-")[0])
            os.kill(pid, 0)  # raises if no such process
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
        except (ValueError, PermissionError, OSError):
            continue


class OutputSet:
    def __init__(self, prefix: str | os.PathLike, kind: str = FORMAT):
        """`kind`: the manifest `format` this output writes; an earlier output of another kind at the prefix is
        refused (a build is never replaced by an export, nor the other way round)."""
        self.prefix = os.fspath(prefix)
        earlier = _manifest_format(manifest_path(self.prefix))
        if earlier is not None and earlier != kind:
            raise OutputConflict(f"{manifest_path(self.prefix)} belongs to a {earlier!r} output, which writing a "
                                 f"{kind!r} one there would destroy; choose another output prefix")
        Path(self.prefix).parent.mkdir(parents=True, exist_ok=True)
        self._datasets: list[IndexedDatasetWriter] = []
        self._files: dict[Path, Path] = {}  # final path -> temporary path, for outputs that are not datasets
        self.rejects_path = rejects_path(self.prefix)
        self._rejects_tmp = self.rejects_path.with_name(
            f".{self.rejects_path.name}.tmp-{os.getpid()}-{os.urandom(4).hex()}")
        _remove_stale_temps(self.rejects_path)
        self._rejects = None  # opened on the first reject
        self.rejected = 0
        self.committed = False

    def dataset(self, suffix: str, dtype: type[np.number] | np.dtype, min_value: int = 0) -> IndexedDatasetWriter:
        """A new `.bin/.idx` pair at PREFIX + suffix (values >= min_value)."""
        for ext in (".bin", ".idx"):
            _remove_stale_temps(Path(self.prefix + suffix + ext))
        writer = IndexedDatasetWriter(self.prefix + suffix, dtype, min_value)
        self._datasets.append(writer)
        return writer

    def file(self, final: str | os.PathLike) -> Path:
        """A temporary path to write one more output file to (e.g. a Parquet shard); renamed to `final` at commit.
        `final` may lie in a subfolder of the prefix's folder (created here)."""
        final = Path(final)
        final.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(final)
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
        journal = _journal(self.prefix)
        if earlier:  # so that a run after a kill below still knows the earlier output's files
            write_json_atomic(journal, {"files": {os.path.relpath(p, here.resolve()): {} for p in earlier}})
        manifest_path(self.prefix).unlink(missing_ok=True)
        if self._rejects is None:
            self.rejects_path.unlink(missing_ok=True)  # a stale file from an earlier run would mislead
        # No mix of old and new: every index that is replaced goes before the first rename, so a reader finds
        # either a complete new pair or no index at all (megatron-core and MindSpeed open no .bin without it).
        for writer in self._datasets:
            writer.idx_path.unlink(missing_ok=True)
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
        journal.unlink(missing_ok=True)
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
