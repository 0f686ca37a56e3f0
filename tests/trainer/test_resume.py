"""Resume: the lr schedule a resumed run follows, which arguments must match (resolved), and the RNG state."""

import dataclasses
import random

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from packer.trainer import checkpoint
from packer.trainer.cli import train_command
from packer.trainer.train import Schedule, TrainConfig, _check_resumable, lr_at, train

from .conftest import FakePackedDataset

LR, MIN_LR, WARMUP = 1e-3, 1e-4, 2


def run(ds, **kw) -> list[dict]:
    kw = {"lr": LR, "min_lr": MIN_LR, "warmup_steps": WARMUP, **kw}
    return train(TrainConfig(data="unused", progress=False, **kw), dataset=ds)


def lrs(records) -> list[float]:
    return [r["lr"] for r in records]


def losses(records) -> list[float]:
    return [r["loss"] for r in records]


@pytest.fixture(scope="module")
def six_steps(tmp_path_factory):
    """A run planned for 6 steps, saved at 3 and 6: (its records, the save dir)."""
    ck = tmp_path_factory.mktemp("six") / "ck"
    return run(FakePackedDataset(n_packs=8), steps=6, micro_batch_size=2, save=str(ck), save_every=3), ck


# ---------------------------------------------------------------- the schedule of a resumed run


def test_more_steps_continue_the_saved_schedule(six_steps, tmp_path):
    """The issue: a run that ended at min_lr, resumed with a larger --steps, jumped back up the cosine."""
    full, ck = six_steps
    ds = FakePackedDataset(n_packs=8)
    assert full[-1]["lr"] > MIN_LR and lr_at(6, Schedule(LR, MIN_LR, WARMUP, 6)) == MIN_LR

    from_end = run(ds, steps=9, micro_batch_size=2, resume=str(ck / "step_000006"))
    assert [r["step"] for r in from_end] == [7, 8, 9]
    assert lrs(from_end) == [MIN_LR] * 3

    # From mid-run, the rest of the saved curve is followed exactly, then min_lr.
    from_mid = run(
        ds, steps=9, micro_batch_size=2, resume=str(ck / "step_000003"), save=str(tmp_path), save_every=4
    )
    assert lrs(from_mid) == lrs(full[3:]) + [MIN_LR] * 3
    assert losses(from_mid[:3]) == losses(full[3:])  # bit-exact continuation

    # Its checkpoints carry the 6-step curve on, not one planned from their run's --steps 9.
    again = run(ds, steps=9, micro_batch_size=2, resume=str(tmp_path / "step_000004"))
    assert lrs(again) == lrs(from_mid[1:]) and losses(again) == losses(from_mid[1:])


def test_new_schedule_follows_the_flags_and_is_saved(six_steps, tmp_path):
    _, ck = six_steps
    ds = FakePackedDataset(n_packs=8)
    new = Schedule(lr=2e-3, min_lr=MIN_LR, warmup_steps=WARMUP, steps=9)
    kw = {"micro_batch_size": 2, "lr": new.lr}
    replanned = run(ds, steps=9, resume=str(ck / "step_000003"), new_schedule=True, save=str(tmp_path), **kw)
    assert lrs(replanned) == [lr_at(s, new) for s in range(3, 9)]  # as if planned for 9 steps at 2e-3

    # The checkpoint holds the new curve: the next resume continues it (at min_lr) without --new-schedule.
    assert lrs(run(ds, steps=11, resume=str(tmp_path), **kw)) == [MIN_LR] * 2
    with pytest.raises(ValueError, match=r"--lr: 0.002 -> 0.001 \(pass --lr 0.002, or --new-schedule"):
        run(ds, steps=11, resume=str(tmp_path), micro_batch_size=2)


def test_new_schedule_needs_resume():
    with pytest.raises(ValueError, match="--new-schedule .* needs --resume"):
        TrainConfig(data="x", new_schedule=True)


# ---------------------------------------------------------------- what must match, after resolving defaults


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"lr": 2e-3}, "--lr: 0.001 -> 0.002 (pass --lr 0.001, or --new-schedule"),
        ({"min_lr": 0.0}, "--min-lr: 0.0001 -> 0.0 (pass --min-lr 0.0001, or --new-schedule"),
        ({"warmup_steps": 5}, "--warmup-steps: 2 -> 5 (pass --warmup-steps 2, or --new-schedule"),
        ({"weight_decay": 0.0}, "--weight-decay: 0.1 -> 0.0 (pass --weight-decay 0.1)"),
        ({"grad_clip": 0.5}, "--grad-clip: 1.0 -> 0.5 (pass --grad-clip 1.0)"),
        ({"dtype": "bf16"}, "--dtype: fp32 -> bf16 (pass --dtype fp32)"),
        ({"loss_average": "sample"}, "--loss-average: token -> sample (pass --loss-average token)"),
        ({"micro_batch_size": 1}, "--micro-batch-size: 2 -> 1 (pass --micro-batch-size 2)"),
        ({"grad_accum": 2}, "--grad-accum: 1 -> 2 (pass --grad-accum 1)"),
        ({"seed": 7}, "--seed: 1234 -> 7 (pass --seed 1234)"),
        ({"attention": "blockwise"}, "--attention: varlen -> blockwise (pass --attention varlen)"),
        ({"seq_length": 64}, "--seq-length: 32 -> 64 (pass --seq-length 32)"),
    ],
)
def test_a_differing_argument_is_named_with_its_fix(six_steps, change, named):
    _, ck = six_steps
    with pytest.raises(ValueError) as e:
        run(FakePackedDataset(n_packs=8), **{"steps": 7, "micro_batch_size": 2, **change}, resume=str(ck))
    assert named in str(e.value) and str(e.value).count(" -> ") == 1, str(e.value)


