"""Hugging Face checkpoints: our model computes what transformers computes, alone and packed; load -> save ->
load is exact; a fine-tune saved with --save-hf is what transformers loads.

Tiny random models (hidden 64, 2 layers, 4 heads, 2 kv heads) are built from transformers configs and saved
with save_pretrained; nothing is downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from packer.dataset import PackedDataset
from packer.trainer import hf
from packer.trainer.batching import collate
from packer.trainer.checkpoint import load as load_checkpoint
from packer.trainer.cli import train_command
from packer.trainer.model import ModelConfig, RopeScaling, Transformer, load_model_config
from packer.trainer.varlen import VarlenMeta

from .conftest import random_pack

transformers = pytest.importorskip("transformers")

VOCAB = 512
DOC_LENS = [7, 1, 12, 9]  # 29 tokens in a row of 32: the padding tail is a 3-token segment
ROW = 32
TOL = 1e-4
COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, initializer_range=0.1)  # fmt: skip
LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8,
}  # fmt: skip  (short, so positions up to 12 are rescaled)

CASES = {
    "llama-llama3-rope": lambda: transformers.LlamaConfig(
        **COMMON, vocab_size=VOCAB, rope_theta=500000.0, rope_scaling=LLAMA3, rms_norm_eps=1e-5
    ),
    "qwen2-tied": lambda: transformers.Qwen2Config(**COMMON, vocab_size=VOCAB, tie_word_embeddings=True),
    "qwen3-head_dim32": lambda: transformers.Qwen3Config(**COMMON, vocab_size=VOCAB, head_dim=32),
    "mistral-untied": lambda: transformers.MistralConfig(
        **COMMON, vocab_size=VOCAB, tie_word_embeddings=False, sliding_window=64, rope_theta=1e6
    ),
}


def make_hf_model(config, seed: int = 0):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # norms start at 1 and biases at 0: move them so a mix-up of them shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> dict[str, tuple[Path, object]]:
    out = {}
    for name, make_config in CASES.items():
        model = make_hf_model(make_config())
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path, safe_serialization=True)
        out[name] = (path, model)
    return out


def hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids[None]).logits[0].float()


def ours_logits(model: Transformer, ids_T, positions_T, meta, backend: str = "reference") -> torch.Tensor:
    with torch.no_grad():
        return model(ids_T, positions_T, meta, backend)


def alone(ids: torch.Tensor):
    n = ids.numel()
    return ids, torch.arange(n), VarlenMeta.from_segment_lens([n], 1, n)


def packed_batch(seed: int = 0):
    pack = random_pack(np.random.default_rng(seed), DOC_LENS, VOCAB, eod=VOCAB - 1)
    return collate([pack], row_len=ROW, pad_id=0)


# --------------------------------------------------------------------------- logits


@pytest.mark.parametrize("case", CASES)
def test_logits_equal_transformers_alone_and_packed(hf_dirs, case):
    path, hf_model = hf_dirs[case]
    model = hf.load_pretrained(path).eval()
    assert model.cfg == load_model_config(str(path), vocab_size=62)  # what `--model PATH` builds
    mb = packed_batch()
    packed = {
        b: ours_logits(model, mb.tokens_T, mb.positions_T, mb.meta, b) for b in ("reference", "blockwise")
    }
    worst, start = 0.0, 0
    for n in DOC_LENS:
        doc = mb.tokens_T[start : start + n]
        ref = hf_logits(hf_model, doc)
        worst = max(worst, (ours_logits(model, *alone(doc)) - ref).abs().max().item())
        for logits in packed.values():  # positions restart, attention stops at the boundary
            worst = max(worst, (logits[start : start + n] - ref).abs().max().item())
        start += n
    print(f"{case}: max abs logit diff vs transformers {worst:.2e}")  # the figure, under pytest -s
    assert worst <= TOL, f"{case}: max abs logit diff {worst:.2e}"


def test_rope_scaling_and_qk_norm_are_not_ignored(hf_dirs):
    """The comparison can fail: dropping llama3 scaling (or Qwen3's q/k norms) changes the logits 100x TOL."""
    ids = packed_batch().tokens_T[:12]
    for case, change in [
        ("llama-llama3-rope", {"rope_scaling": None}),
        ("qwen3-head_dim32", {"qk_norm": False}),
    ]:
        path, hf_model = hf_dirs[case]
        state = hf.load_pretrained(path).state_dict()
        other = Transformer(ModelConfig(**{**hf.read_config(path).to_dict(), **change}))
        other.load_state_dict(state, strict=False)
        assert (ours_logits(other, *alone(ids)) - hf_logits(hf_model, ids)).abs().max() > 100 * TOL, case


# --------------------------------------------------------------------------- round trips


def test_load_save_load_is_exact(hf_dirs, tmp_path):
    from safetensors.torch import load_file

    for case, (path, _) in hf_dirs.items():
        first = hf.load_pretrained(path)
        out = hf.save_hf(first, tmp_path / case, base=path)
        again = hf.load_pretrained(out)
        assert again.cfg == first.cfg
        a, b = first.state_dict(), again.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), case
        # the files hold what transformers wrote, name for name, bit for bit
        saved, original = load_file(out / "model.safetensors"), load_file(path / "model.safetensors")
        assert saved.keys() == original.keys()
        assert all(torch.equal(saved[k], original[k]) for k in saved), case
        config = json.loads((out / "config.json").read_text())
        assert config["model_type"] == json.loads((path / "config.json").read_text())["model_type"]
        assert again.output.weight is again.tok_embeddings.weight or not again.cfg.tie_embeddings
    assert not list(tmp_path.glob(".tmp_*"))  # no temporary directory is left behind


