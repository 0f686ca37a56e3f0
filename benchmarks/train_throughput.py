"""Training throughput of packed varlen attention vs blockwise vs the padded baseline, on real Alpaca packs.

    python benchmarks/train_throughput.py                    # tiny + small100m, seq 1024, CPU
    python benchmarks/train_throughput.py --models tiny --seq-length 2048 --steps 8

Builds stanford_alpaca_pr152_alpaca_5000.json with `packer build` (GPT-2 tokenizer) into a temp dir, then
runs the real trainer (`trainer.train.train`) for each (model, attention) and reports REAL tokens/s
(non-pad tokens trained per second, averaged over the steps after warm-up), the tokens the model actually
processed (padding included), and the attention FLOPs per step (forward, all layers) from
trainer.attention.attention_flops, next to the FLOPs that fall inside documents.

All three read the same packs in the same order, so they train on the same documents and targets:
  varlen     one pack per row, attention bounded by documents (reference kernel on CPU)
  blockwise  one pack per row, block-sparse attention that skips blocks sharing no document
  padded     one DOCUMENT per row of S tokens: more rows for the same documents (the usual baseline)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from packer.dataset import PackedDataset
from packer.trainer.attention import attention_flops
from packer.trainer.batching import PackOrder, collate
from packer.trainer.model import load_model_config
from packer.trainer.train import TrainConfig, attention_backend, train

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
ALPACA = SHARED / "alpaca" / "stanford_alpaca_pr152_alpaca_5000.json"
GPT2 = SHARED / "tokenizers" / "gpt2" / "tokenizer.json"


def build(out: Path, seq_length: int) -> str:
    prefix = out / f"alpaca_{seq_length}"
    cmd = [
        sys.executable, "-m", "packer.cli", "build", "--handler", "alpaca", "--input", str(ALPACA),
        "--tokenizer", str(GPT2), "--seq-length", str(seq_length), "--output-prefix", str(prefix), "--on-error", "skip", "-q",
    ]  # fmt: skip
    subprocess.run(cmd, check=True)
    return str(prefix)


def step_flops(ds, cfg: TrainConfig, layout: str, backend: str, mcfg, skip: int, steps: int):
    """Attention forward FLOPs per measured step, all layers: (computed by the kernel, inside documents)."""
    order = PackOrder(len(ds), cfg.micro_batch_size, cfg.seed)
    for _ in range(skip * cfg.grad_accum):
        order.next()  # the warm-up steps' packs
    computed = useful = 0
    for _ in range(steps * cfg.grad_accum):
        packs = [ds[i] for i in order.next()]
        mb = collate(packs, cfg.seq_length, ds.pad_id, layout)
        computed += attention_flops(mb.meta, backend, mcfg.n_heads, mcfg.head_dim)["flops_computed"]
        doc_pairs = sum(int(n) * (int(n) + 1) // 2 for p in packs for n in p.doc_lens)
        useful += doc_pairs * 4 * mcfg.head_dim * mcfg.n_heads
    return computed * mcfg.n_layers / steps, useful * mcfg.n_layers / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="tiny,small100m")
    ap.add_argument("--attention", default="varlen,blockwise,padded")
    ap.add_argument("--seq-length", type=int, default=1024)
    ap.add_argument("--micro-batch-size", type=str, default="tiny=4,small100m=1")
    ap.add_argument("--steps", type=str, default="tiny=5,small100m=1", help="measured steps per model")
    ap.add_argument("--warmup", type=str, default="tiny=1,small100m=0", help="warm-up steps per model")
    ap.add_argument("--data", default=None, help="an existing build prefix instead of building Alpaca")
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args()
    per_model = lambda s: dict(kv.split("=") for kv in s.split(","))  # noqa: E731
    mbs, steps, warmup = per_model(args.micro_batch_size), per_model(args.steps), per_model(args.warmup)

    with tempfile.TemporaryDirectory() as tmp:
        prefix = args.data or build(Path(tmp), args.seq_length)
        ds = PackedDataset(prefix)
        print(
            f"data: {len(ds)} packs of <= {ds.seq_length} tokens, vocab {ds.vocab_size}; "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads, device cpu"
        )
        rows = []
        for model in args.models.split(","):
            mcfg = load_model_config(model, vocab_size=ds.vocab_size)
            for choice in args.attention.split(","):
                cfg = TrainConfig(
                    data=prefix, model=model, attention=choice, seq_length=args.seq_length,
                    micro_batch_size=int(mbs[model]),
                    steps=int(warmup[model]) + int(steps[model]), warmup_steps=1, device="cpu", progress=False,
                )  # fmt: skip
                backend, layout = attention_backend(choice, torch.device("cpu"))
                flops, useful = step_flops(
                    ds, cfg, layout, backend, mcfg, int(warmup[model]), int(steps[model])
                )
                t0 = time.perf_counter()
                recs = train(cfg, dataset=ds)[int(warmup[model]) :]
                wall = time.perf_counter() - t0
                secs = sum(r["step_time_s"] for r in recs)
                rows.append({
                    "model": model, "attention": choice, "backend": backend,
                    "tokens_per_s": sum(r["tokens"] for r in recs) / secs,
                    "processed_per_real": sum(r["processed_tokens"] for r in recs) / sum(r["tokens"] for r in recs),
                    "step_s": secs / len(recs), "attn_gflops_step": flops / 1e9,
                    "attn_useful_fraction": useful / flops, "loss_first": recs[0]["loss"], "wall_s": wall,
                })  # fmt: skip
                r = rows[-1]
                print(
                    f"  {model:9s} {choice:9s} {r['tokens_per_s']:9.0f} tok/s  {r['step_s']:7.2f} s/step  "
                    f"(run {wall:.0f}s)",
                    flush=True,
                )

    print(
        f"\nseq {args.seq_length}, warm-up steps {args.warmup}, measured steps {args.steps}; "
        f"tokens/s counts real (non-pad) tokens"
    )
    head = (
        f"{'model':9s} {'attention':9s} {'backend':9s} {'real tok/s':>10s} {'vs varlen':>9s} "
        f"{'processed/real':>14s} {'s/step':>7s} {'attn GFLOP/step':>15s} {'in-doc':>7s}"
    )
    print(head + "\n" + "-" * len(head))
    for r in rows:
        base = [x for x in rows if x["model"] == r["model"] and x["attention"] == "varlen"]
        speedup = f"{r['tokens_per_s'] / base[0]['tokens_per_s']:8.2f}x" if base else f"{'-':>9s}"
        print(
            f"{r['model']:9s} {r['attention']:9s} {r['backend']:9s} {r['tokens_per_s']:10.0f} "
            f"{speedup} {r['processed_per_real']:14.2f} "
            f"{r['step_s']:7.2f} {r['attn_gflops_step']:15.3f} {r['attn_useful_fraction']:7.1%}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
