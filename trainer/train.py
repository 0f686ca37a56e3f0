"""The training loop: packs -> micro-batches -> Llama -> token-mean loss -> AdamW, with DDP and checkpoints.

One optimizer step = grad_accum micro-batches per rank. The loss is normalised by the number of targets
(or documents, for --loss-average sample) of the WHOLE step across micro-batches and ranks, so a step's
gradient does not depend on how its documents were split over micro-batches or ranks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from packer.trainer import checkpoint, hf
from packer.trainer.attention import AttentionConfig, max_segments_per_micro_batch, resolve_backend
from packer.trainer.balance import BalancedPackOrder
from packer.trainer.batching import IGNORE_INDEX, MicroBatch, PackOrder, collate
from packer.trainer.context_parallel import cp_groups, shard_micro_batch
from packer.trainer.model import ModelConfig, build_model, load_model_config

AttentionChoice = Literal["varlen", "blockwise", "padded"]


@dataclass(frozen=True, slots=True)
class TrainConfig:
    data: str
    model: str = "tiny"  # preset name, JSON path or Hugging Face model directory
    seq_length: int | None = None  # None: the packed seq_length of the data
    micro_batch_size: int = 1
    steps: int = 100
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_steps: int = 10
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # 0 disables clipping (grad_norm is still reported)
    grad_accum: int = 1
    context_parallel_size: int = 1  # CP ranks per data-parallel replica (ring attention over documents)
    balance_attention: bool = False  # data order that balances each step's attention cost over DP ranks
    attention: AttentionChoice = "varlen"
    npu_sparse_mode: int = 4  # 4: band, MindSpeed-LLM's TND call; 3: rightDownCausal (transformers, XTuner)
    device: str = "auto"
    dtype: Literal["fp32", "bf16"] = "fp32"
    loss_average: Literal["token", "sample"] = "token"
    save: str | None = None
    save_every: int = 0  # 0: only at the end
    save_hf: str | None = None  # at the end: a Hugging Face model directory (trainer.hf)
    resume: str | None = None
    allow_data_change: bool = False  # resume on data whose content differs from the checkpoint's
    new_schedule: bool = False  # on --resume: the lr curve of these flags instead of the checkpoint's
    log_jsonl: str | None = None
    seed: int = 1234
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("micro_batch_size", "steps", "grad_accum", "context_parallel_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.attention not in ("varlen", "blockwise", "padded"):
            raise ValueError(f"--attention {self.attention!r}: choose varlen, blockwise or padded")
        if self.loss_average not in ("token", "sample"):
            raise ValueError(f"--loss-average {self.loss_average!r}: choose token or sample")
        if self.context_parallel_size > 1 and self.attention == "padded":
            raise ValueError(
                "--attention padded (one document per row, no boundaries) cannot run under "
                "--context-parallel-size > 1; use --attention varlen"
            )
        if self.save_every and not self.save:
            raise ValueError("--save-every needs --save DIR")
        if self.new_schedule and not self.resume:
            raise ValueError("--new-schedule replaces a checkpoint's lr schedule; it needs --resume DIR")


@dataclass(frozen=True, slots=True)
class Schedule:
    """The lr curve of a run, saved in every checkpoint: a resumed run follows it whatever its --steps."""

    lr: float
    min_lr: float
    warmup_steps: int
    steps: int  # the cosine reaches min_lr here and stays there

    @classmethod
    def of(cls, cfg: TrainConfig | dict) -> Schedule:
        get = cfg.get if isinstance(cfg, dict) else lambda k: getattr(cfg, k)
        return cls(float(get("lr")), float(get("min_lr")), int(get("warmup_steps")), int(get("steps")))


def lr_at(step: int, cfg: TrainConfig | Schedule) -> float:
    """Linear warmup over warmup_steps, then cosine decay from lr to min_lr at `steps`, then min_lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    decay_steps = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def loss_sum(logits_NV: torch.Tensor, mb: MicroBatch, average: str, at: torch.Tensor | None = None):
    """Sum of per-target losses (token) or of per-document mean losses (sample); the caller divides.

    `logits_NV` are the logits of all T tokens, or of the N token indices `at` (MicroBatch.target_idx_N).
    """
    labels, segments = mb.labels_T, mb.segment_ids_T
    if at is not None:
        labels, segments = labels[at], segments[at]
    losses_N = F.cross_entropy(logits_NV.float(), labels, ignore_index=IGNORE_INDEX, reduction="none")
    if average == "token":
        return losses_N.sum()
    n_seg = mb.meta.cu_seqlens.numel() - 1
    seg_loss = losses_N.new_zeros(n_seg).index_add_(0, segments, losses_N)
    if mb.segment_targets_S is not None:  # context parallel: documents span ranks, count them whole
        seg_count = mb.segment_targets_S
    else:
        is_target_N = (labels != IGNORE_INDEX).float()
        seg_count = losses_N.new_zeros(n_seg).index_add_(0, segments, is_target_N)
    return (seg_loss / seg_count.clamp(min=1)).sum()


