"""Tokenizer loading (EOD/BOS/PAD resolution) and segment -> (ids, loss mask) encoding.

A sample's segments are joined into one text and tokenized ONCE, so the ids are exactly what the tokenizer
gives for the whole text (no artifacts at segment joins). The loss mask comes from character spans: a token
is a target iff the last character it covers lies in a target segment. Tokens the post-processor adds (BOS)
cover no character and are never targets. Then exactly one EOD is appended, and it is a target.

    segments   "### Response:\\n" (prompt)  "Hi there" (target)
    tokens     ###  Response  :  \\n  Hi  ' there'  EOD
    loss_mask   0      0      0   0   1      1       1

When every segment of a batch is a target (pretraining text, --train-on-prompt), no character offsets are
needed: the batch goes through `encode_batch_fast` (the same ids, ~25% less work), and the post-processor's
tokens are found by position, since it adds the same prefix and suffix around every text (checked by probing;
otherwise offsets are used as above).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from itertools import chain
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from packer.records import Sample, Segment

# Tokens that end a DOCUMENT, tried in order (before any turn terminator) when the tokenizer's own eos_token does
# not settle the EOD.
DOCUMENT_END = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|end_of_document|>")
# Tokens that end a chat TURN: a template writes them inside every multi-turn sample, so as the EOD they would
# make every trainer that finds boundaries by scanning for EOD cut samples after each turn.
TURN_END = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "<|end_of_turn|>",
            "<|END_OF_TURN_TOKEN|>")
WELL_KNOWN_EOD = (*DOCUMENT_END, *TURN_END, "[SEP]")


class TokenizerError(ValueError):
    pass


def utf8_encodable(text: str) -> bool:
    """False for text no tokenizer can take: a lone UTF-16 surrogate (e.g. a "\\ud800" JSON escape)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@dataclass(frozen=True, slots=True)
class TokenizerInfo:
    path: str
    sha256: str
    vocab_size: int
    eod_token: str
    eod_id: int
    eod_source: str  # "--eod-token" | "tokenizer_config.json" | "document-end token" | "well-known"
    bos_id: int | None  # the BOS the post-processor adds, if any
    pad_id: int | None
    eod_reason: str = ""  # why this EOD, in words (the manifest and the build summary show it)
    eod_special: bool = False  # the EOD is a special token: text that ends with it already ends the sample

    def to_json(self) -> dict:
        return asdict(self)


def _config_token(config: dict, key: str) -> str | None:
    value = config.get(key)
    if isinstance(value, dict):  # {"content": "</s>", "lstrip": false, ...}
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _token_id(tokenizer: Tokenizer, token: str) -> int | None:
    return tokenizer.token_to_id(token)


