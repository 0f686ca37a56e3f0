"""A SentencePiece `tokenizer.model` as a `tokenizers.Tokenizer`, without the `sentencepiece` package.

A .model file is one protobuf `ModelProto` (sentencepiece_model.proto). Protobuf's wire format is a list of
(key, value) fields, key = field_number << 3 | wire_type (0 varint, 1 8 bytes, 2 length + bytes, 5 4 bytes);
a field missing from the file has its default. The fields read here:

    ModelProto      1 pieces (repeated SentencePiece)  2 trainer_spec  3 normalizer_spec
    SentencePiece   1 piece (string)  2 score (float)  3 type (1 NORMAL, 2 UNKNOWN, 3 CONTROL, 4 USER_DEFINED,
                    5 UNUSED, 6 BYTE; default NORMAL)
    TrainerSpec     3 model_type (1 UNIGRAM (default), 2 BPE, 3 WORD, 4 CHAR)  24 treat_whitespace_as_suffix
                    35 byte_fallback  40 unk_id (0)  41 bos_id (1)  42 eos_id (2)  43 pad_id (-1)
    NormalizerSpec  1 name  2 precompiled_charsmap  3 add_dummy_prefix (true)  4 remove_extra_whitespaces (true)
                    5 escape_whitespaces (true)

The tokenizer is the one transformers' LlamaConverter (legacy mode) writes as tokenizer.json, so ids and
offsets are those of the converted file. For Llama 2's model:

    normalizer      Prepend("▁") then Replace(" ", "▁")             (add_dummy_prefix, escape_whitespaces)
    model           BPE(byte_fallback, fuse_unk, unk "<unk>"); merge (l, r) for every NORMAL piece l + r, ranked
                    by the piece's score (SentencePiece merges the adjacent pair whose piece scores highest)
    added tokens    UNKNOWN and CONTROL pieces as special tokens (<unk> <s> </s>), USER_DEFINED as plain ones
    post-processor  "<s> $A" (BOS before every text), when the model has a bos_id
    decoder         Replace("▁", " "), ByteFallback, Fuse, Strip one leading space

Only BPE models with SentencePiece's identity normalization are converted: a Unigram model (T5, ALBERT, XLNet)
or a normalization rule table would need SentencePiece's own lattice and normalizer to be reproduced exactly,
so those are refused with the command that converts them.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
from tokenizers.models import BPE

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
UNIGRAM, BPE_TYPE, WORD, CHAR = 1, 2, 3, 4
MODEL_TYPES = {UNIGRAM: "Unigram", BPE_TYPE: "BPE", WORD: "word", CHAR: "char"}
CONVERT = ("convert it with transformers: AutoTokenizer.from_pretrained(DIR).save_pretrained(OUT), where DIR holds "
           "the .model and its tokenizer_config.json, then pass OUT/tokenizer.json")
SPACE = "\u2581"  # "▁", SentencePiece's escaped space


class SentencePieceError(ValueError):
    """The file is not a SentencePiece model packer can reproduce; the message names the file and the fix."""


@dataclass(frozen=True, slots=True)
class Piece:
    piece: str
    score: float
    type: int = NORMAL


@dataclass(frozen=True)
class SentencePieceModel:
    """The fields of a ModelProto that decide how text becomes ids (defaults: sentencepiece_model.proto's)."""

    pieces: tuple[Piece, ...]
    model_type: int = UNIGRAM
    byte_fallback: bool = False
    treat_whitespace_as_suffix: bool = False
    unk_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    pad_id: int = -1
    normalizer_name: str = ""
    precompiled_charsmap: bytes = b""
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = True
    escape_whitespaces: bool = True

    def piece_of(self, token_id: int) -> str | None:
        return self.pieces[token_id].piece if 0 <= token_id < len(self.pieces) else None


class _Corrupt(ValueError):
    pass


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise _Corrupt("a number runs past the end of the data")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise _Corrupt("a number is longer than 10 bytes")


def _fields(buf: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    """(field number, wire type, value) of each field of one message: an int for varints, else the bytes."""
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise _Corrupt("field number 0")
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire in (1, 2, 5):
            if wire == 2:
                size, pos = _varint(buf, pos)
            else:
                size = 8 if wire == 1 else 4
            if pos + size > end:
                raise _Corrupt(f"field {number} runs past the end of its message")
            value, pos = buf[pos : pos + size], pos + size
        else:  # 3/4: the deprecated groups, which sentencepiece_model.proto has none of; 6/7 do not exist
            raise _Corrupt(f"field {number} has wire type {wire}")
        yield number, wire, value


def _expect(number: int, wire: int, want: int, what: str) -> None:
    if wire != want:
        raise _Corrupt(f"{what} (field {number}) has wire type {wire}, not {want}")


def _int32(value: int) -> int:
    # int32 fields are varints of the 64-bit two's complement: -1 is 2**64 - 1 on the wire.
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


def _text(value: bytes, what: str) -> str:
    try:
        return bytes(value).decode("utf-8")
    except UnicodeDecodeError as e:
        raise _Corrupt(f"{what} is not UTF-8 ({e.reason} at byte {e.start})") from None


def _piece(buf: bytes, index: int) -> Piece:
    piece, score, kind = None, 0.0, NORMAL
    for number, wire, value in _fields(buf):
        if number == 1:
            _expect(number, wire, 2, f"piece {index}'s text")
            piece = _text(value, f"piece {index}")
        elif number == 2:
            _expect(number, wire, 5, f"piece {index}'s score")
            score = struct.unpack("<f", value)[0]
        elif number == 3:
            _expect(number, wire, 0, f"piece {index}'s type")
            kind = value
    if not piece:
        raise _Corrupt(f"piece {index} has no text")
    if kind not in (NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE):
        raise _Corrupt(f"piece {index} ({piece!r}) has type {kind}, which SentencePiece does not define")
    return Piece(piece, score, kind)


_TRAINER_INTS = {40: "unk_id", 41: "bos_id", 42: "eos_id", 43: "pad_id"}
_TRAINER_BOOLS = {24: "treat_whitespace_as_suffix", 35: "byte_fallback"}
_NORMALIZER_BOOLS = {3: "add_dummy_prefix", 4: "remove_extra_whitespaces", 5: "escape_whitespaces"}


def parse(data: bytes) -> SentencePieceModel:
    """The ModelProto in `data`; ValueError (why) where it is not one."""
    pieces: list[Piece] = []
    spec: dict = {}
    try:
        for number, wire, value in _fields(data):
            if number == 1:
                _expect(number, wire, 2, "a piece")
                pieces.append(_piece(value, len(pieces)))
            elif number == 2:
                _expect(number, wire, 2, "trainer_spec")
                for n, w, v in _fields(value):
                    if n == 3:
                        _expect(n, w, 0, "trainer_spec.model_type")
                        spec["model_type"] = v
                    elif n in _TRAINER_INTS:
                        _expect(n, w, 0, f"trainer_spec.{_TRAINER_INTS[n]}")
                        spec[_TRAINER_INTS[n]] = _int32(v)
                    elif n in _TRAINER_BOOLS:
                        _expect(n, w, 0, f"trainer_spec.{_TRAINER_BOOLS[n]}")
                        spec[_TRAINER_BOOLS[n]] = bool(v)
            elif number == 3:
                _expect(number, wire, 2, "normalizer_spec")
                for n, w, v in _fields(value):
                    if n == 1:
                        _expect(n, w, 2, "normalizer_spec.name")
                        spec["normalizer_name"] = _text(v, "normalizer_spec.name")
                    elif n == 2:
                        _expect(n, w, 2, "normalizer_spec.precompiled_charsmap")
                        spec["precompiled_charsmap"] = bytes(v)
                    elif n in _NORMALIZER_BOOLS:
                        _expect(n, w, 0, f"normalizer_spec.{_NORMALIZER_BOOLS[n]}")
                        spec[_NORMALIZER_BOOLS[n]] = bool(v)
    except _Corrupt as e:
        raise ValueError(str(e)) from None
    if not pieces:
        raise ValueError("no vocabulary pieces")
    return SentencePieceModel(tuple(pieces), **spec)


def load(path: str | Path) -> Tokenizer:
    """The `tokenizers.Tokenizer` of SentencePiece model file `path`; SentencePieceError names the file and why."""
    path = Path(path)
    data = path.read_bytes()
    try:
        model = parse(data)
    except ValueError as e:
        raise SentencePieceError(f"{path}: not a SentencePiece model file, or a corrupt one ({e})") from None
    return to_tokenizer(model, str(path))


def to_tokenizer(model: SentencePieceModel, where: str = "the model") -> Tokenizer:
    """The tokenizer transformers' LlamaConverter (legacy) builds from `model` (see the module docstring)."""
    if model.model_type != BPE_TYPE:
        kind = MODEL_TYPES.get(model.model_type, f"type-{model.model_type}")
        raise SentencePieceError(f"{where}: a SentencePiece {kind} model; packer reads SentencePiece BPE models "
                                 f"(Llama, Mistral, Gemma and the like) only: {CONVERT}")
    unsupported = [why for cond, why in (
        (bool(model.precompiled_charsmap), f"normalization rules ({model.normalizer_name or 'precompiled'})"),
        (model.remove_extra_whitespaces, "remove_extra_whitespaces"),
        (not model.escape_whitespaces, "escape_whitespaces off"),
        (model.treat_whitespace_as_suffix, "treat_whitespace_as_suffix"),
    ) if cond]
    if unsupported:
        raise SentencePieceError(f"{where}: this SentencePiece BPE model uses {', '.join(unsupported)}, which "
                                 f"packer does not reproduce: {CONVERT}")
    unk = model.piece_of(model.unk_id)
    if unk is None or model.pieces[model.unk_id].type != UNKNOWN:
        raise SentencePieceError(f"{where}: unk_id {model.unk_id} is not an UNKNOWN piece; a corrupt model?")
    vocab: dict[str, int] = {}
    for i, p in enumerate(model.pieces):
        if vocab.setdefault(p.piece, i) != i:
            raise SentencePieceError(f"{where}: piece {p.piece!r} appears twice (ids {vocab[p.piece]} and {i})")
    tokenizer = Tokenizer(BPE(vocab=vocab, merges=merges(model), unk_token=unk, fuse_unk=True,
                              byte_fallback=model.byte_fallback, dropout=None))
    steps = [normalizers.Prepend(SPACE)] if model.add_dummy_prefix else []
    tokenizer.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", SPACE)])
    # special: control pieces and <unk>; user-defined pieces match in the text too, as plain tokens
    tokenizer.add_tokens([AddedToken(p.piece, normalized=False, special=p.type != USER_DEFINED)
                          for p in model.pieces if p.type in (UNKNOWN, CONTROL, USER_DEFINED)])
    bos = model.piece_of(model.bos_id)
    if bos is not None:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, model.bos_id)])
    steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if model.add_dummy_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tokenizer.decoder = decoders.Sequence(steps)
    return tokenizer


def merges(model: SentencePieceModel) -> list[tuple[str, str]]:
    """Every (left, right) whose concatenation is a NORMAL piece, both halves NORMAL pieces too, best first.

    SentencePiece's BPE encoder repeatedly joins the adjacent pair whose joined piece has the highest score;
    `tokenizers`' BPE joins the pair of lowest merge rank; so rank = the joined piece's place by score
    (higher first; equal scores by id); the splits of one piece by the ids of their halves, as transformers
    orders them (the order of those changes no id: each joins the same characters into the same piece)."""
    normal = {p.piece: i for i, p in enumerate(model.pieces) if p.type == NORMAL}
    order = sorted(normal.values(), key=lambda i: (-model.pieces[i].score, i))
    out = []
    for i in order:
        piece = model.pieces[i].piece
        splits = [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in normal and piece[k:] in normal]
        out.extend(sorted(splits, key=lambda lr: (normal[lr[0]], normal[lr[1]])))
    return out