ADAM_BETAS, ADAM_EPS = (0.9, 0.95), 1e-8


def configure_optimizer(model: torch.nn.Module, cfg: TrainConfig, fused: bool = False) -> torch.optim.AdamW:
    # Decay only matrices that multiply activations; norms, biases and embeddings are left alone. Embeddings
    # are found by module type, not name, so any model's (HF `embed_tokens`, a tied output head) counts.
    embeddings = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        is_matrix = p.dim() >= 2 and id(p) not in embeddings
        (decay if is_matrix else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=ADAM_BETAS, eps=ADAM_EPS, fused=fused or None)


# --------------------------------------------------------------------------- devices and processes


def pick_device(requested: str, local_rank: int) -> torch.device:
    if requested == "auto":
        if torch.cuda.is_available():
            requested = "cuda"
        elif _npu_available():
            requested = "npu"
        else:
            requested = "cpu"
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda but torch.cuda.is_available() is False; use --device cpu")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    if requested == "npu":
        if not _npu_available():
            raise ValueError("--device npu needs torch_npu (Ascend CANN); use --device cpu or cuda")
        torch.npu.set_device(local_rank)
        return torch.device("npu", local_rank)
    if requested == "cpu":
        return torch.device("cpu")
    raise ValueError(f"--device {requested!r}: choose auto, cpu, cuda or npu")


def _npu_available() -> bool:
    try:
        import torch_npu  # noqa: F401
    except ImportError:
        return False
    return torch.npu.is_available()


def attention_backend(choice: str, device: torch.device, dtype: str = "fp32") -> tuple[str, str]:
    """--attention -> (trainer.attention backend, batch layout). varlen picks the device's fused kernel."""
    if choice == "padded":
        return "padded", "padded"
    if choice == "blockwise":
        return "blockwise", "packed"
    backend = resolve_backend("varlen", device)
    if backend == "cuda" and dtype == "fp32":
        raise ValueError(
            "--attention varlen on CUDA runs FlashAttention, which needs half precision; "
            "pass --dtype bf16 (or --attention blockwise for fp32)"
        )
    return backend, "packed"


@dataclass(frozen=True, slots=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, values: list[float], device: torch.device) -> list[float]:
        if self.world_size == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.tolist()


def init_distributed(device_request: str) -> tuple[Dist, torch.device]:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_request, local_rank)
    if world_size > 1 and not dist.is_initialized():
        backend = {"cpu": "gloo", "cuda": "nccl", "npu": "hccl"}[device.type]
        dist.init_process_group(backend=backend)
    return Dist(rank, world_size, local_rank), device


# --------------------------------------------------------------------------- the loop


def open_dataset(prefix: str):
    from packer.dataset import PackedDataset

    return PackedDataset(prefix)


def train(cfg: TrainConfig, dataset=None) -> list[dict]:
    """Run cfg.steps optimizer steps (continuing from cfg.resume); returns the per-step log records."""
    ddp, device = init_distributed(cfg.device)
    # On an error, no collective teardown: the other ranks may wait in a collective this rank never joins, and a
    # destroy would hang with them; the launcher ends them once this rank exits with the error.
    records = _train(cfg, dataset if dataset is not None else open_dataset(cfg.data), ddp, device)
    if ddp.world_size > 1 and dist.is_initialized():
        # Every rank reaches the end before any tears its connections down (CI once saw rank 1 of a 2-rank gloo run
        # abort at the end, "terminate called without an active exception", while rank 0 finished).
        dist.barrier()
        dist.destroy_process_group()
    return records


def pack_costs(ds, multiple: int = 1) -> np.ndarray:
    """Attention cost of every pack (packer.balance.pack_attention_costs), from the index alone where the data
    is a PackedDataset, documents padded as the micro-batches lay them out."""
    from packer.balance import pack_attention_costs

    tokens = getattr(ds, "tokens", None)
    if tokens is not None and hasattr(tokens, "document_indices"):
        return pack_attention_costs(tokens.sequence_lengths, tokens.document_indices, multiple)
    lens = [np.asarray(ds[i].doc_lens, dtype=np.int64) for i in range(len(ds))]
    doc_index = np.concatenate([[0], np.cumsum([len(x) for x in lens])])
    flat = np.concatenate(lens) if lens else np.zeros(0, np.int64)
    return pack_attention_costs(flat, doc_index, multiple)


