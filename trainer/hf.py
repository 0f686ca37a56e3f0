"""Hugging Face checkpoints in and out: `--model HF_DIR` starts from one, `--save-hf DIR` writes one.

    DIR/config.json                           model_type llama | qwen2 | qwen3 | mistral
    DIR/model.safetensors                     every tensor; or, sharded:
    DIR/model.safetensors.index.json          {"metadata": {"total_size": bytes}, "weight_map": {name: file}}
    DIR/model-00001-of-00002.safetensors      ...
    DIR/tokenizer.json, tokenizer_config.json, ...   (written by --save-hf: the tokenizer the data was built with)

Tensor names of layer i, Hugging Face -> ours. The layouts are the same: no transposes, and no RoPE
permutation, since both rotate (first half, second half) pairs of a head.

    model.embed_tokens.weight                        tok_embeddings.weight
    model.layers.i.input_layernorm.weight            layers.i.attention_norm.weight
    model.layers.i.self_attn.{q,k,v}_proj.weight     layers.i.attention.{wq,wk,wv}.weight  (and .bias: Qwen2)
    model.layers.i.self_attn.{q,k}_norm.weight       layers.i.attention.{q,k}_norm.weight  (Qwen3)
    model.layers.i.self_attn.o_proj.weight           layers.i.attention.wo.weight
    model.layers.i.post_attention_layernorm.weight   layers.i.ffn_norm.weight
    model.layers.i.mlp.{gate,up,down}_proj.weight    layers.i.feed_forward.{w1,w3,w2}.weight
    model.norm.weight                                norm.weight
    lm_head.weight                                   output.weight  (absent with tie_word_embeddings)

The four architectures differ only in options of `ModelConfig`: Qwen2 = q/k/v biases, Qwen3 = q/k norms
(and its own head_dim), Mistral = a sliding window. A config with anything else that changes the function
(another activation, rope type, o_proj/MLP biases, dropout, quantized weights) is refused, naming it.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from packer.trainer.checkpoint import _fsync_dir, _umask
from packer.trainer.model import ModelConfig, RopeScaling, Transformer

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
GENERATION_CONFIG_FILE = "generation_config.json"
TOKENIZER_SIDE_FILES = (
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
)
MAX_SHARD_BYTES = 5 * 10**9  # transformers' long-time default max_shard_size "5GB"

ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mistral": "MistralForCausalLM",
}
# What the config classes assume for keys a config.json leaves out (transformers' defaults).
_DEFAULTS = {
    "num_key_value_heads": None,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
}
_TYPE_DEFAULTS = {"qwen3": {"head_dim": 128}}

_TOP = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight"}  # fmt: skip
_LAYER = {
    "attention_norm.weight": "input_layernorm.weight",
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wq.bias": "self_attn.q_proj.bias",
    "attention.wk.bias": "self_attn.k_proj.bias",
    "attention.wv.bias": "self_attn.v_proj.bias",
    "attention.q_norm.weight": "self_attn.q_norm.weight",
    "attention.k_norm.weight": "self_attn.k_norm.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
}


class UnsupportedModelError(ValueError):
    """A Hugging Face config this trainer cannot reproduce exactly; the message names what."""


def hf_name(name: str) -> str:
    """Our state_dict name -> the Hugging Face one."""
    if name.startswith("layers."):
        _, i, rest = name.split(".", 2)
        return f"model.layers.{i}.{_LAYER[rest]}"
    return _TOP[name]


def is_hf_dir(path: str | os.PathLike | None) -> bool:
    return path is not None and os.path.isdir(path) and os.path.isfile(os.path.join(path, CONFIG_FILE))


# --------------------------------------------------------------------------- config.json <-> ModelConfig


def read_config(path: str | os.PathLike) -> ModelConfig:
    file = Path(path) / CONFIG_FILE
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{file}: unreadable ({e})") from e
    if not isinstance(raw, dict):
        raise ValueError(f"{file}: not a JSON object")
    return config_from_hf(raw, source=str(file))


def config_from_hf(raw: dict, source: str = CONFIG_FILE) -> ModelConfig:
    model_type = raw.get("model_type")
    arch = ARCHITECTURES.get(model_type)
    if arch is None:
        raise UnsupportedModelError(
            f"{source}: model_type {model_type!r} (architectures {raw.get('architectures')}) is not supported; "
            f"--model takes a Hugging Face directory of {', '.join(ARCHITECTURES)}"
        )
    if raw.get("architectures") not in (None, [arch]):
        raise UnsupportedModelError(
            f"{source}: architectures {raw['architectures']} is not supported; only {arch} (the causal LM)"
        )
    get = {**_DEFAULTS, **_TYPE_DEFAULTS.get(model_type, {}), **raw}.get
    problems = []
    if get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={get('hidden_act')!r} (the MLP is SwiGLU: only 'silu')")
    if model_type in ("llama", "qwen3") and get("attention_bias"):
        problems.append("attention_bias=true (a bias on o_proj; only Qwen2's q/k/v biases are supported)")
    if get("mlp_bias"):
        problems.append("mlp_bias=true")
    if get("attention_dropout"):
        problems.append(
            f"attention_dropout={get('attention_dropout')} (the trainer has no dropout; set it to 0.0)"
        )
    if get("quantization_config"):
        problems.append("quantization_config (quantized weights; start from an unquantized checkpoint)")
    theta, scaling = _rope(raw, get, problems)
    if problems:
        raise UnsupportedModelError(
            f"{source}: {model_type} with unsupported settings: {'; '.join(problems)}"
        )

    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                           "vocab_size") if get(k) is None]  # fmt: skip
    if missing:
        raise ValueError(f"{source}: missing {missing}")
    dim, n_heads = int(get("hidden_size")), int(get("num_attention_heads"))
    head_dim = get("head_dim")
    if model_type in ("qwen2", "qwen3"):
        layer_types = get("layer_types")
        sliding = "sliding_attention" in layer_types if layer_types else bool(get("use_sliding_window"))
        window = get("sliding_window") if sliding else None
    else:
        window = get("sliding_window") if model_type == "mistral" else None
    try:
        return ModelConfig(
            dim=dim,
            n_layers=int(get("num_hidden_layers")),
            n_heads=n_heads,
            n_kv_heads=int(get("num_key_value_heads") or n_heads),
            vocab_size=int(get("vocab_size")),
            hidden_dim=int(get("intermediate_size")),
            norm_eps=float(get("rms_norm_eps")),
            rope_theta=theta,
            rope_scaling=scaling,
            tie_embeddings=bool(get("tie_word_embeddings")),
            head_dim_override=int(head_dim) if head_dim and int(head_dim) * n_heads != dim else None,
            qkv_bias=model_type == "qwen2",
            qk_norm=model_type == "qwen3",
            sliding_window=int(window) if window else None,
        )
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from e


def _rope(raw: dict, get, problems: list[str]) -> tuple[float, RopeScaling | None]:
    """(rope_theta, scaling) from transformers 4's rope_theta + rope_scaling or 5's rope_parameters (4's wins,
    as transformers 5 reads it)."""
    params = raw.get("rope_scaling") or raw.get("rope_parameters") or {}
    if params and all(isinstance(v, dict) for v in params.values()):
        problems.append(f"rope_parameters per layer type ({sorted(params)})")
        return 0.0, None
    theta = float(params.get("rope_theta") or get("rope_theta"))
    if (params.get("partial_rotary_factor") or get("partial_rotary_factor") or 1.0) != 1.0:
        problems.append("partial_rotary_factor != 1")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        problems.append(f"rope_type {rope_type!r} (supported: 'default', 'llama3')")
        return theta, None
    keys = ("factor", "low_freq_factor", "high_freq_factor")
    if absent := [k for k in keys if params.get(k) is None]:
        problems.append(f"llama3 rope scaling without {absent}")
        return theta, None
    original = params.get("original_max_position_embeddings") or get("max_position_embeddings")
    if original is None:
        problems.append("llama3 rope scaling without original_max_position_embeddings")
        return theta, None
    return theta, RopeScaling(*(float(params[k]) for k in keys), int(original))


def model_type_for(cfg: ModelConfig, preferred: str | None = None) -> str:
    """The architecture that computes exactly `cfg`: `preferred` (the --model directory's) where it can."""
    if cfg.qkv_bias and cfg.qk_norm:
        raise UnsupportedModelError("q/k/v biases together with q/k norms match no supported HF architecture")
    fits = {
        "qwen3": cfg.qk_norm,
        "qwen2": cfg.qkv_bias,
        "mistral": not (cfg.qkv_bias or cfg.qk_norm),
        "llama": not (cfg.qkv_bias or cfg.qk_norm or cfg.sliding_window),
    }
    if preferred in fits and fits[preferred]:
        return preferred
    return next(t for t in ("qwen3", "qwen2", "llama", "mistral") if fits[t])


def hf_config(
    cfg: ModelConfig, model_type: str, base: dict | None = None, tokenizer: dict | None = None
) -> dict:
    """config.json for `cfg`: the --model directory's config (`base`, so its token ids, max length and the
    like survive) with every key that shapes the function rewritten from `cfg`."""
    out = {
        k: v for k, v in (base or {}).items() if k not in ("torch_dtype", "transformers_version", "auto_map")
    }
    rope = {"rope_type": "default"}
    if (s := cfg.rope_scaling) is not None:
        rope = {"rope_type": s.rope_type, "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                "high_freq_factor": s.high_freq_factor,
                "original_max_position_embeddings": s.original_max_position_embeddings}  # fmt: skip
    out |= {
        "architectures": [ARCHITECTURES[model_type]],
        "model_type": model_type,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps,
        "vocab_size": cfg.vocab_size,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_dropout": 0.0,
        # Both spellings: transformers 4 reads rope_theta + rope_scaling, 5 reads either.
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None if cfg.rope_scaling is None else rope,
        "rope_parameters": {**rope, "rope_theta": cfg.rope_theta},
        "dtype": "float32",  # the trainer's weights; transformers loads them as saved
    }
    if model_type in ("llama", "qwen3"):
        out["attention_bias"] = False
    if model_type == "llama":
        out["mlp_bias"] = False
    if model_type == "mistral":
        out["sliding_window"] = cfg.sliding_window
    if model_type in ("qwen2", "qwen3"):
        sliding = cfg.sliding_window is not None
        out |= {"use_sliding_window": sliding, "sliding_window": cfg.sliding_window}
        if not sliding:
            out["layer_types"] = ["full_attention"] * cfg.n_layers
        elif len(out.get("layer_types") or []) != cfg.n_layers:
            # Windowed layers from max_window_layers on; with every segment inside the window, any split of
            # full and sliding layers computes the same function.
            out |= {"max_window_layers": 0, "layer_types": ["sliding_attention"] * cfg.n_layers}
    out.setdefault("max_position_embeddings", 2048)
    if base is None:
        tok = tokenizer or {}
        out |= {
            "bos_token_id": tok.get("bos_id"),
            "eos_token_id": tok.get("eod_id"),
            "pad_token_id": tok.get("pad_id"),
        }
    return out


# --------------------------------------------------------------------------- weights


def read_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a model directory, from model.safetensors or the shards its index names."""
    from safetensors.torch import load_file

    path = Path(path)
    if (path / INDEX_FILE).is_file():
        try:
            weight_map = json.loads((path / INDEX_FILE).read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path / INDEX_FILE}: unreadable ({type(e).__name__}: {e})") from e
        files = sorted(set(weight_map.values()))
    elif (path / WEIGHTS_FILE).is_file():
        weight_map, files = None, [WEIGHTS_FILE]
    else:
        raise FileNotFoundError(
            f"{path}: no {WEIGHTS_FILE} or {INDEX_FILE}; only safetensors are read (convert a pytorch_model.bin "
            f"with `AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)`)"
        )
    state: dict[str, torch.Tensor] = {}
    for name in files:
        part = load_file(path / name)
        if weight_map is not None and (
            lost := [k for k, f in weight_map.items() if f == name and k not in part]
        ):
            raise ValueError(f"{path / name}: lacks {lost[:4]}, which {INDEX_FILE} places in it")
        state.update(part)
    return state


def state_from_hf(
    hf_state: dict[str, torch.Tensor], model: Transformer, source: str
) -> dict[str, torch.Tensor]:
    """Hugging Face tensors -> `model`'s state_dict (in its dtype), checking names and shapes."""
    ours = model.state_dict()
    tied = model.cfg.tie_embeddings
    wanted = {hf_name(k): k for k in ours if not (tied and k == "output.weight")}
    # Some old Llama checkpoints store RoPE's buffer; a tied checkpoint may store lm_head anyway.
    ignored = {k for k in hf_state if k.endswith("rotary_emb.inv_freq") or (tied and k == "lm_head.weight")}
    missing = sorted(set(wanted) - set(hf_state))
    unexpected = sorted(set(hf_state) - set(wanted) - ignored)
    if missing or unexpected:
        raise ValueError(
            f"{source}: the tensors do not match its config.json: missing {missing[:6]}"
            f"{' ...' if len(missing) > 6 else ''}, unexpected {unexpected[:6]}{' ...' if len(unexpected) > 6 else ''}"
        )
    out = {}
    for hf_key, key in wanted.items():
        t = hf_state[hf_key]
        if t.shape != ours[key].shape:
            raise ValueError(
                f"{source}: {hf_key} has shape {tuple(t.shape)}, its config.json gives {tuple(ours[key].shape)}"
            )
        out[key] = t.to(ours[key].dtype)
    if tied:
        out["output.weight"] = out["tok_embeddings.weight"]
    return out


def load_pretrained(path: str | os.PathLike, cfg: ModelConfig | None = None) -> Transformer:
    """A Transformer holding the weights of a Hugging Face directory (`cfg`: its read_config, if given)."""
    cfg = cfg or read_config(path)
    with torch.device("meta"):  # no random init of weights that are overwritten at once
        model = Transformer(cfg)
    model.load_state_dict(state_from_hf(read_state(path), model, os.fspath(path)), strict=True, assign=True)
    model.tie_weights()
    return model


def state_to_hf(model: Transformer) -> dict[str, torch.Tensor]:
    tied = model.cfg.tie_embeddings
    return {
        hf_name(k): v.detach().to("cpu").contiguous()
        for k, v in model.state_dict().items()
        if not (tied and k == "output.weight")  # safetensors stores no shared tensors; HF re-ties on load
    }


def shard(state: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Consecutive groups of at most max_bytes (a single larger tensor gets a shard of its own)."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += n
    return shards


# --------------------------------------------------------------------------- --save-hf


def check_save_dir(out_dir: str | os.PathLike) -> None:
    """Refuse, before training, a --save-hf path that a save would have to clobber: only a new or empty
    directory, or an earlier --save-hf output (it has config.json), is replaced."""
    out = Path(out_dir)
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise ValueError(f"--save-hf {out}: exists and is not a directory; pass a new directory")
    if out.is_dir() and any(out.iterdir()) and not (out / CONFIG_FILE).is_file():
        raise ValueError(
            f"--save-hf {out}: a non-empty directory without {CONFIG_FILE} (not an earlier --save-hf output), "
            f"which a save would replace; pass a new or empty directory"
        )


def save_hf(
    model: Transformer,
    out_dir: str | os.PathLike,
    base: str | os.PathLike | None = None,
    manifest: dict | None = None,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> Path:
    """Write `model` as a directory that `AutoModelForCausalLM.from_pretrained` loads, atomically.

    `base`: the --model value; where it is a Hugging Face directory, its config.json supplies the keys the
    trainer does not own (token ids, max_position_embeddings) and its generation_config.json is copied.
    `manifest`: the build's PREFIX.json; the tokenizer it records is copied next to the weights.
    Everything is written into a fresh `.tmp_NAME.*` directory beside `out_dir` and renamed into place, so
    a crash leaves the old output or the new one, never a half-written one.
    """
    out = Path(out_dir)
    check_save_dir(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    base_dir = Path(base) if is_hf_dir(base) else None
    base_cfg = json.loads((base_dir / CONFIG_FILE).read_text(encoding="utf-8")) if base_dir else None
    tokenizer = (manifest or {}).get("tokenizer") or {}
    config = hf_config(
        model.cfg, model_type_for(model.cfg, (base_cfg or {}).get("model_type")), base_cfg, tokenizer
    )

    _remove_stale_temps(out)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".tmp_{out.name}."))
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        _write_weights(tmp, state_to_hf(model), max_shard_bytes)
        _write_json(tmp / CONFIG_FILE, config)
        if base_dir and (base_dir / GENERATION_CONFIG_FILE).is_file():
            _copy(base_dir / GENERATION_CONFIG_FILE, tmp / GENERATION_CONFIG_FILE)
        _copy_tokenizer(tokenizer, tmp)
        _fsync_dir(tmp)
        if out.exists():  # an earlier --save-hf output (check_save_dir) or an empty directory
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".tmp_{out.name}.old."))
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(out.parent)
    return out


