"""An exact `tiktoken` twin of a byte-level BPE `tokenizer.json` (GPT-2, Llama-3, Qwen and similar families).

`tiktoken` runs the same algorithm several times faster than `tokenizers` for these models: split the text at
special tokens, split the rest with the pre-tokenizer's regex, byte-level BPE over each piece by merge rank. It
is used only where it gives exactly the ids `tokenizers` gives, which is decided in two steps:

1. the file qualifies: a BPE model without byte fallback, dropout or word affixes; no normalizer (or NFC, applied
   only where it changes nothing: a text that is not NFC goes to `tokenizers`); the pre-tokenizer is ByteLevel
   with its own regex, or one regex Split (Isolated) followed by ByteLevel without; every token id is its merge
   rank (how tiktoken stores a vocabulary); added tokens match as plain text (no lstrip/rstrip/single_word);
2. a probe: the built-in PROBES (scripts, digits, whitespace runs, special tokens) and the caller's texts (the
   first records of the input) encode to the same ids with both.

Otherwise `load` says why, in one line, and the build uses `tokenizers`.
"""

from __future__ import annotations

import json
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from packer.tokenize import utf8_encodable

# The GPT-2 split pattern, which `ByteLevel(use_regex=True)` applies (tokenizers' byte_level.rs).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

PROBES = (
    "Hello, world! It's a test: don't, won't, I'll, we've, they're, I'm, he'd.",
    "   leading spaces, trailing spaces   ", "tabs\tand\nnewlines\n\n\nand\r\nCRLF  \n  ",
    "Numbers 0 1 12 123 1234 12345 3.14159 -42 1e10 0x1F 2024-12-01", "ALL CAPS, MiXeD cAsE, camelCaseWord",
    "中文文本测试，标点符号。日本語のテキスト、カタカナ。한국어 텍스트입니다.", "Ελληνικά Русский текст العربية עברית हिन्दी ไทย",
    "emoji 😀🎉👍🏽👨‍👩‍👧 and symbols ©®™ §¶ ∑∫√ ←→ €£¥", "code: def f(x):\n    return x**2  # comment\n\tif a != b: {}",
    "URLs https://example.com/a?b=c&d=e#f and e-mail a.b@c.org", "combining: e\u0301 a\u0308 (not NFC)",
    "zero width\u200b joiner\u200d nbsp\u00a0 ideographic\u3000space", "'s 'S 'T 'Re ''' \"quoted\" ``backticks``",
)


