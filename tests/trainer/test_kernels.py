"""The kernel calls without the hardware: the npu segment guard (split at segment boundaries == one call), the
segment count the trainer prints, and the cuda call contract against fakes of varlen_attn / flash-attn."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch

from packer.trainer import kernels, npu_emulator
from packer.trainer.attention import AttentionConfig, VarlenMeta, attention, max_segments_per_micro_batch
from packer.trainer.kernels import NPU_MAX_SEGMENTS, npu_call_plan, npu_varlen_attention
from packer.trainer.varlen import segments_per_pack

from .conftest import random_pack


def make_qkv(meta: VarlenMeta, hq: int, hkv: int, d: int, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(meta.total_tokens, h, d, generator=g).to(dtype).requires_grad_() for h in (hq, hkv, hkv)]


def grads(out, inputs, seed: int = 1):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    return torch.autograd.grad(out, inputs, g.to(out.dtype))


# --- npu: the segment guard ------------------------------------------------------------------------------


def test_call_plan_cuts_only_at_segment_ends():
    assert npu_call_plan([3, 5, 8, 13, 16], 2) == [(0, 5, [3, 5]), (5, 13, [3, 8]), (13, 16, [3])]
    assert npu_call_plan([3, 5, 8, 13, 16], 5) == [(0, 16, [3, 5, 8, 13, 16])]
    # empty documents stay in their call; a call of empty documents only (no tokens) is dropped
    assert npu_call_plan([0, 0, 4, 4, 4, 4, 9], 2) == [(0, 4, [4, 4]), (4, 9, [5])]
    with pytest.raises(ValueError, match=">= 1"):
        npu_call_plan([4], 0)


def test_documented_limit_is_the_emulators():
    assert NPU_MAX_SEGMENTS == npu_emulator.MAX_SEGMENTS == AttentionConfig("npu").npu_max_segments == 1024


def test_1204_segments_split_into_two_calls_equal_one_call(monkeypatch):
    """The issue's case: 4 packs of 300 short documents, each row short of S, = 4 * 301 = 1,204 segments."""
    rows = [[1] * 150 + [2] * 150] * 4  # 450 of 512 tokens a row
    meta = VarlenMeta.from_rows(rows, 512)
    assert len(meta.actual_seq_len) == 1204
    q, k, v = make_qkv(meta, 2, 1, 8)
    calls = []

    def recording(*args, **kwargs):
        calls.append(kwargs["actual_seq_qlen"])
        return npu_emulator.npu_fusion_attention(*args, **kwargs)

    split = npu_varlen_attention(q, k, v, meta, kernel=recording)
    assert [len(c) for c in calls] == [1024, 180] and calls[1][-1] == 2048 - calls[0][-1]
    with pytest.raises(npu_emulator.NpuArgumentError, match="1..1024 segments"):  # the guard is needed
        npu_varlen_attention(q, k, v, meta, kernel=npu_emulator.npu_fusion_attention, max_segments=2048)
    monkeypatch.setattr(npu_emulator, "MAX_SEGMENTS", 2048)  # a kernel without the limit, for the comparison
    one = npu_varlen_attention(q, k, v, meta, kernel=npu_emulator.npu_fusion_attention, max_segments=2048)
    torch.testing.assert_close(split, one, atol=1e-6, rtol=0)
    for g_split, g_one in zip(grads(split, (q, k, v)), grads(one, (q, k, v)), strict=True):
        torch.testing.assert_close(g_split, g_one, atol=1e-6, rtol=0)


@pytest.mark.parametrize("max_segments", [1, 2, 3])
@pytest.mark.parametrize("mode", [4, 3])
def test_split_calls_match_reference(max_segments, mode):
    meta = VarlenMeta.from_rows([[5, 3, 0, 8], [0, 9, 0], [6, 6]], 16)  # empty documents at call edges
    q, k, v = make_qkv(meta, 4, 2, 8)
    cfg = AttentionConfig("npu", npu_sparse_mode=mode, npu_max_segments=max_segments)
    out = npu_varlen_attention(
        q, k, v, meta, kernel=npu_emulator.npu_fusion_attention, sparse_mode=mode, max_segments=max_segments
    )
    ref = attention(q, k, v, meta, "reference")
    assert (out - ref).abs().max() <= 1e-5
    for g_out, g_ref in zip(grads(out, (q, k, v)), grads(ref, (q, k, v)), strict=True):
        assert (g_out - g_ref).abs().max() <= 1e-5
    assert cfg.npu_max_segments == max_segments


