"""OutputSet: the one commit of a prefix's files (the 4 steps of packer/output.py's docstring)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from packer.indexed import IndexedDataset
from packer.manifest import manifest_path, sha256_file
from packer.output import OutputConflict, OutputSet, create_exclusive, rejects_path

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


def record_file_ops(monkeypatch, prefix: Path) -> list[str]:
    """The commit's removals and renames, as "rm NAME" / "mv NAME" (the final name), in order."""
    ops: list[str] = []
    real_replace, real_unlink = os.replace, os.unlink

    def replace(src, dst, **kw):
        ops.append(f"mv {Path(dst).name}")
        real_replace(src, dst, **kw)

    def unlink(path, **kw):
        if ".tmp-" not in Path(path).name:
            ops.append(f"rm {Path(path).name}")
        real_unlink(path, **kw)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "unlink", unlink)
    return ops


def test_commit_takes_the_earlier_output_down_key_first_and_puts_the_new_one_up_key_last(tmp_path, monkeypatch):
    # The key (the first dataset's .idx) and the manifest are what readers need: megatron-core the .idx,
    # packer the manifest. Down: key, then manifest; up: manifest, then key.
    prefix = tmp_path / "out"
    build(prefix, OLD, rejects=[{"record": 0, "error": "old"}])
    ops = record_file_ops(monkeypatch, prefix)
    build(prefix, NEW, rejects=[{"record": 1, "error": "new"}])
    assert ops == ["mv .out.json.replacing",
                   "rm out.idx", "rm out.json", "rm out.rejects.jsonl", "rm out_loss_mask.idx",
                   "mv out_loss_mask.bin", "mv out_loss_mask.idx", "mv out.rejects.jsonl",
                   "mv out.json", "mv out.bin", "mv out.idx", "rm .out.json.replacing"]
    assert IndexedDataset(prefix).document_indices.tolist() == [0, 1, 2, 3]


def test_an_output_without_datasets_has_the_manifest_for_key(tmp_path, monkeypatch):
    prefix = tmp_path / "out"
    ops = record_file_ops(monkeypatch, prefix)
    with OutputSet(prefix, kind="test") as out:
        out.file(tmp_path / "out" / "part-0.txt").write_text("a")
        out.commit(manifest_of)
    assert ops == ["rm out.json", "rm out.rejects.jsonl", "mv part-0.txt", "mv out.json", "rm .out.json.replacing"]


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


class Crash(Exception):
    pass


def crash_at(monkeypatch, step: int) -> None:
    """os.replace / os.unlink raise Crash at the commit's step-th removal or rename (0-based)."""
    seen = [0]
    for name in ("replace", "unlink"):
        real = getattr(os, name)

        def op(*args, _real=real, **kw):
            if ".tmp-" not in Path(args[-1]).name:  # not the cleanup of a temporary file
                if seen[0] == step:
                    raise Crash(step)
                seen[0] += 1
            return _real(*args, **kw)

        monkeypatch.setattr(os, name, op)


def state_of(prefix: Path, old: dict, new: dict) -> str:
    """'old' or 'new' where that complete output is in place, 'none' where no reader could take one for
    complete: the key (out.idx) or the manifest is missing."""
    directory = prefix.parent
    files = snapshot(directory)
    for name, want in (("old", old), ("new", new)):
        if all(files.get(n) == b for n, b in want.items()) and not set(files) - set(want) - {".out.json.replacing"}:
            return name
    if "out.idx" in files and "out.json" in files:
        raise AssertionError(f"a key and a manifest, but neither output: {sorted(files)}")
    return "none"


def test_a_crash_at_any_step_of_the_commit_leaves_old_new_or_no_output(tmp_path, monkeypatch):
    # Each step of the commit raises in turn (the with block's cleanup runs; test_interrupt.py kills a real
    # process instead). The states run old, then none, then new; a later commit always succeeds.
    prefix = tmp_path / "out"
    old_rejects, new_rejects = [{"record": 0, "error": "old"}], [{"record": 1, "error": "new"}]
    build(prefix, NEW, new_rejects)
    new = snapshot(tmp_path)
    for p in tmp_path.iterdir():
        p.unlink()
    build(prefix, OLD, old_rejects)
    old = snapshot(tmp_path)
    states = []
    for step in range(20):
        with monkeypatch.context() as m:
            crash_at(m, step)
            try:
                build(prefix, NEW, new_rejects)
            except Crash as e:
                assert e.output_state == ("incomplete" if step else "unchanged", str(prefix))
            else:
                break
        states.append(state_of(prefix, old, new))
        assert temp_files(tmp_path) == []
        build(prefix, NEW, new_rejects)  # the next run finishes the job
        assert snapshot(tmp_path) == new
        for p in tmp_path.iterdir():
            p.unlink()
        for name, data in old.items():
            (tmp_path / name).write_bytes(data)
    assert states[0] == "old" and states[-1] == "new" and len(states) == 12
    assert states == sorted(states, key=["old", "none", "new"].index), states


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


