"""A Llama-architecture decoder over one flat token stream (TND).

RMSNorm, rotary embeddings driven by per-token position ids (they restart at 0 in every document, so a
document packed at offset 700 sees the same rotations as the same document alone), SwiGLU MLP and
grouped-query attention. Attention never crosses a document: `trainer.attention.attention` takes the
boundaries in `VarlenMeta`.

The options that tell the Hugging Face decoders apart (see `trainer.hf`): q/k/v biases (Qwen2), RMSNorm
on each query and key head (Qwen3), a head_dim other than dim / n_heads (Qwen3, Mistral Nemo), Llama 3's
RoPE frequency scaling, and a sliding window (Mistral), which document-bounded attention matches exactly
while no segment is longer than the window.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from packer.trainer.attention import attention
from packer.trainer.varlen import VarlenMeta


@dataclass(frozen=True, slots=True)
class RopeScaling:
    """Llama 3.1's rescaled RoPE frequencies (HF rope_type "llama3"): wavelengths above
    original_max_position_embeddings / low_freq_factor are stretched by `factor`, those below
    original / high_freq_factor kept, and the band between interpolated."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int
    rope_type: str = "llama3"

    def __post_init__(self) -> None:
        if self.rope_type != "llama3":
            raise ValueError(f"rope_scaling.rope_type {self.rope_type!r} is not supported; only 'llama3' is")
        if self.high_freq_factor <= self.low_freq_factor:
            raise ValueError(
                f"rope_scaling: high_freq_factor={self.high_freq_factor} must exceed "
                f"low_freq_factor={self.low_freq_factor}"
            )


@dataclass(frozen=True, slots=True)
class ModelConfig:
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    vocab_size: int | None = None  # None: taken from the dataset manifest
    hidden_dim: int | None = None  # SwiGLU width; None: 8/3 * dim rounded up to `multiple_of`
    multiple_of: int = 32
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    tie_embeddings: bool = False
    init_std: float = 0.02
    head_dim_override: int | None = None  # None: dim // n_heads
    qkv_bias: bool = False  # biases on the q, k, v projections (Qwen2)
    qk_norm: bool = False  # RMSNorm over each query and key head before RoPE (Qwen3)
    sliding_window: int | None = None  # Mistral's window; segments longer than it are refused

    def __post_init__(self) -> None:
        if self.head_dim_override is None and self.dim % self.n_heads:
            raise ValueError(
                f"dim={self.dim} must be divisible by n_heads={self.n_heads} (or set head_dim_override)"
            )
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} must be divisible by n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if isinstance(self.rope_scaling, dict):  # from JSON; frozen, so set through object.__setattr__
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))

    @property
    def head_dim(self) -> int:
        return self.head_dim_override or self.dim // self.n_heads

    @property
    def ffn_dim(self) -> int:
        if self.hidden_dim is not None:
            return self.hidden_dim
        h = int(8 * self.dim / 3)
        return self.multiple_of * math.ceil(h / self.multiple_of)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> ModelConfig:
        with open(path) as f:
            raw = json.load(f)
        return cls.from_dict(raw, source=os.fspath(path))

    @classmethod
    def from_dict(cls, raw: dict, source: str = "model config") -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        if unknown := sorted(set(raw) - known):
            raise ValueError(f"{source}: unknown key(s) {unknown}; valid keys are {sorted(known)}")
        return cls(**raw)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2),
    # ~100M parameters at vocab 32000 (tied embeddings): 12 x 6.3M blocks + 24.6M embedding.
    "small100m": ModelConfig(dim=768, n_layers=12, n_heads=12, n_kv_heads=4, tie_embeddings=True),
}


def load_model_config(name_or_path: str, vocab_size: int | None = None) -> ModelConfig:
    """A preset name, a JSON file or a Hugging Face model directory; `vocab_size` (the tokenizer's) fills in
    a config that leaves it None."""
    from packer.trainer import hf  # hf builds on this module

    if name_or_path in PRESETS:
        cfg = PRESETS[name_or_path]
    elif os.path.isfile(name_or_path):
        cfg = ModelConfig.from_json(name_or_path)
    elif hf.is_hf_dir(name_or_path):
        cfg = hf.read_config(name_or_path)
    else:
        raise ValueError(
            f"--model {name_or_path!r} is neither a preset ({', '.join(PRESETS)}), a JSON config file nor a "
            f"Hugging Face model directory (config.json + *.safetensors)"
        )
    if cfg.vocab_size is None:
        if vocab_size is None:
            raise ValueError("the model config has no vocab_size and none was given by the dataset")
        cfg = dataclasses.replace(cfg, vocab_size=vocab_size)
    elif vocab_size is not None and cfg.vocab_size < vocab_size:
        raise ValueError(
            f"model vocab_size={cfg.vocab_size} is smaller than the tokenizer's {vocab_size}; "
            f"raise vocab_size in the config or leave it null"
        )
    return cfg


def build_model(name_or_path: str, cfg: ModelConfig) -> Transformer:
    """`--model`: a Hugging Face directory's weights, else a freshly initialised model of `cfg`."""
    from packer.trainer import hf

    if hf.is_hf_dir(name_or_path):
        return hf.load_pretrained(name_or_path, cfg)
    return Transformer(cfg)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_fp32 = x.float()
        x_fp32 = x_fp32 * torch.rsqrt(x_fp32.pow(2).mean(-1, keepdim=True) + self.eps)
        return x_fp32.type_as(x) * self.weight


