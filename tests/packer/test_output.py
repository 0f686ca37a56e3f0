"""OutputSet: the one commit of a prefix's files (the 6 steps of packer/output.py's docstring)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from packer.indexed import IndexedDataset, IndexedDatasetWriter
from packer.manifest import manifest_path, sha256_file
from packer.output import OutputConflict, OutputSet, rejects_path

DATA_NAMES = ["out.bin", "out.idx", "out_loss_mask.bin", "out_loss_mask.idx"]


def write_packs(out: OutputSet, packs: list[list[list[int]]]) -> None:
    """Token and loss-mask datasets of `packs` (each a list of samples); the mask is 1 on odd ids."""
    tokens, mask = out.dataset("", np.uint16), out.dataset("_loss_mask", np.uint8)
    seqs = [s for p in packs for s in p]
    flat = np.array([t for s in seqs for t in s], dtype=np.int64)
    lengths = [len(s) for s in seqs]
    counts = [len(p) for p in packs]
    tokens.add_sequences(flat, lengths)
    mask.add_sequences(flat % 2, lengths)
    tokens.end_documents(counts)
    mask.end_documents(counts)


def manifest_of(files: dict) -> dict:
    return {"format": "test", "files": files}


def build(prefix: Path, packs: list[list[list[int]]], rejects: list[dict] | None = None) -> dict:
    with OutputSet(prefix, kind="test") as out:
        write_packs(out, packs)
        out.add_rejects(rejects or [])
        return out.commit(manifest_of)


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def temp_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".tmp-" in p.name)


OLD = [[[1, 2, 3], [4, 5]], [[6]]]
NEW = [[[7, 8, 9, 10]], [[11, 12]], [[13]]]


def test_nothing_visible_before_commit(tmp_path):
    prefix = tmp_path / "out"
    seen: list[list[str]] = []

    def make_manifest(files):
        seen.append(sorted(p.name for p in tmp_path.iterdir()))  # steps 1-2 done, no rename yet
        return manifest_of(files)

    with OutputSet(prefix, kind="test") as out:
        write_packs(out, OLD)
        out.add_rejects([{"record": 3, "error": "bad"}])
        names = sorted(p.name for p in tmp_path.iterdir())
        assert names and names == temp_files(tmp_path)
        out.commit(make_manifest)
    # While the manifest is built the four data files and the rejects are all still temporary.
    assert len(seen[0]) == 5 and all(".tmp-" in n for n in seen[0])


def test_commit_puts_every_file_in_place_with_its_checksum(tmp_path):
    prefix = tmp_path / "out"
    manifest = build(prefix, OLD)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*DATA_NAMES, "out.json"])
    assert temp_files(tmp_path) == []
    on_disk = json.loads(manifest_path(prefix).read_text(encoding="utf-8"))
    assert on_disk == manifest
    assert sorted(on_disk["files"]) == sorted(DATA_NAMES)
    for name, entry in on_disk["files"].items():
        path = tmp_path / name
        assert entry == {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    tokens, mask = IndexedDataset(prefix), IndexedDataset(f"{prefix}_loss_mask")
    assert [tokens.get(i).tolist() for i in range(len(tokens))] == [[1, 2, 3], [4, 5], [6]]
    assert [mask.get(i).tolist() for i in range(len(mask))] == [[1, 0, 1], [0, 1], [0]]
    assert tokens.document_indices.tolist() == mask.document_indices.tolist() == [0, 2, 3]
    assert tokens.dtype == np.uint16 and mask.dtype == np.uint8


def test_renames_first_dataset_last_and_manifest_after_the_data(tmp_path, monkeypatch):
    prefix = tmp_path / "out"
    build(prefix, OLD)
    calls: list[tuple[str, bool]] = []
    real_commit = IndexedDatasetWriter.commit

    def recording_commit(self):
        calls.append((Path(self.prefix).name, manifest_path(prefix).exists()))
        real_commit(self)

    monkeypatch.setattr(IndexedDatasetWriter, "commit", recording_commit)
    build(prefix, NEW)
    assert calls == [("out_loss_mask", False), ("out", False)]
    assert manifest_path(prefix).exists()
    assert IndexedDataset(prefix).document_indices.tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("earlier", [False, True])
def test_leaving_without_commit_removes_temp_files_and_keeps_the_earlier_output(tmp_path, earlier):
    prefix = tmp_path / "out"
    if earlier:
        build(prefix, OLD, rejects=[{"record": 0, "error": "old"}])
    before = snapshot(tmp_path)
    with pytest.raises(RuntimeError, match="boom"), OutputSet(prefix, kind="test") as out:
        write_packs(out, NEW)
        out.add_rejects([{"record": 1, "error": "new"}])
        assert temp_files(tmp_path)
        raise RuntimeError("boom")
    assert snapshot(tmp_path) == before
    assert temp_files(tmp_path) == []


def test_a_failing_manifest_leaves_the_earlier_output(tmp_path):
    # Steps 1-2 (finalize, checksum, build the manifest) come before anything earlier is touched.
    prefix = tmp_path / "out"
    build(prefix, OLD)
    before = snapshot(tmp_path)

    def failing(files):
        raise ValueError("no manifest")

    with pytest.raises(ValueError, match="no manifest"), OutputSet(prefix, kind="test") as out:
        write_packs(out, NEW)
        out.commit(failing)
    assert snapshot(tmp_path) == before


def test_earlier_manifest_is_removed_before_the_data_renames(tmp_path, monkeypatch):
    prefix = tmp_path / "out"
    build(prefix, OLD)
    before = snapshot(tmp_path)

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(IndexedDatasetWriter, "commit", interrupted)
    with pytest.raises(KeyboardInterrupt), OutputSet(prefix, kind="test") as out:
        write_packs(out, NEW)
        out.commit(manifest_of)
    assert not manifest_path(prefix).exists()
    # The old .bin files may remain, but without their manifest and their .idx no reader opens them (so no mix
    # of an old index with new data can exist), and the journal names them for the next run to remove.
    assert not (tmp_path / "out.idx").exists() and not (tmp_path / "out_loss_mask.idx").exists()
    assert (tmp_path / "out.bin").read_bytes() == before["out.bin"]
    assert (tmp_path / ".out.json.replacing").is_file()
    assert temp_files(tmp_path) == []


def test_no_rejects_file_without_rejects(tmp_path):
    prefix = tmp_path / "out"
    with OutputSet(prefix, kind="test") as out:
        write_packs(out, OLD)
        out.add_rejects([])
        assert not any("rejects" in p.name for p in tmp_path.iterdir())
        out.commit(manifest_of)
        assert out.rejected == 0
    assert not rejects_path(prefix).exists()


def test_rejects_written_in_order(tmp_path):
    prefix = tmp_path / "out"
    rejects = [{"record": 2, "error": "a"}, {"record": 5, "error": "b"}, {"record": 9, "error": "c"}]
    with OutputSet(prefix, kind="test") as out:
        write_packs(out, OLD)
        out.add_rejects(rejects[:2])
        out.add_rejects(rejects[2:])
        assert out.rejected == 3
        assert not rejects_path(prefix).exists()
        out.commit(manifest_of)
    assert rejects_path(prefix) == tmp_path / "out.rejects.jsonl"
    lines = rejects_path(prefix).read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == rejects
    assert temp_files(tmp_path) == []


def test_stale_rejects_removed_by_a_commit_without_rejects(tmp_path):
    prefix = tmp_path / "out"
    build(prefix, OLD, rejects=[{"record": 0, "error": "old"}])
    assert rejects_path(prefix).exists()
    build(prefix, NEW)
    assert not rejects_path(prefix).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*DATA_NAMES, "out.json"])


def test_lone_surrogate_reject_is_a_json_escape_in_valid_utf8(tmp_path):
    prefix = tmp_path / "out"
    rejects = [{"record": 0, "text": "\ud800"}, {"record": 1, "text": "héllo 漢字"}]
    build(prefix, OLD, rejects=rejects)
    raw = rejects_path(prefix).read_bytes()
    lines = raw.decode("utf-8").splitlines()  # strict: a surrogate would not decode
    assert len(lines) == 2
    assert "\\ud800" in lines[0]
    assert "héllo 漢字" in lines[1]  # other text is kept readable, not escaped
    assert [json.loads(line) for line in lines] == rejects


def test_commit_rejects_without_data(tmp_path):
    prefix = tmp_path / "out"
    rejects = [{"record": 4, "error": "empty"}]
    with OutputSet(prefix, kind="test") as out:
        write_packs(out, [])
        out.add_rejects(rejects)
        where = out.commit_rejects()
        assert where == rejects_path(prefix)
        assert [json.loads(line) for line in where.read_text(encoding="utf-8").splitlines()] == rejects
        for name in [*DATA_NAMES, "out.json"]:
            assert not (tmp_path / name).exists()
    # Leaving without a commit clears the data's temp files but keeps the rejects put in place.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.rejects.jsonl"]


def test_commit_rejects_with_nothing_rejected(tmp_path):
    prefix = tmp_path / "out"
    with OutputSet(prefix, kind="test") as out:
        write_packs(out, OLD)
        assert out.commit_rejects() is None
    assert list(tmp_path.iterdir()) == []


def test_an_output_of_another_kind_is_refused_and_kept(tmp_path):
    prefix = str(tmp_path / "out")
    with OutputSet(prefix, kind="test") as out:
        out.dataset("", np.uint16).add_sequences(np.array([1, 2]), [2])
        out.commit(manifest_of)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(OutputConflict, match="belongs to a 'test' output"):
        OutputSet(prefix, kind="other")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