def test_a_symlink_planted_at_a_temporary_name_is_never_followed(tmp_path, monkeypatch):
    target = tmp_path / "precious"
    target.write_text("keep me")
    planted = tmp_path / "link"
    planted.symlink_to(target)
    with pytest.raises(FileExistsError):
        create_exclusive(planted)
    # The rejects file's temporary name, made predictable here, is taken by a link: the run fails, the target
    # is neither truncated nor written.
    monkeypatch.setattr("secrets.token_hex", lambda n: "ab" * n)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / f".o.rejects.jsonl.tmp-{os.getpid()}-{'ab' * 8}").symlink_to(target)
    with pytest.raises(FileExistsError), OutputSet(out_dir / "o", kind="test") as out:
        out.add_rejects([{"record": 0}])
    assert target.read_text() == "keep me"


def dead_pid() -> int:
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(child.stdout)


def test_temporary_files_of_dead_runs_are_removed_by_the_next_run(tmp_path):
    prefix = tmp_path / "out"
    outside = tmp_path / "outside"
    outside.write_text("not ours")
    gone = dead_pid()
    stale = [f".out.bin.tmp-{gone}-0123abcd", f".out_loss_mask.idx.tmp-{gone}-beef", f".out.json.tmp-{gone}-aa",
             f"out.json.tmp-{gone}-aa", f".out.rejects.jsonl.tmp-{gone}-0f", f"..out.json.replacing.tmp-{gone}-1"]
    for name in stale:
        (tmp_path / name).write_bytes(b"x" * 100)
    (tmp_path / f".out.idx.tmp-{gone}-cafe").symlink_to(outside)  # removed as a link, its target kept
    alive = f".out.bin.tmp-{os.getpid()}-abcd"  # a live run's (here: this process)
    other = f".other.bin.tmp-{gone}-abcd"  # another prefix's
    for name in (alive, other):
        (tmp_path / name).write_bytes(b"y")
    build(prefix, OLD)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*DATA_NAMES, "out.json", "outside", alive, other])
    assert outside.read_text() == "not ours"


def test_spill_folders_of_dead_runs_on_this_host_are_removed(tmp_path):
    import socket

    from packer.spill import SampleSpill

    host = socket.gethostname()
    dead = tmp_path / f".packer-spill-{host}-{dead_pid()}-x1"
    elsewhere = tmp_path / f".packer-spill-{host}x-{dead_pid()}-x2"  # another host: its pids mean nothing here
    for d in (dead, elsewhere):
        d.mkdir()
        (d / "ids").write_bytes(b"z")
    with SampleSpill(tmp_path, np.dtype(np.uint16)) as spill:
        assert spill.dir.name.startswith(f".packer-spill-{host}-{os.getpid()}-")
        assert (spill.dir.stat().st_mode & 0o777) == 0o700
        spill.add(np.array([1, 2]), np.array([0, 1]), np.array([2]))
        assert spill.seal().tolist() == [2]
    assert sorted(p.name for p in tmp_path.iterdir()) == [elsewhere.name]


def test_a_folder_where_an_output_file_goes_is_refused_before_any_work(tmp_path):
    (tmp_path / "out.bin").mkdir()
    with pytest.raises(IsADirectoryError) as e, OutputSet(tmp_path / "out", kind="test") as out:
        out.dataset("", np.uint16)
    assert e.value.errno == errno.EISDIR and e.value.filename == str(tmp_path / "out.bin")
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError, match="is a file, not a folder"):
        OutputSet(tmp_path / "file" / "sub" / "out", kind="test")


def test_a_run_that_writes_nothing_leaves_an_earlier_build_and_its_rejects_alone(tmp_path):
    """No sample at all: the failed run's rejects go beside, never over, the earlier build's own."""
    import json as _json

    from packer.build import build
    from packer.config import BuildConfig, BuildError

    good = tmp_path / "good.jsonl"
    good.write_text(_json.dumps({"instruction": "a", "output": "b"}) + "\n{broken\n", encoding="utf-8")
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{broken\n", encoding="utf-8")
    gpt2 = str(Path(__file__).resolve().parents[2] / "packer" / "assets" / "gpt2")
    kw = dict(handler="alpaca", tokenizer=gpt2, seq_length=64, output_prefix=str(tmp_path / "o"), on_error="skip",
              tokenizer_backend="hf")
    build(BuildConfig(inputs=(str(good),), **kw), progress=False)
    before = (tmp_path / "o.rejects.jsonl").read_text(encoding="utf-8")
    with pytest.raises(BuildError, match=r"o\.failed\.rejects\.jsonl"):
        build(BuildConfig(inputs=(str(bad),), **kw), progress=False)
    assert (tmp_path / "o.rejects.jsonl").read_text(encoding="utf-8") == before
    from packer.verify import verify

    assert verify(tmp_path / "o").ok
    build(BuildConfig(inputs=(str(good),), **kw), progress=False)  # a later success clears the failed run's file
    assert not (tmp_path / "o.failed.rejects.jsonl").exists()
