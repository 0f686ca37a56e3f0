"""When the filesystem refuses: disk full, read-only, a file where a folder goes, a folder where a file goes.
Each is one line naming the path and the cause, exit 74 (README.md, "Exit codes"), no traceback, no
temporary file left, and an earlier output at the prefix untouched."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from packer.cli import EXIT_IO, main
from packer.indexed import IndexedDatasetWriter
from packer.output import OutputSet
from packer.spill import SampleSpill
from packer.verify import verify


def run(*args: str):
    return CliRunner().invoke(main, list(args))


def build_args(prefix: Path, *extra: str) -> list[str]:
    return ["build", "--handler", "alpaca", "--output-prefix", str(prefix), "-q", *extra]


def one_line(result, code: int, *needles: str) -> str:
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit | None), result.exception
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if ".tmp-" in p.name or p.name.startswith(".packer-spill-"))


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture
def earlier(tmp_path) -> Path:
    """A complete build at tmp_path/out/b, to be left as it is by every failure."""
    prefix = tmp_path / "out" / "b"
    assert run(*build_args(prefix)).exit_code == 0
    return prefix


def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # what write() raises: no file name


@pytest.mark.parametrize("where", [(IndexedDatasetWriter, "add_sequences"), (SampleSpill, "add"),
                                   (OutputSet, "_write_temp_json")], ids=["dataset", "spill", "manifest"])
def test_disk_full(earlier, monkeypatch, where):
    before = snapshot(earlier.parent)
    monkeypatch.setattr(*where, enospc)
    line = one_line(run(*build_args(earlier)), EXIT_IO, "No space left on device [ENOSPC]", str(earlier.parent),
                    "an earlier output there is unchanged")
    assert line.startswith("Error: ")
    assert leftovers(earlier.parent) == []
    assert snapshot(earlier.parent) == before and verify(earlier).ok


def test_disk_full_in_a_merge(earlier, tmp_path, monkeypatch):
    monkeypatch.setattr(IndexedDatasetWriter, "add_sequences", enospc)
    one_line(run("merge", str(tmp_path / "m" / "all"), str(earlier)), EXIT_IO, "[ENOSPC]", str(tmp_path / "m"))
    assert leftovers(tmp_path / "m") == []


def test_a_read_only_folder_found_by_the_filesystem(tmp_path, monkeypatch):
    # Where the tests run as root chmod does not stop writes; the filesystem's refusal is the same OSError.
    def read_only(self, prefix, *args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(Path(prefix).parent / f".{Path(prefix).name}"
                      f".bin.tmp-{os.getpid()}-0a1b"))

    monkeypatch.setattr(IndexedDatasetWriter, "__init__", read_only)
    prefix = tmp_path / "ro" / "b"
    # The temporary name is reported as the file it stood for.
    one_line(run(*build_args(prefix)), EXIT_IO, f"{prefix}.bin: Read-only file system [EROFS]",
             "choose a writable output location")
    assert leftovers(tmp_path) == []


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into a 0o555 folder anyway")
def test_a_read_only_folder(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        one_line(run(*build_args(folder / "b")), EXIT_IO, str(folder), "Permission denied [EACCES]")
        assert leftovers(folder) == []
    finally:
        folder.chmod(0o755)


def test_a_prefix_whose_folder_is_a_file(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    one_line(run(*build_args(tmp_path / "file" / "b")), EXIT_IO, f"{tmp_path / 'file'} is a file, not a folder",
             "[ENOTDIR]")
    assert (tmp_path / "file").read_text() == "not a folder"


def test_a_folder_where_the_bin_goes(tmp_path):
    (tmp_path / "b.bin").mkdir()
    one_line(run(*build_args(tmp_path / "b")), EXIT_IO, f"{tmp_path / 'b.bin'}: is a folder where an output file goes",
             "[EISDIR]")
    assert leftovers(tmp_path) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["b.bin"]


def test_a_missing_folder_is_created(tmp_path):
    prefix = tmp_path / "new" / "deeper" / "b"
    assert run(*build_args(prefix)).exit_code == 0
    assert verify(prefix).ok


def test_a_missing_input_is_the_inputs_fault_not_the_filesystems(tmp_path):
    result = run("merge", str(tmp_path / "all"), str(tmp_path / "nothing-here"))
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
