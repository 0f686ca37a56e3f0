"""Context parallelism with EoD reset: ring attention over packed documents, per-document zigzag.

A micro-batch is one flat stream of T tokens cut into segments (documents padded to a multiple of 2N by
`packer build --cp-size N`, and each row's padding tail). Every segment is cut into 2N equal chunks and CP
rank r of N holds chunks r and 2N-1-r of EVERY segment: MindSpeed's ring layout and TransformerEngine's THD
partitioning (`thd_get_partitioned_indices`). N = 2, segments [8, 4] (chunk sizes 2 and 1):

    global token       a0 a1 a2 a3 a4 a5 a6 a7 | b0 b1 b2 b3
    chunk              0  0  1  1  2  2  3  3  | 0  1  2  3
    rank 0 holds       a0 a1 a6 a7 b0 b3          chunks 0, 3     positions 0 1 6 7 0 3
    rank 1 holds       a2 a3 a4 a5 b1 b2          chunks 1, 2     positions 2 3 4 5 1 2
    local segments     [4, 2] on every rank: the low chunk then the high chunk of each segment

Positions stay those of the whole document, so RoPE sees what it would see without CP. Causal work per rank
is equal: with chunk size c, rank r's queries see (2N-1)c^2 + c(c+1) keys of each segment, whatever r.

Ring: K/V blocks travel r -> r+1 around the CP group (`torch.distributed` point-to-point, the next block in
flight while the current one is computed). At step s rank r holds the K/V of rank j = (r - s) mod N, and the
chunk order decides what each pair of chunks contributes, per segment, identically for all segments:

    step        j vs r    queries              keys                  mask
    0           j == r    all local (2c)       all local (2c)        causal (the local order is the global one)
    s > 0       j <  r    all local (2c)       j's low chunks (c)    none: chunk j precedes both of r's chunks
    s > 0       j >  r    r's high chunks (c)  all of j's (2c)       none: r's low chunk precedes all of j's

Pairs that share no document never meet: every call is varlen over the same segment list. Partial results
merge with their log-sum-exp (online softmax). The backward pass runs the ring again: dQ accumulates at home,
dK/dV travel with their K/V block and arrive back at its owner after N hops; each step recomputes its scores
from the saved Q/K/V and the FINAL log-sum-exp, so it is exact (flash-attention's backward, split by key).

Step kernels (`StepKernel`): `reference` (exact fp32, any device; the CPU path), `npu`
(torch_npu.npu_fusion_attention / npu_fusion_attention_grad in TND, as MindSpeed's TND ring calls them) and
`cuda` (FlashAttention's varlen forward/backward through torch's aten ops, which return the log-sum-exp).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.distributed as dist

from packer import boundaries

# ---------------------------------------------------------------------------------------------------------
# layout


@dataclass(frozen=True, slots=True)
class ZigzagLayout:
    """Which tokens of a micro-batch CP rank `cp_rank` of `cp_size` holds, and the local segment lists."""

    cp_size: int
    cp_rank: int
    seg_lens: tuple[int, ...]  # global segment lengths, each a multiple of 2N, zero-length ones dropped
    index_L: torch.Tensor  # (T/N,) int64: global index of each local token
    local_lens: list[int]  # 2c per segment: both chunks, in local order
    half_lens: list[int]  # c per segment
    lo_L: torch.Tensor  # (T/2N,) int64 local indices of every segment's low chunk (chunk r)
    hi_L: torch.Tensor  # (T/2N,) int64 local indices of every segment's high chunk (chunk 2N-1-r)

    @property
    def num_local(self) -> int:
        return int(self.index_L.numel())

    @property
    def max_seqlen(self) -> int:  # longest GLOBAL segment (what a model's sliding-window check compares)
        return max(self.seg_lens, default=0)

    def to(self, device: torch.device | str) -> ZigzagLayout:
        move = lambda t: t.to(device, non_blocking=True)  # noqa: E731
        return ZigzagLayout(
            self.cp_size, self.cp_rank, self.seg_lens, move(self.index_L), self.local_lens, self.half_lens,
            move(self.lo_L), move(self.hi_L),
        )  # fmt: skip


def zigzag_layout(seg_lens: Sequence[int], cp_size: int, cp_rank: int) -> ZigzagLayout:
    """Layout of a stream whose segments have lengths `seg_lens` (documents and padding tails, in order).

    >>> zigzag_layout([8, 4], 2, 0).index_L.tolist()
    [0, 1, 6, 7, 8, 11]
    """
    if cp_size < 1 or not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank {cp_rank} must lie in [0, cp_size={cp_size})")
    lens = np.asarray(seg_lens, dtype=np.int64)
    n = 2 * cp_size
    if (bad := np.flatnonzero(lens % n)).size:
        i = int(bad[0])
        raise ValueError(
            f"context parallel size {cp_size} cuts every segment into {n} chunks, but segment {i} has "
            f"{int(lens[i])} tokens; build the data with `packer build --cp-size {cp_size}` (documents padded "
            f"to a multiple of {n}) and train with --seq-length a multiple of {n}"
        )
    starts = boundaries.cu_seqlens(lens).astype(np.int64)[:-1]
    keep = lens > 0
    lens, starts = lens[keep], starts[keep]
    c = lens // n
    # local order: (low chunk, high chunk) of each segment
    chunk_start = np.stack([starts + cp_rank * c, starts + (n - 1 - cp_rank) * c], axis=1).ravel()
    chunk_len = np.repeat(c, 2)
    local_start = np.concatenate([[0], np.cumsum(chunk_len)[:-1]]).astype(np.int64)
    total = int(chunk_len.sum())
    index = np.arange(total, dtype=np.int64) + np.repeat(chunk_start - local_start, chunk_len)
    is_lo = np.repeat(np.tile([True, False], len(c)), chunk_len)
    return ZigzagLayout(
        cp_size=cp_size,
        cp_rank=cp_rank,
        seg_lens=tuple(int(x) for x in lens),
        index_L=torch.from_numpy(index),
        local_lens=(2 * c).tolist(),
        half_lens=c.tolist(),
        lo_L=torch.from_numpy(np.flatnonzero(is_lo)),
        hi_L=torch.from_numpy(np.flatnonzero(~is_lo)),
    )


# ---------------------------------------------------------------------------------------------------------
# step kernels: attention of some queries to some keys within each segment, with the log-sum-exp


class StepKernel(Protocol):
    """q (Tq, Hq, D), k/v (Tk, Hkv, D); segment i owns q_lens[i] queries and k_lens[i] keys, in order.

    forward -> (out (Tq, Hq, D) fp32, lse (Tq, Hq) fp32); causal only when q_lens == k_lens (top-left).
    backward(..., out, dout, lse) with the FINAL out and lse of the whole ring -> dq, dk, dv (fp32), this
    step's share.
    """

    def forward(self, q, k, v, q_lens, k_lens, causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]: ...

    def backward(
        self, q, k, v, out, dout, lse, q_lens, k_lens, causal: bool, scale: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...


def _segments(q_lens: Sequence[int], k_lens: Sequence[int]):
    qo = ko = 0
    for lq, lk in zip(q_lens, k_lens, strict=True):
        if lq and lk:
            yield qo, lq, ko, lk
        qo, ko = qo + lq, ko + lk


class ReferenceStep:
    """Exact step kernel in fp32, one segment at a time (the CPU path, and the oracle of the others)."""

    name = "reference"

    @staticmethod
    def _scores(qs, ks, causal: bool, scale: float):
        s = (qs @ ks.transpose(-1, -2)) * scale  # (Hkv, G, lq, lk)
        if causal:
            lq, lk = s.shape[-2:]
            future = torch.ones(lq, lk, dtype=torch.bool, device=s.device).triu(1)
            s = s.masked_fill(future, float("-inf"))
        return s

    def forward(self, q, k, v, q_lens, k_lens, causal, scale):
        # fp32 even under --dtype bf16: autocast would run these matmuls in bf16, and the backward (outside
        # autocast) would then rebuild fp32 probabilities against a bf16 log-sum-exp
        with torch.autocast(q.device.type, enabled=False):
            return self._forward(q, k, v, q_lens, k_lens, causal, scale)

    def backward(self, q, k, v, out, dout, lse, q_lens, k_lens, causal, scale):
        with torch.autocast(q.device.type, enabled=False):
            return self._backward(q, k, v, out, dout, lse, q_lens, k_lens, causal, scale)

    def _forward(self, q, k, v, q_lens, k_lens, causal, scale):
        Tq, Hq, D = q.shape
        Hkv = k.shape[1]
        G = Hq // Hkv
        out = torch.zeros(Tq, Hq, D, dtype=torch.float32, device=q.device)
        lse = torch.full((Tq, Hq), float("-inf"), dtype=torch.float32, device=q.device)
        for qo, lq, ko, lk in _segments(q_lens, k_lens):
            qs = q[qo : qo + lq].float().view(lq, Hkv, G, D).permute(1, 2, 0, 3)  # (Hkv, G, lq, D)
            ks = k[ko : ko + lk].float().permute(1, 0, 2).unsqueeze(1)  # (Hkv, 1, lk, D)
            vs = v[ko : ko + lk].float().permute(1, 0, 2).unsqueeze(1)
            s = self._scores(qs, ks, causal, scale)
            m = s.amax(dim=-1, keepdim=True)  # finite: causal rows keep their diagonal
            p = torch.exp(s - m)
            den = p.sum(dim=-1, keepdim=True)
            out[qo : qo + lq] = ((p @ vs) / den).permute(2, 0, 1, 3).reshape(lq, Hq, D)
            lse[qo : qo + lq] = (m + den.log()).squeeze(-1).permute(2, 0, 1).reshape(lq, Hq)
        return out, lse

    def _backward(self, q, k, v, out, dout, lse, q_lens, k_lens, causal, scale):
        Tq, Hq, D = q.shape
        Tk, Hkv, _ = k.shape
        G = Hq // Hkv
        dq = torch.zeros(Tq, Hq, D, dtype=torch.float32, device=q.device)
        dk = torch.zeros(Tk, Hkv, D, dtype=torch.float32, device=q.device)
        dv = torch.zeros(Tk, Hkv, D, dtype=torch.float32, device=q.device)
        for qo, lq, ko, lk in _segments(q_lens, k_lens):
            qs, os_, dos = (
                x[qo : qo + lq].float().view(lq, Hkv, G, D).permute(1, 2, 0, 3) for x in (q, out, dout)
            )  # (Hkv, G, lq, D)
            ks = k[ko : ko + lk].float().permute(1, 0, 2).unsqueeze(1)  # (Hkv, 1, lk, D)
            vs = v[ko : ko + lk].float().permute(1, 0, 2).unsqueeze(1)
            lse_s = lse[qo : qo + lq].view(lq, Hkv, G).permute(1, 2, 0).unsqueeze(-1)  # (Hkv, G, lq, 1)
            p = torch.exp(self._scores(qs, ks, causal, scale) - lse_s)  # probabilities of the whole ring
            dv[ko : ko + lk] = (p.transpose(-1, -2) @ dos).sum(1).transpose(0, 1)
            dp = dos @ vs.transpose(-1, -2)
            ds = p * (dp - (dos * os_).sum(-1, keepdim=True))  # D_i = rowsum(dO * O) of the final output
            dq[qo : qo + lq] = (ds @ ks * scale).permute(2, 0, 1, 3).reshape(lq, Hq, D)
            dk[ko : ko + lk] = (ds.transpose(-1, -2) @ qs * scale).sum(1).transpose(0, 1)
        return dq, dk, dv


def _cumulative(lens: Sequence[int]) -> list[int]:
    return boundaries.cu_seqlens(lens)[1:].tolist()


def _split_calls(q_lens: Sequence[int], k_lens: Sequence[int], max_segments: int):
    """Cut a step's segment list into kernel calls of at most `max_segments` segments:
    (q start, q end, k start, k end, q_lens, k_lens) each; a segment never straddles two calls."""
    qo = ko = 0
    for i in range(0, len(q_lens), max_segments):
        ql, kl = list(q_lens[i : i + max_segments]), list(k_lens[i : i + max_segments])
        qe, ke = qo + sum(ql), ko + sum(kl)
        yield qo, qe, ko, ke, ql, kl
        qo, ko = qe, ke


class NpuStep:
    """Step kernel on Ascend: torch_npu.npu_fusion_attention / npu_fusion_attention_grad in TND, argument for
    argument as MindSpeed's TND ring calls them (mindspeed/core/context_parallel/ring_context_parallel.py,
    CausalEodAttentionStrategy): the diagonal step with the compressed causal mask and sparse_mode 3
    (rightDownCausal), the others with no mask, sparse_mode 0 and pre/next_tockens = the key count (all keys).

    The backward gets the ring's FINAL statistics: softmax_max = the log-sum-exp and softmax_sum = 1, which
    make the kernel's exp(s - max) / sum the probabilities of the whole ring; attention_in = the final output.
    Kernels are injectable (tests pass trainer.npu_emulator's); more than `max_segments` segments per call are
    split at segment boundaries, as the non-CP npu path does.
    """

    name = "npu"

    def __init__(self, kernel=None, grad_kernel=None, max_segments: int | None = None):
        from packer.trainer.kernels import NPU_MAX_SEGMENTS

        self._kernel, self._grad_kernel = kernel, grad_kernel
        self.max_segments = max_segments or NPU_MAX_SEGMENTS

    def _kernels(self):
        if self._kernel is None or self._grad_kernel is None:
            from packer.trainer.kernels import _torch_npu_kernel

            _torch_npu_kernel()  # the ImportError with the pip command when torch_npu is missing
            import torch_npu

            self._kernel = self._kernel or torch_npu.npu_fusion_attention
            self._grad_kernel = self._grad_kernel or torch_npu.npu_fusion_attention_grad
        return self._kernel, self._grad_kernel

    @staticmethod
    def _mask_args(causal: bool, n_keys: int, device) -> dict:
        from packer.trainer.kernels import npu_causal_mask

        return {
            "atten_mask": npu_causal_mask(device) if causal else None,
            "pre_tockens": n_keys,
            "next_tockens": 0 if causal else n_keys,
            "sparse_mode": 3 if causal else 0,
        }

    def forward(self, q, k, v, q_lens, k_lens, causal, scale):
        kernel, _ = self._kernels()
        outs, lses = [], []
        for qs, qe, ks, ke, ql, kl in _split_calls(q_lens, k_lens, self.max_segments):
            out, smax, ssum, *_ = kernel(
                q[qs:qe], k[ks:ke], v[ks:ke], q.shape[1], "TND",
                pse=None, padding_mask=None, scale=scale, keep_prob=1.0,
                actual_seq_qlen=_cumulative(ql), actual_seq_kvlen=_cumulative(kl),
                **self._mask_args(causal, ke - ks, q.device),
            )  # fmt: skip
            outs.append(out.float())
            lses.append(smax[..., 0] + ssum[..., 0].log())  # (T, N1, 8) in TND; the 8 lanes are equal
        cat = lambda xs: xs[0] if len(xs) == 1 else torch.cat(xs)  # noqa: E731
        return cat(outs), cat(lses)

    def backward(self, q, k, v, out, dout, lse, q_lens, k_lens, causal, scale):
        _, grad_kernel = self._kernels()
        dq, dk, dv = [], [], []
        for qs, qe, ks, ke, ql, kl in _split_calls(q_lens, k_lens, self.max_segments):
            smax = lse[qs:qe, :, None].expand(-1, -1, 8).contiguous()
            gq, gk, gv, *_ = grad_kernel(
                q[qs:qe], k[ks:ke], v[ks:ke], dout[qs:qe], q.shape[1], "TND",
                pse=None, padding_mask=None, softmax_max=smax, softmax_sum=torch.ones_like(smax),
                attention_in=out[qs:qe].to(q.dtype), scale_value=scale, keep_prob=1.0,
                actual_seq_qlen=_cumulative(ql), actual_seq_kvlen=_cumulative(kl),
                **self._mask_args(causal, ke - ks, q.device),
            )  # fmt: skip
            dq.append(gq.float())
            dk.append(gk.float())
            dv.append(gv.float())
        cat = lambda xs: xs[0] if len(xs) == 1 else torch.cat(xs)  # noqa: E731
        return cat(dq), cat(dk), cat(dv)


class CudaStep:
    """Step kernel on CUDA: FlashAttention-2 varlen through torch's own ops (`torch.nn.attention.varlen`),
    whose forward returns the log-sum-exp (num_heads, total_q) and whose backward takes the final output and
    log-sum-exp, i.e. exactly the ring's needs. GQA is native. bf16/fp16 only."""

    name = "cuda"

    def __init__(self, ops=None):
        self._ops = ops  # (forward, backward); tests inject fakes that record the call

    def _kernels(self):
        if self._ops is None:
            import torch.nn.attention.varlen  # noqa: F401  (registers torch.ops.torch_attn)

            self._ops = (torch.ops.torch_attn._varlen_attn, torch.ops.torch_attn._varlen_attn_backward)
        return self._ops

    @staticmethod
    def _cu(lens, device) -> torch.Tensor:
        return torch.from_numpy(boundaries.cu_seqlens(lens)).to(device, non_blocking=True)

    def forward(self, q, k, v, q_lens, k_lens, causal, scale):
        if q.dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"the cuda ring step runs FlashAttention, which takes float16/bfloat16, got {q.dtype}")
        fwd, _ = self._kernels()
        cu_q, cu_k = self._cu(q_lens, q.device), self._cu(k_lens, q.device)
        out, lse_HT, _ = fwd(
            q, k, v, cu_q, cu_k, max(q_lens), max(k_lens), is_causal=causal, scale=scale,
            enable_gqa=q.shape[1] != k.shape[1],
        )  # fmt: skip
        return out.float(), lse_HT.transpose(0, 1).float()

    def backward(self, q, k, v, out, dout, lse, q_lens, k_lens, causal, scale):
        _, bwd = self._kernels()
        cu_q, cu_k = self._cu(q_lens, q.device), self._cu(k_lens, q.device)
        rng = torch.zeros(2, dtype=torch.uint64, device=q.device)  # no dropout
        dq, dk, dv = bwd(
            dout.to(q.dtype), q, k, v, out.to(q.dtype), lse.transpose(0, 1).contiguous(), cu_q, cu_k,
            max(q_lens), max(k_lens), causal, rng, scale=scale,
        )  # fmt: skip
        return dq.float(), dk.float(), dv.float()


