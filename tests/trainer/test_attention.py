"""Every attention backend against an independent per-document attention, outputs and gradients."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from packer.boundaries import cu_seqlens
from packer.trainer import npu_emulator
from packer.trainer.attention import (
    BACKENDS,
    AttentionConfig,
    VarlenMeta,
    attention,
    attention_flops,
    block_plan,
    npu_causal_mask,
    npu_varlen_attention,
    resolve_backend,
)
from packer.trainer.npu_emulator import NpuArgumentError

TOL = 1e-5  # fp32

# name -> (documents per row, row_len S, Hq, Hkv, D)
LAYOUTS = {
    "one_row_empty_doc": ([[5, 3, 0, 8]], 16, 2, 2, 8),
    "two_rows_padding_tail": ([[7, 4], [0, 9, 0]], 16, 2, 2, 8),
    "gqa": ([[5, 3, 0, 8], [6, 6]], 16, 4, 2, 8),
    "doc_longer_than_block": ([[150, 20], [192]], 192, 2, 1, 16),
}


def make_qkv(meta: VarlenMeta, hq: int, hkv: int, d: int, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    T = meta.total_tokens
    return [torch.randn(T, h, d, generator=g, dtype=dtype).requires_grad_() for h in (hq, hkv, hkv)]


def naive_per_document(q, k, v, seg_lens: list[int], scale: float) -> torch.Tensor:
    """Each document alone: plain causal softmax attention in float64, one head at a time."""
    G = q.shape[1] // k.shape[1]
    out, start = [], 0
    for n in seg_lens:
        for t in range(start, start + n):
            heads = []
            for h in range(q.shape[1]):
                keys = k[start : t + 1, h // G].double()  # keys of this document up to and including t
                w = torch.softmax(keys @ q[t, h].double() * scale, dim=0)
                heads.append(w @ v[start : t + 1, h // G].double())
            out.append(torch.stack(heads))
        start += n
    return torch.stack(out).to(q.dtype)


def run_backend(name: str, q, k, v, meta: VarlenMeta, block_size: int | None = None):
    if name.startswith("npu"):  # no Ascend device here: the documented semantics, emulated
        mode = 3 if name == "npu3" else 4  # "npu": the default, MindSpeed-LLM's sparse_mode=4
        return npu_varlen_attention(q, k, v, meta, kernel=npu_emulator.npu_fusion_attention, sparse_mode=mode)
    if name == "blockwise":
        return attention(q, k, v, meta, "blockwise", block_size=block_size)
    return attention(q, k, v, meta, name)


def grads(out, inputs, seed: int = 1):
    # drawn in fp32 then cast, so a bf16 output gets the same upstream gradient as its fp32 reference
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    return torch.autograd.grad(out, inputs, g.to(out.device, out.dtype))


CASES = [("blockwise", bs) for bs in (4, 8, 128)] + [("npu", None), ("npu3", None)]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_reference_equals_each_document_alone(layout):
    rows, S, hq, hkv, d = LAYOUTS[layout]
    meta = VarlenMeta.from_rows(rows, S)
    q, k, v = make_qkv(meta, hq, hkv, d)
    seg_lens = [e - s for s, e in meta.segments()]
    expected = naive_per_document(q.detach(), k.detach(), v.detach(), seg_lens, 1 / math.sqrt(d))
    torch.testing.assert_close(attention(q, k, v, meta, "reference"), expected, atol=TOL, rtol=0)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(("backend", "block_size"), CASES, ids=[f"{b}{s or ''}" for b, s in CASES])
def test_backend_matches_reference_outputs_and_grads(layout, backend, block_size):
    rows, S, hq, hkv, d = LAYOUTS[layout]
    meta = VarlenMeta.from_rows(rows, S)
    q, k, v = make_qkv(meta, hq, hkv, d)
    ref = attention(q, k, v, meta, "reference")
    out = run_backend(backend, q, k, v, meta, block_size)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert (out - ref).abs().max() <= TOL
    for g_out, g_ref, name in zip(grads(out, (q, k, v)), grads(ref, (q, k, v)), "qkv", strict=True):
        assert (g_out - g_ref).abs().max() <= TOL, f"grad wrt {name}"


@pytest.mark.parametrize(("backend", "block_size"), [*CASES, ("reference", None)])
def test_no_backend_leaks_across_documents(backend, block_size):
    """Changing one document's keys/values leaves every other document's output unchanged."""
    rows, S, hq, hkv, d = LAYOUTS["gqa"]  # segments [5, 3, 0, 8 | 6, 6, pad 4]
    meta = VarlenMeta.from_rows(rows, S)
    q, k, v = (x.detach() for x in make_qkv(meta, hq, hkv, d))
    before = run_backend(backend, q, k, v, meta, block_size)
    k2, v2 = k.clone(), v.clone()
    k2[5:8] += 3.0  # document 1
    v2[5:8] -= 3.0
    after = run_backend(backend, q, k2, v2, meta, block_size)
    others = torch.ones(meta.total_tokens, dtype=torch.bool)
    others[5:8] = False
    assert torch.equal(before[others], after[others])
    assert (before[5:8] - after[5:8]).abs().max() > 0.1  # ...and the test can see a change


def test_padded_is_per_row_causal_and_ignores_documents():
    # One document per row, padding at the tail: padded == reference on the real tokens.
    meta = VarlenMeta.from_rows([[10], [16], [3]], 16)
    q, k, v = make_qkv(meta, 4, 2, 8)
    real = torch.zeros(meta.total_tokens, dtype=torch.bool)
    real[0:10] = real[16:32] = real[32:35] = True
    ref, pad = attention(q, k, v, meta, "reference"), attention(q, k, v, meta, "padded")
    assert (ref[real] - pad[real]).abs().max() <= TOL
    for g_ref, g_pad in zip(grads(ref[real], (q, k, v)), grads(pad[real], (q, k, v)), strict=True):
        assert (g_ref - g_pad).abs().max() <= TOL
    # Two documents in one row: the baseline lets the second one see the first.
    packed = VarlenMeta.from_rows([[5, 11]], 16)
    q, k, v = make_qkv(packed, 2, 2, 8)
    diff = attention(q, k, v, packed, "padded") - attention(q, k, v, packed, "reference")
    assert diff[:5].abs().max() <= TOL and diff[5:].abs().max() > 1e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the cuda backend needs a CUDA GPU")
@pytest.mark.parametrize("layout", LAYOUTS)
def test_cuda_matches_reference(layout):
    rows, S, hq, hkv, d = LAYOUTS[layout]
    meta = VarlenMeta.from_rows(rows, S, device="cuda")
    q, k, v = (x.detach().cuda().bfloat16().requires_grad_() for x in make_qkv(meta, hq, hkv, d))
    ref = attention(*(x.float() for x in (q, k, v)), meta, "reference")
    out = attention(q, k, v, meta, resolve_backend("cuda", q.device))
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)  # bf16: FlashAttention has no fp32
    for g_out, g_ref in zip(grads(out, (q, k, v)), grads(ref, (q, k, v)), strict=True):
        torch.testing.assert_close(g_out.float(), g_ref.float(), atol=5e-2, rtol=5e-2)


def test_cuda_backend_refuses_fp32_with_the_fix():
    meta = VarlenMeta.from_rows([[4]], 4)
    q, k, v = make_qkv(meta, 2, 2, 8)
    with pytest.raises(ValueError, match="bf16"):
        attention(q, k, v, meta, "cuda")


# --- the npu call contract -----------------------------------------------------------------------------


# The keyword arguments of MindSpeed-LLM's TND call (mindspeed_llm/core/transformer/
# custom_dot_product_attention.py, CustomDotProductAttentionImpl.forward), after query, key, value, n_head,
# shape_order.
MINDSPEED_KWARGS = {
    "pse", "padding_mask", "atten_mask", "actual_seq_qlen", "actual_seq_kvlen", "scale", "pre_tockens",
    "next_tockens", "keep_prob", "inner_precise", "sparse_mode",
}


def _recording(calls: list):
    def kernel(*args, **kwargs):
        calls.append((args, kwargs))
        return npu_emulator.npu_fusion_attention(*args, **kwargs)

    return kernel


@pytest.mark.parametrize("mode", [4, 3])
def test_npu_backend_calls_the_kernel_as_mindspeed_does(mode):
    meta = VarlenMeta.from_rows([[5, 3, 0, 8], [6, 6]], 16)
    q, k, v = make_qkv(meta, 4, 2, 8)
    calls = []
    npu_varlen_attention(q, k, v, meta, scale=0.25, kernel=_recording(calls), sparse_mode=mode)
    [(args, kw)] = calls
    assert args[3:] == (4, "TND")  # head_num = QUERY heads; k/v keep their 2 heads (GQA, no repeat)
    assert args[0] is q and args[1].shape[1] == 2  # one call: the whole stream, no copy
    assert set(kw) == MINDSPEED_KWARGS
    assert kw["actual_seq_qlen"] == kw["actual_seq_kvlen"] == [5, 8, 8, 16, 22, 28, 32]  # cumulative ends
    assert type(kw["actual_seq_qlen"]) is list
    assert kw["sparse_mode"] == mode and kw["keep_prob"] == 1.0 and kw["scale"] == 0.25
    assert (kw["pre_tockens"], kw["next_tockens"], kw["inner_precise"]) == (65536, 0, 0)
    assert kw["pse"] is None and kw["padding_mask"] is None
    assert torch.equal(kw["atten_mask"], torch.triu(torch.ones(2048, 2048), diagonal=1).bool())


def test_npu_default_is_mindspeeds_sparse_mode_4_and_3_is_selectable():
    meta = VarlenMeta.from_rows([[5, 3, 0, 8]], 16)
    q, k, v = make_qkv(meta, 2, 2, 8)
    calls = []
    npu_varlen_attention(q, k, v, meta, kernel=_recording(calls))
    assert calls[-1][1]["sparse_mode"] == 4 == AttentionConfig("npu").npu_sparse_mode
    assert str(AttentionConfig("npu", npu_sparse_mode=3)) == "npu (sparse_mode 3)"
    with pytest.raises(ValueError, match=r"--npu-sparse-mode \{4,3\}"):
        AttentionConfig("npu", npu_sparse_mode=2)
    with pytest.raises(ValueError, match="choose 4"):
        npu_varlen_attention(q, k, v, meta, kernel=_recording(calls), sparse_mode=0)


def test_emulator_accepts_mindspeeds_exact_call():
    """MindSpeed-LLM's statement, copied as it stands, run with its TND settings (sparse_mode=4 for TND,
    --pre-tockens 65536, --next-tockens 0, attention dropout 0, the compressed 2048 mask)."""
    from types import SimpleNamespace

    torch_npu = SimpleNamespace(npu_fusion_attention=npu_emulator.npu_fusion_attention)
    args = SimpleNamespace(shape_order="TND", pre_tockens=65536, next_tockens=0, sparse_mode=4)
    meta = VarlenMeta.from_rows([[5, 3, 0, 8], [6, 6]], 16)
    s, b, n_head, d = 16, 2, 4, 8
    g = torch.Generator().manual_seed(0)
    # Megatron's [s, b, h, d] -> rearrange(x, 's b h d -> (b s) h d'): row after row, the packed stream
    q_SBHD, k_SBHD, v_SBHD = (torch.randn(s, b, n_head, d, generator=g) for _ in range(3))
    query, key, value = (x.transpose(0, 1).reshape(b * s, n_head, d) for x in (q_SBHD, k_SBHD, v_SBHD))
    actual_seq_len = meta.actual_seq_len
    pse = None
    self = SimpleNamespace(
        attention_mask=torch.triu(torch.ones([2048, 2048], dtype=bool), diagonal=1),
        scale=1.0 / math.sqrt(d),
        attention_dropout=torch.nn.Dropout(0.0),
    )
    # --- verbatim from custom_dot_product_attention.py ---
    output, softmax_max, softmax_sum, *_ = torch_npu.npu_fusion_attention(
        query,
        key,
        value,
        n_head,
        args.shape_order,
        pse=pse,
        padding_mask=None,
        atten_mask=self.attention_mask,
        actual_seq_qlen=actual_seq_len,
        actual_seq_kvlen=actual_seq_len,
        scale=self.scale,
        pre_tockens=args.pre_tockens,
        next_tockens=args.next_tockens,
        keep_prob=1 - self.attention_dropout.p,
        inner_precise=0,
        sparse_mode=args.sparse_mode,
    )
    # --- end ---
    assert (output - attention(query, key, value, meta, "reference")).abs().max() <= TOL


def test_emulator_accepts_xtuners_and_transformers_mode_3_calls():
    """XTuner (xtuner/v1/ops/flash_attn/npu.py) and transformers (integrations/npu_flash_attention.py) call
    the causal varlen case with sparse_mode=3, tuples from cu_seqlens, and the default pre/next_tockens."""
    meta = VarlenMeta.from_rows([[5, 3, 0, 8], [6, 6]], 16)
    q, k, v = (x.detach() for x in make_qkv(meta, 4, 2, 8))
    cu = meta.cu_seqlens
    xtuner = npu_emulator.npu_fusion_attention(
        q, k, v, q.shape[1], pse=None,
        atten_mask=torch.triu(torch.ones([2048, 2048], dtype=torch.bool), diagonal=1),
        scale=q.shape[-1] ** -0.5, keep_prob=1 - 0.0, input_layout="TND",
        actual_seq_qlen=tuple(cu[1:].tolist()), actual_seq_kvlen=tuple(cu[1:].tolist()), sparse_mode=3,
    )[0]
    hf = npu_emulator.npu_fusion_attention(
        q, k, v, q.shape[1], pse=None, padding_mask=None,
        atten_mask=torch.triu(torch.ones([2048, 2048]), diagonal=1).bool(),
        scale=1.0 / math.sqrt(q.shape[-1]), keep_prob=1.0, input_layout="TND",
        actual_seq_qlen=tuple(cu[1:].cpu().numpy().tolist()), actual_seq_kvlen=tuple(cu[1:].cpu().numpy().tolist()),
        sparse_mode=3,
    )[0]
    ref = attention(q, k, v, meta, "reference")
    assert (xtuner - ref).abs().max() <= TOL and torch.equal(xtuner, hf)


def naive_band(q, k, v, seg_lens: list[int], scale: float, pre: int, nxt: int) -> torch.Tensor:
    """Each document alone, query t reading its document's keys t-pre .. t+nxt, float64, one head at a time."""
    G = q.shape[1] // k.shape[1]
    out, start = [], 0
    for n in seg_lens:
        for t in range(start, start + n):
            lo, hi = max(start, t - pre), min(start + n, t + nxt + 1)
            heads = []
            for h in range(q.shape[1]):
                w = torch.softmax(k[lo:hi, h // G].double() @ q[t, h].double() * scale, dim=0)
                heads.append(w @ v[lo:hi, h // G].double())
            out.append(torch.stack(heads))
        start += n
    return torch.stack(out).to(q.dtype)


@pytest.mark.parametrize(("pre", "nxt"), [(65536, 0), (16, 0), (2, 0), (0, 0), (3, 2), (0, 4)])
def test_emulator_band_mode_is_the_documented_band_in_each_segment(pre, nxt):
    """sparse_mode=4 keeps keys pre before to nxt after each query, inside its segment; pre >= the segment and
    nxt = 0 is causal (= sparse_mode 3); a pre smaller than a segment is a sliding window."""
    meta = VarlenMeta.from_rows([[5, 3, 0, 8], [6, 6]], 16)
    q, k, v = (x.detach() for x in make_qkv(meta, 4, 2, 8))
    out = _good_call(query=q, key=k, value=v, sparse_mode=4, pre_tockens=pre, next_tockens=nxt,
                     actual_seq_qlen=meta.actual_seq_len, actual_seq_kvlen=meta.actual_seq_len)[0]
    seg_lens = [e - s for s, e in meta.segments()]
    assert (out - naive_band(q, k, v, seg_lens, 0.35, pre, nxt)).abs().max() <= TOL
    if nxt == 0 and pre >= meta.max_seqlen:
        mode3 = _good_call(query=q, key=k, value=v, sparse_mode=3, pre_tockens=pre, next_tockens=nxt,
                           actual_seq_qlen=meta.actual_seq_len, actual_seq_kvlen=meta.actual_seq_len)[0]
        assert torch.equal(out, mode3)
    elif nxt == 0:  # a window shorter than the longest document changes that document's later tokens
        assert (out - naive_band(q, k, v, seg_lens, 0.35, 65536, 0)).abs().max() > 1e-3


def test_npu_band_refuses_segments_longer_than_pre_tockens():
    meta = VarlenMeta.from_rows([[65537]], 65537)
    q = k = v = torch.empty(65537, 1, 8, device="meta")
    with pytest.raises(ValueError, match="--npu-sparse-mode 3"):
        npu_varlen_attention(q, k, v, meta, kernel=_recording([]))


@pytest.mark.skipif(importlib.util.find_spec("torch_npu") is not None, reason="torch_npu is installed")
def test_npu_backend_without_torch_npu_names_the_fix():
    meta = VarlenMeta.from_rows([[4]], 4)
    q, k, v = make_qkv(meta, 2, 2, 8)
    with pytest.raises(ImportError, match="torch-npu"):
        attention(q, k, v, meta, "npu")


def _good_call(**overrides):
    meta = VarlenMeta.from_rows([[5, 3, 0, 8]], 16)
    q, k, v = (x.detach() for x in make_qkv(meta, 4, 2, 8))
    kwargs = dict(
        atten_mask=npu_causal_mask(),
        scale=0.35,
        keep_prob=1.0,
        pre_tockens=65536,
        next_tockens=0,
        actual_seq_qlen=[5, 8, 8, 16],
        actual_seq_kvlen=[5, 8, 8, 16],
        sparse_mode=4,
    )
    args = dict(query=q, key=k, value=v, head_num=4, input_layout="TND")
    for name, val in overrides.items():
        (args if name in args else kwargs)[name] = val
    return npu_emulator.npu_fusion_attention(**args, **kwargs)


def test_emulator_accepts_the_good_call_and_returns_the_kernels_tuple():
    out = _good_call()
    assert len(out) == 7 and out[0].shape == (16, 4, 8)
    # the documented example: lengths [2, 2, 0, 2, 2] are passed as [2, 4, 4, 6, 8]
    meta = VarlenMeta.from_rows([[2, 2, 0, 2, 2]], 8)
    q, k, v = make_qkv(meta, 2, 2, 8)
    assert meta.actual_seq_len == [2, 4, 4, 6, 8]
    npu_varlen_attention(q, k, v, meta, kernel=npu_emulator.npu_fusion_attention)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            {"actual_seq_qlen": [5, 3, 0, 8], "actual_seq_kvlen": [5, 3, 0, 8]},
            "cumulative",
        ),  # per-doc lengths
        ({"actual_seq_qlen": torch.tensor([5, 8, 8, 16])}, "python list"),
        ({"actual_seq_qlen": [5, 8, 8, 15], "actual_seq_kvlen": [5, 8, 8, 15]}, "must end at T = 16"),
        ({"actual_seq_kvlen": [5, 8, 16, 16]}, "must be equal"),
        ({"input_layout": "BSND"}, "TND"),
        ({"atten_mask": torch.ones(1024, 1024).triu(1).bool()}, r"\(2048, 2048\)"),
        ({"atten_mask": torch.ones(2048, 2048).tril().bool()}, "upper-triangular"),
        ({"atten_mask": torch.ones(2048, 2048).triu(1)}, "bool"),
        ({"atten_mask": None}, "needs atten_mask"),
        ({"head_num": 2}, "QUERY heads"),
        ({"keep_prob": 0.9}, "keep_prob"),
        ({"sparse_mode": 0}, "sparse_mode"),
        ({"sparse_mode": 2}, "sparse_mode"),
        ({"pre_tockens": -1}, "pre_tockens"),
        ({"next_tockens": 0.0}, "next_tockens"),
        ({"softmax_layout": "TND"}, "softmax_layout"),
        ({"actual_seq_qlen": [0] * 1024 + [16], "actual_seq_kvlen": [0] * 1024 + [16]}, "1..1024 segments"),
    ],
    ids=lambda x: next(iter(x)) if isinstance(x, dict) else None,
)
def test_emulator_rejects_bad_arguments(override, message):
    with pytest.raises(NpuArgumentError, match=message):
        _good_call(**override)


# --- metadata, backend resolution ----------------------------------------------------------------------


def test_meta_from_rows_adds_one_padding_tail_per_short_row():
    meta = VarlenMeta.from_rows([[3, 5], [2, 2]], 8)
    assert meta.actual_seq_len == [3, 8, 10, 12, 16]
    assert meta.cu_seqlens.tolist() == cu_seqlens([3, 5, 2, 2, 4]).tolist()
    assert meta.cu_seqlens.dtype == torch.int32 and meta.max_seqlen == 5


def test_meta_rejects_segments_crossing_rows_and_overfull_rows():
    with pytest.raises(ValueError, match="crosses a row boundary"):
        VarlenMeta.from_segment_lens([10, 22], num_rows=2, row_len=16)
    with pytest.raises(ValueError, match="row 1"):
        VarlenMeta.from_rows([[8], [9]], 8)
    meta = VarlenMeta.from_rows([[4]], 4)
    q, k, v = make_qkv(meta, 2, 2, 8)
    with pytest.raises(ValueError, match="tokens but meta"):
        attention(q[:3], k[:3], v[:3], meta, "reference")


def test_resolve_backend():
    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu) == resolve_backend("varlen", "cpu") == "reference"
    for name in ("reference", "blockwise", "padded"):
        assert resolve_backend(name, cpu) == name
    with pytest.raises(ValueError, match="needs a CUDA device"):
        resolve_backend("cuda", cpu)
    with pytest.raises(ValueError, match="needs an Ascend NPU"):
        resolve_backend("npu", cpu)
    with pytest.raises(ValueError, match="unknown attention backend"):
        resolve_backend("flash", cpu)
    assert set(BACKENDS) == {"reference", "blockwise", "npu", "cuda", "padded"}


