import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from packer.trainer.cli import train_command
from packer.trainer.train import TrainConfig, lr_at, train

from .conftest import FakePackedDataset


def run(ds, **kw) -> list[dict]:
    cfg = TrainConfig(data="unused", progress=False, warmup_steps=2, lr=1e-3, **kw)
    return train(cfg, dataset=ds)


def losses(records) -> list[float]:
    return [r["loss"] for r in records]


def test_lr_schedule():
    cfg = TrainConfig(data="x", steps=110, warmup_steps=10, lr=1.0, min_lr=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55)
    assert lr_at(110, cfg) == pytest.approx(0.1)


def test_resume_equals_uninterrupted(tmp_path):
    """A 6-step run saved at step 3 (as if stopped there) and resumed == the same run in one go."""
    ds = FakePackedDataset(n_packs=5, seq_length=32)  # 2 packs/step: the resumed run crosses an epoch
    full = run(ds, steps=6, micro_batch_size=2, grad_accum=1, save=str(tmp_path / "ck"), save_every=3)
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["step_000003", "step_000006"]
    rest = run(ds, steps=6, micro_batch_size=2, resume=str(tmp_path / "ck" / "step_000003"))
    assert [r["step"] for r in rest] == [4, 5, 6]
    assert losses(rest) == losses(full[3:])
    assert [r["grad_norm"] for r in rest] == [r["grad_norm"] for r in full[3:]]
    assert [r["lr"] for r in rest] == [r["lr"] for r in full[3:]]


def test_resume_refuses_other_arguments(tmp_path):
    ds = FakePackedDataset(n_packs=4)
    run(ds, steps=1, save=str(tmp_path))
    with pytest.raises(ValueError, match="--micro-batch-size: 1 -> 2"):
        run(ds, steps=2, micro_batch_size=2, resume=str(tmp_path / "step_000001"))


def test_grad_accum_equals_bigger_micro_batch():
    """Token-mean over the whole step: 1 x 4 packs == 2 micro-batches x 2 packs == 4 x 1."""
    ds = FakePackedDataset(n_packs=8)
    a = run(ds, steps=2, micro_batch_size=4)
    b = run(ds, steps=2, micro_batch_size=2, grad_accum=2)
    c = run(ds, steps=2, micro_batch_size=1, grad_accum=4, loss_average="token")
    for x, y in [(a, b), (a, c)]:
        assert losses(x) == pytest.approx(losses(y), abs=1e-5)
        assert [r["tokens"] for r in x] == [r["tokens"] for r in y]


@pytest.mark.parametrize("attention", ["blockwise", "padded"])
def test_attention_choices_train_the_same_tokens(attention):
    ds = FakePackedDataset(n_packs=4)
    ref = run(ds, steps=2, micro_batch_size=2)
    other = run(ds, steps=2, micro_batch_size=2, attention=attention)
    # same documents, same targets -> same loss; padded only processes more (pad) tokens
    assert losses(other) == pytest.approx(losses(ref), abs=1e-4)
    assert [r["tokens"] for r in other] == [r["tokens"] for r in ref]
    if attention == "padded":
        assert all(o["processed_tokens"] > r["processed_tokens"] for o, r in zip(other, ref, strict=True))


def test_sample_average_and_bf16_run():
    ds = FakePackedDataset(n_packs=4)
    recs = run(ds, steps=2, micro_batch_size=2, loss_average="sample", dtype="bf16")
    assert all(math.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in recs)


# ---------------------------------------------------------------- real packed Alpaca, through the CLI


def cli(*args: str) -> None:
    result = CliRunner().invoke(train_command, [*args, "--no-progress", "--device", "cpu"])
    assert result.exit_code == 0, result.output + repr(result.exception)


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_cli_training_lowers_loss(alpaca_prefix, tmp_path):
    log = tmp_path / "log.jsonl"
    cli(
        "--data", alpaca_prefix, "--model", "tiny", "--micro-batch-size", "1", "--steps", "15",
        "--lr", "1e-2", "--warmup-steps", "2", "--log-jsonl", str(log),
    )  # fmt: skip
    recs = read_log(log)
    assert [r["step"] for r in recs] == list(range(1, 16))
    assert {"step", "loss", "tokens", "tokens_per_s", "lr", "grad_norm"} <= recs[0].keys()
    assert recs[0]["loss"] == pytest.approx(math.log(50257), abs=0.1)  # starts at uniform over GPT-2's vocab
    first, last = sum(losses(recs[:3])) / 3, sum(losses(recs[-3:])) / 3
    assert last < first - 1.5, (first, last)


def test_cli_resume_equals_uninterrupted(alpaca_prefix, tmp_path):
    common = ["--data", alpaca_prefix, "--micro-batch-size", "1", "--lr", "3e-3", "--warmup-steps", "2"]
    ck = tmp_path / "ck"
    cli(*common, "--steps", "6", "--save", str(ck), "--save-every", "2", "--log-jsonl", str(tmp_path / "a.jsonl"))  # fmt: skip
    assert sorted(p.name for p in ck.iterdir()) == ["step_000002", "step_000004", "step_000006"]
    for later in ("step_000004", "step_000006"):  # as if the run had been stopped during step 3
        shutil.rmtree(ck / later)
    cli(*common, "--steps", "6", "--resume", str(ck), "--log-jsonl", str(tmp_path / "b.jsonl"))
    full, resumed = read_log(tmp_path / "a.jsonl"), read_log(tmp_path / "b.jsonl")
    assert [r["step"] for r in resumed] == [3, 4, 5, 6]
    assert losses(resumed) == pytest.approx(losses(full[2:]), abs=1e-6)
    assert [r["lr"] for r in resumed] == [r["lr"] for r in full[2:]]


def test_torchrun_two_ranks(alpaca_prefix, tmp_path):
    """2 CPU ranks x 1 pack read packs (0, 1), (2, 3), ... of the shuffle: the same steps as 1 rank x 2."""
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    log = tmp_path / "ddp.jsonl"
    args = ["--data", alpaca_prefix, "--steps", "3", "--device", "cpu", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            torchrun,
            "--nproc-per-node",
            "2",
            "--standalone",
            "-m",
            "packer.trainer",
            *args,
            "--micro-batch-size",
            "1",
            "--log-jsonl",
            str(log),
            "--save",
            str(tmp_path / "ck"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ddp = read_log(log)
    assert [r["step"] for r in ddp] == [1, 2, 3]
    assert (tmp_path / "ck" / "step_000003" / "state.pt").is_file()
    single = tmp_path / "single.jsonl"
    cli(*args[:-3], "--micro-batch-size", "2", "--log-jsonl", str(single))
    one = read_log(single)
    assert [r["tokens"] for r in ddp] == [r["tokens"] for r in one]
    assert losses(ddp) == pytest.approx(losses(one), abs=1e-4)
    assert [r["grad_norm"] for r in ddp] == pytest.approx([r["grad_norm"] for r in one], rel=1e-4)
    assert torch.isfinite(torch.tensor(losses(ddp))).all()


def test_cli_errors_name_the_fix(alpaca_prefix):
    result = CliRunner().invoke(train_command, ["--data", alpaca_prefix, "--steps", "1", "--model", "huge"])
    assert result.exit_code != 0 and "neither a preset" in result.output
    result = CliRunner().invoke(
        train_command, ["--data", alpaca_prefix, "--steps", "1", "--seq-length", "64"]
    )
    assert result.exit_code != 0 and "--seq-length" in result.output
