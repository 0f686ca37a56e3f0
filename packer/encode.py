"""Encode: a batch of raw records -> handler -> tokenizer -> `--overflow` -> one `Chunk` of samples.

Malformed records become `RecordError`s that fail the build (naming file, record and field) or, with
`--on-error skip`, are counted and returned as rejects for the rejects file. A record whose answer is empty is
not malformed: `--empty-response` skips and counts it (default), keeps it, or fails it as a record error.
Everything here runs in the tokenizer workers as well as in the main process; each process builds its own
`RecordEncoder`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

import numpy as np

from packer.config import BuildConfig, BuildError
from packer.handlers import HandlerOptions, RecordError, get_handler
from packer.handlers.base import EmptyResponse
from packer.indexed import token_dtype
from packer.overflow import SampleTooLong, fit
from packer.sources import BadRecord, LineBlock, RawRecord
from packer.tokenize import SampleEncoder, load_tokenizer, utf8_encodable

if TYPE_CHECKING:
    from packer.streaming import ArrowBatch


@dataclass
class Counters:
    records: int = 0
    skipped: int = 0  # malformed records, with --on-error skip
    empty_response: int = 0  # records whose answer is empty, not samples (--empty-response skip)
    samples: int = 0  # samples written (a split sample counts once per chunk)
    tokens: int = 0
    target_tokens: int = 0
    truncated: int = 0
    split: int = 0  # samples split into several chunks
    dropped: int = 0  # samples dropped by --overflow drop
    dropped_no_target: int = 0  # truncation left no trainable token, or a split chunk had none
    unterminated: int = 0  # split chunks other than the last: they do not end with EOD
    interior_eod: int = 0  # EOD ids inside samples: the record text spelled the EOD token

    def add(self, other: Any) -> None:
        """Add another Counters, or anything with some of these fields (an `overflow.Fitted`)."""
        for name in _COUNTER_NAMES:
            if hasattr(other, name):
                setattr(self, name, getattr(self, name) + getattr(other, name))


_COUNTER_NAMES = tuple(f.name for f in fields(Counters))  # fields() builds its tuple anew at every call


@dataclass
class Chunk:
    """What encoding a batch of records yields: samples as flat arrays (cheap to pass between processes)."""

    ids: np.ndarray  # concatenated sample ids
    mask: np.ndarray  # concatenated loss masks
    lengths: np.ndarray  # (n_samples,)
    rejects: list[dict]
    counters: Counters

    @staticmethod
    def join(parts: list[Chunk]) -> Chunk:
        c = Counters()
        for part in parts:
            c.add(part.counters)
        return Chunk(np.concatenate([p.ids for p in parts]), np.concatenate([p.mask for p in parts]),
                     np.concatenate([p.lengths for p in parts]), [r for p in parts for r in p.rejects], c)


_MAX_REJECT_DEPTH = 64  # deeper records go to the rejects file as text: pickle and json.dumps recurse


def _storable(rec: RawRecord, data: Any) -> Any:
    """The record as the rejects file holds it: the JSON value itself, or, for one that JSON cannot hold or
    that is nested too deep to pass between processes, its text (the line, or Python's repr of a Parquet row)."""
    if isinstance(data, BadRecord):
        return data.raw
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            if depth > _MAX_REJECT_DEPTH:
                break
            stack.extend((v, depth + 1) for v in (value.values() if isinstance(value, dict) else value))
        elif not (value is None or isinstance(value, (str, int, bool)) or
                  (isinstance(value, float) and np.isfinite(value))):
            break
    else:
        return data
    if rec.raw:
        return rec.data.decode("utf-8", errors="replace") if isinstance(rec.data, bytes) else rec.data
    return repr(data)[:10_000]


class RecordEncoder:
    """handler + tokenizer + overflow policy for one process; `encode` turns raw records into a Chunk."""

    def __init__(self, config: BuildConfig, twin_proven: bool = False):
        """`twin_proven`: the parent process proved the tiktoken twin exact (`choose_backend`); load it unprobed."""
        self.config = config
        self.tokenizer, self.info = load_tokenizer(config.tokenizer, config.eod_token)
        self.chat, self.chat_note = self._chat_renderer()
        options = HandlerOptions(
            template=config.template,
            map_keys=dict(config.map_keys),
            json_keys=tuple(config.json_keys),
            last_turn_only=config.last_turn_only,
            system=config.system,
            chat=self.chat,
            keep_empty_response=config.empty_response == "keep",
        )
        try:
            self.handler = get_handler(config.handler, options)
        except ValueError as e:
            raise BuildError(str(e)) from e
        self.overflow = config.overflow or self.handler.default_overflow
        self.dtype = np.dtype(token_dtype(self.info.vocab_size))
        self.encoder = SampleEncoder(self.tokenizer, self.info, train_on_prompt=config.train_on_prompt)
        self.backend, self.backend_note = "hf", ""
        if twin_proven:
            self.encoder.twin, _ = self._twin(probe=False)
            self.backend = "tiktoken"

    def _chat_renderer(self):
        """(the chat template for this build or None, a note on BOS where tokenizer and template disagree)."""
        from packer.chat_template import ChatRenderer, TemplateError, find_template, special_tokens

        config = self.config
        if config.chat_template is None and config.handler != "messages":
            return None, ""
        try:
            found = find_template(config.chat_template, config.tokenizer)
        except TemplateError as e:
            raise BuildError(str(e)) from e
        if found is None:
            if config.handler == "messages":
                raise BuildError(f"--handler messages: the tokenizer {config.tokenizer} has no chat template "
                                 "(no chat_template.jinja, no chat_template in tokenizer_config.json); pass "
                                 "--chat-template chatml|llama3|FILE.jinja")
            raise BuildError(f"--chat-template auto: the tokenizer {config.tokenizer} has no chat template; pass "
                             "--chat-template chatml|llama3|FILE.jinja, or --template NAME")
        source, origin = found
        variables = special_tokens(config.tokenizer) | config.template_variables()
        specials = frozenset(t.content for t in self.tokenizer.get_added_tokens_decoder().values() if t.special)
        chat = ChatRenderer(source, origin, variables, specials)
        try:
            chat.render([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}])
        except TemplateError as e:
            raise BuildError(f"--chat-template {origin}: {e}") from e
        except ValueError:
            pass  # a template that refuses this probe may still take real records; they report their own errors
        return chat, self._bos_note(chat, variables.get("bos_token"))

    def _bos_note(self, chat, bos_text: str | None) -> str:
        """BOS exactly once: the pipeline drops the text's copy when the tokenizer adds one too. Say where
        tokenizer and template disagree."""
        from packer.chat_template import SpanError

        try:
            text = chat.render([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}])
        except SpanError:
            return ""
        writes = bool(bos_text) and text.startswith(bos_text)
        adds = self.info.bos_id is not None
        if writes and not adds:
            return f"BOS {bos_text!r} comes from the chat template (the tokenizer adds none)"
        if adds and not writes:
            return ("the tokenizer adds BOS, the chat template does not write it: one BOS kept, as the tokenizer "
                    "adds it")
        return ""

    def _twin(self, sample: list[str] = (), probe: bool = True):
        from packer.tiktoken_backend import load

        if self.info.path.endswith(".model"):  # tiktoken_backend reads tokenizer.json files
            return None, "a SentencePiece model (BPE with byte fallback)"
        twin, why = load(self.info.path, self.tokenizer, sample, probe=probe)
        if twin is not None and not self.encoder.use_twin(twin):
            twin, why = None, "the post-processor does not add one fixed prefix/suffix to every text"
        return twin, why

    def choose_backend(self, first: list[RawRecord]) -> str:
        """Decide --tokenizer-backend on the input's first records (the probe runs on their texts too); returns
        the backend used. `auto` falls back to tokenizers, saying why in `backend_note`."""
        want = self.config.tokenizer_backend
        if want == "hf":
            return self.backend
        sample = []
        for rec in first[:64]:
            data = rec.parsed()
            if isinstance(data, dict):
                try:
                    sample.append("".join(s.text for s in self.handler(data)))
                except RecordError:
                    continue
        twin, why = self._twin(sample)
        if twin is None:
            if want == "tiktoken":
                raise BuildError(f"--tokenizer-backend tiktoken cannot reproduce {self.info.path} exactly: {why}; "
                                 "pass --tokenizer-backend hf (or auto)")
            self.backend_note = f"tiktoken not used: {why}"
            return self.backend
        self.backend = "tiktoken"
        return self.backend

    def encode(self, batch: list[RawRecord] | ArrowBatch | LineBlock) -> Chunk:
        """A batch of raw records -> one Chunk, tokenized --batch-size records per encode_batch call."""
        records = batch if isinstance(batch, list) else batch.records()
        size = self.config.batch_size
        if len(records) <= size:
            return self._encode(records)
        return Chunk.join([self._encode(records[i : i + size]) for i in range(0, len(records), size)])

    def _encode(self, records: list[RawRecord]) -> Chunk:
        c = Counters(records=len(records))
        rejects: list[dict] = []

        def reject(rec: RawRecord, data: Any, e: RecordError) -> None:
            message = f"{rec.where()}: field {e.field!r}: {e.message}"
            if self.config.on_error == "fail":
                fix = ("--empty-response skip to skip and count such records, or keep to train on their EOD"
                       if isinstance(e, EmptyResponse) else "--on-error skip to skip and count such records")
                raise BuildError(f"{message} (or pass {fix})") from e
            c.skipped += 1
            rejects.append({"source": rec.source, "record": rec.number, "line": rec.line, "field": e.field,
                            "error": e.message, "data": _storable(rec, data)})

        datas = [rec.parsed() for rec in records]
        batch = getattr(self.handler, "batch", None)  # the whole batch at once, where every record is plain
        if batch is not None and (segments := batch(datas)) is not None:
            return self._tokenized(segments, records, datas, c, rejects, reject)
        segments, kept, kept_data = [], [], []
        list_field = getattr(self.handler, "list_field", None)
        for rec, data in zip(records, datas, strict=True):
            if list_field and isinstance(data, list):  # a bare list of messages
                data = {list_field: data}
            try:
                if isinstance(data, BadRecord):
                    raise RecordError("<line>", data.message)
                if not isinstance(data, dict):
                    raise RecordError("<record>", f"expected a JSON object, got {type(data).__name__}")
                segments.append(self.handler(data))
                kept.append(rec)
                kept_data.append(data)
            except EmptyResponse as e:  # an expected kind of record, not a malformed one: never a reject
                if self.config.empty_response == "skip":
                    c.empty_response += 1
                else:
                    reject(rec, data, e)
            except RecordError as e:
                reject(rec, data, e)
        return self._tokenized(segments, kept, kept_data, c, rejects, reject)

    def _tokenized(self, segments: list, kept: list[RawRecord], kept_data: list, c: Counters, rejects: list[dict],
                   reject) -> Chunk:
        """The Chunk of the handled records' segments (`kept`: their records, `kept_data`: their values)."""
        try:
            ids, mask, lengths = self.encoder.encode_flat(segments)
        except MemoryError:
            raise
        except Exception:  # tokenizers refuses the whole batch for one text it cannot take; find which
            bad = [j for j, segs in enumerate(segments) if not all(utf8_encodable(s.text) for s in segs)]
            if not bad:
                raise
            for j in bad:
                reject(kept[j], kept_data[j], RecordError(
                    "<text>", "a lone UTF-16 surrogate (e.g. a \\ud800 escape without its pair), which no "
                    "tokenizer can encode; fix or remove the record"))
            rejects.sort(key=lambda r: r["record"])  # the file lists a batch's rejects in record order
            keep = sorted(set(range(len(segments))) - set(bad))
            segments, kept = [segments[j] for j in keep], [kept[j] for j in keep]
            ids, mask, lengths = self.encoder.encode_flat(segments)
        if lengths.size and lengths.max() > self.config.seq_length:  # rare: apply --overflow per sample
            ids, mask, lengths = self._fit_all(kept, ids, mask, lengths, c)
        # (count_nonzero: a mask is 0/1, and a uint8 sum widens every byte first; 3-5x slower)
        c.samples, c.tokens, c.target_tokens = len(lengths), int(lengths.sum()), int(np.count_nonzero(mask))
        if lengths.size:
            is_eod = ids == self.info.eod_id
            c.interior_eod = int(np.count_nonzero(is_eod)) - int(np.count_nonzero(is_eod[np.cumsum(lengths) - 1]))
        # In the output's dtype already: a quarter of the bytes to send back for a < 65536 vocabulary.
        return Chunk(ids.astype(self.dtype), mask, lengths, rejects, c)

    def _fit_all(self, kept: list[RawRecord], ids: np.ndarray, mask: np.ndarray, lengths: np.ndarray,
                 c: Counters) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """--overflow on the samples longer than --seq-length; the others stay as they are, in place. The flat
        arrays are cut into runs of fitting samples and the pieces of the long ones:

            lengths [3, 9, 2, 4], seq_length 4, split  ->  [3] + [4, 4, 1] + [2, 4]   (one fit() call)
        """
        ends = np.cumsum(lengths)
        long = np.flatnonzero(lengths > self.config.seq_length)
        ids_out: list[np.ndarray] = []
        mask_out: list[np.ndarray] = []
        lengths_out: list[np.ndarray] = []
        done = 0  # samples before this one are in the lists
        for j, n, e in zip(long.tolist(), lengths[long].tolist(), ends[long].tolist(), strict=True):
            try:
                fitted = fit(ids[e - n : e], mask[e - n : e], self.config.seq_length, self.overflow)
            except SampleTooLong as err:
                raise BuildError(f"{kept[j].where()}: {err}; pass --overflow truncate|split|drop, or a larger "
                                 "--seq-length") from err
            c.add(fitted)
            run = slice(int(ends[done - 1]) if done else 0, e - n)  # the fitting samples before this one
            ids_out.append(ids[run])
            mask_out.append(mask[run])
            lengths_out.append(lengths[done:j])
            ids_out.extend(s for s, _ in fitted.pieces)
            mask_out.extend(m for _, m in fitted.pieces)
            lengths_out.append(np.fromiter((s.size for s, _ in fitted.pieces), np.int64, len(fitted.pieces)))
            done = j + 1
        tail = int(ends[done - 1]) if done else 0
        ids_out.append(ids[tail:])
        mask_out.append(mask[tail:])
        lengths_out.append(lengths[done:])
        return np.concatenate(ids_out), np.concatenate(mask_out), np.concatenate(lengths_out)
