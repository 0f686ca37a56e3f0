"""Checkpoints: checksums checked on load, fallback over broken ones, exclusive saves, the data fingerprint."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from packer.trainer import checkpoint
from packer.trainer.checkpoint import CheckpointError
from packer.trainer.cli import train_command
from packer.trainer.train import TrainConfig, train

WEIGHTS = torch.arange(4096, dtype=torch.float32)  # 16 KiB of tensor bytes to corrupt


def save_steps(save_dir: Path, *steps: int) -> None:
    for s in steps:
        checkpoint.save(save_dir, s, {"step": s, "w": WEIGHTS + s})


def state_file(save_dir: Path, step: int) -> Path:
    return checkpoint.step_dir(save_dir, step) / checkpoint.STATE_FILE


def flip_bytes(path: Path, at: int | None = None, n: int = 64) -> None:
    """Invert n bytes (default: mid-file), as a bad disk or copy would."""
    blob = bytearray(path.read_bytes())
    at = len(blob) // 2 if at is None else at
    blob[at : at + n] = bytes(b ^ 0xFF for b in blob[at : at + n])
    path.write_bytes(bytes(blob))


def flip_weight_bytes(path: Path, step: int) -> None:
    """Flip bytes inside the tensor data, away from the zip headers, so torch.load still succeeds."""
    at = path.read_bytes().find((WEIGHTS + step).numpy().tobytes()[:64])
    assert at >= 0, "tensor bytes not found in the checkpoint"
    flip_bytes(path, at + 1024)


# ---------------------------------------------------------------- checks on load


def test_flipped_bytes_are_refused_though_torch_would_load_them(tmp_path):
    save_steps(tmp_path, 1)
    flip_weight_bytes(state_file(tmp_path, 1), 1)
    silently = torch.load(state_file(tmp_path, 1), weights_only=True)  # what loading did before checksums
    assert not torch.equal(silently["w"], WEIGHTS + 1)
    with pytest.raises(CheckpointError, match=r"step_000001/state.pt: sha256 differs from checksums.json"):
        checkpoint.load(tmp_path / "step_000001")


@pytest.mark.parametrize(
    ("keep", "check"),
    [(0.5, r"state.pt: \d+ bytes, checksums.json says \d+ \(truncated\)"), (0, r"0 bytes.*\(empty\)")],
)
def test_truncated_and_empty_state_files_are_refused(tmp_path, keep, check):
    save_steps(tmp_path, 1)
    path = state_file(tmp_path, 1)
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * keep)])
    with pytest.raises(CheckpointError, match=check):
        checkpoint.load(tmp_path / "step_000001")


def test_missing_or_broken_checksums_file_is_refused(tmp_path):
    save_steps(tmp_path, 1, 2)
    (checkpoint.step_dir(tmp_path, 1) / "checksums.json").unlink()
    with pytest.raises(
        CheckpointError, match=r"step_000001/checksums.json: missing, so .*state.pt cannot be"
    ):
        checkpoint.load(tmp_path / "step_000001")
    (checkpoint.step_dir(tmp_path, 2) / "checksums.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"step_000002/checksums.json: unreadable \(JSONDecodeError"):
        checkpoint.load(tmp_path / "step_000002")


def test_save_dir_falls_back_to_the_newest_intact_checkpoint(tmp_path):
    save_steps(tmp_path, 1, 2, 3)
    flip_weight_bytes(state_file(tmp_path, 3), 3)
    state_file(tmp_path, 2).write_bytes(b"")
    loaded = checkpoint.load(tmp_path)
    assert loaded.path.name == "step_000001" and torch.equal(loaded.state["w"], WEIGHTS + 1)
    assert len(loaded.skipped) == 2
    assert "step_000003/state.pt: sha256 differs" in loaded.skipped[0]
    assert "step_000002/state.pt: 0 bytes" in loaded.skipped[1]
    with pytest.raises(CheckpointError, match="step_000003"):  # named explicitly: no fallback
        checkpoint.load(tmp_path / "step_000003")
    state_file(tmp_path, 1).unlink()
    with pytest.raises(CheckpointError, match=r"no checkpoint passes its checks: .*000003.*000002.*000001"):
        checkpoint.load(tmp_path)


def test_latest_ignores_partial_saves(tmp_path):
    save_steps(tmp_path, 2, 10)
    (tmp_path / ".tmp_step_000020.abc").mkdir()  # a crash mid-save
    (tmp_path / "step_000030").mkdir()  # not a checkpoint: neither file
    assert checkpoint.latest(tmp_path).name == "step_000010"
    assert checkpoint.load(tmp_path).path.name == "step_000010"
    assert checkpoint.load(tmp_path / "step_000002").state["step"] == 2
    with pytest.raises(FileNotFoundError, match="--resume"):
        checkpoint.load(tmp_path / "step_000030")


# ---------------------------------------------------------------- saving


def test_planted_names_neither_block_nor_redirect_a_save(tmp_path):
    save_dir, victim = tmp_path / "ck", tmp_path / "victim"
    save_dir.mkdir()
    victim.mkdir()
    (victim / "keep.txt").write_text("precious")
    (save_dir / ".tmp_step_000001").symlink_to(victim)  # the name saves used before mkdtemp
    (save_dir / ".tmp_step_000002").write_text("planted")  # a file there made the old save's mkdir fail
    (save_dir / ".tmp_step_000002.x").write_text("planted")
    (save_dir / "step_000003").symlink_to(victim)  # the final name: the old save's rmtree refused a link
    save_steps(save_dir, 1, 2, 3)
    assert [p.name for p in checkpoint.checkpoints(save_dir)] == ["step_000003", "step_000002", "step_000001"]
    assert not (save_dir / "step_000003").is_symlink()
    assert checkpoint.load(save_dir / "step_000001").state["step"] == 1
    assert sorted(p.name for p in victim.iterdir()) == ["keep.txt"]  # nothing written through the link
    assert (victim / "keep.txt").read_text() == "precious"
    assert not (save_dir / ".tmp_step_000001").is_symlink()  # the link itself was removed
    assert (save_dir / ".tmp_step_000002").read_text() == "planted"  # plain files are not ours: left


def test_stale_temp_dirs_are_removed_without_following_links(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "data.bin").write_text("x")
    save_dir = tmp_path / "ck"
    stale = save_dir / ".tmp_step_000007.k2j3"  # left by a run that died mid-save
    stale.mkdir(parents=True)
    (stale / "state.pt").write_bytes(b"half")
    (stale / "link").symlink_to(outside)
    (save_dir / ".tmp_step_000008.zz").symlink_to(outside)
    (save_dir / "notes").mkdir()  # not our prefix
    save_steps(save_dir, 9)
    assert sorted(p.name for p in save_dir.iterdir()) == ["notes", "step_000009"]
    assert (outside / "data.bin").read_text() == "x"


def test_save_fsyncs_state_then_checksums_then_dirs(tmp_path, monkeypatch):
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to name the fsynced file descriptors")
    synced, real_fsync = [], os.fsync

    def recording_fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    save_steps(tmp_path, 5)
    tmp = Path(synced[0]).parent
    assert tmp.parent == tmp_path and tmp.name.startswith(".tmp_step_000005.")
    # the files in the temporary directory, it before the rename, its parent after
    assert synced == [str(tmp / "state.pt"), str(tmp / "checksums.json"), str(tmp), str(tmp_path)]
    sums = json.loads((checkpoint.step_dir(tmp_path, 5) / "checksums.json").read_text())
    assert sums["files"]["state.pt"]["bytes"] == state_file(tmp_path, 5).stat().st_size


# ---------------------------------------------------------------- through the trainer and its CLI


def cli(*args: str):
    return CliRunner().invoke(train_command, [*args, "--no-progress", "--device", "cpu"])


def test_cli_resume_falls_back_or_fails_in_one_line(tiny_build, tmp_path):
    data = tiny_build("a", seed=0)
    common = ["--data", data, "--warmup-steps", "1"]
    assert cli(*common, "--steps", "2", "--save", str(tmp_path), "--save-every", "1").exit_code == 0
    flip_bytes(state_file(tmp_path, 2))

    ok = cli(*common, "--steps", "3", "--resume", str(tmp_path))
    assert ok.exit_code == 0, ok.output
    notes = [line for line in ok.stderr.splitlines() if line.startswith("--resume")]
    assert notes == [
        f"--resume: skipped {state_file(tmp_path, 2)}: sha256 differs from checksums.json (the file is corrupt); "
        f"resuming from {checkpoint.step_dir(tmp_path, 1)}"
    ]

    for broken in ("flipped", "empty"):
        if broken == "empty":
            state_file(tmp_path, 2).write_bytes(b"")  # torch.load raised EOFError: click printed "Aborted!"
        bad = cli(*common, "--steps", "3", "--resume", str(checkpoint.step_dir(tmp_path, 2)))
        assert bad.exit_code == 1 and isinstance(bad.exception, SystemExit), bad.output
        assert bad.output.count("\n") == 1 and bad.output.startswith(f"Error: {state_file(tmp_path, 2)}: ")
        assert "Traceback" not in bad.output and "Aborted" not in bad.output


def test_resume_on_other_data_is_refused_unless_allowed(tiny_build, tmp_path):
    a, b = tiny_build("a", seed=0), tiny_build("b", seed=1)  # same tokenizer, other corpus
    assert cli("--data", a, "--steps", "2", "--save", str(tmp_path)).exit_code == 0

    refused = cli("--data", b, "--steps", "3", "--resume", str(tmp_path))
    assert refused.exit_code == 1 and refused.output.count("\n") == 1, refused.output
    assert (
        "the data's content differs from the checkpoint's (sha256 of .bin, .idx, _loss_mask.bin"
        in refused.output
    )
    assert "pass --allow-data-change" in refused.output

    allowed = cli("--data", b, "--steps", "3", "--resume", str(tmp_path), "--allow-data-change")
    assert allowed.exit_code == 0, allowed.output
    notes = [line for line in allowed.stderr.splitlines() if line.startswith("--resume")]
    assert len(notes) == 1 and notes[0].endswith("continuing on it (--allow-data-change)")


def test_resume_on_a_moved_copy_of_the_data_equals_uninterrupted(tiny_build, tmp_path):
    """The fingerprint is the content (sha256 per file), not the path: a renamed copy resumes exactly."""
    data = tiny_build("a", seed=0)
    copy = tmp_path / "moved" / "renamed"
    copy.parent.mkdir()
    for suffix in (".bin", ".idx", "_loss_mask.bin", "_loss_mask.idx", ".json"):
        shutil.copy(data + suffix, f"{copy}{suffix}")
    manifest = json.loads(Path(f"{copy}.json").read_text())
    manifest["files"] = {k.replace("a", "renamed", 1): v for k, v in manifest["files"].items()}
    Path(f"{copy}.json").write_text(json.dumps(manifest))

    def run(prefix, **kw):
        cfg = TrainConfig(
            data=str(prefix), device="cpu", progress=False, warmup_steps=1, micro_batch_size=2, **kw
        )
        return [r["loss"] for r in train(cfg)]

    full = run(data, steps=4, save=str(tmp_path / "ck"), save_every=2)
    rest = run(copy, steps=4, resume=str(tmp_path / "ck" / "step_000002"))
    assert rest == full[2:]