# ---------------------------------------------------------------------------------------------------------
# the ring


@dataclass(frozen=True, slots=True)
class Ring:
    """A CP group: global ranks in ring order, this process's place in it."""

    group: dist.ProcessGroup | None
    ranks: tuple[int, ...]  # global ranks of the group, cp rank order
    cp_rank: int

    @property
    def size(self) -> int:
        return len(self.ranks)

    @property
    def next(self) -> int:
        return self.ranks[(self.cp_rank + 1) % self.size]

    @property
    def prev(self) -> int:
        return self.ranks[(self.cp_rank - 1) % self.size]

    def exchange(self, tensors: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list]:
        """Start sending `tensors` to the next rank and receiving their likes from the previous one."""
        recv = [torch.empty_like(t) for t in tensors]
        ops = [dist.P2POp(dist.isend, t, self.next, self.group) for t in tensors]
        ops += [dist.P2POp(dist.irecv, t, self.prev, self.group) for t in recv]
        return recv, dist.batch_isend_irecv(ops)


def _wait(reqs) -> None:
    for r in reqs:
        r.wait()


def _step_plan(layout: ZigzagLayout, j: int):
    """(query rows or None = all, key rows or None = all, q_lens, k_lens, causal) for the K/V of cp rank j."""
    r = layout.cp_rank
    if j == r:
        return None, None, layout.local_lens, layout.local_lens, True
    if j < r:
        return None, layout.lo_L, layout.local_lens, layout.half_lens, False
    return layout.hi_L, None, layout.half_lens, layout.local_lens, False


