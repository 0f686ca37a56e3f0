"""Packed == unpacked: a pack of documents through varlen attention with reset positions gives exactly the
logits, loss and gradients of running each document alone."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import packer.trainer.kernels as kernels
from packer.trainer.batching import IGNORE_INDEX, collate
from packer.trainer.model import PRESETS, ModelConfig, RopeScaling, Transformer, load_model_config
from packer.trainer.train import loss_sum

from .conftest import random_pack

VOCAB = 61
DOC_LENS = [7, 1, 12, 5, 9]  # 34 tokens in a row of 40: the padding tail is a 6-token segment
ROW = 40


@pytest.fixture
def npu_emulated(monkeypatch):
    """Route backend 'npu' to trainer.npu_emulator (same signature as torch_npu.npu_fusion_attention)."""
    from packer.trainer.npu_emulator import npu_fusion_attention

    monkeypatch.setattr(kernels, "_torch_npu_kernel", lambda: npu_fusion_attention)


# What the Hugging Face architectures add (trainer.hf): Qwen2's q/k/v biases, Qwen3's q/k norms and head_dim,
# Llama 3's RoPE scaling (original length 8, so positions 0..11 are in the rescaled range).
HF_FEATURES = {
    "qkv_bias": True,
    "qk_norm": True,
    "head_dim_override": 16,
    "rope_scaling": RopeScaling(8.0, 1.0, 4.0, 8),
}


def tiny_model(seed: int = 0, **features) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(
        ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=VOCAB, **features)
    )
    with torch.no_grad():  # biases start at 0 and norms at 1: move them so they take part
        for name, p in model.named_parameters():
            if name.endswith(("bias", "norm.weight")):
                p.add_(torch.randn_like(p) * 0.1)
    return model


def packed_and_alone(backend: str):
    rng = np.random.default_rng(0)
    pack = random_pack(rng, DOC_LENS, VOCAB, eod=VOCAB - 1)
    mb = collate([pack], row_len=ROW, pad_id=0)
    docs = []
    start = 0
    for n in DOC_LENS:
        one = type(pack)(
            pack.ids[start : start + n], pack.loss_mask[start : start + n], np.array([n], np.int32)
        )
        docs.append(collate([one], row_len=n, pad_id=0))  # the document alone, no padding
        start += n
    return mb, docs


@pytest.mark.parametrize("features", [{}, HF_FEATURES], ids=["llama", "hf_features"])
@pytest.mark.parametrize("backend", ["reference", "blockwise", "npu"])
def test_packed_logits_loss_grads_equal_each_document_alone(backend, features, request):
    if backend == "npu":
        request.getfixturevalue("npu_emulated")
    mb, docs = packed_and_alone(backend)
    model = tiny_model(**features)

    logits_TV = model(mb.tokens_T, mb.positions_T, mb.meta, backend)
    loss = loss_sum(logits_TV, mb, "token")
    loss.backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    start, alone_loss = 0, torch.zeros(())
    for doc in docs:
        n = doc.tokens_T.numel()
        logits_alone = model(doc.tokens_T, doc.positions_T, doc.meta, "reference")
        torch.testing.assert_close(logits_TV[start : start + n], logits_alone, atol=1e-5, rtol=0)
        # labels agree too: packing never adds a target across documents
        assert torch.equal(mb.labels_T[start : start + n], doc.labels_T)
        alone_loss = alone_loss + loss_sum(logits_alone, doc, "token")
        start += n
    alone_loss.backward()

    torch.testing.assert_close(loss, alone_loss, atol=1e-4, rtol=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(packed_grads[name], p.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_without_boundaries_documents_leak():
    """The proof can fail: the same pack under padded (row-causal) attention differs from docs alone."""
    mb, docs = packed_and_alone("padded")
    model = tiny_model()
    with torch.no_grad():
        packed = model(mb.tokens_T, mb.positions_T, mb.meta, "padded")
        n0, n1, n2 = (d.tokens_T.numel() for d in docs[:3])
        third = model(docs[2].tokens_T, docs[2].positions_T, docs[2].meta, "reference")
    assert (packed[n0 + n1 : n0 + n1 + n2] - third).abs().max() > 1e-3


def test_positions_drive_rope():
    """RoPE is relative, so inside document-bounded attention a constant offset changes nothing (up to
    rounding); the positions are still read: zeroing them changes every document's logits."""
    mb, _ = packed_and_alone("reference")
    model = tiny_model()
    with torch.no_grad():
        reset = model(mb.tokens_T, mb.positions_T, mb.meta, "reference")
        running = model(mb.tokens_T, torch.arange(ROW), mb.meta, "reference")
        zeros = model(mb.tokens_T, torch.zeros(ROW, dtype=torch.long), mb.meta, "reference")
    torch.testing.assert_close(reset, running, atol=1e-5, rtol=0)
    assert (reset - zeros).abs().max() > 1e-4  # 100x the packed-vs-alone tolerance


def test_sample_average_is_mean_of_document_means():
    mb, docs = packed_and_alone("reference")
    torch.manual_seed(1)
    logits = torch.randn(mb.tokens_T.numel(), VOCAB)
    per_doc, start = [], 0
    for d in docs:
        n = d.tokens_T.numel()
        if (d.labels_T != IGNORE_INDEX).any():
            per_doc.append(F.cross_entropy(logits[start : start + n], d.labels_T, ignore_index=IGNORE_INDEX))
        start += n
    torch.testing.assert_close(loss_sum(logits, mb, "sample") / mb.num_docs, torch.stack(per_doc).mean())
    assert mb.num_docs == len(per_doc)


def test_config_json_rejects_unknown_keys(tmp_path):
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"dim": 64, "n_layer": 2}))
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['n_layer'\]"):
        load_model_config(str(path), vocab_size=100)
    path.write_text(json.dumps({"dim": 48, "n_layers": 1, "n_heads": 4, "n_kv_heads": 1}))
    cfg = load_model_config(str(path), vocab_size=100)
    assert (cfg.dim, cfg.n_kv_heads, cfg.vocab_size) == (48, 1, 100)
    with pytest.raises(ValueError, match="neither a preset"):
        load_model_config("nope", vocab_size=100)


def test_config_json_round_trips_hf_features(tmp_path):
    cfg = ModelConfig(vocab_size=100, sliding_window=4096, **HF_FEATURES)
    path = tmp_path / "m.json"
    path.write_text(json.dumps(cfg.to_dict()))  # rope_scaling is written as a dict and read back
    assert load_model_config(str(path)) == cfg and cfg.head_dim == 16
    with pytest.raises(ValueError, match="only 'llama3'"):
        ModelConfig.from_dict({"rope_scaling": {**cfg.to_dict()["rope_scaling"], "rope_type": "yarn"}})


def test_small100m_is_about_100m_params():
    cfg = load_model_config("small100m", vocab_size=32000)
    with torch.device("meta"):
        n = Transformer(cfg).num_params()
    assert 95e6 < n < 110e6, n
    assert PRESETS["tiny"].vocab_size is None


def test_logits_at_targets_equal_full_logits():
    mb, _ = packed_and_alone("reference")
    model = tiny_model()
    with torch.no_grad():
        full = model(mb.tokens_T, mb.positions_T, mb.meta, "reference")
        some = model(mb.tokens_T, mb.positions_T, mb.meta, "reference", logits_at=mb.target_idx_N)
    assert some.shape == (mb.num_targets, VOCAB)
    torch.testing.assert_close(some, full[mb.target_idx_N])
    torch.testing.assert_close(loss_sum(some, mb, "sample", mb.target_idx_N), loss_sum(full, mb, "sample"))