# --- the segment count the trainer prints at start ------------------------------------------------------


class _Packs:
    """Just what max_segments_per_micro_batch reads: len, [i].doc_lens, seq_length."""

    def __init__(self, doc_lens: list[list[int]], seq_length: int):
        rng = np.random.default_rng(0)
        self.packs = [random_pack(rng, lens, 97, 96) for lens in doc_lens]
        self.seq_length = seq_length

    def __len__(self):
        return len(self.packs)

    def __getitem__(self, i):
        return self.packs[i]


def test_max_segments_per_micro_batch_hand_checked():
    # segments per pack: 2 (full row), 3 (2 docs + tail), 1 (1 doc, full), 301 (300 docs + tail)
    ds = _Packs([[4, 4], [2, 3], [8], [1] * 5], seq_length=8)
    assert segments_per_pack(ds) == [2, 3, 1, 6]
    assert [max_segments_per_micro_batch(ds, b) for b in (1, 2, 4, 9)] == [6, 9, 12, 12]
    assert segments_per_pack(ds, seq_length=16) == [3, 3, 2, 6]  # a longer row gives every pack a tail
    issue = _Packs([[1] * 300] * 4, seq_length=512)
    assert max_segments_per_micro_batch(issue, 4) == 1204 > NPU_MAX_SEGMENTS
    with pytest.raises(ValueError, match=">= 1"):
        max_segments_per_micro_batch(ds, 0)


def test_max_segments_per_micro_batch_on_a_real_build(tiny_build):
    from packer.dataset import PackedDataset
    from packer.trainer.batching import collate

    ds = PackedDataset(tiny_build("segments", seed=3))
    per_pack = [len(collate([ds[i]], ds.seq_length, ds.pad_id).meta.actual_seq_len) for i in range(len(ds))]
    assert segments_per_pack(ds) == per_pack
    assert max_segments_per_micro_batch(ds, 1) == max(per_pack)
    everything = collate([ds[i] for i in range(len(ds))], ds.seq_length, ds.pad_id).meta
    assert max_segments_per_micro_batch(ds, len(ds)) == len(everything.actual_seq_len)


# --- cuda: the call contract, against fakes with the real signatures -------------------------------------


def _fake_semantics(q, k, v, cu, max_len, window: tuple[int, int], scale: float) -> torch.Tensor:
    """What a FlashAttention varlen kernel computes from its arguments: per segment, key j visible to query i
    iff (left < 0 or j >= i - left) and (right < 0 or j <= i + right); (-1, 0) is causal. fp32 inside."""
    if cu.dtype != torch.int32:
        raise RuntimeError(f"cu_seqlens must have dtype int32, got {cu.dtype}")
    if cu.device != q.device:
        raise RuntimeError(f"cu_seqlens must be on {q.device}, got {cu.device}")
    if type(max_len) is not int:
        raise TypeError(f"max_seqlen must be a python int, got {type(max_len).__name__}")
    bounds = cu.tolist()
    if max(b - a for a, b in zip(bounds, bounds[1:], strict=False)) > max_len:
        raise RuntimeError("a segment is longer than max_seqlen: the kernel's grid would miss its tail")
    G = q.shape[1] // k.shape[1]
    out = torch.empty(q.shape, dtype=torch.float32)
    left, right = window
    for a, b in zip(bounds, bounds[1:], strict=False):
        if a == b:
            continue
        i, j = torch.arange(b - a)[:, None], torch.arange(b - a)[None, :]
        keep = ((left < 0) | (j >= i - left)) & ((right < 0) | (j <= i + right))
        qs = q[a:b].float().transpose(0, 1)
        ks, vs = (x[a:b].float().repeat_interleave(G, dim=1).transpose(0, 1) for x in (k, v))
        probs = ((qs @ ks.transpose(1, 2)) * scale).masked_fill(~keep, float("-inf")).softmax(-1)
        out[a:b] = (probs @ vs).transpose(0, 1)
    return out.to(q.dtype)