def load_tokenizer(path: str | os.PathLike, eod_token: str | None = None) -> tuple[Tokenizer, TokenizerInfo]:
    """Load `tokenizer.json` or a SentencePiece `*.model` (a file, or a directory holding one and optionally
    tokenizer_config.json; tokenizer.json wins over tokenizer.model)."""
    path = Path(path)
    if path.is_dir():
        file = path / "tokenizer.json"
        if not file.exists() and (path / "tokenizer.model").exists():
            file = path / "tokenizer.model"
        if not file.exists():
            raise TokenizerError(
                f"{path} is a directory without tokenizer.json or tokenizer.model; pass the tokenizer file or a "
                "Hugging Face model directory that contains one (convert other slow tokenizers with "
                "`AutoTokenizer.from_pretrained(...).save_pretrained(dir)`)"
            )
        config_file = path / "tokenizer_config.json"
    elif path.exists():
        file = path
        config_file = path.with_name("tokenizer_config.json")
    else:
        raise TokenizerError(f"tokenizer {path} does not exist")
    tokenizer = _read_tokenizer(file)
    # Padding or truncation saved in tokenizer.json would pad samples to their batch's longest (as targets) or
    # cut them silently; lengths and --overflow are ours to decide.
    tokenizer.no_padding()
    tokenizer.no_truncation()
    config: dict = {}
    if config_file.exists():
        try:
            config = json.loads(config_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise TokenizerError(f"{config_file}: invalid JSON ({e})") from e

    eod_token, eod_id, source, reason = _choose_eod(tokenizer, config, eod_token, file)
    bos_id = _post_processor_bos(tokenizer)
    if bos_id is None and (tok := _config_token(config, "bos_token")) and config.get("add_bos_token"):
        # A config asking for BOS that the post-processor does not add: we honour it ourselves.
        bos_id = _token_id(tokenizer, tok)
    pad = _config_token(config, "pad_token")
    pad_id = _token_id(tokenizer, pad) if pad else None
    info = TokenizerInfo(
        path=str(file.resolve()),
        sha256=hashlib.sha256(file.read_bytes()).hexdigest(),
        vocab_size=tokenizer.get_vocab_size(with_added_tokens=True),
        eod_token=eod_token,
        eod_id=int(eod_id),
        eod_source=source,
        bos_id=bos_id,
        pad_id=pad_id,
        eod_reason=reason,
        eod_special=_is_special(tokenizer, int(eod_id)),
    )
    return tokenizer, info


def _read_tokenizer(file: Path) -> Tokenizer:
    if file.suffix == ".model":  # SentencePiece, converted as transformers' LlamaConverter does
        from packer.sentencepiece import SentencePieceError, load

        try:
            return load(file)
        except SentencePieceError as e:
            raise TokenizerError(str(e)) from e
        except OSError as e:
            raise TokenizerError(f"{file}: cannot read it ({e.strerror})") from e
    try:
        return Tokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises a bare Exception on malformed files
        hint = "; a SentencePiece model must be named *.model" if "UTF-8" in str(e) else ""
        raise TokenizerError(f"{file}: not a Hugging Face tokenizers file ({e}){hint}") from e


def _is_special(tokenizer: Tokenizer, token_id: int) -> bool:
    added = tokenizer.get_added_tokens_decoder().get(token_id)
    return bool(added is not None and added.special)


def _template_ends_turns_with(config: dict, token: str) -> bool:
    """Does tokenizer_config.json's chat template write `token` after turns (not only once, at the end)?
    Found by rendering a two-turn conversation; a template that does not render is judged by its text."""
    template = config.get("chat_template")
    if isinstance(template, list):  # the named form: [{"name": "default", "template": ...}, ...]
        template = next((t.get("template") for t in template if isinstance(t, dict)
                         and t.get("name") == "default"), None) or next(
            (t.get("template") for t in template if isinstance(t, dict)), None)
    if not isinstance(template, str) or not template:
        return False
    turns = [{"role": "user", "content": "u1"}, {"role": "assistant", "content": "a1"},
             {"role": "user", "content": "u2"}, {"role": "assistant", "content": "a2"}]
    from packer.chat_template import ChatRenderer

    try:  # rendered as transformers renders it (packer.chat_template)
        text = ChatRenderer(template, "tokenizer_config.json chat_template",
                            {"eos_token": token, "bos_token": _config_token(config, "bos_token") or ""}).render(turns)
    except Exception:  # an unusual template: fall back to what its text says
        return token in template or "eos_token" in template
    return text.count(token) >= 2 or (token in text and not text.rstrip().endswith(token))


def _choose_eod(tokenizer: Tokenizer, config: dict, forced: str | None, file: Path) -> tuple[str, int, str, str]:
    """(EOD token, id, source, reason). The EOD must end DOCUMENTS: an eos_token that also ends chat turns (a
    turn terminator, or written by the chat template) gives way to the tokenizer's document-end token."""
    if forced is not None:
        eod_id = _token_id(tokenizer, forced)
        if eod_id is None:
            raise TokenizerError(f"--eod-token {forced!r} is not in the vocabulary of {file}")
        return forced, eod_id, "--eod-token", "given by --eod-token"
    eos = _config_token(config, "eos_token")
    if eos is not None and _token_id(tokenizer, eos) is not None:
        writes_eos = _template_ends_turns_with(config, eos)
        if eos in TURN_END or writes_eos:
            why = "ends chat turns (" + ("its chat template writes it after turns" if writes_eos
                                         else "a turn terminator") + ")"
            for doc_end in DOCUMENT_END:
                doc_id = _token_id(tokenizer, doc_end)
                if doc_end != eos and doc_id is not None and _is_special(tokenizer, doc_id):
                    return doc_end, doc_id, "document-end token", (
                        f"tokenizer_config.json's eos_token {eos!r} {why}; {doc_end!r} ends documents")
            return eos, _token_id(tokenizer, eos), "tokenizer_config.json", (
                f"tokenizer_config.json's eos_token; it also {why} and the vocabulary has no other document-end "
                "token, so EOD ids inside multi-turn samples are expected (the index still has every boundary)")
        return eos, _token_id(tokenizer, eos), "tokenizer_config.json", "tokenizer_config.json's eos_token"
    found = next((t for t in WELL_KNOWN_EOD if _token_id(tokenizer, t) is not None), None)
    if found is None:
        raise TokenizerError(
            f"cannot tell the end-of-document token of {file}: no tokenizer_config.json eos_token and none of "
            f"{', '.join(WELL_KNOWN_EOD)} is in the vocabulary; pass --eod-token TOKEN"
        )
    return found, _token_id(tokenizer, found), "well-known", f"no eos_token in a tokenizer_config.json; {found!r} " \
        "is the first well-known end token in the vocabulary"


def _post_processor_bos(tokenizer: Tokenizer) -> int | None:
    """The id the post-processor puts before the text, if any (e.g. Llama's <s>)."""
    with_special = tokenizer.encode("a", add_special_tokens=True)
    without = tokenizer.encode("a", add_special_tokens=False)
    # The text's ids sit after k >= 1 added prefix ids (and maybe before added suffix ids, e.g. "<s> $A </s>").
    n_extra = len(with_special.ids) - len(without.ids)
    for k in range(1, n_extra + 1):
        if with_special.ids[k : k + len(without.ids)] == without.ids:
            return with_special.ids[0]
    return None


def _template_affix(tokenizer: Tokenizer) -> tuple[int, int] | None:
    """(prefix, suffix) counts of the tokens the post-processor adds around every single text, e.g. (1, 0) for
    Llama's "<s> $A"; None if it does not add the same ids around every probe (then offsets must tell)."""
    affix = None
    for text in ("a", "Hello world, 42!", " x\n\ny "):
        with_special = tokenizer.encode(text, add_special_tokens=True).ids
        plain = tokenizer.encode(text, add_special_tokens=False).ids
        extra = len(with_special) - len(plain)
        found = next(((with_special[:k], with_special[k + len(plain):]) for k in range(extra + 1)
                      if with_special[k : k + len(plain)] == plain), None)
        if found is None or (affix is not None and found != affix):
            return None
        affix = found
    if len(tokenizer.encode("", add_special_tokens=True).ids) != len(affix[0]) + len(affix[1]):
        return None
    return len(affix[0]), len(affix[1])


# Words the BPE model caches (it stops adding once full). The default, 10,000, misses often on real corpora:
# measured on 100k Alpaca texts with GPT-2, 131,072 entries made encode_batch_fast 26% faster for ~4 MB.
WORD_CACHE = 1 << 17


def _enlarge_word_cache(tokenizer: Tokenizer) -> None:
    resize = getattr(tokenizer.model, "_resize_cache", None)  # tokenizers >= 0.21; a pure memo, ids unchanged
    if resize is not None:
        with contextlib.suppress(Exception):  # a private method: if it ever changes, only speed is lost
            resize(WORD_CACHE)


class SampleEncoder:
    """Segments -> `Sample`s, in batches through `Tokenizer.encode_batch`."""

    def __init__(self, tokenizer: Tokenizer, info: TokenizerInfo, train_on_prompt: bool = False, twin=None):
        """`twin`: a `tiktoken_backend.TiktokenEncoder` proven to give this tokenizer's ids; batches go through it
        wherever the post-processor adds a fixed prefix/suffix (its ids are added here) and the text qualifies."""
        self.tokenizer = tokenizer
        self.info = info
        self.train_on_prompt = train_on_prompt
        # Add BOS ourselves only when the config asks for one the post-processor does not add.
        self._manual_bos = info.bos_id is not None and _post_processor_bos(tokenizer) is None
        self._affix = _template_affix(tokenizer)
        self.twin = None
        if twin is not None:
            self.use_twin(twin)
        # Samples whose every token is a target need no character offsets; `encode_batch_fast` skips computing
        # them (same ids). Older tokenizers lack it.
        self._encode_fast = getattr(tokenizer, "encode_batch_fast", None)
        _enlarge_word_cache(tokenizer)

    def encode_batch(self, batch: Sequence[Sequence[Segment]]) -> list[Sample]:
        ids, mask, lengths = self.encode_flat(batch)
        ends = np.cumsum(lengths)
        return [Sample(ids=ids[e - n : e], loss_mask=mask[e - n : e])
                for n, e in zip(lengths.tolist(), ends.tolist(), strict=True)]

    def use_twin(self, twin) -> bool:
        """Encode through `twin` from now on; False (and no change) where the post-processor's additions are not
        one fixed prefix/suffix, which the twin needs to add them itself."""
        if self._affix is None:
            return False
        full = self.tokenizer.encode("a", add_special_tokens=True).ids
        head, tail = self._affix
        self._head_ids, self._tail_ids = full[:head], full[len(full) - tail:]
        self.twin = twin
        return True

    def _twin_encode(self, texts: list[str], need_chars: bool = True
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray]:
        """(ids, lengths, last character of each token on the batch's character axis, covers text) through the
        tiktoken twin: the post-processor's fixed prefix/suffix ids are added here, and each token's last
        character comes from the tokens' byte lengths (the same character `tokenizers`' offsets name: a token that
        ends inside a multi-byte character covers that character). Without `need_chars` (every token a target)
        the characters are not computed: None."""
        text_ids, text_counts = self.twin.encode_flat(texts)
        head, tail = self._head_ids, self._tail_ids
        text_last = None
        if need_chars:
            # Byte -> character on the batch's axis: a character starts at every byte that is not a continuation.
            raw = np.frombuffer("".join(texts).encode("utf-8"), dtype=np.uint8)
            char_of_byte = np.cumsum((raw & 0xC0) != 0x80) - 1
            byte_end = np.cumsum(self.twin.token_bytes[text_ids])
            if byte_end.size and byte_end[-1] != raw.size:
                raise RuntimeError("tiktoken twin: token bytes do not add up to the text")  # never: ids are exact
            text_last = char_of_byte[byte_end - 1] if text_ids.size else np.zeros(0, np.int64)
        h, t = len(head), len(tail)
        lengths = text_counts + h + t
        if not h and not t:
            return text_ids, lengths, text_last, np.ones(text_ids.size, dtype=bool)
        total = int(lengths.sum())
        starts = np.cumsum(lengths) - lengths
        is_text = np.ones(total, dtype=bool)
        for k in range(h):
            is_text[starts + k] = False
        for k in range(t):
            is_text[starts + lengths - t + k] = False
        ids = np.empty(total, dtype=np.int64)
        ids[is_text] = text_ids
        affix = np.tile(np.asarray([*head, *tail], dtype=np.int64), len(texts))
        ids[~is_text] = affix
        last_char = None
        if text_last is not None:
            last_char = np.full(total, -1, dtype=np.int64)
            last_char[is_text] = text_last
        return ids, lengths, last_char, is_text

    def _twin_encode_ended(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """`encode_flat` of texts that are all target, where the EOD is a special token and the post-processor
        adds nothing (GPT-2, Qwen and such with the text handler): the texts joined at the EOD and encoded in one
        call (`TiktokenEncoder.encode_joined`) are the samples already, each ended by its EOD. None: not so here.
        As below, a text that ends with the EOD itself (a special token) gets no second one."""
        eod = self.info.eod_id
        if (self._head_ids or self._tail_ids or self.info.bos_id is not None
                or self.twin.special.get(self.info.eod_token) != eod):
            return None
        joined = self.twin.encode_joined(texts, self.info.eod_token)
        if joined is None:
            return None
        ids, where = joined
        lengths = np.diff(where, prepend=-1)
        if self.info.eod_special:
            ended = (lengths > 1) & (ids[where - 1] == eod)  # (where - 1 >= 0 wherever lengths > 1)
            if ended.any():
                ids = np.delete(ids, where[ended])
                lengths = lengths - ended
        return ids, np.ones(ids.size, dtype=np.uint8), lengths

    def encode_flat(self, batch: Sequence[Sequence[Segment]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids, loss mask, lengths) of the whole batch, concatenated; the same samples `encode_batch` gives.

        Vectorized over the batch: per-sample Python work is only joining texts and listing target spans.
        """
        if not batch:
            return np.zeros(0, np.int64), np.zeros(0, np.uint8), np.zeros(0, np.int64)
        texts = [segs[0].text if len(segs) == 1 else "".join(s.text for s in segs) for segs in batch]
        all_target = self.train_on_prompt or all(s.target for segs in batch for s in segs)
        eod, bos = self.info.eod_id, self.info.bos_id
        n = len(texts)
        text_lens = np.fromiter(map(len, texts), dtype=np.int64, count=n)
        char_base = np.cumsum(text_lens) - text_lens  # where each text starts on one global character axis
        fast = False
        if self.twin is not None and all(map(self.twin.accepts, texts)):
            if all_target and (done := self._twin_encode_ended(texts)) is not None:
                return done
            ids, lengths, last_char, covers_text = self._twin_encode(texts, need_chars=not all_target)
        else:
            # Without offsets, the tokens the post-processor added are found by position: its fixed prefix/suffix.
            fast = all_target and self._affix is not None and self._encode_fast is not None
            encodings = (self._encode_fast if fast else self.tokenizer.encode_batch)(texts, add_special_tokens=True)
            id_lists = [e.ids for e in encodings]
            lengths = np.fromiter(map(len, id_lists), dtype=np.int64, count=n)
            ids = np.fromiter(chain.from_iterable(id_lists), dtype=np.int64, count=int(lengths.sum()))
            if not fast:
                # Token ends (character offsets) for the whole batch, moved onto the global character axis.
                ends = np.fromiter(chain.from_iterable(chain.from_iterable(e.offsets for e in encodings)),
                                   dtype=np.int64, count=2 * ids.size)[1::2]
                last_char = ends - 1 + np.repeat(char_base, lengths)
                covers_text = ends > 0  # tokens added by the post-processor cover no character
        total = ids.size
        starts = np.cumsum(lengths) - lengths

        if fast:
            added = np.zeros(total, dtype=bool)
            head, tail = self._affix
            if head:
                added[(starts[:, None] + np.arange(head)).ravel()] = True
            if tail:
                added[((starts + lengths - tail)[:, None] + np.arange(tail)).ravel()] = True
            mask = (~added).view(np.uint8)
        else:
            added = ~covers_text
            if all_target:
                mask = covers_text.astype(np.uint8)
            else:
                span_lo, span_hi = [], []
                for base, segs in zip(char_base.tolist(), batch, strict=True):
                    pos = base
                    for seg in segs:
                        if seg.target and seg.text:
                            span_lo.append(pos)
                            span_hi.append(pos + len(seg.text))
                        pos += len(seg.text)
                if span_lo:
                    lo, hi = np.asarray(span_lo), np.asarray(span_hi)
                    k = np.searchsorted(lo, last_char, side="right") - 1
                    mask = (covers_text & (k >= 0) & (last_char < hi[np.maximum(k, 0)])).astype(np.uint8)
                else:
                    mask = np.zeros(total, dtype=np.uint8)

        if bos is not None:
            if self._manual_bos:
                ids, mask = np.insert(ids, starts, bos), np.insert(mask, starts, 0)
                added = np.insert(added, starts, True)
                lengths = lengths + 1
                starts = np.cumsum(lengths) - lengths
            # Template text that began with BOS as well: drop the text's copy, keep the added one (a BOS is
            # never a target, even when the "<s>" text lies in a target segment, e.g. --train-on-prompt).
            two = lengths >= 2
            doubled = starts[two][(ids[starts[two]] == bos) & (ids[starts[two] + 1] == bos)]
            if doubled.size:
                ids, mask = np.delete(ids, doubled + 1), np.delete(mask, doubled + 1)
                added = np.delete(added, doubled + 1)
                lengths[np.isin(starts, doubled)] -= 1
                starts = np.cumsum(lengths) - lengths
        # Exactly one EOD ends every sample, and it is a target.
        last = starts + lengths - 1
        # Already ended: by the post-processor, or by the text itself when the EOD is a special token (a template
        # whose turns end with it, e.g. chatml with --eod-token '<|im_end|>': never doubled). A text token that
        # merely has the EOD id (an ordinary --eod-token such as "!") is content and still gets its EOD after it.
        if ids.size:
            at = np.maximum(last, 0)
            ended = (lengths > 0) & (ids[at] == eod) & (added[at] | self.info.eod_special)
        else:  # a batch of empty texts
            ended = np.zeros(n, dtype=bool)
        mask[last[ended]] = 1
        where = (starts + lengths)[~ended]
        ids, mask = np.insert(ids, where, eod), np.insert(mask, where, 1)
        lengths = lengths + ~ended
        return ids, mask.astype(np.uint8, copy=False), lengths
