"""The device kernels behind the `npu` and `cuda` attention backends, imported only where they run.

    npu   torch_npu.npu_fusion_attention, TND layout, called the way MindSpeed-LLM calls it for packed data
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
NPU_SPARSE_MODE = 3  # rightDownCausal: causal within each (actual_seq_qlen, actual_seq_kvlen) segment
NPU_PRE_TOCKENS = 65536  # MindSpeed-LLM's defaults; sparse_mode=3 ignores both
NPU_NEXT_TOCKENS = 0


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


def npu_varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    meta: VarlenMeta,
    scale: float | None = None,
    kernel: Callable[..., tuple] | None = None,
) -> torch.Tensor:
    """npu backend with the kernel injectable (tests pass trainer.npu_emulator.npu_fusion_attention).

    TND: q is (T, N1, D), k/v (T, N2, D) with N1 % N2 == 0 (GQA is native, no repeat); head_num is N1.
    actual_seq_qlen/kvlen are CUMULATIVE ends as python ints ([5, 3, 0, 8] -> [5, 8, 8, 16]); passing them
    as host lists avoids a device->host copy per layer.
    """
    check_inputs(q, k, v, meta)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    kernel = _torch_npu_kernel() if kernel is None else kernel
    out = kernel(
        q,
        k,
        v,
        q.shape[1],
        "TND",
        pse=None,
        padding_mask=None,
        atten_mask=npu_causal_mask(q.device),
        scale=scale,
        keep_prob=1.0,
        pre_tockens=NPU_PRE_TOCKENS,
        next_tockens=NPU_NEXT_TOCKENS,
        inner_precise=0,
        actual_seq_qlen=list(meta.actual_seq_len),
        actual_seq_kvlen=list(meta.actual_seq_len),
        sparse_mode=NPU_SPARSE_MODE,
    )
    return out[0]  # (attention_out, softmax_max, softmax_sum, softmax_out, seed, offset, mask_len)


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


def cuda_varlen_attention(q, k, v, meta: VarlenMeta, scale: float) -> torch.Tensor:
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