def _rows(x: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
    return x if idx is None else x.index_select(0, idx)


def _merge(out, lse, rows, o_new, lse_new) -> None:
    """Fold a partial result into the running (out, lse) in place: softmax over the union of their keys."""
    o_old, l_old = _rows(out, rows), _rows(lse, rows)
    l_max = torch.maximum(l_old, lse_new)
    w_old, w_new = torch.exp(l_old - l_max), torch.exp(lse_new - l_max)
    den = w_old + w_new
    o = (o_old * w_old[..., None] + o_new * w_new[..., None]) / den[..., None]
    l_all = l_max + den.log()
    if rows is None:
        out.copy_(o)
        lse.copy_(l_all)
    else:
        out.index_copy_(0, rows, o)
        lse.index_copy_(0, rows, l_all)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, layout: ZigzagLayout, ring: Ring, kernel: StepKernel, scale: float):
        N, r = ring.size, ring.cp_rank
        out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        lse = torch.full(q.shape[:2], float("-inf"), dtype=torch.float32, device=q.device)
        kv = [k.contiguous(), v.contiguous()]
        for s in range(N):
            if s < N - 1:
                nxt, reqs = ring.exchange(kv)  # in flight while this block is computed
            q_rows, k_rows, q_lens, k_lens, causal = _step_plan(layout, (r - s) % N)
            o_s, lse_s = kernel.forward(
                _rows(q, q_rows), _rows(kv[0], k_rows), _rows(kv[1], k_rows), q_lens, k_lens, causal, scale
            )
            if s == 0:
                out.copy_(o_s)
                lse.copy_(lse_s)
            else:
                _merge(out, lse, q_rows, o_s, lse_s)
            if s < N - 1:
                _wait(reqs)
                kv = nxt
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.layout, ctx.ring, ctx.kernel, ctx.scale = layout, ring, kernel, scale
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        layout, ring, kernel, scale = ctx.layout, ctx.ring, ctx.kernel, ctx.scale
        N, r = ring.size, ring.cp_rank
        dout = dout.contiguous()
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        kv = [k.contiguous(), v.contiguous()]
        dkv = [torch.zeros(k.shape, dtype=torch.float32, device=k.device) for _ in range(2)]
        for s in range(N):
            q_rows, k_rows, q_lens, k_lens, causal = _step_plan(layout, (r - s) % N)
            dq_s, dk_s, dv_s = kernel.backward(
                _rows(q, q_rows), _rows(kv[0], k_rows), _rows(kv[1], k_rows),
                _rows(out, q_rows), _rows(dout, q_rows), _rows(lse, q_rows), q_lens, k_lens, causal, scale,
            )  # fmt: skip
            if q_rows is None:
                dq += dq_s
            else:
                dq.index_add_(0, q_rows, dq_s)
            for acc, d in zip(dkv, (dk_s, dv_s), strict=True):
                if k_rows is None:
                    acc += d
                else:
                    acc.index_add_(0, k_rows, d)
            # The block (and its gradient so far) moves on; after the last step only the gradient travels,
            # one more hop, home to the rank that owns the block.
            if N == 1:  # no ring: the block never left home
                break
            recv, reqs = ring.exchange(dkv if s == N - 1 else [*kv, *dkv])
            _wait(reqs)
            if s == N - 1:
                dkv = recv
            else:
                kv, dkv = recv[:2], recv[2:]
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None, None, None


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: ZigzagLayout,
    ring: Ring,
    kernel: StepKernel | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Causal, document-bounded attention of this rank's zigzag share. q (T/N, Hq, D), k/v (T/N, Hkv, D)."""
    if ring.size != layout.cp_size or ring.cp_rank != layout.cp_rank:
        raise ValueError(
            f"layout is for cp rank {layout.cp_rank} of {layout.cp_size}, ring is rank {ring.cp_rank} of "
            f"{ring.size}"
        )
    if q.shape[0] != layout.num_local or k.shape[0] != layout.num_local:
        raise ValueError(
            f"cp rank {layout.cp_rank} holds {layout.num_local} tokens, got q {tuple(q.shape)}, k {tuple(k.shape)}"
        )
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"grouped-query attention needs Hq % Hkv == 0, got {q.shape[1]} and {k.shape[1]}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return _RingAttention.apply(q, k, v, layout, ring, kernel or ReferenceStep(), scale)


