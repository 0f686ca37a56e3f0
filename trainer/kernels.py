"""The device kernels behind the `npu` and `cuda` attention backends, imported only where they run.

    npu   torch_npu.npu_fusion_attention, TND layout, called the way MindSpeed-LLM calls it for packed data
          (sparse_mode 4; 3 selectable), at most NPU_MAX_SEGMENTS segments per call
    cuda  torch.nn.attention.varlen.varlen_attn (FlashAttention-2 in torch), flash_attn's varlen function
          for torch < 2.10
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch

from packer.trainer.varlen import VarlenMeta, check_inputs

# ---------------------------------------------------------------------------------------------------------
# npu: torch_npu.npu_fusion_attention in TND layout, called the way MindSpeed-LLM calls it for packed data

# sparse_mode 2/3/4 take this fixed "compressed" causal mask, whatever the sequence length
NPU_MASK_SIZE = 2048
# 4 = band between pre_tockens before and next_tockens after the diagonal of each segment: what MindSpeed-LLM's
# TND path sets; with next_tockens=0 and pre_tockens >= the segment length it is causal.
# 3 = rightDownCausal: what transformers' NPU flash-attention and XTuner pass for varlen; ignores pre/next.
NPU_SPARSE_MODES = (4, 3)
NPU_SPARSE_MODE = 4
NPU_PRE_TOCKENS = 65536  # MindSpeed-LLM's --pre-tockens / --next-tockens defaults; sparse_mode=3 ignores both
NPU_NEXT_TOCKENS = 0
# Segments (len(actual_seq_qlen)) per call: the op-plugin docs allow at most 1K in the varlen case (B 1~2K
# elsewhere on the same page; MindSpeed-LLM warns above 2048 and reports core dumps). Longer lists are split.
NPU_MAX_SEGMENTS = 1024


@functools.lru_cache(maxsize=4)
def npu_causal_mask(device: torch.device | str = "cpu") -> torch.Tensor:
    """(2048, 2048) bool, True above the diagonal (= masked out), built once per device like MindSpeed-LLM."""
    return torch.triu(torch.ones(NPU_MASK_SIZE, NPU_MASK_SIZE, device=device), diagonal=1).bool()


def _torch_npu_kernel() -> Callable[..., tuple]:
    try:
        import torch_npu  # here, not at module import: CPU/CUDA users never need it
    except ImportError as e:
        raise ImportError(
            "attention backend 'npu' needs torch_npu and an Ascend NPU with CANN: `pip install torch-npu` at the "
            "version matching your torch and CANN; without an NPU use backend 'auto'"
        ) from e
    return torch_npu.npu_fusion_attention


def check_npu_sparse_mode(sparse_mode: int) -> int:
    if sparse_mode not in NPU_SPARSE_MODES:
        raise ValueError(
            f"npu sparse_mode {sparse_mode!r} is not supported; choose 4 (band, MindSpeed-LLM's call) or 3 "
            "(rightDownCausal, transformers' / XTuner's call): --npu-sparse-mode {4,3}"
        )
    return sparse_mode


def npu_call_plan(
    actual_seq_len: list[int], max_segments: int = NPU_MAX_SEGMENTS
) -> list[tuple[int, int, list[int]]]:
    """Kernel calls for one micro-batch: (token start, token end, that call's actual_seq_len) each.

    Calls are cut at segment ends only, so no segment straddles two calls and each call computes exactly what
    the one big call would for its tokens. Ends [3, 5, 8, 13, 16], 2 segments a call:

        (0, 5, [3, 5])   (5, 13, [3, 8])   (13, 16, [3])

    A call whose segments are all empty (no tokens) is dropped.
    """
    if max_segments < 1:
        raise ValueError(f"max_segments must be >= 1, got {max_segments}")
    plan, start = [], 0
    for i in range(0, len(actual_seq_len), max_segments):
        ends = actual_seq_len[i : i + max_segments]
        if ends[-1] > start:
            plan.append((start, ends[-1], [e - start for e in ends]))
        start = ends[-1]
    return plan


def npu_varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    meta: VarlenMeta,
    scale: float | None = None,
    kernel: Callable[..., tuple] | None = None,
    sparse_mode: int = NPU_SPARSE_MODE,
    max_segments: int = NPU_MAX_SEGMENTS,
) -> torch.Tensor:
    """npu backend with the kernel injectable (tests pass trainer.npu_emulator.npu_fusion_attention).

    TND: q is (T, N1, D), k/v (T, N2, D) with N1 % N2 == 0 (GQA is native, no repeat); head_num is N1.
    actual_seq_qlen/kvlen are CUMULATIVE ends as python ints ([5, 3, 0, 8] -> [5, 8, 8, 16]); passing them
    as host lists avoids a device->host copy per layer. More than `max_segments` segments: several calls
    (npu_call_plan), outputs concatenated along T.
    """
    check_inputs(q, k, v, meta)
    check_npu_sparse_mode(sparse_mode)
    if sparse_mode == 4 and meta.max_seqlen > NPU_PRE_TOCKENS:
        raise ValueError(
            f"a segment of {meta.max_seqlen} tokens is longer than pre_tockens={NPU_PRE_TOCKENS}: sparse_mode=4 "
            "(band) would attend to a sliding window, not causally; pass --npu-sparse-mode 3"
        )
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    kernel = _torch_npu_kernel() if kernel is None else kernel
    mask = npu_causal_mask(q.device)
    plan = npu_call_plan(meta.actual_seq_len, max_segments)
    outs = []
    for start, end, ends in plan:
        # one call: the tensors as they are; several: views of whole segments
        qc, kc, vc = (q, k, v) if len(plan) == 1 else (q[start:end], k[start:end], v[start:end])
        # MindSpeed-LLM's call (custom_dot_product_attention.py), argument for argument
        out_THD, *_ = kernel(
            qc,
            kc,
            vc,
            q.shape[1],
            "TND",
            pse=None,
            padding_mask=None,
            atten_mask=mask,
            actual_seq_qlen=ends,
            actual_seq_kvlen=ends,
            scale=scale,
            pre_tockens=NPU_PRE_TOCKENS,
            next_tockens=NPU_NEXT_TOCKENS,
            keep_prob=1.0,
            inner_precise=0,
            sparse_mode=sparse_mode,
        )  # (attention_out, softmax_max, softmax_sum, softmax_out, seed, offset, mask_len)
        outs.append(out_THD)
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)


# ---------------------------------------------------------------------------------------------------------
# cuda: torch's own varlen kernel (FlashAttention-2 inside), flash-attn as the fallback for older torch


def cuda_kernel() -> tuple[str, Callable]:
    try:
        from torch.nn.attention.varlen import varlen_attn  # torch >= 2.10

        return "torch", varlen_attn
    except ImportError:
        pass
    try:
        from flash_attn import flash_attn_varlen_func

        return "flash_attn", flash_attn_varlen_func
    except ImportError as e:
        raise ImportError(
            f"attention backend 'cuda' needs torch >= 2.10 (torch.nn.attention.varlen) or flash-attn; this is torch "
            f"{torch.__version__}: `pip install -U torch` or `pip install flash-attn --no-build-isolation`"
        ) from e


def cuda_varlen_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: VarlenMeta, scale: float
) -> torch.Tensor:
    """q (T, Hq, D), k/v (T, Hkv, D) -> (T, Hq, D). Both kernels take cu_seqlens (n_seg+1,) int32 on q's
    device and max_seqlen as a python int (an upper bound on segment length that sizes the kernel's grid)."""
    if q.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(
            f"attention backend 'cuda' runs FlashAttention, which takes float16/bfloat16, got {q.dtype}; "
            "train in bf16 (or autocast) or use backend 'blockwise' / 'reference' for fp32"
        )
    name, kernel = cuda_kernel()
    cu, n = meta.cu_seqlens.to(q.device, non_blocking=True), meta.max_seqlen  # no-op when already there
    if name == "torch":
        # window (-1, 0) is how varlen_attn spells causal; GQA is native (enable_gqa), no repeat of k/v.
        return kernel(
            q, k, v, cu, cu, n, n, scale=scale, window_size=(-1, 0), enable_gqa=q.shape[1] != k.shape[1]
        )
    return kernel(q, k, v, cu, cu, n, n, softmax_scale=scale, causal=True)  # flash-attn: GQA native too


# ---------------------------------------------------------------------------------------------------------
