"""benchmarks/segment_sdpa.py: the bucketed-SDPA prototype equals the `reference` backend, outputs and grads."""

import importlib.util
from pathlib import Path

import pytest
import torch

from packer.trainer.attention import attention
from packer.trainer.varlen import VarlenMeta

_spec = importlib.util.spec_from_file_location(
    "segment_sdpa", Path(__file__).resolve().parents[2] / "benchmarks" / "segment_sdpa.py"
)
segment_sdpa = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(segment_sdpa)


def test_bucket_len():
    assert [segment_sdpa.bucket_len(n) for n in (1, 16, 17, 100, 130, 700, 2048)] == [
        16,
        16,
        32,
        112,
        144,
        704,
        2048,
    ]
    assert all(n <= segment_sdpa.bucket_len(n) <= n + max(15, n // 8) for n in range(1, 3000))


@pytest.mark.parametrize(
    ("doc_lens_per_row", "row_len", "heads"),
    [
        ([[3, 0, 5, 17], [2, 40]], 64, (4, 2)),  # empty doc, padding tails, GQA
        ([[1, 1, 1], [16, 16, 32]], 64, (2, 2)),  # single tokens; segments exactly a bucket long
        ([[100, 130, 7], [200, 50]], 256, (6, 2)),  # lengths that share a bucket with padding
    ],
)
def test_segment_sdpa_equals_reference(doc_lens_per_row, row_len, heads):
    meta = VarlenMeta.from_rows(doc_lens_per_row, row_len)
    T, (hq, hkv), D = meta.total_tokens, heads, 16
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(T, hq, D, generator=gen)
    k, v = (torch.randn(T, hkv, D, generator=gen) for _ in range(2))
    grad = torch.randn(T, hq, D, generator=gen)
    _, out_ref, grads_ref = segment_sdpa.fwd_bwd(
        lambda a, b, c: attention(a, b, c, meta, "reference"), q, k, v, grad, 1
    )
    _, out, grads = segment_sdpa.fwd_bwd(
        lambda a, b, c: segment_sdpa.segment_sdpa(a, b, c, meta), q, k, v, grad, 1
    )
    torch.testing.assert_close(out, out_ref, rtol=0, atol=1e-5)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref, rtol=0, atol=1e-5)