def _write_weights(dir: Path, state: dict[str, torch.Tensor], max_shard_bytes: int) -> None:
    from safetensors.torch import save_file

    shards = shard(state, max_shard_bytes)
    if len(shards) == 1:
        save_file(shards[0], dir / WEIGHTS_FILE, metadata={"format": "pt"})
        _fsync(dir / WEIGHTS_FILE)
        return
    weight_map = {}
    for i, part in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(part, dir / name, metadata={"format": "pt"})
        _fsync(dir / name)
        weight_map |= dict.fromkeys(part, name)
    total = sum(t.numel() * t.element_size() for t in state.values())
    _write_json(dir / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})


def _copy_tokenizer(tokenizer: dict, dir: Path) -> list[str]:
    """The build's tokenizer file (as tokenizer.json or tokenizer.model) and the side files beside it; a
    minimal tokenizer_config.json naming the EOD token where it had none."""
    path = tokenizer.get("path")
    if not path:
        return []
    src = Path(path)
    dest = {".json": "tokenizer.json", ".model": "tokenizer.model"}.get(src.suffix)
    if not src.is_file() or dest is None:
        print(f"--save-hf: tokenizer {src} from the build's manifest is not a file here; saved no tokenizer",
              file=sys.stderr)  # fmt: skip
        return []
    written = [dest]
    _copy(src, dir / dest)
    for name in TOKENIZER_SIDE_FILES:
        if (src.parent / name).is_file():
            _copy(src.parent / name, dir / name)
            written.append(name)
    if "tokenizer_config.json" not in written and dest == "tokenizer.json":
        side = {"tokenizer_class": "PreTrainedTokenizerFast"}
        if tokenizer.get("eod_token"):
            side["eos_token"] = tokenizer["eod_token"]
        _write_json(dir / "tokenizer_config.json", side)
        written.append("tokenizer_config.json")
    return written


def _remove_stale_temps(out: Path) -> None:
    """Temporary directories of earlier --save-hf runs to the same path that died (never a symlink's target)."""
    if not out.parent.is_dir():
        return
    for p in out.parent.glob(f".tmp_{out.name}.*"):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)


def _write_json(path: Path, obj: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(obj, indent=2, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _copy(src: Path, dest: Path) -> None:
    shutil.copyfile(src, dest)
    _fsync(dest)


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


__all__ = ["ARCHITECTURES", "UnsupportedModelError", "check_save_dir", "config_from_hf", "hf_config",
           "load_pretrained", "read_config", "read_state", "save_hf", "state_from_hf", "state_to_hf"]  # fmt: skip
