"""train.py's optimizer step with the rows of a step fed to the model a few at a time (padded baseline in
bounded memory), and the pieces of a step profiled.

`--attention padded` gives every document its own row of S tokens, so one Alpaca pack of 2048 tokens (~18
documents) becomes ~18 rows = 36,864 tokens in ONE forward, and what the backward keeps grows with that:
small100m holds ~0.9 GB per 2048-token row, ~16 GB for the pack, which with the weights, AdamW state and the
backward's buffers is past the 23 GB of the benchmark machine. Logits are not the cause (train.py computes
them only at targets in both layouts: ~20 MB a row) and neither is attention (CPU SDPA runs its flash
kernel, no S x S matrix is kept). Here the same rows go through the model `rows_per_chunk` at a time with
gradient accumulation. A step of 2 packs with doc_lens [3, 5] and [2], S = 8, rows_per_chunk = 2:

    padded rows    a a a P P P P P | b b b b b P P P | c c P P P P P P
    chunks         [row a, row b]                    | [row c]          -> 2 forward/backward passes
    loss           (chunk 1's sum of target losses + chunk 2's) / (targets of the whole step)

The gradient equals the unchunked step's: each chunk's loss sum is divided by the WHOLE step's target (or
document) count before its backward, backward passes add into .grad, and a row's forward depends on no other
row (attention stays inside a row, everything else is per token). Only the float summation order differs
(tested to 1e-5 against `train()`). The rest of the step is train.py's, for one rank: the same AdamW groups
(`configure_optimizer`), lr schedule (`lr_at`), grad clipping, data order (`PackOrder`) and seeding. The
packed layout chunks whole packs (rows) the same way.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence

import numpy as np
import torch

from packer.boundaries import cumulative_ends
from packer.records import Pack
from packer.trainer.attention import AttentionConfig, attention
from packer.trainer.batching import MicroBatch, PackOrder, collate
from packer.trainer.model import build_model, load_model_config
from packer.trainer.train import (
    Schedule,
    TrainConfig,
    attention_backend,
    configure_optimizer,
    loss_sum,
    lr_at,
)
from packer.trainer.varlen import VarlenMeta


def row_chunks(packs: Sequence[Pack], layout: str, rows_per_chunk: int) -> list[list[Pack]]:
    """The step's rows, in order, in groups of at most `rows_per_chunk` rows, each group ready for `collate`.

    packed: a row is a pack, so a group is a slice of `packs`. padded: a row is a document, so a group is ONE
    pseudo-pack of up to `rows_per_chunk` documents, which `collate(..., "padded")` splits back into rows.
    Two packs with doc_lens [3, 5] and [0, 2], rows_per_chunk 2:

        packed   [[pack 0, pack 1]]
        padded   [[Pack(doc_lens=[3, 5])], [Pack(doc_lens=[2])]]     (the empty document owns no row)
    """
    if rows_per_chunk < 1:
        raise ValueError(
            f"rows per chunk must be >= 1, got {rows_per_chunk}; pass --padded-rows-per-chunk MODEL=N with "
            f"N >= 1 (or 0 for the trainer's own unchunked step)"
        )
    if layout == "packed":
        return [list(packs[i : i + rows_per_chunk]) for i in range(0, len(packs), rows_per_chunk)]
    if layout != "padded":
        raise ValueError(f"unknown layout {layout!r}; use 'packed' or 'padded'")
    docs = []
    for p in packs:
        ends = cumulative_ends(p.doc_lens, leading_zero=True)
        docs += [(p.ids[a:b], p.loss_mask[a:b]) for a, b in zip(ends[:-1], ends[1:], strict=True) if b > a]
    chunks = []
    for i in range(0, len(docs), rows_per_chunk):
        group = docs[i : i + rows_per_chunk]
        ids, mask = np.concatenate([d for d, _ in group]), np.concatenate([m for _, m in group])
        chunks.append(
            [Pack(ids=ids, loss_mask=mask, doc_lens=np.array([len(d) for d, _ in group], np.int32))]
        )
    return chunks


def train_chunked(
    cfg: TrainConfig, ds, rows_per_chunk: int = 0, warmup_passes: int = 0, profile_step: int | None = None
) -> tuple[list[dict], torch.profiler.profile | None]:
    """`train(cfg, dataset=ds)` on one CPU rank, feeding the model at most `rows_per_chunk` rows per forward
    (0: all of a micro-batch's rows in one forward, as train() does).

    `warmup_passes` untimed forward + backward passes over step 1's first chunk run first; their gradients
    are dropped and no optimizer step is taken, so the weights, the data order and every step's packs stay
    those of train(). Returns train()'s per-step records plus `cpu_s` (the process's CPU seconds in the step,
    all threads: on a shared machine it moves less than the wall time), `chunks` (forward passes in the
    step) and `rows_max` (the most rows one forward saw), and the torch.profiler of step index
    `profile_step` (0-based) if one was asked for.
    """
    if cfg.dtype != "fp32" or cfg.resume or cfg.save or cfg.save_hf or cfg.device not in ("cpu", "auto"):
        raise ValueError("train_chunked measures fp32 CPU steps only: no --dtype bf16, --resume, --save, GPU")
    seq_length = cfg.seq_length or ds.seq_length
    backend, layout = attention_backend(cfg.attention, torch.device("cpu"))
    backend = AttentionConfig(backend)
    # Seeded and built in train._train's order, so both start from the same weights.
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, load_model_config(cfg.model, vocab_size=ds.vocab_size))
    optimizer = configure_optimizer(model, cfg)
    order = PackOrder(len(ds), cfg.micro_batch_size, cfg.seed)
    schedule = Schedule.of(cfg)
    model.train()

    def micro_batches() -> list[MicroBatch]:
        """The step's micro-batches (grad_accum of them), each cut into chunks of rows."""
        micro = []
        for _ in range(cfg.grad_accum):
            packs = [ds[i] for i in order.next()]
            groups = row_chunks(packs, layout, rows_per_chunk) if rows_per_chunk else [packs]
            micro += [collate(g, seq_length, ds.pad_id, layout) for g in groups]
        return micro

    def loss_backward(mb: MicroBatch, scale: float) -> float:
        at = mb.target_idx_N
        logits_NV = model(mb.tokens_T, mb.positions_T, mb.meta, backend, logits_at=at)
        loss = loss_sum(logits_NV, mb, cfg.loss_average, at)
        (loss * scale).backward()
        return float(loss.detach())  # the graph goes here, before the next chunk's forward

    if warmup_passes:
        position = order.state_dict()
        first = micro_batches()[0]
        order.load_state_dict(position)
        for _ in range(warmup_passes):
            loss_backward(first, 1.0)
        model.zero_grad(set_to_none=True)

    records, prof = [], None
    for step in range(cfg.steps):
        profiling = step == profile_step
        if profiling:
            prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            prof.__enter__()
        t0, c0 = time.perf_counter(), time.process_time()
        lr = lr_at(step, schedule)
        for group in optimizer.param_groups:
            group["lr"] = lr
        micro = micro_batches()
        # The whole step's count, as train.py all-reduces it before any backward.
        denom = sum(mb.num_targets if cfg.loss_average == "token" else mb.num_docs for mb in micro)
        total = sum(loss_backward(mb, 1.0 / max(denom, 1)) for mb in micro)
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        if profiling:
            prof.__exit__(None, None, None)
        tokens = sum(mb.num_tokens for mb in micro)
        records.append({
            "step": step + 1, "loss": total / max(denom, 1), "tokens": tokens,
            "processed_tokens": sum(mb.tokens_T.numel() for mb in micro), "tokens_per_s": tokens / dt,
            "lr": lr, "grad_norm": float(grad_norm), "epoch": order.epoch, "step_time_s": dt, "cpu_s": cpu,
            "chunks": len(micro), "rows_max": max(mb.meta.num_rows for mb in micro),
        })  # fmt: skip
    return records, prof


def attention_seconds(
    meta: VarlenMeta, backend: str, n_heads: int, n_kv_heads: int, head_dim: int, repeats: int = 2
) -> float:
    """Seconds one layer's attention forward + backward takes on `meta`'s stream (random fp32 q, k, v; the
    fastest of `repeats`): times n_layers, the attention part of a step, to set against the step's time."""
    T = meta.total_tokens
    gen = torch.Generator().manual_seed(0)
    q_THD = torch.randn(T, n_heads, head_dim, generator=gen, requires_grad=True)
    k_THD = torch.randn(T, n_kv_heads, head_dim, generator=gen, requires_grad=True)
    v_THD = torch.randn(T, n_kv_heads, head_dim, generator=gen, requires_grad=True)
    grad_THD = torch.randn(T, n_heads, head_dim, generator=gen)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        attention(q_THD, k_THD, v_THD, meta, backend).backward(grad_THD)
        best = min(best, time.perf_counter() - t0)
    return best
