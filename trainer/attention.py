"""Causal attention over packed, document-bounded token streams.

A batch is flattened to one stream of T = B*S tokens. Documents (and one padding-tail segment per padded
row) are contiguous segments of that stream, given as cumulative offsets; attention is causal and never
crosses a segment. For rows of S=8, docs [3, 2] then [5] + 3 padding tokens:

    tokens        a a a b b | c c c c c p p p
    cu_seqlens    [0, 3, 5, 8, 13, 16]         (CUDA form, leading 0)
    actual_seq_len   [3, 5, 8, 13, 16]         (Ascend form, cumulative ends)

Backends (see docs/attention.md):
    reference  exact, one segment at a time, fp32 softmax; the ground truth
    blockwise  pure PyTorch block-sparse flash-style attention; skips blocks that share no document
    npu        torch_npu.npu_fusion_attention, TND layout, sparse_mode=4 as MindSpeed-LLM calls it (3 selectable),
               split into several calls above NPU_MAX_SEGMENTS segments
    cuda       torch.nn.attention.varlen.varlen_attn (or flash_attn.flash_attn_varlen_func)
    padded     dense causal SDPA over each full row; ignores documents (the baseline of one doc per row)

Under context parallelism the meta is a `trainer.context_parallel.CPMeta` and every backend runs as the step
kernel of ring attention (reference/blockwise: the exact fp32 step; npu, cuda: the fused kernels per step).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from packer.trainer.context_parallel import CPMeta, cp_attention
from packer.trainer.kernels import (
    NPU_MAX_SEGMENTS,
    NPU_SPARSE_MODE,
    NPU_SPARSE_MODES,
    check_npu_sparse_mode,
    cuda_kernel,
    cuda_varlen_attention,
    npu_causal_mask,
    npu_varlen_attention,
)
from packer.trainer.varlen import VarlenMeta, check_inputs, max_segments_per_micro_batch

__all__ = [
    "BACKENDS", "NPU_MAX_SEGMENTS", "NPU_SPARSE_MODE", "NPU_SPARSE_MODES", "AttentionConfig", "VarlenMeta",
    "attention", "attention_flops", "block_plan", "max_segments_per_micro_batch", "npu_causal_mask",
    "npu_varlen_attention", "resolve_backend",
]

BACKENDS = ("reference", "blockwise", "npu", "cuda", "padded")


@dataclass(frozen=True, slots=True)
class AttentionConfig:
    """A backend plus its options; `attention()` takes this or a bare backend name (= the defaults).

    npu_sparse_mode    4: band, pre_tockens=65536 / next_tockens=0 (MindSpeed-LLM's TND call)
                       3: rightDownCausal (transformers' NPU flash-attention, XTuner)
    npu_max_segments   segments per npu kernel call; more are split at segment boundaries
    block_size         tile size of the blockwise backend
    """

    backend: str
    npu_sparse_mode: int = NPU_SPARSE_MODE
    npu_max_segments: int = NPU_MAX_SEGMENTS
    block_size: int = 128

    def __post_init__(self) -> None:
        check_npu_sparse_mode(self.npu_sparse_mode)
        if self.npu_max_segments < 1 or self.block_size < 1:
            raise ValueError(
                f"npu_max_segments and block_size must be >= 1, got {self.npu_max_segments}, {self.block_size}"
            )

    def __str__(self) -> str:  # what the trainer prints at start
        return f"npu (sparse_mode {self.npu_sparse_mode})" if self.backend == "npu" else self.backend


def _reference(q, k, v, meta: VarlenMeta, scale: float) -> torch.Tensor:
    """Exact softmax(q k^T * scale + causal) v per segment, in fp32."""
    G = q.shape[1] // k.shape[1]
    outs = []
    for start, end in meta.segments():
        if end == start:
            continue  # zero-length documents own no tokens
        L = end - start
        qs = q[start:end].float().transpose(0, 1)  # (Hq, L, D)
        ks = k[start:end].float().repeat_interleave(G, dim=1).transpose(0, 1)  # (Hq, L, D)
        vs = v[start:end].float().repeat_interleave(G, dim=1).transpose(0, 1)
        scores = (qs @ ks.transpose(1, 2)) * scale  # (Hq, L, L)
        future = torch.ones(L, L, dtype=torch.bool, device=q.device).triu(1)
        probs = scores.masked_fill(future, float("-inf")).softmax(dim=-1)
        outs.append((probs @ vs).transpose(0, 1).to(q.dtype))  # (L, Hq, D)
    # Segments tile [0, T) in order, so concatenating them rebuilds the stream.
    return torch.cat(outs, dim=0)


def _padded(q, k, v, meta: VarlenMeta, scale: float) -> torch.Tensor:
    """Dense causal SDPA over each full row of S tokens; documents inside a row are NOT separated."""
    B, S = meta.num_rows, meta.row_len
    _, Hq, D = q.shape
    rows = [x.view(B, S, x.shape[1], D).transpose(1, 2) for x in (q, k, v)]  # (B, H, S, D)
    out = F.scaled_dot_product_attention(*rows, is_causal=True, scale=scale, enable_gqa=Hq != k.shape[1])
    return out.transpose(1, 2).reshape(B * S, Hq, D)


# ---------------------------------------------------------------------------------------------------------
# blockwise: flash-attention's tiling and online softmax, in plain PyTorch, skipping blocks that share no doc


@dataclass(frozen=True, slots=True)
class BlockPlan:
    """Which (q-block, k-block) tiles of the T x T score matrix get computed.

    T=16, block 4, docs [5, 3, 0, 8]: segment id per token 00000111 33333333 (the empty doc 2 owns none).

        q\\k  0 1 2 3      M = computed with an element mask, F = computed unmasked,
         0   M . . .      . = skipped: above the diagonal, or no document in common
         1   M M . .      6 of the 10 causal tiles are computed (dense causal: all 10)
         2   . . M .
         3   . . F M
    """

    block_size: int
    num_blocks: int
    tiles: tuple[tuple[int, tuple[tuple[int, bool], ...]], ...]  # (i, ((j, needs_mask), ...) diagonal first)

    @property
    def computed(self) -> int:
        return sum(len(js) for _, js in self.tiles)

    @property
    def masked(self) -> int:
        return sum(m for _, js in self.tiles for _, m in js)


def _segment_ids(meta: VarlenMeta) -> list[int]:
    """Segment id of every token; empty segments own no token, so ids may jump (0,0,2,...)."""
    ids: list[int] = []
    prev = 0
    for s, end in enumerate(meta.actual_seq_len):
        ids += [s] * (end - prev)
        prev = end
    return ids


def block_plan(meta: VarlenMeta, block_size: int = 128) -> BlockPlan:
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    seg = _segment_ids(meta)
    T = len(seg)
    nb = -(-T // block_size)
    lo = [seg[i * block_size] for i in range(nb)]  # ids are non-decreasing, so a block's docs are [lo, hi]
    hi = [seg[min((i + 1) * block_size, T) - 1] for i in range(nb)]
    tiles = []
    for i in range(nb):
        js = []
        # k-blocks j <= i (causal); k-block j shares a doc with q-block i iff hi[j] >= lo[i]. Going down from
        # the diagonal, hi[j] only shrinks, so stop at the first block that misses.
        for j in range(i, -1, -1):
            if hi[j] < lo[i]:
                break
            # below the diagonal and all of both blocks in one document: every score is kept
            full = j < i and lo[j] == hi[i]
            js.append((j, not full))
        tiles.append((i, tuple(js)))
    return BlockPlan(block_size=block_size, num_blocks=nb, tiles=tuple(tiles))


def _blockwise(q, k, v, meta: VarlenMeta, scale: float, block_size: int = 128) -> torch.Tensor:
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    plan = block_plan(meta, block_size)
    seg = torch.tensor(_segment_ids(meta), device=q.device)
    pos = torch.arange(T, device=q.device)
    # Group q heads under their kv head so GQA needs no repeat: q head h uses kv head h // G.
    q_HGTD = q.float().view(T, Hkv, G, D).permute(1, 2, 0, 3)
    k_HDT = k.float().permute(1, 2, 0).unsqueeze(1)  # (Hkv, 1, D, T)
    v_HTD = v.float().permute(1, 0, 2).unsqueeze(1)  # (Hkv, 1, T, D)
    bs = block_size
    outs = []
    for i, js in plan.tiles:
        qs = slice(i * bs, min((i + 1) * bs, T))
        qb = q_HGTD[:, :, qs] * scale
        m = denom = acc = None
        # Diagonal block first: it holds every query's own key, so the running max is finite from the start
        # and later fully-masked rows add exp(-inf) = 0 instead of NaN.
        for j, needs_mask in js:
            ks = slice(j * bs, min((j + 1) * bs, T))
            s = qb @ k_HDT[..., ks]  # (Hkv, G, bq, bk)
            if needs_mask:
                keep = (seg[qs, None] == seg[None, ks]) & (pos[qs, None] >= pos[None, ks])
                s = s.masked_fill(~keep, float("-inf"))
            # The max only keeps exp() in range; the result does not depend on it, so keep it out of autograd.
            s_max = s.detach().amax(dim=-1, keepdim=True)
            m_new = s_max if m is None else torch.maximum(m, s_max)
            p = torch.exp(s - m_new)
            pv = p @ v_HTD[:, :, ks]
            if m is None:
                denom, acc = p.sum(-1, keepdim=True), pv
            else:
                alpha = torch.exp(m - m_new)
                denom = denom * alpha + p.sum(-1, keepdim=True)
                acc = acc * alpha + pv
            m = m_new
        outs.append(acc / denom)  # (Hkv, G, bq, D)
    out = torch.cat(outs, dim=2)  # (Hkv, G, T, D)
    return out.permute(2, 0, 1, 3).reshape(T, Hq, D).to(q.dtype)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    meta: VarlenMeta,
    backend: str | AttentionConfig,
    scale: float | None = None,
    block_size: int | None = None,
) -> torch.Tensor:
    """Causal attention within each segment of `meta`. q (T, Hq, D), k/v (T, Hkv, D) -> (T, Hq, D).

    `backend` is a name or an AttentionConfig (npu sparse mode, segments per npu call, block size).
    `scale` defaults to 1/sqrt(D); `block_size`, if given, overrides the config's (blockwise only).
    """
    cfg = backend if isinstance(backend, AttentionConfig) else AttentionConfig(backend)
    backend = cfg.backend
    if isinstance(meta, CPMeta):  # context parallel: this rank's zigzag share, ring attention (trainer.context_parallel)
        return cp_attention(q, k, v, meta, backend, cfg.npu_max_segments, scale)
    block_size = cfg.block_size if block_size is None else block_size
    check_inputs(q, k, v, meta)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if backend == "reference":
        return _reference(q, k, v, meta, scale)
    if backend == "blockwise":
        return _blockwise(q, k, v, meta, scale, block_size)
    if backend == "npu":
        return npu_varlen_attention(
            q, k, v, meta, scale, sparse_mode=cfg.npu_sparse_mode, max_segments=cfg.npu_max_segments
        )
    if backend == "cuda":
        return cuda_varlen_attention(q, k, v, meta, scale)
    if backend == "padded":
        return _padded(q, k, v, meta, scale)
    raise ValueError(
        f"unknown attention backend {backend!r}; choose one of {BACKENDS}, or resolve 'auto' with "
        "resolve_backend()"
    )


def resolve_backend(requested: str, device: torch.device | str) -> str:
    """Turn a user's choice into a backend that can run on `device`.

    'auto' / 'varlen' pick the fused varlen kernel of the device (npu, cuda) and the exact reference on CPU.
    """
    device = torch.device(device)
    if requested in ("auto", "varlen"):
        if device.type == "npu":
            return "npu"
        if device.type == "cuda":
            return resolve_backend("cuda", device)
        return "reference"
    if requested == "npu" and device.type != "npu":
        raise ValueError(
            f"attention backend 'npu' needs an Ascend NPU device, got {device}; on this device use 'auto' "
            "(or 'reference' / 'blockwise'); the npu path can be unit-tested with trainer.npu_emulator"
        )
    if requested == "cuda":
        if device.type != "cuda" or not torch.cuda.is_available():
            raise ValueError(
                f"attention backend 'cuda' needs a CUDA device, got {device} (cuda available: "
                f"{torch.cuda.is_available()}); use 'auto' (reference on CPU) or 'blockwise'"
            )
        cuda_kernel()  # fail now, with the pip command, rather than at the first forward
        return "cuda"
    if requested not in BACKENDS:
        raise ValueError(
            f"unknown attention backend {requested!r}; choose 'auto', 'varlen' or one of {BACKENDS}"
        )
    return requested


def attention_flops(
    meta: VarlenMeta, backend: str, n_heads: int, head_dim: int, block_size: int = 128
) -> dict:
    """Forward attention FLOPs (QK^T + PV) one layer computes for `meta`, and how many of them are useful.

    A (query, key) score costs 4*head_dim FLOPs per head: 2*D for q.k and 2*D for p.v (multiply-add = 2).
    useful = causal pairs inside segments, sum L*(L+1)/2; a padding-tail segment counts as a segment here,
    since the meta cannot tell it from a document. computed:
        reference/npu/cuda  exactly the useful pairs (fused kernels round up to their tiles; not modelled)
        padded              a full causal triangle per row, B * S*(S+1)/2, documents ignored
        blockwise           every element of every computed tile (masked elements are computed, then dropped)
    Softmax, masking and backward (about 2.5x forward for flash-style kernels) are not counted.
    """
    per_pair = 4 * head_dim * n_heads
    seg_lens = [e - s for s, e in meta.segments()]
    useful = sum(n * (n + 1) // 2 for n in seg_lens)
    T, S = meta.total_tokens, meta.row_len
    out: dict = {"backend": backend, "tokens": T}
    if backend in ("reference", "npu", "cuda"):
        computed = useful
    elif backend == "padded":
        computed = meta.num_rows * S * (S + 1) // 2
    elif backend == "blockwise":
        plan = block_plan(meta, block_size)
        rows = [min(block_size, T - i * block_size) for i in range(plan.num_blocks)]
        computed = sum(rows[i] * rows[j] for i, js in plan.tiles for j, _ in js)
        nb = plan.num_blocks
        # What a causal block kernel that knows rows but not documents computes: the same plan, one segment a row.
        rows_only = VarlenMeta.from_segment_lens([S] * meta.num_rows, meta.num_rows, S)
        dense = block_plan(rows_only, block_size).computed
        out |= {
            "block_size": block_size,
            "blocks_total": nb * nb,
            "blocks_dense_causal": dense,
            "blocks_computed": plan.computed,
            "blocks_masked": plan.masked,  # computed with an element mask (partially covered)
            "blocks_skipped": nb * nb - plan.computed,
            "skipped_fraction": 1 - plan.computed / (nb * nb),
            "skipped_fraction_vs_dense_causal": 1 - plan.computed / dense,
        }
    else:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
    out |= {
        "pairs_computed": computed,
        "pairs_useful": useful,
        "flops_computed": computed * per_pair,
        "flops_useful": useful * per_pair,
        "flops_per_token": computed * per_pair / T,
        "useful_fraction": useful / computed if computed else 1.0,
    }
    return out