@pytest.fixture
def fake_cuda(monkeypatch):
    """fake_cuda("torch" | "flash_attn") -> list of recorded calls; the backend then calls that fake."""

    def install(which: str) -> list[dict]:
        calls: list[dict] = []

        # torch.nn.attention.varlen.varlen_attn's signature (torch 2.13, inspect.signature)
        def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                        window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
            calls.append(dict(q=query, k=key, v=value, cu_q=cu_seq_q, cu_k=cu_seq_k, max_q=max_q, max_k=max_k,
                              scale=scale, window=window_size, enable_gqa=enable_gqa))
            if query.shape[1] != key.shape[1] and not enable_gqa:
                raise RuntimeError("fewer key/value heads than query heads needs enable_gqa=True")
            if query.device.type == "meta":
                return torch.empty_like(query)
            return _fake_semantics(query, key, value, cu_seq_q, max_q, window_size, scale)

        # flash_attn.flash_attn_varlen_func's signature (flash-attn 2.x)
        def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                                   softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                                   alibi_slopes=None, deterministic=False, return_attn_probs=False,
                                   block_table=None):
            calls.append(dict(q=q, k=k, v=v, cu_q=cu_seqlens_q, cu_k=cu_seqlens_k, max_q=max_seqlen_q,
                              max_k=max_seqlen_k, scale=softmax_scale, causal=causal, window=window_size,
                              dropout_p=dropout_p))
            if q.device.type == "meta":
                return torch.empty_like(q)
            right = 0 if causal else window_size[1]
            return _fake_semantics(q, k, v, cu_seqlens_q, max_seqlen_q, (window_size[0], right), softmax_scale)

        if which == "torch":
            varlen = pytest.importorskip("torch.nn.attention.varlen", reason="torch < 2.10 has no varlen_attn")
            monkeypatch.setattr(varlen, "varlen_attn", varlen_attn)
        else:  # torch < 2.10: no torch.nn.attention.varlen, flash-attn installed
            monkeypatch.setitem(sys.modules, "torch.nn.attention.varlen", None)
            module = types.ModuleType("flash_attn")
            module.flash_attn_varlen_func = flash_attn_varlen_func
            monkeypatch.setitem(sys.modules, "flash_attn", module)
        assert kernels.cuda_kernel()[0] == which
        return calls

    return install


LAYOUTS = {"gqa_empty_doc": ([[5, 3, 0, 8], [6, 6]], 16, 4, 2), "mha_tail": ([[7, 4], [0, 9, 0]], 16, 2, 2)}


@pytest.mark.parametrize("which", ["torch", "flash_attn"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_cuda_backend_calls_the_kernel_causally_with_int32_offsets(fake_cuda, which, layout):
    calls = fake_cuda(which)
    rows, S, hq, hkv = LAYOUTS[layout]
    meta = VarlenMeta.from_rows(rows, S)
    q, k, v = make_qkv(meta, hq, hkv, 8, dtype=torch.bfloat16)
    out = attention(q, k, v, meta, "cuda", scale=0.3)
    [c] = calls
    assert c["q"] is q and c["k"] is k and c["v"] is v  # (T, H, D) as they are: no repeat of k/v, no copy
    for cu in (c["cu_q"], c["cu_k"]):
        assert cu.dtype == torch.int32 and cu.device == q.device
        assert cu.tolist() == [0, *meta.actual_seq_len]  # leading 0: the CUDA form
    assert type(c["max_q"]) is int and c["max_q"] == c["max_k"] == meta.max_seqlen
    assert c["scale"] == 0.3
    if which == "torch":
        assert c["window"] == (-1, 0)  # varlen_attn's spelling of causal; (-1, -1) is full attention
        assert c["enable_gqa"] is (hq != hkv)
    else:
        assert c["causal"] is True and c["window"] == (-1, -1) and c["dropout_p"] == 0.0
    # ...and what the fake computes from those arguments is causal attention within documents
    ref = attention(q.float(), k.float(), v.float(), meta, "reference", scale=0.3)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("which", ["torch", "flash_attn"])
def test_cuda_backend_moves_offsets_to_the_tensors_device(fake_cuda, which):
    """cu_seqlens built on the host must reach the kernel on q's device (here: the meta device)."""
    calls = fake_cuda(which)
    meta = VarlenMeta.from_rows([[5, 3, 0, 8], [6, 6]], 16)  # cu_seqlens on the CPU
    q = torch.empty(32, 4, 8, dtype=torch.bfloat16, device="meta")
    k = v = torch.empty(32, 2, 8, dtype=torch.bfloat16, device="meta")
    attention(q, k, v, meta, "cuda")
    assert calls[0]["cu_q"].device.type == calls[0]["cu_k"].device.type == "meta"
    assert calls[0]["cu_q"].dtype == torch.int32
