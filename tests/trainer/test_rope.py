"""RoPE against transformers' Llama: the same inverse frequencies (theta 10000 and Llama 3's 500000) and the
same rotate-half pairing, so a checkpoint moved between the two computes the same attention."""

import pytest
import torch

from packer.trainer import model as model_mod
from packer.trainer.model import ModelConfig, Transformer, apply_rope, rope_cos_sin
from packer.trainer.varlen import VarlenMeta

transformers = pytest.importorskip("transformers", reason="the reference RoPE is transformers' Llama")
from transformers.models.llama.modeling_llama import (  # noqa: E402
    LlamaConfig,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
)


def hf_cos_sin(positions_T: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    n_heads = 4
    config = LlamaConfig(
        hidden_size=head_dim * n_heads,
        num_attention_heads=n_heads,
        rope_parameters={"rope_type": "default", "rope_theta": theta},
    )
    x = torch.zeros(1, len(positions_T), head_dim)
    cos, sin = LlamaRotaryEmbedding(config)(x, positions_T[None])
    return cos[0], sin[0]  # (T, head_dim): the D/2 frequencies twice


@pytest.mark.parametrize("theta", [10000.0, 500000.0])
@pytest.mark.parametrize("head_dim", [16, 64])
def test_rope_matches_transformers_llama(theta, head_dim):
    positions_T = torch.tensor([0, 1, 2, 3, 0, 1, 7, 100, 4095])
    cos_TF, sin_TF = rope_cos_sin(positions_T, head_dim, theta)
    ref_cos, ref_sin = hf_cos_sin(positions_T, head_dim, theta)
    torch.testing.assert_close(torch.cat([cos_TF, cos_TF], -1), ref_cos, rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.cat([sin_TF, sin_TF], -1), ref_sin, rtol=0, atol=1e-5)

    q_THD = torch.randn(len(positions_T), 3, head_dim, generator=torch.Generator().manual_seed(0))
    ref_q, _ = apply_rotary_pos_emb(q_THD, q_THD, ref_cos, ref_sin, unsqueeze_dim=1)
    torch.testing.assert_close(apply_rope(q_THD, cos_TF, sin_TF), ref_q, rtol=0, atol=1e-5)


def test_the_model_rotates_with_its_configured_theta(monkeypatch):
    used = []

    def recording(positions_T, head_dim, theta, *rest):
        used.append((head_dim, theta))
        return real(positions_T, head_dim, theta, *rest)

    real = model_mod.rope_cos_sin
    monkeypatch.setattr(model_mod, "rope_cos_sin", recording)
    cfg = ModelConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=11, rope_theta=5e5)
    model = Transformer(cfg)
    tokens_T = torch.tensor([1, 2, 3, 4])
    model(tokens_T, torch.arange(4), VarlenMeta.from_rows([[4]], 4), "reference")
    assert used == [(16, 5e5)]