def byte_decoder() -> dict[str, int]:
    """GPT-2's printable stand-in character of each byte (the alphabet of byte-level vocabularies) -> the byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, n = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


@dataclass
class TiktokenEncoder:
    """ids like `Tokenizer.encode_batch(texts, add_special_tokens=False)`, and each id's length in bytes."""

    encoding: Any  # tiktoken.Encoding
    nfc: bool  # the tokenizer normalizes to NFC: texts that are not NFC must go to `tokenizers`
    token_bytes: np.ndarray  # (vocab,) int64: bytes of each id (special tokens: their UTF-8 text)
    special: dict[str, int] = field(default_factory=dict)  # the added tokens: text -> id
    _isolated: dict[str, bool] = field(default_factory=dict, repr=False, compare=False)

    def accepts(self, text: str) -> bool:
        return not self.nfc or unicodedata.is_normalized("NFC", text)

    @property
    def joiner(self) -> str | None:
        """The special token `encode_flat` joins a batch's texts at, or None (there is none)."""
        return next(iter(self.special), None)

    def encode_joined(self, texts: list[str], joiner: str) -> tuple[np.ndarray, np.ndarray] | None:
        """(ids int64, where): every text's ids followed by `joiner`'s id, from ONE encode of the texts joined at
        that special token (and one after the last); `where` is the index of each text's joiner. None where the
        joined ids are not those of the texts encoded one by one: encode them so.

            texts ["Hi", "", "yo"], joiner "<|endoftext|>"  ->  ids [17250, 50256, 50256, 8226, 50256], where [1, 2, 4]

        tiktoken splits at special tokens before anything else and encodes the text between two on its own (its
        regex and BPE see only that text), so each text's ids are its own. What could differ is a special-token
        match that runs across a boundary (a special that ends with the joiner's first characters or begins with
        the joiner, or a joiner whose end can begin it again, "~~" after "a~"): then the token at some text's end is
        not its joiner, starting exactly where the text ends in bytes, which is checked, unless no special token
        can do that (`joiner_isolated`) and the joiner's id occurs once per text.
        One call per batch instead of one per text: bare tiktoken called so ran at 103-120% of one call per text in
        benchmarks/tokenizer_throughput.py, with only 2% fewer instructions (callgrind): the per-call conversions."""
        if not texts:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        ids = self.encoding.encode_to_numpy(joiner.join(texts) + joiner,
                                            allowed_special=self.encoding.special_tokens_set,
                                            disallowed_special=()).astype(np.int64)  # (an intp index is 3x faster)
        if self.joiner_isolated(joiner):
            # Every joiner is its own token, so exactly len(texts) of the joiner's id means no text holds one:
            # they are the joiners, in order (ordinary tokens never have a special token's id, see _build).
            where = np.flatnonzero(ids == self.special[joiner])
            if where.size == len(texts):
                return ids, where
        nbytes = np.fromiter((len(t) if t.isascii() else len(t.encode("utf-8")) for t in texts), np.int64,
                             len(texts))
        ends = np.cumsum(self.token_bytes[ids])
        width = len(joiner.encode("utf-8"))
        at = np.cumsum(nbytes + width)  # where each text's joiner ends, in bytes
        where = np.searchsorted(ends, at - width, side="right")  # the token holding each joiner's first byte
        if where[-1] >= ids.size or not ((ids[where] == self.special[joiner]).all() and (ends[where] == at).all()):
            return None
        return ids, where

    def joiner_isolated(self, joiner: str) -> bool:
        """True where no special token can match across an occurrence of `joiner`, whatever the texts around it:
        then tiktoken, which takes the leftmost special-token match, matches every joiner as itself. One would
        begin before it with an end that runs into it (a proper suffix of a special that is a prefix of the joiner
        or begins with it: "x<|end", or "~~" after a text ending "~"), or begin with it and be another special
        ("<|endoftext|>!", or one that is a prefix of the joiner). Where one could, `encode_joined` checks bytes.

            {"<|endoftext|>"}: True     {"<|endoftext|>", "x<|end"}: False     {"~~"}: False
        """
        if (isolated := self._isolated.get(joiner)) is None:
            def overlaps(a: str) -> bool:
                return a.startswith(joiner) or joiner.startswith(a)

            isolated = not any((s != joiner and overlaps(s)) or any(overlaps(s[k:]) for k in range(1, len(s)))
                               for s in self.special)
            self._isolated[joiner] = isolated
        return isolated

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # One call per text: Encoding.encode_batch hands every text to a thread pool (a future per text), which
        # cost more than the tokenizing itself in a profile (1.2 of 1.6 s); the processes are the parallelism.
        encode, allowed = self.encoding.encode, self.encoding.special_tokens_set
        return [encode(t, allowed_special=allowed, disallowed_special=()) for t in texts]

    def encode_flat(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(ids of all texts back to back, int64; ids per text): the same ids as `encode_batch`, without Python
        ints in between (encode_to_numpy wraps tiktoken's own buffer; 10-15% less time than lists here), in one
        call for the batch where `encode_joined` can."""
        joiner = self.joiner
        if joiner is not None and (joined := self.encode_joined(texts, joiner)) is not None:
            ids, where = joined
            keep = np.ones(ids.size, dtype=bool)
            keep[where] = False
            return ids[keep], np.diff(where, prepend=-1) - 1
        encode, allowed = self.encoding.encode_to_numpy, self.encoding.special_tokens_set
        arrays = [encode(t, allowed_special=allowed, disallowed_special=()) for t in texts]
        counts = np.fromiter(map(len, arrays), dtype=np.int64, count=len(arrays))
        ids = np.concatenate(arrays).astype(np.int64) if arrays else np.zeros(0, np.int64)
        return ids, counts


def _qualifies(spec: dict) -> str | None:
    """Why this tokenizer.json is not one tiktoken reproduces, or None."""
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        return f"model {model.get('type')!r} is not BPE"
    for key in ("byte_fallback", "dropout", "continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):
            return f"BPE {key} is set"
    normalizer = spec.get("normalizer")
    if normalizer is not None and normalizer.get("type") != "NFC":
        return f"normalizer {normalizer.get('type')!r}"
    if (spec.get("decoder") or {}).get("type") != "ByteLevel":
        return "not a byte-level decoder"
    for tok in spec.get("added_tokens") or []:
        if tok.get("lstrip") or tok.get("rstrip") or tok.get("single_word"):
            return f"added token {tok.get('content')!r} strips or matches whole words only"
        if tok.get("normalized") and normalizer is not None:
            return f"added token {tok.get('content')!r} is matched after normalization"
    return None


def _pattern(pre: dict | None) -> str | None:
    if pre is None:
        return None
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space"):
        return GPT2_PATTERN
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else None
    if steps and len(steps) == 2:
        split, level = steps
        if (split.get("type") == "Split" and split.get("behavior") == "Isolated" and not split.get("invert")
                and "Regex" in (split.get("pattern") or {}) and level.get("type") == "ByteLevel"
                and not level.get("use_regex", True) and not level.get("add_prefix_space")):
            return split["pattern"]["Regex"]
    return None


_BUILT: dict[tuple, tuple[TiktokenEncoder | None, str]] = {}  # (path, size, mtime) -> twin and the PROBES verdict


def load(tokenizer_file: str | Path, tokenizer, sample: list[str] = (), probe: bool = True
         ) -> tuple[TiktokenEncoder | None, str]:
    """(the tiktoken twin, "") where it is exact, else (None, why not). `probe=False` skips the probe, for a
    process whose parent already ran it on the same file (the tokenizer workers).

    Building the Encoding costs 0.1 s (GPT-2) to 2 s (131k tokens, 1,000 specials), so it is kept per file for
    the process: forked workers inherit it, and repeated builds reuse it; the probe of `sample` runs each time."""
    path = Path(tokenizer_file).resolve()
    try:
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns)
    except OSError as e:
        return None, f"cannot read {tokenizer_file} ({e})"
    if key not in _BUILT:
        _BUILT[key] = _build(path, tokenizer)
    enc, why = _BUILT[key]
    if enc is None or not probe:
        return enc, why
    texts = [p for p in sample if isinstance(p, str) and enc.accepts(p) and utf8_encodable(p)]
    return (enc, "") if not texts else _probe(enc, tokenizer, texts)


def _probe(enc: TiktokenEncoder, tokenizer, texts: list[str]) -> tuple[TiktokenEncoder | None, str]:
    want = [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)]
    for text, a, b in zip(texts, want, enc.encode_batch(texts), strict=True):
        if a != b:
            return None, f"tiktoken's ids differ from tokenizers' on {text[:40]!r}"
    return enc, ""


def _build(tokenizer_file: Path, tokenizer) -> tuple[TiktokenEncoder | None, str]:
    """The Encoding, checked on PROBES."""
    try:
        import tiktoken
    except ImportError:
        return None, "tiktoken is not installed (pip install tiktoken)"
    try:
        spec = json.loads(Path(tokenizer_file).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return None, f"cannot read {tokenizer_file} ({e})"
    if why := _qualifies(spec):
        return None, why
    pattern = _pattern(spec.get("pre_tokenizer"))
    if pattern is None:
        return None, "the pre-tokenizer is not ByteLevel with a regex, or one Split regex + ByteLevel"
    decode = byte_decoder()
    vocab = spec["model"]["vocab"]
    tokens = list(vocab)
    text = "".join(tokens)
    if not set(text) <= decode.keys():
        return None, "a vocabulary entry is not in the byte-level alphabet"
    # Every alphabet character is one byte: translate the whole vocabulary at once, then cut it at the entries'
    # lengths (one C call per entry took 0.04-0.07 s of every start for GPT-2's 50k; a generator per entry 0.15 s).
    blob = text.translate(str.maketrans({c: chr(b) for c, b in decode.items()})).encode("latin-1")
    widths = np.fromiter(map(len, tokens), dtype=np.int64, count=len(tokens))
    ends = np.cumsum(widths).tolist()
    pieces = [blob[a:b] for a, b in zip([0, *ends[:-1]], ends, strict=True)]
    ids = np.fromiter(vocab.values(), dtype=np.int64, count=len(vocab))
    ranks = dict(zip(pieces, ids.tolist(), strict=True))
    if len(ranks) != len(vocab):
        return None, "two vocabulary entries spell the same bytes"
    # Added tokens are matched in the text before any splitting, as tokenizers does: tiktoken's special tokens.
    special = {t["content"]: t["id"] for t in spec.get("added_tokens") or []}
    is_special = np.isin(ids, list(special.values()))
    for j in np.flatnonzero(is_special).tolist():  # so no ordinary token has a special token's id
        del ranks[pieces[j]]
    try:
        encoding = tiktoken.Encoding(name=f"packer:{Path(tokenizer_file).name}", pat_str=pattern,
                                     mergeable_ranks=ranks, special_tokens=special)
    except (ValueError, BaseException) as e:  # an unsupported regex raises from Rust (pyo3 PanicException)
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        return None, f"tiktoken refuses the file ({type(e).__name__}: {str(e)[:120]})"
    size = max([*ranks.values(), *special.values()]) + 1
    token_bytes = np.zeros(size, dtype=np.int64)
    token_bytes[ids[~is_special]] = widths[~is_special]
    for content, i in special.items():
        token_bytes[i] = len(content.encode("utf-8"))
    enc = TiktokenEncoder(encoding, nfc=spec.get("normalizer") is not None, token_bytes=token_bytes, special=special)
    specials = " ".join(list(special)[:8])
    probes = [p for p in (*PROBES, specials, f"a{specials}b") if enc.accepts(p)]
    return _probe(enc, tokenizer, probes)

