"""Training throughput of packed varlen attention vs blockwise vs the padded baseline, on real Alpaca packs.

    python benchmarks/train_throughput.py --models small100m --profile small100m:varlen
    python benchmarks/train_throughput.py --models tiny
    python benchmarks/train_throughput.py --models tiny --seq-length 1024 --steps tiny=8 --threads 2

Builds stanford_alpaca_pr152_alpaca_5000.json with `packer build` (GPT-2 tokenizer, seq 2048: 277 packs of
~18 documents) into a temp dir, then runs train.py's optimizer step (benchmarks/chunked_step.py, tested equal
to `train()`) for each (model, attention) after one untimed warm-up pass, and reports REAL tokens/s (non-pad
tokens trained per second over the measured steps), per wall second and per CPU second of the process, the
tokens the model actually processed (padding included), and the attention FLOPs per step (forward, all
layers) from trainer.attention.attention_flops, next to the FLOPs that fall inside documents.

All three read the same packs in the same order, so they train on the same documents and targets:
  varlen     one pack per row, attention bounded by documents (reference kernel on CPU)
  blockwise  one pack per row, block-sparse attention that skips blocks sharing no document
  padded     one DOCUMENT per row of S tokens: more rows for the same documents (the usual baseline); for
             small100m fed 2 rows per forward with gradient accumulation (--padded-rows-per-chunk), since
             one pack's ~18 rows in one forward keep ~16 GB of activations

Measured with the two commands above on a shared 2-core VM, 1 thread, twice each (real tok/s, varlen's over
padded's; docs/trainer.md has the whole table and the profile):
  small100m  varlen 109, 110   blockwise 102, 108   padded 6.8, 8.9   -> varlen 15.9x, 12.4x padded
  tiny       varlen 1446, 2158 blockwise 1191, 2122 padded 333, 446   -> varlen 4.3x, 4.8x padded
small100m's varlen step is 83% aten::mm; its reference attention alone is 7-12% of the step.
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
from packer.trainer.train import TrainConfig, attention_backend

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


def step_flops(ds, cfg: TrainConfig, layout: str, backend: str, mcfg) -> tuple[float, float]:
    """Attention forward FLOPs per step, all layers: (computed by the kernel, inside documents)."""
    order = PackOrder(len(ds), cfg.micro_batch_size, cfg.seed)
    computed = useful = 0
    for _ in range(cfg.steps * cfg.grad_accum):
        packs = [ds[i] for i in order.next()]
        mb = collate(packs, cfg.seq_length, ds.pad_id, layout)
        computed += attention_flops(mb.meta, backend, mcfg.n_heads, mcfg.head_dim)["flops_computed"]
        doc_pairs = sum(int(n) * (int(n) + 1) // 2 for p in packs for n in p.doc_lens)
        useful += doc_pairs * 4 * mcfg.head_dim * mcfg.n_heads
    return computed * mcfg.n_layers / cfg.steps, useful * mcfg.n_layers / cfg.steps


def profile(ds, cfg: TrainConfig, rows_per_chunk: int, warmup: int) -> None:
    """Profile step 1 (after the warm-up passes): top ops by self CPU time, and the step's attention (forward
    + backward, every layer) timed alone on the same boundaries, as a share of the step."""
    mcfg = load_model_config(cfg.model, vocab_size=ds.vocab_size)
    backend, layout = attention_backend(cfg.attention, torch.device("cpu"))
    cfg = dataclasses.replace(cfg, steps=1)
    recs, prof = train_chunked(cfg, ds, rows_per_chunk, warmup_passes=warmup, profile_step=0)
    packs = [ds[i] for i in PackOrder(len(ds), cfg.micro_batch_size, cfg.seed).next()]
    groups = row_chunks(packs, layout, rows_per_chunk) if rows_per_chunk else [packs]
    metas = [collate(g, cfg.seq_length, ds.pad_id, layout).meta for g in groups]
    attn_s = mcfg.n_layers * sum(
        attention_seconds(m, backend, mcfg.n_heads, mcfg.n_kv_heads, mcfg.head_dim) for m in metas
    )
    step_s = recs[0]["step_time_s"]
    print(
        f"\nprofile: {cfg.model} {cfg.attention} ({backend}), step 1: {step_s:.1f} s ({recs[0]['cpu_s']:.1f} "
        f"CPU-s) under the profiler, {len(metas)} forward(s); attention alone (fwd+bwd, {mcfg.n_layers} "
        f"layers, same boundaries): {attn_s:.2f} s = {attn_s / step_s:.1%} of the step"
    )
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="tiny,small100m")
    ap.add_argument("--attention", default="varlen,blockwise,padded")
    ap.add_argument("--seq-length", type=int, default=2048)
    ap.add_argument("--micro-batch-size", type=str, default="tiny=4,small100m=1")
    ap.add_argument("--steps", type=str, default="tiny=4,small100m=1", help="measured steps per model")
    ap.add_argument(
        "--warmup", type=str, default="tiny=1,small100m=1",
        help="untimed forward+backward passes over step 1's first chunk per model (weights and packs untouched)",
    )  # fmt: skip
    ap.add_argument(
        "--padded-rows-per-chunk", type=str, default="tiny=0,small100m=2",
        help="padded baseline: documents (rows) per forward, gradient accumulated over the step's chunks "
        "(benchmarks/chunked_step.py); 0: all rows in one forward, as train() runs it",
    )  # fmt: skip
    ap.add_argument(
        "--profile", default="", help="MODEL:ATTENTION,...: profile step 1 of each (torch.profiler, top ops "
        "by self CPU time) and time its attention alone",
    )  # fmt: skip
    ap.add_argument(
        "--threads", type=int, default=1,
        help="torch threads; 1 because on a shared machine two OpenMP threads wait for each other whenever "
        "one is descheduled (2 threads ran tiny's steps 6x slower than 1 there)",
    )  # fmt: skip
    ap.add_argument("--data", default=None, help="an existing build prefix instead of building Alpaca")
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    per_model = lambda s: dict(kv.split("=") for kv in s.split(","))  # noqa: E731
    mbs, steps, warmup = per_model(args.micro_batch_size), per_model(args.steps), per_model(args.warmup)
    chunk_rows = per_model(args.padded_rows_per_chunk)

    def config(model: str, choice: str) -> tuple[TrainConfig, int]:
        cfg = TrainConfig(
            data=prefix, model=model, attention=choice, seq_length=args.seq_length,
            micro_batch_size=int(mbs[model]), steps=int(steps[model]), warmup_steps=1, device="cpu",
            progress=False,
        )  # fmt: skip
        return cfg, int(chunk_rows.get(model, 0)) if choice == "padded" else 0

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
                cfg, rows_per_chunk = config(model, choice)
                backend, layout = attention_backend(choice, torch.device("cpu"))
                flops, useful = step_flops(ds, cfg, layout, backend, mcfg)
                t0 = time.perf_counter()
                recs, _ = train_chunked(cfg, ds, rows_per_chunk, warmup_passes=int(warmup[model]))
                wall = time.perf_counter() - t0
                secs, cpu = sum(r["step_time_s"] for r in recs), sum(r["cpu_s"] for r in recs)
                tokens = sum(r["tokens"] for r in recs)
                rows.append({
                    "model": model, "attention": choice, "backend": backend, "rows_per_chunk": rows_per_chunk,
                    "step_times_s": [r["step_time_s"] for r in recs], "step_cpu_s": [r["cpu_s"] for r in recs],
                    "tokens_per_s": tokens / secs, "tokens_per_cpu_s": tokens / cpu,
                    "processed_per_real": sum(r["processed_tokens"] for r in recs) / tokens,
                    "step_s": secs / len(recs), "cpu_s_step": cpu / len(recs), "attn_gflops_step": flops / 1e9,
                    "attn_useful_fraction": useful / flops, "losses": [r["loss"] for r in recs], "wall_s": wall,
                })  # fmt: skip
                r = rows[-1]
                print(
                    f"  {model:9s} {choice:9s} {r['tokens_per_s']:9.0f} tok/s  {r['step_s']:7.2f} s/step  "
                    f"(steps {', '.join(f'{t:.1f}' for t in r['step_times_s'])} s, CPU "
                    f"{', '.join(f'{t:.1f}' for t in r['step_cpu_s'])} s; run {wall:.0f}s"
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
            profile(ds, *config(model, choice), int(warmup.get(model, 1)))

    print(
        f"\nseq {args.seq_length}, warm-up passes {args.warmup}, measured steps {args.steps}; tokens count real "
        f"(non-pad) tokens; CPU-s = the process's CPU seconds, all threads"
    )
    head = (
        f"{'model':9s} {'attention':9s} {'backend':9s} {'real tok/s':>10s} {'vs varlen':>9s} "
        f"{'tok/CPU-s':>9s} {'vs varlen':>9s} {'processed/real':>14s} {'s/step':>7s} {'CPU-s':>7s} "
        f"{'attn GFLOP/step':>15s} {'in-doc':>7s}"
    )
    print(head + "\n" + "-" * len(head))
    for r in rows:
        base = next((x for x in rows if x["model"] == r["model"] and x["attention"] == "varlen"), None)

        def ratio(key: str, r=r, base=base) -> str:
            return f"{r[key] / base[key]:8.2f}x" if base else f"{'-':>9s}"

        print(
            f"{r['model']:9s} {r['attention']:9s} {r['backend']:9s} {r['tokens_per_s']:10.0f} "
            f"{ratio('tokens_per_s')} {r['tokens_per_cpu_s']:9.0f} {ratio('tokens_per_cpu_s')} "
            f"{r['processed_per_real']:14.2f} {r['step_s']:7.2f} {r['cpu_s_step']:7.1f} "
            f"{r['attn_gflops_step']:15.3f} {r['attn_useful_fraction']:7.1%}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
