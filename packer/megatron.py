"""megatron-core dataset that serves one packer PACK per sample: pass `PackedGPTDataset` where `GPTDataset` goes.

    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from packer.megatron import PackedGPTDataset, PackedGPTDatasetConfig

    config = PackedGPTDatasetConfig(random_seed=1234, sequence_length=2048, blend=(["out/alpaca"], None),
                                    split="90,5,5", create_attention_mask=False)
    train, valid, test = BlendedMegatronDatasetBuilder(PackedGPTDataset, [n_train, n_valid, n_test],
                                                       lambda: True, config).build()

`GPTDataset` concatenates every sequence and cuts `sequence_length + 1` windows, so on a packer build its
samples mix packs, start mid-sample, and train on every token (prompt included; `eod_mask_loss` even drops the
EOD target). Here a sample IS a pack (a Megatron document), read through the index: no EOD scan, no windows.

Item for a pack with doc_lens [3, 2] at sequence_length S = 7 (E = EOD, p = pad id: the manifest's pad_id,
else its eod_id). Labels are shifted, as Megatron's loss expects; loss_mask is per label:

    t             0   1   2   3   4   5   6
    tokens        a0  a1  E   b0  E   p   p
    packer mask   0   1   1   1   1   .   .      (1 = this token is a target)
    labels        a1  E   b0  E   p   p   p      tokens[t+1]; the pad id past the end
    loss_mask     1   1   0   1   0   0   0      1 iff t+1 is in t's document and packer's mask[t+1] == 1
    position_ids  0   1   2   0   1   0   1      restart at every document; the padding tail is one more segment
    cu_seqlens    [0, 3, 5, 7]                   int32; the tail [5, 7) is its own segment (attends only to itself)
    max_seqlen    3                              0-d int32 tensor (default collate makes it (1,), as get_batch wants)

So a document's first token is never a label (b0's target at t=2 would cross the boundary), the EOD stays a
target (it belongs to its document), and padding never is. `attention_mask` (only when
`config.create_attention_mask`) is GPTDataset's convention: (1, S, S) bool, True = masked out, here
block-diagonal causal over the same segments as cu_seqlens.

Context parallelism: on a `packer build --cp-size N` build (docs/context-parallel.md) every sample is served
padded to its multiple m (the manifest's context_parallel.multiple) with the pad id, as Megatron-LM's own SFT
dataset and TransformerEngine's THD split lay it out: the pad tokens follow their sample, continue its positions
and are never a target. The same pack at m = 4, S = 12:

    t                 0   1   2   3   4   5   6   7   8   9  10  11
    tokens            a0  a1  E   p   b0  E   p   p   p   p   p   p
    labels            a1  E   p   p   E   p   p   p   p   p   p   p
    loss_mask         1   1   0   0   1   0   0   0   0   0   0   0
    position_ids      0   1   2   3   0   1   2   3   0   1   2   3
    cu_seqlens        [0, 3, 5, 5]          real tokens per segment (TE's cu_seqlens_q); the tail holds none
    cu_seqlens_padded [0, 4, 8, 12]         physical offsets, each segment a multiple of m (cu_seqlens_q_padded)
    max_seqlen        4                     the longest padded segment

and the dataset refuses a config whose context_parallel_size is not the build's (a plain build has CP 1).

Samples and epochs: the builder's split hands each split a range of pack indices; one epoch is every pack of
the range once, in the order of `numpy.random.RandomState(config.random_seed)` permutations, one fresh
permutation per epoch, as many epochs as `num_samples` needs (None: one). Epoch e's order does not depend on
how many epochs are built. The order is computed in memory (a few bytes per sample); `path_to_cache` is unused.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

try:
    import torch
    from megatron.core.datasets.blended_megatron_dataset_config import BlendedMegatronDatasetConfig
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from megatron.core.datasets.megatron_dataset import MegatronDataset
    from megatron.core.datasets.utils import Split
except ImportError as e:  # this module is only for megatron-core users; the rest of packer does not need it
    raise ImportError(f"packer.megatron needs megatron-core ({e}): pip install megatron-core") from e

from packer.boundaries import cu_seqlens, pack_tokens
from packer.cp import pad_multiple, padded_lengths
from packer.manifest import loss_mask_prefix, read_manifest


def check_config(config: BlendedMegatronDatasetConfig) -> None:
    """Reject the GPTDataset options that would silently mean something else on packs."""
    if config.sequence_length < 1:
        raise ValueError(f"sequence_length {config.sequence_length}: pass --seq-length >= 1")
    if getattr(config, "eod_mask_loss", False):
        raise ValueError("eod_mask_loss is not supported: packer's loss mask decides the targets, and the EOD "
                         "that ends each sample is one; drop --eod-mask-loss")
    if getattr(config, "hybrid_context_parallel", False):
        raise ValueError("hybrid context parallelism is not supported: it regroups samples into its own CP groups "
                         "at run time, and a pack is one sample here; drop --hybrid-context-parallel")
    if config.fast_cache_load or config.defer_npy_index_mmap:
        raise ValueError("fast_cache_load / defer_npy_index_mmap load GPTDataset's cached index files, which this "
                         "dataset does not use; drop --dataloader-fast-cache-load / --dataloader-defer-npy-index-mmap")


@dataclass
class PackedGPTDatasetConfig(GPTDatasetConfig):
    """`GPTDatasetConfig` without GPTDataset's requirements: the tokenizer is optional (pad and EOD ids come from
    each build's manifest) and reset_position_ids / reset_attention_mask are implied (always per document).

    `PackedGPTDataset` also accepts a plain `GPTDatasetConfig`, e.g. Megatron-LM's
    `core_gpt_dataset_config_from_args(args)`; both are checked by `check_config`.
    """

    def __post_init__(self) -> None:
        # BlendedMegatronDatasetConfig's checks (blend/split) only: GPTDatasetConfig's assert a tokenizer and
        # the reset_* / eod_mask_loss flags, none of which a pack needs.
        BlendedMegatronDatasetConfig.__post_init__(self)
        if self.mock:
            raise ValueError("no data: pass blend=([PREFIX, ...], weights) or blend_per_split (--data-path PREFIX)")
        check_config(self)


@dataclass(frozen=True, slots=True)
class PackerBuild:
    """The low-level dataset: one packer build, its two megatron-core indexes and its manifest."""

    prefix: str
    tokens: IndexedDataset
    loss_mask: IndexedDataset
    pack_lens: np.ndarray  # (n_packs,) int64 tokens per pack
    eod_id: int
    pad_id: int
    seq_length: int  # the build's --seq-length
    cp_size: int = 1  # the build's --cp-size: samples are served padded to `multiple`
    multiple: int = 1

    def __len__(self) -> int:
        return len(self.pack_lens)

    def read(self, d: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Pack d: ids (T,), loss mask (T,) uint8, doc_lens (n,) -- one contiguous read from each .bin."""
        s0, s1 = int(self.tokens.document_indices[d]), int(self.tokens.document_indices[d + 1])
        if s0 == s1:
            return np.zeros(0, np.int64), np.zeros(0, np.uint8), np.zeros(0, np.int32)
        ids = np.concatenate(self.tokens[s0:s1])
        mask = np.concatenate(self.loss_mask[s0:s1])
        return ids, mask, self.tokens.sequence_lengths[s0:s1]