# ---------------------------------------------------------------------------------------------------------
# micro-batches


@dataclass(frozen=True, slots=True)
class CPMeta:
    """What the model's attention gets instead of a VarlenMeta under context parallelism."""

    layout: ZigzagLayout
    ring: Ring
    cu_seqlens: torch.Tensor  # the micro-batch's GLOBAL segments (int32, leading 0), as in its VarlenMeta
    kernel: StepKernel | None = None  # None: chosen from the attention backend

    @property
    def max_seqlen(self) -> int:
        return self.layout.max_seqlen

    @property
    def total_tokens(self) -> int:
        return self.layout.num_local

    def to(self, device: torch.device | str) -> CPMeta:
        return CPMeta(self.layout.to(device), self.ring, self.cu_seqlens.to(device), self.kernel)


def step_kernel(backend: str, npu_max_segments: int | None = None) -> StepKernel:
    """The ring's step kernel for an attention backend: the device's fused kernel, the exact one on CPU."""
    if backend == "npu":
        return NpuStep(max_segments=npu_max_segments)
    if backend == "cuda":
        return CudaStep()
    if backend in ("reference", "blockwise"):
        return ReferenceStep()
    raise ValueError(
        f"attention backend {backend!r} cannot run under context parallelism: it needs document-bounded "
        "(packed) rows; use --attention varlen"
    )