def check_context_parallel(ds, cp_size: int, seq_length: int) -> int:
    """The document padding multiple the micro-batches are laid out with (1 = none), after checking that the
    data was built for this context-parallel size (`packer build --cp-size N`, recorded in its manifest)."""
    built_cp = int(getattr(ds, "cp_size", 1) or 1)
    multiple = int(getattr(ds, "pad_multiple", 1) or 1)
    if cp_size > 1:
        if built_cp != cp_size:
            built = (
                f"built for --cp-size {built_cp} (documents padded to a multiple of {multiple})"
                if built_cp > 1
                else "built without --cp-size (documents not padded)"
            )
            raise ValueError(
                f"--context-parallel-size {cp_size}, but the data {getattr(ds, 'prefix', '')} was {built}; "
                f"rebuild it with `packer build ... --cp-size {cp_size}` or train with --context-parallel-size "
                f"{built_cp}"
            )
        if multiple % (2 * cp_size):
            raise ValueError(
                f"the data pads documents to a multiple of {multiple}, which context parallel size {cp_size} "
                f"cannot cut into {2 * cp_size} equal chunks; rebuild with `packer build ... --cp-size {cp_size}`"
            )
        if seq_length % (2 * cp_size):
            raise ValueError(
                f"--seq-length {seq_length} is not a multiple of 2 x --context-parallel-size = {2 * cp_size}: a row's "
                "padding tail could not be cut into equal chunks; pass a multiple (or leave the data's seq_length)"
            )
    return multiple