def test_sharded_save_of_a_preset_model_loads_in_transformers(tmp_path):
    """A model trained from a preset becomes a Llama; over max_shard_bytes the weights are sharded with an
    index, which both loaders read."""
    torch.manual_seed(0)
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=VOCAB, init_std=0.1)
    model = Transformer(cfg).eval()
    out = hf.save_hf(model, tmp_path / "m", max_shard_bytes=200_000)
    index = json.loads((out / hf.INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) > 1 and not (out / hf.WEIGHTS_FILE).exists()
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(loaded).__name__ == "LlamaForCausalLM"
    ids = packed_batch().tokens_T[:12]
    assert (hf_logits(loaded, ids) - ours_logits(model, *alone(ids))).abs().max() <= TOL
    again = hf.load_pretrained(out)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in model.state_dict().items())
    # saving again over an earlier --save-hf output replaces it
    hf.save_hf(again, out)
    assert (out / hf.WEIGHTS_FILE).exists() and not (out / hf.INDEX_FILE).exists()


# --------------------------------------------------------------------------- fine-tune through the CLI


def test_fine_tune_saves_what_transformers_loads(tiny_build, tmp_path):
    prefix = tiny_build("hf_ft", seed=3)
    base = tmp_path / "base"
    config = transformers.Qwen2Config(**COMMON, vocab_size=64, tie_word_embeddings=True, eos_token_id=1)
    make_hf_model(config).save_pretrained(base, safe_serialization=True)
    out = tmp_path / "tuned"
    args = ["--data", prefix, "--model", str(base), "--steps", "3", "--lr", "1e-2", "--warmup-steps", "1",
            "--save", str(tmp_path / "ck"), "--save-hf", str(out), "--device", "cpu", "--no-progress"]  # fmt: skip
    result = CliRunner().invoke(train_command, args)
    assert result.exit_code == 0, result.output + repr(result.exception)

    ours = Transformer(hf.read_config(base))  # the fine-tuned weights, from the trainer's own checkpoint
    ours.load_state_dict(load_checkpoint(tmp_path / "ck").state["model"])
    ours.eval()
    start = hf.load_pretrained(base)
    assert not torch.equal(ours.layers[0].attention.wq.bias, start.layers[0].attention.wq.bias)  # trained

    tuned = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(tuned).__name__ == "Qwen2ForCausalLM" and tuned.config.eos_token_id == 1  # base's ids kept
    ids = torch.from_numpy(PackedDataset(prefix)[0].ids[:16]).long()
    assert (hf_logits(tuned, ids) - ours_logits(ours, *alone(ids))).abs().max() <= TOL

    tokenizer = transformers.AutoTokenizer.from_pretrained(out)  # the build's tokenizer came along
    manifest = json.loads(Path(prefix + ".json").read_text())
    built = json.loads(Path(manifest["tokenizer"]["path"]).read_text())
    assert tokenizer("w3 w17 w59").input_ids == [built["model"]["vocab"][w] for w in ("w3", "w17", "w59")]


# --------------------------------------------------------------------------- what is refused


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"model_type": "gpt2"}, "model_type 'gpt2'"),
        ({"architectures": ["LlamaForSequenceClassification"]}, "LlamaForSequenceClassification"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
        ({"attention_bias": True}, "attention_bias"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_type 'yarn'"),
        ({"rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e4}}, "rope_type 'dynamic'"),
        ({"attention_dropout": 0.1}, "attention_dropout=0.1"),
    ],
)
def test_unsupported_configs_name_the_feature(change, named):
    raw = {**transformers.LlamaConfig(**COMMON, vocab_size=VOCAB).to_dict(), **change}
    with pytest.raises(hf.UnsupportedModelError, match=named.replace("(", r"\(").replace("[", r"\[")):
        hf.config_from_hf(raw)


def test_transformers4_rope_keys_and_defaults():
    raw = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
           "intermediate_size": 128, "vocab_size": 100, "rope_theta": 5e5, "max_position_embeddings": 8192,
           "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}}  # fmt: skip
    cfg = hf.config_from_hf(raw)
    assert cfg.rope_theta == 5e5 and cfg.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 8192)
    assert (cfg.n_kv_heads, cfg.norm_eps, cfg.tie_embeddings, cfg.head_dim) == (4, 1e-6, False, 16)


def test_tensor_mismatch_and_bad_save_dir_are_errors(hf_dirs, tmp_path):
    from safetensors.torch import load_file, save_file

    path, _ = hf_dirs["qwen3-head_dim32"]
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((path / "config.json").read_text())
    state = load_file(path / "model.safetensors")
    del state["model.layers.1.self_attn.k_norm.weight"]
    save_file(state, broken / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing \['model.layers.1.self_attn.k_norm.weight'\]"):
        hf.load_pretrained(broken)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not an earlier --save-hf output"):
        hf.check_save_dir(tmp_path / "busy")


def test_sliding_window_refuses_longer_segments():
    model = Transformer(
        ModelConfig(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=50, sliding_window=8)
    )
    ids = torch.zeros(12, dtype=torch.long)
    with pytest.raises(ValueError, match="sliding_window=8"):
        ours_logits(model, *alone(ids))
    ours_logits(model, ids, torch.arange(12) % 6, VarlenMeta.from_segment_lens([6, 6], 1, 12))  # fits