def shard_micro_batch(mb, ring: Ring):
    """This CP rank's share of a micro-batch (trainer.batching.MicroBatch), built on every rank of the group
    from the same full micro-batch, so nothing but K/V ever travels.

    Labels, positions and segment ids are taken from the full micro-batch (a label is the next token of the
    whole document, a position counts from the document's start). Counts that the step's loss divides by are
    split so that summing them over the group gives the micro-batch's: targets by where they fall, tokens
    and documents on cp rank 0 only; `segment_targets_S` holds each document's target count over the WHOLE
    micro-batch, which --loss-average sample needs for a document split across ranks.
    """
    from packer.trainer.batching import IGNORE_INDEX  # batching imports attention, which imports this module

    seg_lens = np.diff(mb.meta.cu_seqlens.cpu().numpy())
    layout = zigzag_layout(seg_lens, ring.size, ring.cp_rank)
    idx = layout.index_L
    labels = mb.labels_T[idx]
    is_target = labels != IGNORE_INDEX
    n_seg = len(seg_lens)
    seg_targets = torch.zeros(n_seg, dtype=torch.float32).index_add_(
        0, mb.segment_ids_T, (mb.labels_T != IGNORE_INDEX).float()
    )
    first = ring.cp_rank == 0
    return dataclasses.replace(
        mb,
        tokens_T=mb.tokens_T[idx],
        positions_T=mb.positions_T[idx],
        labels_T=labels,
        segment_ids_T=mb.segment_ids_T[idx],
        target_idx_N=torch.nonzero(is_target).flatten(),
        meta=CPMeta(layout, ring, mb.meta.cu_seqlens),
        num_tokens=mb.num_tokens if first else 0,
        num_targets=int(is_target.sum()),
        num_docs=mb.num_docs if first else 0,
        segment_targets_S=seg_targets,
    )


def cp_attention(q, k, v, meta: CPMeta, backend: str, npu_max_segments: int | None = None, scale=None):
    kernel = meta.kernel or step_kernel(backend, npu_max_segments)
    return ring_attention(q, k, v, meta.layout, meta.ring, kernel, scale)


def cp_groups(world_size: int, cp_size: int, rank: int) -> tuple[Ring, int, int]:
    """Make the CP process groups (every rank creates every group, in the same order) and return this rank's
    ring, its data-parallel rank and the data-parallel size. Megatron's order: the CP ranks of one DP replica
    are adjacent, global rank = dp_rank * cp_size + cp_rank."""
    if cp_size < 1 or world_size % cp_size:
        raise ValueError(
            f"--context-parallel-size {cp_size} must divide the number of ranks ({world_size}); launch "
            f"torchrun with --nproc-per-node a multiple of {cp_size}"
        )
    mine = None
    for d in range(world_size // cp_size):
        ranks = tuple(range(d * cp_size, (d + 1) * cp_size))
        group = dist.new_group(list(ranks)) if world_size > 1 else None
        if rank in ranks:
            mine = Ring(group, ranks, rank - d * cp_size)
    return mine, rank // cp_size, world_size // cp_size
