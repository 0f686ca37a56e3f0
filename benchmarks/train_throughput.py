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
import dataclasses
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

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script: benchmarks/ holds its helpers
from chunked_step import attention_seconds, row_chunks, train_chunked  # noqa: E402

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


def profile(ds, cfg: TrainConfig, rows_per_chunk: int, warmup: int) -> None:
    """Profile the step after `warmup` steps: top ops by self CPU time, and that step's attention (forward +
    backward, every layer) timed alone on the same boundaries, as a share of the step."""
    mcfg = load_model_config(cfg.model, vocab_size=ds.vocab_size)
    backend, layout = attention_backend(cfg.attention, torch.device("cpu"))
    rows = rows_per_chunk or 1 << 30  # 0: every row in one forward, as train() does at --grad-accum 1
    recs, prof = train_chunked(dataclasses.replace(cfg, steps=warmup + 1), ds, rows, profile_step=warmup)
    order = PackOrder(len(ds), cfg.micro_batch_size, cfg.seed)
    for _ in range(warmup * cfg.grad_accum):
        order.next()
    packs = [ds[i] for _ in range(cfg.grad_accum) for i in order.next()]
    metas = [collate(c, cfg.seq_length, ds.pad_id, layout).meta for c in row_chunks(packs, layout, rows)]
    attn_s = mcfg.n_layers * sum(
        attention_seconds(m, backend, mcfg.n_heads, mcfg.n_kv_heads, mcfg.head_dim) for m in metas
    )
    step_s = recs[-1]["step_time_s"]
    print(
        f"\nprofile: {cfg.model} {cfg.attention} ({backend}), step {warmup + 1}: {step_s:.1f} s under the "
        f"profiler, {len(metas)} forward(s); attention alone (fwd+bwd, {mcfg.n_layers} layers, same "
        f"boundaries): {attn_s:.2f} s = {attn_s / step_s:.1%} of the step"
    )
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="tiny,small100m")
    ap.add_argument("--attention", default="varlen,blockwise,padded")
    ap.add_argument("--seq-length", type=int, default=2048)
    ap.add_argument("--micro-batch-size", type=str, default="tiny=4,small100m=1")
    ap.add_argument("--steps", type=str, default="tiny=4,small100m=2", help="measured steps per model")
    ap.add_argument("--warmup", type=str, default="tiny=1,small100m=1", help="warm-up steps per model")
    ap.add_argument(
        "--padded-rows-per-chunk", type=str, default="tiny=0,small100m=2",
        help="padded baseline: documents (rows) per forward, gradient accumulated over the step's chunks "
        "(benchmarks/chunked_step.py); 0: the trainer's own step, all rows in one forward",
    )  # fmt: skip
    ap.add_argument(
        "--profile", default="", help="MODEL:ATTENTION,...: profile one step after the warm-up of each "
        "(torch.profiler, top ops by self CPU time) and time its attention alone",
    )  # fmt: skip
    ap.add_argument("--data", default=None, help="an existing build prefix instead of building Alpaca")
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args()
    per_model = lambda s: dict(kv.split("=") for kv in s.split(","))  # noqa: E731
    mbs, steps, warmup = per_model(args.micro_batch_size), per_model(args.steps), per_model(args.warmup)
    chunk_rows = per_model(args.padded_rows_per_chunk)

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
                rows_per_chunk = int(chunk_rows.get(model, 0)) if choice == "padded" else 0
                t0 = time.perf_counter()
                if rows_per_chunk:  # the trainer's step, its rows fed a few at a time (bounded memory)
                    recs = train_chunked(cfg, ds, rows_per_chunk)[0][int(warmup[model]) :]
                else:
                    recs = train(cfg, dataset=ds)[int(warmup[model]) :]
                wall = time.perf_counter() - t0
                secs = sum(r["step_time_s"] for r in recs)
                rows.append({
                    "model": model, "attention": choice, "backend": backend, "rows_per_chunk": rows_per_chunk,
                    "step_times_s": [r["step_time_s"] for r in recs],
                    "tokens_per_s": sum(r["tokens"] for r in recs) / secs,
                    # on a shared machine the fastest step is the least disturbed one
                    "best_step_tokens_per_s": max(r["tokens"] / r["step_time_s"] for r in recs),
                    "processed_per_real": sum(r["processed_tokens"] for r in recs) / sum(r["tokens"] for r in recs),
                    "step_s": secs / len(recs), "attn_gflops_step": flops / 1e9,
                    "attn_useful_fraction": useful / flops, "loss_first": recs[0]["loss"], "wall_s": wall,
                })  # fmt: skip
                r = rows[-1]
                print(
                    f"  {model:9s} {choice:9s} {r['tokens_per_s']:9.0f} tok/s  {r['step_s']:7.2f} s/step  "
                    f"(steps {', '.join(f'{t:.1f}' for t in r['step_times_s'])} s; run {wall:.0f}s"
                    + (f"; {rows_per_chunk} rows per forward" if rows_per_chunk else "")
                    + ")",
                    flush=True,
                )

        for spec in filter(None, args.profile.split(",")):
            model, _, choice = spec.partition(":")
            if model not in mbs or choice not in ("varlen", "blockwise", "padded"):
                raise SystemExit(
                    f"--profile {spec!r}: give MODEL:ATTENTION with MODEL in --micro-batch-size "
                    f"({', '.join(mbs)}) and ATTENTION varlen, blockwise or padded"
                )
            cfg = TrainConfig(
                data=prefix, model=model, attention=choice, seq_length=args.seq_length,
                micro_batch_size=int(mbs[model]), steps=1, warmup_steps=1, device="cpu", progress=False,
            )  # fmt: skip
            rows_per_chunk = int(chunk_rows.get(model, 0)) if choice == "padded" else 0
            profile(ds, cfg, rows_per_chunk, int(warmup.get(model, 1)))

    print(
        f"\nseq {args.seq_length}, warm-up steps {args.warmup}, measured steps {args.steps}; "
        f"tokens/s counts real (non-pad) tokens"
    )
    head = (
        f"{'model':9s} {'attention':9s} {'backend':9s} {'real tok/s':>10s} {'vs varlen':>9s} "
        f"{'best step':>9s} {'vs varlen':>9s} {'processed/real':>14s} {'s/step':>7s} "
        f"{'attn GFLOP/step':>15s} {'in-doc':>7s}"
    )
    print(head + "\n" + "-" * len(head))
    for r in rows:
        base = next((x for x in rows if x["model"] == r["model"] and x["attention"] == "varlen"), None)

        def ratio(key: str, r=r, base=base) -> str:
            return f"{r[key] / base[key]:8.2f}x" if base else f"{'-':>9s}"

        print(
            f"{r['model']:9s} {r['attention']:9s} {r['backend']:9s} {r['tokens_per_s']:10.0f} "
            f"{ratio('tokens_per_s')} {r['best_step_tokens_per_s']:9.0f} {ratio('best_step_tokens_per_s')} "
            f"{r['processed_per_real']:14.2f} {r['step_s']:7.2f} {r['attn_gflops_step']:15.3f} "
            f"{r['attn_useful_fraction']:7.1%}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
