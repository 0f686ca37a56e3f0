"""`OutputSet`: everything one command writes at a prefix, made visible as ONE commit.

`build`, `merge` and `export` write through it, so the crash-safety argument is made here once:

    with OutputSet(prefix) as out:
        tokens = out.dataset("", np.uint16)              # PREFIX.bin / PREFIX.idx
        mask = out.dataset("_loss_mask", np.uint8)       # PREFIX_loss_mask.bin / .idx
        out.add_rejects([...])                           # PREFIX.rejects.jsonl, only if any record was skipped
        ...
        shard = out.file("OUT/part-0.parquet")           # any other file, written to a temporary path
        manifest = out.commit(lambda files: {...})       # files: path (relative to PREFIX.json) -> {bytes, sha256}

Until `commit` every byte goes to temporary files next to the targets (`.NAME.tmp-PID-RANDOM`, created with
O_EXCL, so never through a planted symlink), and an earlier output at the prefix is untouched; leaving the
`with` block without a commit removes them.

An output is complete when its manifest and its *key* are both in place: the key is the `.idx` of the first
dataset declared (PREFIX.idx), or the manifest itself for an output without datasets. packer's readers need
the manifest, megatron-core and MindSpeed need the `.idx`, so no reader opens an output that lacks either.
`commit` takes the earlier output down key first and puts the new one up key last:
    1. finalizes every file under its temporary name, fsyncs it and checksums it, and writes the manifest to a
       temporary file: everything that can fail slowly happens before anything earlier is touched;
    2. notes the earlier output's files in a journal (`.PREFIX.json.replacing`, for a run after a kill here),
       then removes the earlier key, its manifest, its rejects file, every other `.idx` it replaces and the
       files it listed that this output does not replace (another shard count); fsyncs the folder;
    3. renames the new files into place: other files (`file()`), the datasets but the first declared (each
       `.idx` after its `.bin`), the rejects file if any record was rejected; fsyncs;
    4. renames the manifest, then the first dataset, key last, into place; fsyncs and drops the journal.
A kill at any point leaves the earlier output complete (before step 2), the new one complete (after step 4),
or an output without its key or manifest, which every reader refuses.

An output of another kind at the prefix (an export over a build, a build over an export) is refused, never
replaced. Temporary files of killed runs at the prefix (by the name pattern above, their process gone) are
removed when the next OutputSet there starts.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np

from packer.indexed import IndexedDatasetWriter
from packer.manifest import FORMAT, file_entries, manifest_path

_TEMP = re.compile(r"\.?(?P<final>.+)\.tmp-(?P<pid>\d+)-[0-9a-f]+")  # no leading dot: written by packer < 0.3


def temp_path(final: str | os.PathLike) -> Path:
    """Where the bytes of `final` are written before the commit: `.NAME.tmp-PID-RANDOM` next to it. The dot
    hides it from readers that glob a folder (datasets' data_dir, MindSpeed's PREFIX_packed_*); the pid lets a
    later run tell a dead run's file."""
    final = Path(final)
    return final.with_name(f".{final.name}.tmp-{os.getpid()}-{secrets.token_hex(8)}")


def create_exclusive(path: str | os.PathLike, text: bool = False) -> IO:
    """Open a new file for writing: O_EXCL, so never an existing file and never through a symlink (a link
    planted at the name fails here instead of truncating its target)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(path, flags, 0o666)
    return os.fdopen(fd, "w", encoding="utf-8") if text else os.fdopen(fd, "wb")


def pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # EPERM: alive, another user's
        return False
    return False


def fsync_path(path: str | os.PathLike, directory: bool = False) -> None:
    """fsync a file, or a folder (so that the renames in it survive a power cut)."""
    fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    try:
        os.fsync(fd)
    except OSError as e:
        if not directory or e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise  # some filesystems cannot sync a folder; that is theirs to guarantee
    finally:
        os.close(fd)


def _manifest_format(path: Path) -> str | None:
    """The `format` of the manifest at `path`; None where there is none (or it is unreadable: a broken output
    is replaced)."""
    try:
        head = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
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
    except (OSError, ValueError, AttributeError, RecursionError):
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


def _writable_folder(folder: Path, what: str) -> None:
    """Create `folder` (and its parents) for `what`; one that is a file is an error naming it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as e:
        blocker = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), folder)
        raise NotADirectoryError(errno.ENOTDIR, f"{blocker} is a file, not a folder", what) from e