def _train(cfg: TrainConfig, ds, ddp: Dist, device: torch.device) -> list[dict]:
    seq_length = cfg.seq_length or ds.seq_length
    if seq_length < ds.seq_length:
        raise ValueError(
            f"--seq-length {seq_length} is shorter than the packs ({ds.seq_length} tokens); "
            f"pass --seq-length >= {ds.seq_length} or rebuild the data with a shorter --seq-length"
        )
    backend, layout = attention_backend(cfg.attention, device, cfg.dtype)
    backend = AttentionConfig(backend, npu_sparse_mode=cfg.npu_sparse_mode)
    cp = cfg.context_parallel_size
    pad_multiple = check_context_parallel(ds, cp, seq_length) if layout == "packed" else 1
    ring, dp_rank, dp_size = (
        cp_groups(ddp.world_size, cp, ddp.rank) if cp > 1 else (None, ddp.rank, ddp.world_size)
    )

    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    model_cfg = load_model_config(cfg.model, vocab_size=ds.vocab_size)
    if cfg.save_hf:
        hf.check_save_dir(cfg.save_hf)  # now, not after the run
    model = build_model(cfg.model, model_cfg).to(device)
    optimizer = configure_optimizer(model, cfg, fused=device.type == "cuda")
    if cfg.balance_attention:
        costs = pack_costs(ds, pad_multiple)
        order = BalancedPackOrder(costs, cfg.micro_batch_size, cfg.grad_accum, cfg.seed, dp_rank, dp_size)
    else:
        order = PackOrder(len(ds), cfg.micro_batch_size, cfg.seed, dp_rank, dp_size)
    run_args = {
        **_primitive(dataclasses.asdict(cfg)),
        "seq_length": seq_length,  # resolved, so a resume compares values, not how they were given
        "model_config": model_cfg.to_dict(),
        "world_size": ddp.world_size,
        "context_parallel_size": cp,
        "betas": list(ADAM_BETAS),
        "eps": ADAM_EPS,
        "data_files": data_fingerprint(ds),
    }

    step, schedule = 0, Schedule.of(cfg)
    if cfg.resume:
        loaded = checkpoint.load(cfg.resume, map_location="cpu")  # RNG states must stay on CPU
        state = loaded.state
        if ddp.is_main:
            for why in loaded.skipped:
                print(f"--resume: skipped {why}; resuming from {loaded.path}", file=sys.stderr)
        saved_args = state["args"]
        if saved_args.get("seq_length") is None:  # checkpoints that stored the unresolved default
            saved_args = {**saved_args, "seq_length": ds.seq_length}
        note = _check_resumable(saved_args, run_args, cfg.allow_data_change, cfg.new_schedule)
        if note and ddp.is_main:
            print(note, file=sys.stderr)
        if not cfg.new_schedule:  # the saved run's curve (older checkpoints hold it only in their args)
            schedule = Schedule.of({**state["args"], **state.get("scheduler", {})})
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        order.load_state_dict(state["data"])
        checkpoint.set_rng_state(state["rng"])
        step = int(state["step"])
        del state

    train_model: torch.nn.Module = model
    if ddp.world_size > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type != "cpu" else None
        )
    autocast = (
        torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        if cfg.dtype == "bf16"
        else contextlib.nullcontext()
    )

    log_file = None
    if ddp.is_main and cfg.log_jsonl:
        Path(cfg.log_jsonl).parent.mkdir(parents=True, exist_ok=True)
        log_file = open(cfg.log_jsonl, "a" if cfg.resume else "w")  # noqa: SIM115
    bar = tqdm(total=cfg.steps, initial=step, disable=not (ddp.is_main and cfg.progress), dynamic_ncols=True)
    if ddp.is_main and cfg.progress:
        bar.write(
            f"model {model.num_params() / 1e6:.2f}M params | attention {backend} ({layout} rows) | "
            f"{len(ds)} packs, seq {seq_length}, {dp_size} rank(s) x {cfg.grad_accum} x "
            f"{cfg.micro_batch_size} packs/step"
            + (f", context parallel {cp} (ring, zigzag per document)" if cp > 1 else "")
            + f" | device {device}"
        )
        if layout == "packed":  # the longest actual_seq_len a kernel call can get (npu: split above 1024)
            segs = max_segments_per_micro_batch(ds, cfg.micro_batch_size, seq_length)
            bar.write(f"up to {segs} attention segments per micro-batch")

    records = []
    model.train()
    while step < cfg.steps:
        t0 = time.perf_counter()
        lr = lr_at(step, schedule)
        for group in optimizer.param_groups:
            group["lr"] = lr
        micro = [
            collate([ds[i] for i in order.next()], seq_length, ds.pad_id, layout, pad_multiple)
            for _ in range(cfg.grad_accum)
        ]
        if ring is not None:  # every CP rank built the same micro-batch; each keeps its zigzag share
            micro = [shard_micro_batch(mb, ring) for mb in micro]
        micro = [mb.to(device) for mb in micro]
        local_counts = [
            sum(mb.num_targets if cfg.loss_average == "token" else mb.num_docs for mb in micro),
            sum(mb.num_tokens for mb in micro),
            sum(mb.tokens_T.numel() for mb in micro),
        ]
        denom, tokens, processed = ddp.all_reduce_sum([float(c) for c in local_counts], device)
        # DDP averages gradients over ranks; scale by world_size so the step's gradient is sum / denom.
        scale = ddp.world_size / max(denom, 1.0)

        total = torch.zeros((), device=device)
        for i, mb in enumerate(micro):
            sync = ddp.world_size == 1 or i == len(micro) - 1
            no_sync = contextlib.nullcontext() if sync else train_model.no_sync()
            with no_sync:
                with autocast:
                    at = mb.target_idx_N
                    logits_NV = train_model(mb.tokens_T, mb.positions_T, mb.meta, backend, logits_at=at)
                loss = loss_sum(logits_NV, mb, cfg.loss_average, at)
                (loss * scale).backward()
            total += loss.detach()

        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1

        (loss_total,) = ddp.all_reduce_sum([total.item()], device)
        dt = time.perf_counter() - t0
        record = {
            "step": step,
            "loss": loss_total / max(denom, 1.0),
            "tokens": int(tokens),  # real (non-pad) tokens over all ranks
            "processed_tokens": int(processed),  # incl. padding
            "tokens_per_s": tokens / dt,
            "lr": lr,
            "grad_norm": float(grad_norm),
            "epoch": order.epoch,
            "step_time_s": dt,
        }
        records.append(record)
        if ddp.is_main:
            if log_file:
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()
            bar.set_postfix(
                loss=f"{record['loss']:.4f}",
                tok_s=f"{record['tokens_per_s']:.0f}",
                lr=f"{lr:.2e}",
                gnorm=f"{record['grad_norm']:.3f}",
            )
            bar.update(1)
        save_now = step == cfg.steps or (cfg.save_every and step % cfg.save_every == 0)
        if cfg.save and save_now and ddp.is_main:
            state = {
                "step": step,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": {"step": step, **dataclasses.asdict(schedule)},
                "data": order.state_dict(),
                "rng": checkpoint.rng_state(),
                "args": run_args,
            }
            checkpoint.save(cfg.save, step, state)
        if ddp.world_size > 1 and cfg.save and save_now:
            dist.barrier()  # nobody runs ahead of a checkpoint being written
    bar.close()
    if cfg.save_hf and ddp.is_main:
        hf.save_hf(model, cfg.save_hf, base=cfg.model, manifest=getattr(ds, "manifest", None))
    if log_file:
        log_file.close()
    return records


