"""`packer train` / `python -m packer.trainer`: flags -> TrainConfig -> train(). Runs under torchrun for DDP."""

from __future__ import annotations

import os

import click

from packer.trainer.train import TrainConfig, train


@click.command("train")
@click.option("--data", required=True, help="Output prefix of `packer build` (PREFIX.bin/.idx/.json).")
@click.option(
    "--model",
    default="tiny",
    show_default=True,
    help="Preset (tiny, small100m), JSON config, or a Hugging Face model directory (config.json + safetensors; "
    "llama, qwen2, qwen3, mistral) whose weights training starts from.",
)
@click.option("--seq-length", type=int, default=None, help="Row length S; default: the data's seq_length.")
@click.option("--micro-batch-size", type=int, default=1, show_default=True, help="Packs per micro-batch (B).")
@click.option("--steps", type=int, required=True, help="Optimizer steps to reach (counting resumed ones).")
@click.option("--lr", type=float, default=3e-4, show_default=True)
@click.option("--min-lr", type=float, default=3e-5, show_default=True)
@click.option("--warmup-steps", type=int, default=10, show_default=True)
@click.option("--weight-decay", type=float, default=0.1, show_default=True)
@click.option("--grad-clip", type=float, default=1.0, show_default=True, help="0 disables clipping.")
@click.option("--grad-accum", type=int, default=1, show_default=True, help="Micro-batches per step per rank.")
@click.option(
    "--context-parallel-size",
    type=int,
    default=1,
    show_default=True,
    help="CP ranks per data-parallel replica: ring attention, each document cut into 2N chunks (zigzag). "
    "Needs data built with `packer build --cp-size N`; ranks = DP x CP under torchrun.",
)
@click.option(
    "--balance-attention",
    is_flag=True,
    help="Data order that balances each step's attention cost (sum of squared document lengths) across "
    "data-parallel ranks: windows of 32 steps re-dealt so the slowest rank waits less (packer.balance).",
)
@click.option(
    "--attention",
    type=click.Choice(["varlen", "blockwise", "padded"]),
    default="varlen",
    show_default=True,
    help="varlen/blockwise: packed rows; padded: one document per row (baseline).",
)
@click.option(
    "--npu-sparse-mode",
    type=click.Choice(["4", "3"]),
    default="4",
    show_default=True,
    callback=lambda _ctx, _param, value: int(value),
    help="npu_fusion_attention sparse_mode: 4 band (MindSpeed-LLM), 3 rightDownCausal (transformers, XTuner).",
)
@click.option(
    "--device", type=click.Choice(["auto", "cpu", "cuda", "npu"]), default="auto", show_default=True
)
@click.option(
    "--dtype",
    type=click.Choice(["fp32", "bf16"]),
    default="fp32",
    show_default=True,
    help="bf16 runs the model under torch.autocast.",
)
@click.option(
    "--loss-average",
    type=click.Choice(["token", "sample"]),
    default="token",
    show_default=True,
    help="token: mean over targets; sample: mean over documents of each one's token mean.",
)
@click.option("--save", type=click.Path(file_okay=False), default=None, help="Checkpoint directory.")
@click.option("--save-every", type=int, default=0, show_default=True, help="0: only at the end.")
@click.option(
    "--save-hf",
    type=click.Path(file_okay=False),
    default=None,
    help="At the end, write a Hugging Face model directory (config.json, safetensors, the data's tokenizer).",
)
@click.option(
    "--resume",
    type=click.Path(exists=True),
    default=None,
    help="A --save directory (its newest intact checkpoint) or one step_NNNNNN directory.",
)
@click.option(
    "--allow-data-change",
    is_flag=True,
    help="Resume even though the data's checksums differ from the checkpoint's (rebuilt or other data).",
)
@click.option(
    "--new-schedule",
    is_flag=True,
    help="On --resume, follow the lr schedule of this run's --lr/--min-lr/--warmup-steps/--steps "
    "instead of continuing the checkpoint's.",
)
@click.option("--log-jsonl", type=click.Path(dir_okay=False), default=None, help="One JSON line per step.")
@click.option("--seed", type=int, default=1234, show_default=True)
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
def train_command(no_progress: bool, **kwargs) -> None:
    """Train a Llama-style model on packed data with document-bounded (varlen) attention."""
    try:
        cfg = TrainConfig(progress=not no_progress, **kwargs)
        logs = train(cfg)
    except (ValueError, OSError) as e:  # bad arguments, data or checkpoints (CheckpointError), disk errors
        raise click.ClickException(str(e)) from e
    if logs and os.environ.get("RANK", "0") == "0":
        last = logs[-1]
        click.echo(f"step {last['step']}: loss {last['loss']:.4f}, {last['tokens_per_s']:,.0f} tokens/s", err=True)
