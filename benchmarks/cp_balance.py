"""Per-rank attention FLOPs per step, without and with the balanced order (packer.balance), on MOSS lengths.

    python benchmarks/cp_balance.py
    python benchmarks/cp_balance.py --samples 1000000

The lengths are /work/shared/data/lengths/moss_gpt2_1M.npy (1M MOSS sample lengths under GPT-2, +1 for EOD;
the first --samples of them, 200,000 by default), clipped to the sequence length and packed with the build's
packing (packer.packing.pack, BFD). For every sequence length, CP size and DP size, with micro-batch 1 and
grad-accum 1 (and micro-batch 2 x grad-accum 2 at CP 1, also with --window-steps 1, where every step keeps
the unbalanced order's packs), one epoch of steps is dealt to the DP ranks by PackOrder's seeded shuffle
(unbalanced) and by packer.balance.balanced_plan (balanced), and each step's per-rank attention is measured.

Unit: forward attention FLOPs of ONE CP rank, per layer, per unit of hidden size (n_heads x head_dim):
4 x the causal query-key pairs it scores (2 FLOPs for q.k and 2 for p.v per pair and head-dim unit). With CP
size N every document is padded to a multiple of 2N and zigzag-split, so each CP rank scores exactly
L*(L+1)/(2N) pairs of every document (packer.balance docstring); CP 1 uses the real lengths. Per step:

    max/mean   the slowest DP rank's attention over the ranks' mean (averaged over steps; worst = worst step)
    attn time  sum over steps of the slowest rank / sum of the mean: how much longer attention takes because
               every rank waits for the slowest (1.00 = perfectly balanced)
    7B step    the same for a whole forward step of Llama-2-7B shapes (32 layers, d_model 4096, 6.7e9 matmul
               parameters at 2 FLOPs per token, over every row token, padding included), with attention and
               matmul FLOPs taken to run at the same rate (attention kernels run slower per FLOP, so the
               real gap is larger)
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from packer.balance import (
    DEFAULT_WINDOW_STEPS,
    StepShape,
    balanced_plan,
    pack_attention_costs,
    rank_costs,
    unbalanced_plan,
)
from packer.boundaries import pack_tokens
from packer.packing import pack

DEFAULT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "lengths" / "moss_gpt2_1M.npy"
LAYERS, D_MODEL, MATMUL_PARAMS = 32, 4096, 6.7e9  # Llama-2-7B


def pack_flops(lengths: np.ndarray, offsets: np.ndarray, cp: int) -> tuple[np.ndarray, np.ndarray]:
    """(costs the order balances: sum of padded L**2 per pack; forward attention FLOPs of one CP rank per
    layer per hidden unit: 4 * pairs / cp, pairs = sum of padded L*(L+1)/2)."""
    multiple = 2 * cp if cp > 1 else 1
    costs = pack_attention_costs(lengths, offsets, multiple)
    padded = -(-lengths.astype(np.int64) // multiple) * multiple
    pairs = (costs + pack_tokens(padded, offsets)) // 2
    return costs, 4 * pairs / cp


def summarise(flops_SW: np.ndarray, linear_per_step: float) -> dict:
    hi, mean = flops_SW.max(axis=1), flops_SW.mean(axis=1)
    ratio = hi / np.maximum(mean, 1e-30)
    attn_7b = flops_SW * (LAYERS * D_MODEL)
    step_hi, step_mean = attn_7b.max(axis=1) + linear_per_step, attn_7b.mean(axis=1) + linear_per_step
    return {
        "mean": float(mean.mean()),
        "ratio": float(ratio.mean()),
        "worst": float(ratio.max()),
        "attn": float(hi.sum() / mean.sum()),
        "step": float(step_hi.sum() / step_mean.sum()),
        "step_time": float(step_hi.sum()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=Path, default=DEFAULT)
    ap.add_argument("--samples", type=int, default=200_000, help="the first N lengths (the file has 1M)")
    ap.add_argument("--seq", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--cp", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--dp", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--window-steps", type=int, default=DEFAULT_WINDOW_STEPS)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if not args.lengths.is_file():
        sys.exit(
            f"{args.lengths} not found; pass --lengths PATH to moss_gpt2_1M.npy (see shared/data/MANIFEST.md)"
        )
    print("$ python " + shlex.join(sys.argv))
    t_start = time.perf_counter()
    raw = np.load(args.lengths)[: args.samples]
    print(
        f"{raw.size:,} lengths from {args.lengths.name}, seed {args.seed}, balanced window {args.window_steps} steps"
    )
    print(
        "unit: forward attention GFLOP of one CP rank per layer per hidden unit; '7B step' as in the docstring\n"
    )

    header = (f"{'seq':>6} {'CP':>2} {'DP':>2} {'B':>1} {'A':>1} {'win':>3} {'steps':>6} {'mean':>7} | "
              f"{'max/mean':>8} {'worst':>6} {'attn':>5} {'7B':>5} | {'max/mean':>8} {'worst':>6} {'attn':>5} "
              f"{'7B':>5} {'7B gain':>7} {'plan s':>6}")  # fmt: skip
    print(f"{'':>47}| {'unbalanced':<28}| balanced")
    print(header)
    for seq in args.seq:
        lengths = np.minimum(raw, seq)
        t = time.perf_counter()
        plan = pack(lengths, seq)
        pack_s = time.perf_counter() - t
        lens_in_order = lengths[plan.order]
        print(f"-- seq {seq}: {plan.num_packs:,} packs (BFD, {pack_s:.2f} s)")
        cases = [(cp, dp, 1, 1, args.window_steps) for cp in args.cp for dp in args.dp]
        cases += [(1, dp, 2, 2, w) for w in (args.window_steps, 1) for dp in args.dp]
        for cp, dp, B, A, window in cases:
            costs, flops = pack_flops(lens_in_order, plan.offsets, cp)
            shape = StepShape(dp, A, B)
            linear = 2 * MATMUL_PARAMS * A * B * seq / cp  # per CP rank and step, every row token
            base = summarise(rank_costs(flops, unbalanced_plan(costs.size, shape, args.seed, 0)), linear)
            t = time.perf_counter()
            balanced = balanced_plan(costs, shape, args.seed, 0, window)
            plan_s = time.perf_counter() - t
            bal = summarise(rank_costs(flops, balanced), linear)
            print(f"{seq:>6} {cp:>2} {dp:>2} {B:>1} {A:>1} {window:>3} {len(balanced):>6} {base['mean'] / 1e9:>7.3f} | "
                  f"{base['ratio']:>8.3f} {base['worst']:>6.2f} {base['attn']:>5.3f} {base['step']:>5.3f} | "
                  f"{bal['ratio']:>8.3f} {bal['worst']:>6.2f} {bal['attn']:>5.3f} {bal['step']:>5.3f} "
                  f"{base['step_time'] / bal['step_time'] - 1:>7.1%} {plan_s:>6.2f}")  # fmt: skip

    # pack_attention_costs at 10M samples: the seq-8192 packing above, tiled until it holds >= 10M samples.
    lengths = np.minimum(raw, 8192)
    plan = pack(lengths, 8192)
    reps = -(-10_000_000 // lengths.size)
    lens_10m = np.tile(lengths[plan.order].astype(np.int32), reps)
    docs_10m = np.concatenate(
        [[0], (plan.offsets[1:][None, :] + lengths.size * np.arange(reps)[:, None]).ravel()]
    )
    for multiple in (1, 8):
        best = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            pack_attention_costs(lens_10m, docs_10m, multiple)
            best = min(best, time.perf_counter() - t)
        print(f"\npack_attention_costs: {lens_10m.size:,} samples, {docs_10m.size - 1:,} packs, multiple {multiple}: "
              f"{best:.3f} s (best of 3)", end="")  # fmt: skip
    print(f"\n\ntotal {time.perf_counter() - t_start:.1f} s")


if __name__ == "__main__":
    main()