# --- FLOPs and block skipping ----------------------------------------------------------------------------


def test_attention_flops_hand_checked():
    # one row of 16, docs [5, 3, 0, 8], block 4 -> tiles computed: (0,0) (1,1) (1,0) (2,2) (3,3) (3,2)
    meta = VarlenMeta.from_rows([[5, 3, 0, 8]], 16)
    exact = attention_flops(meta, "reference", n_heads=2, head_dim=8)
    assert exact["pairs_useful"] == exact["pairs_computed"] == 15 + 6 + 0 + 36
    assert exact["flops_computed"] == 57 * 4 * 8 * 2
    assert attention_flops(meta, "padded", 2, 8)["pairs_computed"] == 16 * 17 // 2
    bw = attention_flops(meta, "blockwise", 2, 8, block_size=4)
    assert bw["blocks_total"] == 16 and bw["blocks_dense_causal"] == 10
    assert bw["blocks_computed"] == 6 and bw["blocks_masked"] == 5 and bw["blocks_skipped"] == 10
    assert bw["pairs_computed"] == 6 * 16 and bw["skipped_fraction_vs_dense_causal"] == pytest.approx(0.4)
    plan = block_plan(meta, 4)
    assert [(i, [j for j, _ in js]) for i, js in plan.tiles] == [(0, [0]), (1, [1, 0]), (2, [2]), (3, [3, 2])]
    assert dict(plan.tiles[3][1])[2] is False  # tokens 8..15 are all document 3: no element mask