def _not_a_folder(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():  # a rename replaces a symlink itself, never a folder
        raise IsADirectoryError(errno.EISDIR, "is a folder where an output file goes", str(path))


class OutputSet:
    def __init__(self, prefix: str | os.PathLike, kind: str = FORMAT):
        """`kind`: the manifest `format` this output writes; an earlier output of another kind at the prefix is
        refused (a build is never replaced by an export, nor the other way round)."""
        self.prefix = os.fspath(prefix)
        self.manifest_path = manifest_path(self.prefix)
        earlier = _manifest_format(self.manifest_path)
        if earlier is not None and earlier != kind:
            raise OutputConflict(f"{self.manifest_path} belongs to a {earlier!r} output, which writing a "
                                 f"{kind!r} one there would destroy; choose another output prefix")
        _writable_folder(self.manifest_path.parent, self.prefix)
        self._dead: dict[Path, dict[str, list[Path]]] = {}  # folder -> final name -> dead runs' temp files
        self.rejects_path = rejects_path(self.prefix)
        for final in (self.manifest_path, self.rejects_path, _journal(self.prefix)):
            _not_a_folder(final)
            self._sweep(final)
        self._datasets: list[IndexedDatasetWriter] = []
        self._files: dict[Path, Path] = {}  # final path -> temporary path, for outputs that are not datasets
        self._temps: list[Path] = []  # this run's own temporary files (manifest, journal), for abort
        self._rejects_tmp = temp_path(self.rejects_path)
        self._rejects: IO | None = None  # opened on the first reject
        self._rejects_placed = False
        self.rejected = 0
        self.touched = False  # the commit has begun to take the earlier output down
        self.committed = False

    def _sweep(self, final: Path) -> None:
        """Remove the temporary files of `final` that runs now dead left (only ours: by name, not following
        symlinks; one listing per folder)."""
        folder = final.parent
        if folder not in self._dead:
            dead: dict[str, list[Path]] = {}
            try:
                with os.scandir(folder) as entries:
                    for entry in entries:
                        m = _TEMP.fullmatch(entry.name)
                        if m and not entry.is_dir(follow_symlinks=False) and pid_gone(int(m["pid"])):
                            dead.setdefault(m["final"], []).append(folder / entry.name)
            except FileNotFoundError:
                pass
            self._dead[folder] = dead
        for path in self._dead[folder].pop(final.name, []):
            path.unlink(missing_ok=True)

    def dataset(self, suffix: str, dtype: type[np.number] | np.dtype, min_value: int = 0) -> IndexedDatasetWriter:
        """A new `.bin/.idx` pair at PREFIX + suffix (values >= min_value). The first one declared is the key."""
        for ext in (".bin", ".idx"):
            _not_a_folder(Path(self.prefix + suffix + ext))
            self._sweep(Path(self.prefix + suffix + ext))
        writer = IndexedDatasetWriter(self.prefix + suffix, dtype, min_value)
        self._datasets.append(writer)
        return writer

    def file(self, final: str | os.PathLike) -> Path:
        """A temporary path to write one more output file to (e.g. a Parquet shard); renamed to `final` at commit.
        `final` may lie in a subfolder of the prefix's folder (created here)."""
        final = Path(final)
        _writable_folder(final.parent, str(final))
        _not_a_folder(final)
        self._sweep(final)
        tmp = temp_path(final)
        create_exclusive(tmp).close()  # the name is ours now; the caller's writer reopens it
        self._files[final] = tmp
        return tmp

    def add_rejects(self, rejects: list[dict]) -> None:
        """Skipped records, one JSON object per line (a lone surrogate stays as its JSON escape)."""
        if not rejects:
            return
        if self._rejects is not None and self._rejects.closed:
            raise RuntimeError("add_rejects() after commit_rejects()")
        if self._rejects is None:
            self._rejects = create_exclusive(self._rejects_tmp, text=True)
        for r in rejects:
            line = json.dumps(r, ensure_ascii=False)
            try:
                line.encode("utf-8")
            except UnicodeEncodeError:
                line = json.dumps(r)
            self._rejects.write(line + "\n")
        self.rejected += len(rejects)

    def _close_rejects(self) -> None:
        if self._rejects is not None and not self._rejects.closed:
            self._rejects.flush()
            os.fsync(self._rejects.fileno())
            self._rejects.close()

    def commit_rejects(self) -> Path | None:
        """Put the rejects file in place without committing the data (a run that fails for want of any sample
        still shows what it skipped and why). Returns its path, or None when nothing was rejected."""
        if self._rejects is None:
            return None
        if not self._rejects_placed:
            self._close_rejects()
            if self.manifest_path.exists():  # an earlier build stays as it was, its rejects file its own
                self.rejects_path = Path(f"{self.prefix}.failed.rejects.jsonl")
            os.replace(self._rejects_tmp, self.rejects_path)
            self._rejects_placed = True
        return self.rejects_path

    def _write_temp_json(self, final: Path, obj: Any) -> Path:
        tmp = temp_path(final)
        self._temps.append(tmp)
        with create_exclusive(tmp, text=True) as f:
            json.dump(obj, f, indent=2, sort_keys=False, ensure_ascii=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        return tmp

    def commit(self, make_manifest: Callable[[dict[str, dict[str, Any]]], dict[str, Any]]) -> dict[str, Any]:
        """Steps 1-4 of the module docstring; returns the manifest written."""
        # 1. Everything final and durable under temporary names.
        pending: dict[str, Path] = {}
        hashed: dict[Path, str] = {}
        for writer in self._datasets:
            writer.finalize()  # fsyncs .bin and .idx
            pending |= writer.pending()
            hashed |= writer.sha256()
        for tmp in self._files.values():
            fsync_path(tmp)
        self._close_rejects()
        here = self.manifest_path.parent
        pending |= {os.path.relpath(final, here): tmp for final, tmp in self._files.items()}
        manifest = make_manifest(file_entries(pending, hashed))
        manifest_tmp = self._write_temp_json(self.manifest_path, manifest)
        folders = {here, *(final.parent for final in self._files)}
        key = self._datasets[0] if self._datasets else None

        # 2. The earlier output down, key first.
        earlier = previous_files(self.prefix)
        journal = _journal(self.prefix)
        if earlier:
            listed = {os.path.relpath(p, here.resolve()): {} for p in sorted(earlier)}
            os.replace(self._write_temp_json(journal, {"files": listed}), journal)
        self.touched = True
        if key is not None:
            key.idx_path.unlink(missing_ok=True)
        self.manifest_path.unlink(missing_ok=True)
        if not self._rejects_placed:
            self.rejects_path.unlink(missing_ok=True)  # an earlier run's would mislead, even for a moment
        failed = Path(f"{self.prefix}.failed.rejects.jsonl")  # a failed run's rejects, beside the earlier build
        if failed.exists():
            failed.unlink()
        for writer in self._datasets[1:]:
            writer.idx_path.unlink(missing_ok=True)
        replaced = {f.resolve() for f in self._files} | {
            p.resolve() for w in self._datasets for p in (w.bin_path, w.idx_path)}
        for stale in earlier - replaced:
            stale.unlink(missing_ok=True)
        self._fsync(folders)

        # 3. The new files up, all but the key's dataset.
        for final, tmp in self._files.items():
            os.replace(tmp, final)
        for writer in reversed(self._datasets[1:]):
            writer.commit()  # .bin, then .idx
        if self._rejects is not None and not self._rejects_placed:
            os.replace(self._rejects_tmp, self.rejects_path)
            self._rejects_placed = True
        self._fsync(folders)

        # 4. The manifest, then the key's dataset (its .idx last): the output is complete.
        os.replace(manifest_tmp, self.manifest_path)
        if key is not None:
            self._fsync({here})  # the manifest is durable before the key can be
            key.commit()
        self._fsync({here})
        journal.unlink(missing_ok=True)
        self.committed = True
        return manifest

    @staticmethod
    def _fsync(folders: set[Path]) -> None:
        for folder in folders:
            fsync_path(folder, directory=True)

    def abort(self) -> None:
        """Remove this run's temporary files (after a failed commit too: only what is still temporary)."""
        for writer in self._datasets:
            writer.abort()
        for tmp in [*self._files.values(), *self._temps]:
            tmp.unlink(missing_ok=True)
        if self._rejects is not None and not self._rejects.closed:
            self._rejects.close()
        self._rejects_tmp.unlink(missing_ok=True)

    def __enter__(self) -> OutputSet:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.committed:
            return
        self.abort()
        if exc is None:
            return
        # What the command line reports: what is at the prefix now, and for an I/O error without a path (a write
        # that found the disk full), which output it was writing.
        with contextlib.suppress(AttributeError):
            exc.output_state = ("incomplete" if self.touched else "unchanged", self.prefix)
        if isinstance(exc, OSError):
            if exc.filename is None:
                exc.filename = self.prefix
            elif (m := _TEMP.fullmatch(Path(os.fsdecode(exc.filename)).name)) is not None:
                exc.filename = str(Path(os.fsdecode(exc.filename)).with_name(m["final"]))
