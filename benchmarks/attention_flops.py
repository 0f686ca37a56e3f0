"""Attention FLOPs of padded rows vs packed rows, and CPU time of the reference vs blockwise backends.

    python benchmarks/attention_flops.py [--lengths PATH] [--num-docs 20000] [--seq 2048 4096]

Packs are made by simple greedy (next-fit) filling of the first N document lengths, documents longer than
the row truncated to it. Methods, all forward QK^T + PV per layer (trainer.attention.attention_flops):

    padded        one document per row of S tokens, dense causal over the full row (today's baseline)
    dense-pack    packed rows, dense causal over each row: documents see each other (wrong) and cost S^2/2
    blockwise     packed rows, block-sparse: tiles that share no document are skipped
    exact-varlen  packed rows, only the causal pairs inside documents (what a varlen kernel computes,
                  before rounding to its tiles)

FLOPs are divided by the number of real (document) tokens, so padding shows up as cost.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from packer.trainer.attention import VarlenMeta, attention, attention_flops

DEFAULT_LENGTHS = (
    Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "lengths" / "alpaca_gpt2_1M.npy"
)


def greedy_packs(lengths: np.ndarray, seq_len: int) -> list[list[int]]:
    packs: list[list[int]] = [[]]
    used = 0
    for n in np.minimum(lengths, seq_len).tolist():
        if used + n > seq_len:
            packs.append([])
            used = 0
        packs[-1].append(n)
        used += n
    return packs


def flops_table(lengths: np.ndarray, seq_len: int, heads: int, head_dim: int, block_size: int) -> None:
    packs = greedy_packs(lengths, seq_len)
    docs = [n for p in packs for n in p]
    real = sum(docs)
    useful = sum(n * (n + 1) // 2 for n in docs) * 4 * heads * head_dim  # documents only, no padding tails

    def per_pack(backend: str) -> dict:
        # one meta per pack keeps the block plan small; sums are the same as one meta for all rows
        tot: dict = {"flops_computed": 0, "blocks_computed": 0, "blocks_dense_causal": 0, "tokens": 0}
        for p in packs:
            f = attention_flops(VarlenMeta.from_rows([p], seq_len), backend, heads, head_dim, block_size)
            for key in tot:
                tot[key] += f.get(key, 0)
        return tot

    padded = attention_flops(VarlenMeta.from_rows([[n] for n in docs], seq_len), "padded", heads, head_dim)
    rows = {
        "padded": (padded["tokens"], padded["flops_computed"], None),
        "dense-pack": (len(packs) * seq_len, per_pack("padded")["flops_computed"], None),
    }
    bw = per_pack("blockwise")
    rows["blockwise"] = (
        bw["tokens"],
        bw["flops_computed"],
        1 - bw["blocks_computed"] / bw["blocks_dense_causal"],
    )
    rows["exact-varlen"] = (len(packs) * seq_len, useful, None)

    print(
        f"\nS={seq_len}: {len(docs)} docs, {real} real tokens -> {len(packs)} packs "
        f"({real / (len(packs) * seq_len):.1%} full); mean doc {real / len(docs):.0f} tokens; "
        f"{heads} heads x {head_dim}, block {block_size}"
    )
    print(
        f"{'method':<13} {'tokens/real':>11} {'MFLOP/real token':>17} {'x exact':>8} {'blocks skipped':>15}"
    )
    for name, (tokens, flops, skipped) in rows.items():
        skip = "" if skipped is None else f"{skipped:.1%}"
        print(
            f"{name:<13} {tokens / real:>11.2f} {flops / real / 1e6:>17.3f} {flops / useful:>8.1f} {skip:>15}"
        )


def time_fwd_bwd(meta: VarlenMeta, backend: str, hq: int, hkv: int, d: int, reps: int, **kw) -> float:
    g = torch.Generator().manual_seed(0)
    T = meta.total_tokens
    q, k, v = (torch.randn(T, h, d, generator=g).requires_grad_() for h in (hq, hkv, hkv))
    times = []
    for _ in range(reps + 1):  # the first run warms up
        t0 = time.perf_counter()
        attention(q, k, v, meta, backend, **kw).sum().backward()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=Path, default=DEFAULT_LENGTHS, help="int .npy of document lengths")
    ap.add_argument("--num-docs", type=int, default=20000)
    ap.add_argument(
        "--seq", type=int, nargs="*", default=[2048, 4096], help="row lengths; none = timing only"
    )
    ap.add_argument("--heads", type=int, default=12, help="FLOPs table: query heads (GPT-2 small: 12 x 64)")
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5, help="timed forward+backward runs (median)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads for the timing (1 = steadiest)")
    args = ap.parse_args()
    if not args.lengths.exists():
        raise SystemExit(
            f"no lengths file at {args.lengths}; pass --lengths PATH to an int .npy of document lengths"
        )
    lengths = np.load(args.lengths)[: args.num_docs]
    print(f"{args.lengths.name}: first {len(lengths)} documents")
    for seq_len in args.seq:
        flops_table(lengths, seq_len, args.heads, args.head_dim, args.block_size)

    torch.set_num_threads(args.threads)
    pack = greedy_packs(lengths, 2048)[0]
    meta = VarlenMeta.from_rows([pack], 2048)
    hq, hkv, d = 4, 2, 64
    print(
        f"\nCPU forward+backward, one 2048-token pack ({len(pack)} docs, {sum(pack)} real tokens), "
        f"q heads {hq}, kv heads {hkv}, head_dim {d}, fp32, {torch.get_num_threads()} threads, median of {args.reps}"
    )
    for backend, kw in [
        ("reference", {}),
        ("blockwise", {"block_size": 128}),
        ("blockwise", {"block_size": 256}),
    ]:
        label = backend + (f" (block {kw['block_size']})" if kw else "")
        print(f"  {label:<24} {time_fwd_bwd(meta, backend, hq, hkv, d, args.reps, **kw) * 1e3:8.1f} ms")
    print(
        f"  {'padded (dense SDPA row)':<24} {time_fwd_bwd(meta, 'padded', hq, hkv, d, args.reps) * 1e3:8.1f} ms"
    )


if __name__ == "__main__":
    main()