def test_blockwise_skips_blocks_only_when_documents_allow():
    # block 128: doc boundaries at 100, 128, 428 -> q-block 1 (doc 2 only) needs nothing of k-block 0 (docs 0, 1)
    multi = VarlenMeta.from_rows([[100, 28, 300, 84]], 512)
    bw = attention_flops(multi, "blockwise", 1, 64)
    assert (bw["blocks_computed"], bw["blocks_dense_causal"]) == (1 + 1 + 2 + 3, 10)
    dense = attention_flops(multi, "padded", 1, 64)  # exact causal triangle, documents ignored
    assert bw["pairs_useful"] < bw["pairs_computed"] == 7 * 128 * 128 < dense["pairs_computed"]
    single = VarlenMeta.from_rows(
        [[512]], 512
    )  # one document filling the row: nothing to skip below the diagonal
    one = attention_flops(single, "blockwise", 1, 64)
    assert one["blocks_computed"] == one["blocks_dense_causal"] == 10
    # two rows: the 8 tiles pairing row 1's queries with row 0's keys are skipped like any cross-document pair
    two = attention_flops(VarlenMeta.from_rows([[512], [512]], 512), "blockwise", 1, 64)
    assert (two["blocks_total"], two["blocks_dense_causal"], two["blocks_computed"]) == (64, 20, 20)