def test_every_difference_is_named_at_once():
    saved = {"lr": 1e-3, "dtype": "fp32", "world_size": 2, "model_config": {"dim": 64, "n_layers": 2}}
    now = {"lr": 1e-3, "dtype": "bf16", "world_size": 1, "model_config": {"dim": 64, "n_layers": 4}}
    with pytest.raises(ValueError) as e:
        _check_resumable(saved, now)
    msg = str(e.value)
    assert "--dtype: fp32 -> bf16" in msg and "--lr" not in msg
    assert "ranks: 2 -> 1 (run 2 processes: torchrun --nproc-per-node 2)" in msg
    assert "model config n_layers: 2 -> 4" in msg


def test_the_same_value_given_or_defaulted_resumes(six_steps, tmp_path):
    """seq_length None (the data's 32) and 32 are one value; so is a checkpoint that stored None."""
    full, ck = six_steps
    ds = FakePackedDataset(n_packs=8)
    explicit = run(ds, steps=4, micro_batch_size=2, seq_length=32, resume=str(ck / "step_000003"))
    assert losses(explicit) == losses(full[3:4])

    # A checkpoint as written before this change: unresolved seq_length, no betas/eps, no saved schedule.
    old = checkpoint.load(ck / "step_000003").state
    old["args"] = {k: v for k, v in old["args"].items() if k not in ("betas", "eps")} | {"seq_length": None}
    old["scheduler"] = {"step": 3}
    checkpoint.save(tmp_path, 3, old)
    for seq_length in (None, 32):
        again = run(ds, steps=6, micro_batch_size=2, seq_length=seq_length, resume=str(tmp_path))
        assert losses(again) == losses(full[3:]) and lrs(again) == lrs(full[3:])


def test_cli_refusal_names_a_flag_that_works(tiny_build, tmp_path):
    data = tiny_build("a", seed=0)

    def cli(*args):
        return CliRunner().invoke(train_command, ["--data", data, "--no-progress", "--device", "cpu", *args])

    assert cli("--steps", "2", "--warmup-steps", "1", "--save", str(tmp_path)).exit_code == 0
    resume = ["--steps", "4", "--warmup-steps", "1", "--resume", str(tmp_path)]
    refused = cli(*resume, "--lr", "1e-3")
    assert refused.exit_code == 1 and refused.output.count("\n") == 1, refused.output
    assert "--lr: 0.0003 -> 0.001 (pass --lr 0.0003, or --new-schedule" in refused.output
    assert cli(*resume, "--lr", "0.0003").exit_code == 0
    replanned = cli(*resume, "--lr", "1e-3", "--new-schedule")
    assert replanned.exit_code == 0, replanned.output


# ---------------------------------------------------------------- RNG


class NoisyDataset(FakePackedDataset):
    """Packs with a few tokens replaced at random, drawn from the global python, numpy and torch RNGs as data
    augmentation or dropout would: a resume that does not restore the RNGs trains on other tokens."""

    def __getitem__(self, i: int):
        pack = self.packs[i]
        n = random.randint(1, 4)
        where = np.random.randint(0, len(pack.ids), n)
        ids = pack.ids.copy()
        ids[where] = torch.randint(0, self.vocab_size - 1, (n,)).numpy()
        return dataclasses.replace(pack, ids=ids)


def test_rng_is_restored_on_resume(tmp_path, monkeypatch):
    ds = NoisyDataset(n_packs=8)
    full = run(ds, steps=6, micro_batch_size=2, save=str(tmp_path), save_every=3)
    rest = run(ds, steps=6, micro_batch_size=2, resume=str(tmp_path / "step_000003"))
    assert losses(rest) == losses(full[3:])  # bit-exact

    # The test has teeth: without restoring the RNGs the resumed steps draw other noise.
    monkeypatch.setattr(checkpoint, "set_rng_state", lambda state: None)
    unrestored = run(ds, steps=6, micro_batch_size=2, resume=str(tmp_path / "step_000003"))
    assert all(a != b for a, b in zip(losses(unrestored), losses(full[3:]), strict=True))
