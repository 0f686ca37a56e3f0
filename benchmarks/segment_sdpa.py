"""A faster exact CPU path for document-bounded attention, prototyped against trainer.attention's `reference`.

    python benchmarks/segment_sdpa.py --step small100m   # 4 real 2048-token Alpaca packs, small100m's heads
    python benchmarks/segment_sdpa.py --seq-length 1024 --heads 4 --kv-heads 2 --head-dim 16   # tiny's

`reference` loops over segments, slices q/k/v per segment and materialises each L x L score matrix. Its
backward then pays twice for the slicing: every `q[start:end]` gives back a zero-filled (T, H, D) gradient
that autograd adds into q's, i.e. O(n_segments * T) memory traffic per layer (the fill_/add_/copy_ rows of
the profile), next to the softmax and masked_fill of the scores. `segment_sdpa` computes the same thing:

  1. q, k, v are `split` once at the segment lengths: the backward of a split is ONE cat of the pieces.
  2. Segments are grouped into buckets of similar length and each bucket is ONE causal SDPA call (the CPU
     flash kernel: no L x L matrix kept, GQA without repeat). Segments shorter than their bucket are padded
     at the END: under the causal mask a real query i sees keys 0..i only, all real, so the padding changes
     no output and gets no gradient; the padded queries' outputs are dropped.

Docs [3, 2] and a padding tail of 3 (T = 8), buckets of 4:

    segments      a a a | b b | p p p
    bucket 4      [a a a _] [b b _ _] [p p p _]   -> one SDPA call over (3, H, 4, D), outputs [:3], [:2], [:3]

Prints the forward + backward time of both on the same q, k, v and boundaries, and the largest difference
of the outputs and of the three input gradients (fp32). `--step MODEL` also trains MODEL for `--steps` steps
(benchmarks/chunked_step.py, one pack per step) twice, with the model's attention calls routed to
segment_sdpa the second time (patched for the run, trainer/ untouched), and prints both step times and losses.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from collections import defaultdict
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from packer.trainer.attention import attention
from packer.trainer.batching import PackOrder
from packer.trainer.varlen import VarlenMeta


def bucket_len(n: int) -> int:
    """The padded length of a segment of n tokens: n rounded up to 1/8 of its power of two (>= 16), so a
    segment past 128 tokens wastes at most 1/8 of its length: 100 -> 112, 130 -> 144, 700 -> 704, 2048 -> 2048."""
    step = max(16, 1 << max(0, math.floor(math.log2(n)) - 3))
    return -(-n // step) * step


def segment_sdpa(q_THD, k_THD, v_THD, meta: VarlenMeta, scale: float | None = None) -> torch.Tensor:
    """Causal attention within each segment of `meta`, equal to the `reference` backend (fp32 here).
    q (T, Hq, D), k/v (T, Hkv, D) -> (T, Hq, D)."""
    _, Hq, D = q_THD.shape
    Hkv = k_THD.shape[1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    lens = [e - s for s, e in meta.segments()]
    qs, ks, vs = (x.split(lens) for x in (q_THD, k_THD, v_THD))
    buckets: dict[int, list[int]] = defaultdict(list)
    for i, n in enumerate(lens):
        if n:  # an empty document owns no token
            buckets[bucket_len(n)].append(i)
    outs: list[torch.Tensor | None] = [None] * len(lens)
    for L, idx in buckets.items():
        # (n, H, L, D): each segment zero-padded after its end to the bucket's length
        q_NHLD, k_NHLD, v_NHLD = (
            torch.stack([F.pad(x[i], (0, 0, 0, 0, 0, L - lens[i])) for i in idx]).transpose(1, 2)
            for x in (qs, ks, vs)
        )
        o_NLHD = F.scaled_dot_product_attention(
            q_NHLD, k_NHLD, v_NHLD, is_causal=True, scale=scale, enable_gqa=Hq != Hkv
        ).transpose(1, 2)
        for j, i in enumerate(idx):
            outs[i] = o_NLHD[j, : lens[i]]
    # Segments tile [0, T) in order, so concatenating them rebuilds the stream.
    return torch.cat([o for o in outs if o is not None], dim=0)


def fwd_bwd(fn, q, k, v, grad, repeats: int):
    """(fastest seconds of `repeats`, output, (dq, dk, dv)) of fn's forward + backward."""
    best, out, grads = float("inf"), None, None
    for _ in range(repeats):
        qq, kk, vv = (x.detach().requires_grad_() for x in (q, k, v))
        t0 = time.perf_counter()
        out = fn(qq, kk, vv)
        out.backward(grad)
        best = min(best, time.perf_counter() - t0)
        grads = (qq.grad, kk.grad, vv.grad)
    return best, out.detach(), grads


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from train_throughput import build  # the same Alpaca build as the throughput benchmark

    from packer.dataset import PackedDataset

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq-length", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument(
        "--packs", type=int, default=4, help="packs timed (one row each), those the training steps read first"
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--step", default=None, help="also time whole training steps of this model (tiny, small100m)"
    )
    ap.add_argument(
        "--steps", type=int, default=2, help="with --step: measured steps per run (after one warm-up pass)"
    )
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: see train_throughput.py --threads)"
    )
    ap.add_argument("--data", default=None, help="an existing build prefix instead of building Alpaca")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        ds = PackedDataset(args.data or build(Path(tmp), args.seq_length))
        S, H, Hkv, D = args.seq_length, args.heads, args.kv_heads, args.head_dim
        print(
            f"{H} q heads, {Hkv} kv heads, head_dim {D}, rows of {S}, fp32, {torch.get_num_threads()} "
            f"threads; forward + backward of one layer, fastest of {args.repeats}"
        )
        gen = torch.Generator().manual_seed(0)
        total_ref = total_new = 0.0
        order = PackOrder(len(ds), 1, seed=1234)  # the packs train_throughput.py's steps read, in order
        for _ in range(args.packs):
            (i,) = order.next()
            meta = VarlenMeta.from_rows([ds[i].doc_lens], S)
            q, grad = (torch.randn(S, H, D, generator=gen) for _ in range(2))
            k, v = (torch.randn(S, Hkv, D, generator=gen) for _ in range(2))
            ref = partial(attention, meta=meta, backend="reference")
            t_ref, o_ref, g_ref = fwd_bwd(ref, q, k, v, grad, args.repeats)
            t_new, o_new, g_new = fwd_bwd(partial(segment_sdpa, meta=meta), q, k, v, grad, args.repeats)
            pairs = [(o_ref, o_new), *zip(g_ref, g_new, strict=True)]
            diff = max((a - b).abs().max().item() for a, b in pairs)
            total_ref, total_new = total_ref + t_ref, total_new + t_new
            print(
                f"  pack {i}: {len(meta.segments())} segments, longest {meta.max_seqlen}: reference "
                f"{t_ref * 1e3:7.1f} ms, segment_sdpa {t_new * 1e3:7.1f} ms ({t_ref / t_new:4.1f}x), "
                f"max |diff| out/grads {diff:.1e}"
            )
        print(
            f"all {args.packs} packs: reference {total_ref:.3f} s, segment_sdpa {total_new:.3f} s, "
            f"{total_ref / total_new:.1f}x"
        )
        if args.step:
            whole_steps(ds, args.step, S, args.steps)