def open_build(prefix: str, mmap: bool = True) -> PackerBuild:
    """Open a packer build with megatron-core's IndexedDataset; the manifest must exist (a finished build)."""
    prefix = os.fspath(prefix)
    manifest = read_manifest(prefix)
    tok = IndexedDataset(prefix, multimodal=False, mmap=mmap)
    mask = IndexedDataset(loss_mask_prefix(prefix), multimodal=False, mmap=mmap)
    if not (np.array_equal(tok.document_indices, mask.document_indices)
            and np.array_equal(tok.sequence_lengths, mask.sequence_lengths)):
        raise ValueError(f"{prefix}: token and loss-mask indexes disagree; run `packer verify {prefix}`")
    t = manifest["tokenizer"]
    eod = int(t["eod_id"])
    section = manifest.get("context_parallel") or {}
    cp, tp = int(section.get("cp_size", 1)), int(section.get("tp_size", 1))
    multiple = int(section.get("multiple", 1))
    if multiple != pad_multiple(cp, tp):
        raise ValueError(f"{prefix}: context_parallel.multiple is {multiple}, not CP {cp} x lcm(2, TP {tp}); run "
                         f"`packer verify {prefix}`")
    # A CP build's packs are served padded: their padded lengths are what must fit sequence_length.
    return PackerBuild(prefix=prefix, tokens=tok, loss_mask=mask,
                       pack_lens=pack_tokens(padded_lengths(tok.sequence_lengths, multiple), tok.document_indices),
                       eod_id=eod, pad_id=int(t["pad_id"]) if t.get("pad_id") is not None else eod,
                       seq_length=int(manifest["config"]["seq_length"]), cp_size=cp, multiple=multiple)


