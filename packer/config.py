"""`BuildConfig`: every option of `packer build`, validated once, before any work starts."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from packer.cp import CPError, check_seq_length, pad_multiple
from packer.overflow import POLICIES
from packer.packing import ALGORITHMS

ON_ERROR = ("fail", "skip")
EMPTY_RESPONSE = ("skip", "keep", "fail")  # records with an empty answer: not a sample, kept, or a record error
TOKENIZER_BACKENDS = ("auto", "hf", "tiktoken")
EXPORT_TARGETS = ("mindspeed", "bridge", "hf")  # `packer export --to` (packer/export)


class BuildError(Exception):
    """A user-facing failure: the message names the file, record, field and fix."""


@dataclass(frozen=True)
class BuildConfig:
    handler: str
    inputs: tuple[str, ...]
    tokenizer: str
    seq_length: int
    output_prefix: str
    eod_token: str | None = None
    map_keys: dict[str, str] = field(default_factory=dict)
    json_keys: tuple[str, ...] = ("text",)
    template: str | None = None
    system: str | None = None
    train_on_prompt: bool = False
    last_turn_only: bool = False
    overflow: str | None = None  # None: the handler's default
    pack: str = "bfd"
    on_error: str = "fail"
    empty_response: str = "skip"  # skip: counted, not a sample; keep: trained on its EOD; fail: a record error
    workers: int = 1
    batch_size: int = 512
    streaming: bool = False
    hf_dataset: str | None = None
    hf_config: str | None = None
    split: str = "train"
    hf_datasets_params: str | None = None  # JSON file of load_dataset keyword arguments
    pack_window: tuple[int, bool] = (16384, False)  # (size, by_tokens): the streaming packer's window
    num_shards: int = 1
    shard_index: int = 0
    tokenizer_backend: str = "auto"  # auto: tiktoken where it is proven exact for the tokenizer, else tokenizers
    chat_template: str | None = None  # None: the tokenizer's own for `messages`, none for the other handlers
    chat_template_kwargs: str = ""  # JSON object of extra template variables, e.g. {"enable_thinking": false}
    cp_size: int = 1  # context parallelism the data is for: samples packed by padded length (packer/cp.py)
    tp_size: int = 1  # tensor parallelism: part of MindSpeed's padding multiple at CP > 1

    def template_variables(self) -> dict:
        if not self.chat_template_kwargs:
            return {}
        try:
            value = json.loads(self.chat_template_kwargs)
        except json.JSONDecodeError as e:
            raise BuildError(f"--chat-template-kwargs: not JSON ({e.msg}); e.g. '{{\"enable_thinking\": false}}'") from e
        if not isinstance(value, dict):
            raise BuildError("--chat-template-kwargs must be a JSON object of template variables")
        return value

    def validate(self) -> None:
        if self.seq_length < 2:
            raise BuildError(f"--seq-length must be >= 2, got {self.seq_length}")
        if self.overflow is not None and self.overflow not in POLICIES:
            raise BuildError(f"--overflow {self.overflow!r}: choose one of {', '.join(POLICIES)}")
        if self.pack not in ALGORITHMS:
            raise BuildError(f"--pack {self.pack!r}: choose one of {', '.join(ALGORITHMS)}")
        if self.on_error not in ON_ERROR:
            raise BuildError(f"--on-error {self.on_error!r}: choose one of {', '.join(ON_ERROR)}")
        if self.empty_response not in EMPTY_RESPONSE:
            raise BuildError(f"--empty-response {self.empty_response!r}: choose one of {', '.join(EMPTY_RESPONSE)}")
        if self.tokenizer_backend not in TOKENIZER_BACKENDS:
            raise BuildError(f"--tokenizer-backend {self.tokenizer_backend!r}: choose one of "
                             f"{', '.join(TOKENIZER_BACKENDS)}")
        if self.chat_template is not None and self.template is not None:
            raise BuildError(f"--template {self.template} and --chat-template {self.chat_template}: choose one "
                             "(--template: packer's built-in formats; --chat-template: a model's Jinja template)")
        if self.chat_template_kwargs:
            self.template_variables()
        try:
            check_seq_length(self.seq_length, self.cp_size, self.tp_size)
        except CPError as e:
            raise BuildError(str(e)) from e
        if self.workers < 1:
            raise BuildError(f"--workers must be >= 1, got {self.workers}")
        if self.batch_size < 1:
            raise BuildError(f"--batch-size must be >= 1, got {self.batch_size}")
        window, by_tokens = self.pack_window
        if self.streaming and window < 2:
            raise BuildError(f"--pack-window must hold at least 2 samples, got {window}")
        if self.streaming and by_tokens and window < 2 * self.seq_length:
            raise BuildError(f"a --pack-window of {window} tokens must hold at least two packs "
                             f"({2 * self.seq_length} tokens at --seq-length {self.seq_length})")
        if not 0 <= self.shard_index < self.num_shards:
            raise BuildError(f"--shard-index {self.shard_index} must be in [0, --num-shards {self.num_shards})")
        if self.hf_dataset and not self.streaming:
            raise BuildError("--hf-dataset reads through `datasets` streaming; add --streaming")
        if self.hf_dataset and self.inputs:
            raise BuildError("pass either --input files or --hf-dataset, not both")
        if not self.hf_dataset and not self.inputs:
            raise BuildError("no input: pass --input PATH (repeatable) or --streaming --hf-dataset NAME")
        if self.streaming and self.pack != "bfd":
            raise BuildError(f"--streaming packs with a window best-fit; --pack {self.pack} needs the global packer "
                             "(drop --streaming)")

    @property
    def prefix(self) -> str:
        """Where this build writes: the output prefix, with the shard suffix for one shard of several."""
        return output_prefix_for_shard(self.output_prefix, self.num_shards, self.shard_index)

    @property
    def context_parallel(self) -> bool:
        """Built for a CP/TP layout: the manifest gets a `context_parallel` section (and the config these sizes)."""
        return self.cp_size > 1 or self.tp_size > 1

    @property
    def pad_multiple(self) -> int:
        return pad_multiple(self.cp_size, self.tp_size)

    @property
    def packing_name(self) -> str:
        """The packer as the manifest names it."""
        if not self.streaming:
            return self.pack
        size, by_tokens = self.pack_window
        return f"window-bfd({size}{' tokens' if by_tokens else ''})"


def output_prefix_for_shard(prefix: str, num_shards: int, shard_index: int) -> str:
    return prefix if num_shards == 1 else f"{prefix}_shard{shard_index:05d}_of_{num_shards:05d}"


def parse_window(text: str) -> tuple[int, bool]:
    """'16384' or '16k' -> (16384, False) samples; '8M tokens', '8Mt', '8M-tokens' -> (8_000_000, True)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgG]?)\s*[-_ ]?(t|tok|tokens|s|samples)?\s*", text)
    if not m:
        raise ValueError(f"--pack-window {text!r}: expected e.g. 16384, 16k (samples) or 8M-tokens")
    scale = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}[m.group(2).lower()]
    return int(float(m.group(1)) * scale), (m.group(3) or "s").startswith("t")