def rope_inv_freq(
    head_dim: int, theta: float, scaling: RopeScaling | None = None, device: torch.device | None = None
) -> torch.Tensor:
    """(head_dim/2,) inverse frequencies, computed as transformers does (so logits agree to the last bits)."""
    inv_freq_F = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)
    if scaling is None:
        return inv_freq_F
    s = scaling
    wavelen_F = 2 * math.pi / inv_freq_F
    low_freq_wavelen = s.original_max_position_embeddings / s.low_freq_factor  # longer: divided by factor
    high_freq_wavelen = s.original_max_position_embeddings / s.high_freq_factor  # shorter: kept
    scaled_F = torch.where(wavelen_F > low_freq_wavelen, inv_freq_F / s.factor, inv_freq_F)
    smooth_F = (s.original_max_position_embeddings / wavelen_F - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    smoothed_F = (1 - smooth_F) * scaled_F / s.factor + smooth_F * scaled_F
    is_medium_F = (wavelen_F >= high_freq_wavelen) & (wavelen_F <= low_freq_wavelen)
    return torch.where(is_medium_F, smoothed_F, scaled_F)


def rope_cos_sin(
    positions_T: torch.Tensor, head_dim: int, theta: float, scaling: RopeScaling | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, head_dim/2) cos and sin of position * inverse frequency, computed from the ids (no max length)."""
    inv_freq_F = rope_inv_freq(head_dim, theta, scaling, positions_T.device)
    angles_TF = positions_T.float()[:, None] * inv_freq_F[None, :]
    return angles_TF.cos(), angles_TF.sin()


def apply_rope(x_THD: torch.Tensor, cos_TF: torch.Tensor, sin_TF: torch.Tensor) -> torch.Tensor:
    """Rotate (first half, second half) pairs of each head (the Llama "rotate_half" layout)."""
    x1, x2 = x_THD.float().chunk(2, dim=-1)  # (T, H, D/2) each
    cos, sin = cos_TF[:, None, :], sin_TF[:, None, :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).type_as(x_THD)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)

    def forward(self, x_TD, cos_TF, sin_TF, meta: VarlenMeta, backend: str) -> torch.Tensor:
        T = x_TD.shape[0]
        q_THD = self.wq(x_TD).view(T, self.n_heads, self.head_dim)
        k_THD = self.wk(x_TD).view(T, self.n_kv_heads, self.head_dim)
        v_THD = self.wv(x_TD).view(T, self.n_kv_heads, self.head_dim)
        if hasattr(self, "q_norm"):
            q_THD, k_THD = self.q_norm(q_THD), self.k_norm(k_THD)
        q_THD, k_THD = apply_rope(q_THD, cos_TF, sin_TF), apply_rope(k_THD, cos_TF, sin_TF)
        out_THD = attention(q_THD, k_THD, v_THD, meta, backend)
        return self.wo(out_THD.reshape(T, -1))


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)  # gate
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)  # up
        self.w2 = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)  # down

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x_TD)) * self.w3(x_TD))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x_TD, cos_TF, sin_TF, meta: VarlenMeta, backend: str) -> torch.Tensor:
        x_TD = x_TD + self.attention(self.attention_norm(x_TD), cos_TF, sin_TF, meta, backend)
        return x_TD + self.feed_forward(self.ffn_norm(x_TD))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError(
                "ModelConfig.vocab_size is None; fill it in with load_model_config(..., vocab_size)"
            )
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.tie_weights()
        self.reset_parameters()

    def tie_weights(self) -> None:
        """Share the embedding with the output layer (again after load_state_dict(assign=True), which gives
        each module its own Parameter)."""
        if self.cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def reset_parameters(self) -> None:
        # nanoGPT / GPT-2: N(0, 0.02) everywhere, residual output projections scaled by 1/sqrt(2 * n_layers)
        # so the residual stream's variance does not grow with depth.
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)
            elif name.endswith(("wo.weight", "w2.weight")):
                nn.init.normal_(p, mean=0.0, std=std / math.sqrt(2 * self.cfg.n_layers))
            else:
                nn.init.normal_(p, mean=0.0, std=std)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # tied weights are counted once

    def forward(
        self,
        tokens_T: torch.Tensor,
        positions_T: torch.Tensor,
        meta: VarlenMeta,
        backend: str,
        logits_at: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(T,) tokens and positions -> (T, V) logits, or (N, V) at the N token indices `logits_at`.

        Training asks only for the target positions: with a 50k vocabulary the output layer and its
        softmax cost more than the whole tiny body, and prompt and padding tokens need no logits.
        """
        window = self.cfg.sliding_window
        if window is not None and meta.max_seqlen > window:
            raise ValueError(
                f"a segment of {meta.max_seqlen} tokens is longer than the model's sliding_window={window}, and "
                f"attention here has no window; pass --seq-length <= {window} (and data packed to it)"
            )
        cos_TF, sin_TF = rope_cos_sin(
            positions_T, self.cfg.head_dim, self.cfg.rope_theta, self.cfg.rope_scaling
        )
        x_TD = self.tok_embeddings(tokens_T)
        for layer in self.layers:
            x_TD = layer(x_TD, cos_TF, sin_TF, meta, backend)
        if logits_at is not None:
            x_TD = x_TD[logits_at]  # (N, D)
        return self.output(self.norm(x_TD))