def pack_item(ids: np.ndarray, mask: np.ndarray, doc_lens: np.ndarray, seq_length: int, pad_id: int,
              create_attention_mask: bool = False, multiple: int = 1) -> dict[str, torch.Tensor]:
    """One pack -> the tensors Megatron-LM's get_batch reads, plus cu_seqlens / max_seqlen (module docstring);
    `multiple` > 1 (a CP build): every sample padded to a multiple of it, plus cu_seqlens_padded."""
    S = seq_length
    real_N = np.asarray(doc_lens, dtype=np.int64)  # (n,) real tokens per sample
    phys_N = padded_lengths(real_N, multiple)  # (n,) where each sample's slot ends; = real_N without CP
    T = int(phys_N.sum())
    if T > S:
        raise ValueError(f"a pack holds {T} tokens{' padded' if multiple > 1 else ''} but sequence_length is {S}: "
                         f"pass --seq-length >= {T}")
    seg_lens = np.append(phys_N, S - T) if T < S else phys_N  # the padding tail: one more segment
    cu_N1 = cu_seqlens(seg_lens)  # (n_seg + 1,) int32
    seg_S = np.repeat(np.arange(len(seg_lens)), seg_lens)  # segment of every position
    real_S = np.zeros(S, dtype=bool)  # the samples' own tokens: the first real_N positions of each slot
    real_ends = np.cumsum(real_N)
    real_S[np.arange(int(real_ends[-1]) if real_N.size else 0)
           + np.repeat(cu_N1[: real_N.size].astype(np.int64) - (real_ends - real_N), real_N)] = True
    tokens_S = np.full(S, pad_id, dtype=np.int64)
    tokens_S[real_S] = ids
    target_S = np.zeros(S, dtype=bool)
    target_S[real_S] = np.asarray(mask) != 0
    labels_S = np.append(tokens_S[1:], pad_id)
    loss_S = np.zeros(S, dtype=np.float32)
    loss_S[:-1] = (seg_S[1:] == seg_S[:-1]) & real_S[1:] & target_S[1:]  # a pad is never a target
    positions_S = np.arange(S, dtype=np.int64) - cu_N1[:-1].astype(np.int64)[seg_S]

    item = {"tokens": torch.from_numpy(tokens_S), "labels": torch.from_numpy(labels_S)}
    if create_attention_mask:
        seg = torch.from_numpy(seg_S)
        allowed_SS = (seg[:, None] == seg[None, :]) & torch.ones(S, S, dtype=torch.bool).tril_()
        item["attention_mask"] = (~allowed_SS).unsqueeze(0)  # (1, S, S), True = masked out, as GPTDataset
    item["loss_mask"] = torch.from_numpy(loss_S)
    item["position_ids"] = torch.from_numpy(positions_S)
    if multiple > 1:  # TE's THD pair: real tokens per segment (the tail holds none), and physical offsets
        real_seg = np.append(real_N, 0) if T < S else real_N
        item["cu_seqlens"] = torch.from_numpy(cu_seqlens(real_seg))
        item["cu_seqlens_padded"] = torch.from_numpy(cu_N1)
    else:
        item["cu_seqlens"] = torch.from_numpy(cu_N1)
    item["max_seqlen"] = torch.tensor(int(seg_lens.max()), dtype=torch.int32)
    return item