# What a resumed run must share with the run it continues, after defaults are resolved (run_args): the lr
# schedule (unless --new-schedule), the optimizer (AdamW's load_state_dict would silently bring back the saved
# weight decay and betas), the numerics, and everything that decides which packs make up a step.
_SCHEDULE_ARGS = ("lr", "min_lr", "warmup_steps")
_RESUME_MUST_MATCH = (
    *_SCHEDULE_ARGS,
    *("weight_decay", "grad_clip", "betas", "eps"),
    *("dtype", "loss_average", "attention", "seq_length", "model_config"),
    *("micro_batch_size", "grad_accum", "world_size", "context_parallel_size", "balance_attention", "seed"),
)
# What checkpoints written before these were recorded used.
_SAVED_DEFAULTS = {"betas": [0.9, 0.95], "eps": 1e-8, "context_parallel_size": 1, "balance_attention": False}


def _resume_mismatch(key: str, was, now, saved: dict) -> str:
    """'NAME: OLD -> NEW (FIX)' for one argument that differs from the checkpoint's."""
    if key == "model_config":
        was, now = was or {}, now or {}
        keys = sorted(k for k in was.keys() | now.keys() if was.get(k) != now.get(k))
        diff = ", ".join(f"{k}: {was.get(k)} -> {now.get(k)}" for k in keys)
        return f"model config {diff} (pass the checkpoint's --model {saved.get('model')})"
    if key == "world_size":
        return f"ranks: {was} -> {now} (run {was} processes: torchrun --nproc-per-node {was})"
    if key in ("betas", "eps"):
        return f"AdamW {key}: {was} -> {now} (fixed in the trainer; resume with the version that saved it)"
    flag = "--" + key.replace("_", "-")
    fix = (f"pass {flag}" if was else f"leave out {flag}") if isinstance(was, bool) else f"pass {flag} {was}"
    if key in _SCHEDULE_ARGS:
        fix += ", or --new-schedule to follow this run's lr schedule from here on"
    return f"{flag}: {was} -> {now} ({fix})"


def _check_resumable(
    saved: dict, now: dict, allow_data_change: bool = False, new_schedule: bool = False
) -> str | None:
    """Refuse a resume that would not continue the saved run, naming each differing argument and its fix;
    returns a line to print where the data changed and --allow-data-change lets it go on."""
    saved = {**_SAVED_DEFAULTS, **saved}
    skip = _SCHEDULE_ARGS if new_schedule else ()
    problems = [
        _resume_mismatch(k, saved.get(k), now.get(k), saved)
        for k in _RESUME_MUST_MATCH
        if k not in skip and saved.get(k) != now.get(k)
    ]
    note = None
    was, new = saved.get("data_files"), now.get("data_files")  # None: no manifest, nothing to compare
    if was is not None and new is not None and was != new:
        changed = ", ".join(sorted(k for k in was.keys() | new.keys() if was.get(k) != new.get(k)))
        what = (
            f"the data's content differs from the checkpoint's (sha256 of {changed} in the manifest; "
            f"trained on {saved.get('data')}, now {now.get('data')})"
        )
        if not allow_data_change:
            problems.append(
                f"{what}; resume on the data it was trained on, or pass --allow-data-change to continue on "
                f"this data"
            )
        note = f"--resume: {what}; continuing on it (--allow-data-change)"
    if problems:
        raise ValueError("--resume: the checkpoint's run differs: " + "; ".join(problems))
    return note


def data_fingerprint(ds) -> dict[str, str] | None:
    """What identifies the data's content: the manifest's sha256 of each file, keyed by the file's name after
    the prefix (".bin", "_loss_mask.idx", ...) so a moved or renamed copy matches. None without a manifest."""
    manifest = getattr(ds, "manifest", None)
    if not manifest or not isinstance(manifest.get("files"), dict):
        return None
    stem = Path(getattr(ds, "prefix", "")).name
    return {
        (name[len(stem) :] if stem and name.startswith(stem) else name): str(entry.get("sha256"))
        for name, entry in sorted(manifest["files"].items())
        if isinstance(entry, dict)
    }


def _primitive(d: dict) -> dict:
    return json.loads(json.dumps(d, default=str))


__all__ = ["TrainConfig", "ModelConfig", "train", "lr_at", "loss_sum"]