def whole_steps(ds, model: str, seq_length: int, steps: int) -> None:
    """Train `model` for `steps` steps twice, the second time with its attention calls routed to segment_sdpa."""
    from chunked_step import train_chunked

    import packer.trainer.model as model_mod
    from packer.trainer.train import TrainConfig

    cfg = TrainConfig(
        data="", model=model, attention="varlen", seq_length=seq_length, steps=steps, warmup_steps=1,
        device="cpu", progress=False,
    )  # fmt: skip
    original = model_mod.attention  # model.py calls the name it imported, so that is what gets patched

    def routed(q, k, v, meta, backend, *args, **kwargs):
        if getattr(backend, "backend", backend) == "reference":
            return segment_sdpa(q, k, v, meta)
        return original(q, k, v, meta, backend, *args, **kwargs)

    seconds = {}
    for name in ("reference", "segment_sdpa"):
        model_mod.attention = routed if name == "segment_sdpa" else original
        try:
            recs = train_chunked(cfg, ds, warmup_passes=1)[0]
        finally:
            model_mod.attention = original
        seconds[name] = sum(r["step_time_s"] for r in recs), sum(r["cpu_s"] for r in recs)
        times = ", ".join(f"{r['step_time_s']:.1f} ({r['cpu_s']:.1f} CPU)" for r in recs)
        losses = ", ".join(f"{r['loss']:.6f}" for r in recs)
        print(f"  {model} {name:12s} step times {times} s; losses {losses}")
    (ref, ref_cpu), (new, new_cpu) = seconds["reference"], seconds["segment_sdpa"]
    print(
        f"  {steps} steps after one warm-up pass: reference {ref:.1f} s ({ref_cpu:.1f} CPU-s), segment_sdpa "
        f"{new:.1f} s ({new_cpu:.1f} CPU-s): {ref / new:.2f}x wall, {ref_cpu / new_cpu:.2f}x CPU"
    )


if __name__ == "__main__":
    main()