def epoch_order(packs: np.ndarray, num_samples: int | None, seed: int) -> np.ndarray:
    """Pack index of every sample: whole epochs, each a fresh permutation of `packs` (see module docstring)."""
    packs = np.asarray(packs, dtype=np.int64)
    if packs.size == 0:
        return packs
    epochs = 1 if not num_samples else -(-num_samples // packs.size)
    rng = np.random.RandomState(seed)
    return np.concatenate([rng.permutation(packs) for _ in range(epochs)])


class PackedGPTDataset(MegatronDataset):
    """One pack per sample (see the module docstring for the item). `indices` are pack (document) indices."""

    def __init__(self, dataset: PackerBuild, dataset_path: str | None, indices: np.ndarray,
                 num_samples: int | None, index_split: Split, config: BlendedMegatronDatasetConfig) -> None:
        super().__init__(dataset, dataset_path, indices, num_samples, index_split, config)
        check_config(config)
        self._check_tokenizer()
        cp = getattr(config, "context_parallel_size", None) or 1
        if cp != dataset.cp_size:
            raise ValueError(
                f"{dataset.prefix}: context_parallel_size is {cp} but the build was made for CP {dataset.cp_size} "
                + (f"(its samples are padded to multiples of {dataset.multiple}); pass --context-parallel-size "
                   f"{dataset.cp_size}, or rebuild with `packer build --cp-size {cp}`" if dataset.cp_size > 1 else
                   f"(no padding: THD context parallelism needs every document padded to a multiple of 2 x CP); "
                   f"rebuild with `packer build --cp-size {cp}`, or pass --context-parallel-size 1"))
        S = config.sequence_length
        if S % dataset.multiple:
            raise ValueError(f"{dataset.prefix}: sequence_length {S} is not a multiple of {dataset.multiple}, the "
                             f"build's context-parallel padding (the tail of a short row would not split over CP "
                             f"{dataset.cp_size}); pass --seq-length {dataset.seq_length}")
        if len(indices):
            lens = dataset.pack_lens[indices]
            if lens.max() > S:
                d = int(indices[int(np.argmax(lens))])
                raise ValueError(
                    f"{dataset.prefix}: pack {d} holds {int(lens.max())} tokens"
                    + (" padded" if dataset.multiple > 1 else "") + f" but sequence_length is {S} (the "
                    f"build was packed to {dataset.seq_length}); pass --seq-length >= {dataset.seq_length}")
        elif num_samples:
            raise ValueError(f"{dataset.prefix}: the {index_split.name} split has no packs of {len(dataset)} "
                             f"(split {config.split!r}) but {num_samples} samples were asked for; change --split")
        self.pack_index = epoch_order(indices, num_samples, config.random_seed)  # (len(self),) pack of sample

    def _check_tokenizer(self) -> None:
        """A tokenizer that disagrees with the build's EOD id means the wrong tokenizer (or the wrong data)."""
        try:
            eod = self.config.tokenizer.eod
        except (AttributeError, NotImplementedError):
            return
        if isinstance(eod, int | np.integer) and int(eod) != self.dataset.eod_id:
            raise ValueError(f"{self.dataset.prefix}: the tokenizer's EOD id is {eod} but the build's is "
                             f"{self.dataset.eod_id}; pass the tokenizer the build used (see {self.dataset.prefix}.json)")

    @staticmethod
    def numel_low_level_dataset(low_level_dataset: PackerBuild) -> int:
        return len(low_level_dataset)  # split by pack, not by sequence as GPTDataset does

    @staticmethod
    def build_low_level_dataset(dataset_path: str | None, config: BlendedMegatronDatasetConfig) -> PackerBuild:
        if dataset_path is None:
            raise ValueError("PackedGPTDataset has no mock data: pass --data-path PREFIX (a packer build)")
        return open_build(dataset_path, mmap=config.mmap_bin_files)

    def __len__(self) -> int:
        return len(self.pack_index)

    def __getitem__(self, idx: int | None) -> dict[str, Any]:
        # idx None: a batch-padding sample (as GPTDataset), any pack with no loss
        ids, mask, doc_lens = self.dataset.read(int(self.pack_index[0 if idx is None else idx]))
        item = pack_item(ids, mask, doc_lens, self.config.sequence_length, self.dataset.pad_id,
                         getattr(self.config, "create_attention_mask", False), self.dataset.multiple)
        if idx is None:
            item["loss_mask"].zero_()
        return item
