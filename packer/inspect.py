"""See what a build trains on: one pack as text with its documents and targets marked (`packer inspect --pack N`),
or one self-contained HTML page of summary figures, histograms and a few packs (`packer inspect --html OUT`).

A pack is shown document by document, each document as runs of consecutive tokens of one kind:

    ids        BOS  Tell  me   .   Hi   !   EOD | BOS  Why   ?   Because  EOD
    loss_mask   0    0    0    0   1    1    1  |  0    0    0      1      1
    runs       [s] [ context   ] [ target ] [ts]| [s] [context]  [ target ][ts]      (s = special token)

    plain      ⟦doc 1/2, 7 tokens⟧
               <s>Tell me.«Hi!</s>»
               ⟦doc 2/2, 5 tokens⟧
               <s>Why?«Because</s>»

On a terminal the markers are colours instead: targets bold green, other tokens dim, special tokens magenta,
each document after a cyan rule. Special tokens (EOD, BOS, pad, the tokenizer's added special tokens) are shown as
their text. Without the build's tokenizer the ids are shown (`[464]`), the EOD as its token.
"""

from __future__ import annotations

import html
import os
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from packer.boundaries import cumulative_ends
from packer.boundaries import pack_tokens as tokens_per_pack
from packer.dataset import PackedDataset
from packer.records import Pack
from packer.tokenize import TokenizerError, load_tokenizer

HTML_PACKS = 3  # packs an --html page renders unless --packs says which


class InspectError(ValueError):
    pass


def token_texts(tokenizer: Tokenizer, ids: Sequence[int]) -> list[str]:
    """The text each token adds, so that ''.join(token_texts(t, ids)) == t.decode(ids) with special tokens kept.

    Decoding one token at a time breaks every character whose UTF-8 bytes span byte-level tokens (each piece
    alone decodes to U+FFFD). So each token is decoded after the tokens of the last cut (decoders that join
    pieces or strip a leading space see their context), and a token that ends inside a character adds "" while
    the one that completes it adds the whole character:

        pieces   'caf'  0xC3  0xA9        ('é' is two byte-level tokens)
        texts    'caf'  ''    'é'
    """
    ids = list(ids)
    out: list[str] = []
    start = cut = 0  # ids[start:cut]: the last emitted tokens (context); ids[cut:k+1]: pending
    done = ""  # decode(ids[start:cut])
    for k in range(len(ids)):
        text = tokenizer.decode(ids[start : k + 1], skip_special_tokens=False)
        # A UTF-8 character is at most 4 bytes, and every byte-level token carries at least one: after 4 pending
        # tokens a trailing U+FFFD is in the text itself. The last token flushes whatever is left.
        if text.endswith("\ufffd") and k + 1 - cut < 4 and k + 1 < len(ids):
            out.append("")
            continue
        out.append(text[len(os.path.commonprefix([done, text])):])
        start, cut = cut, k + 1
        done = tokenizer.decode(ids[start:cut], skip_special_tokens=False)
    return out


@dataclass(frozen=True, slots=True)
class Decoder:
    """Token ids -> per-token text: through the build's tokenizer, or as the ids themselves where it is absent."""

    tokenizer: Tokenizer | None
    source: str  # what the text comes from, in words
    specials: frozenset[int]  # ids shown as special tokens
    eod_id: int
    eod_token: str
    warnings: tuple[str, ...] = ()

    def texts(self, ids: np.ndarray) -> list[str]:
        if self.tokenizer is None:
            return [self.eod_token if i == self.eod_id else f"[{i}]" for i in ids.tolist()]
        return token_texts(self.tokenizer, ids.tolist())


def open_decoder(ds: PackedDataset, tokenizer_path: str | os.PathLike | None = None) -> Decoder:
    """The build's tokenizer (the manifest's `tokenizer.path`, or `tokenizer_path`); token ids where it cannot
    be loaded, with the reason in `warnings`."""
    tok = ds.manifest["tokenizer"]
    path = tokenizer_path if tokenizer_path is not None else tok.get("path")
    base = {ds.eod_id, ds.pad_id} | ({ds.bos_id} if ds.bos_id is not None else set())
    try:
        tokenizer, info = load_tokenizer(path, eod_token=tok["eod_token"])
    except TokenizerError as e:
        why = f"showing token ids, not text: {e}; pass --tokenizer PATH to decode"
        return Decoder(None, "token ids (no tokenizer)", frozenset(base), ds.eod_id, tok["eod_token"], (why,))
    warnings = []
    if tok.get("sha256") and info.sha256 != tok["sha256"]:
        warnings.append(f"{info.path} is not the tokenizer this build was made with (its sha256 differs from the "
                        "manifest's): the text shown may be wrong; pass --tokenizer PATH")
    specials = {i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special} | base
    return Decoder(tokenizer, f"tokenizer {info.path}", frozenset(specials), ds.eod_id, tok["eod_token"],
                   tuple(warnings))


@dataclass(frozen=True, slots=True)
class Run:
    """Tokens start .. stop-1 of a pack: consecutive, in one document, all of one kind."""

    start: int
    stop: int
    target: bool  # loss_mask 1
    special: bool


def pack_layout(pack: Pack, specials: frozenset[int]) -> list[list[Run]]:
    """Each document's runs (see the module docstring); documents from `doc_lens` through `cumulative_ends`."""
    ends = cumulative_ends(pack.doc_lens, leading_zero=True).tolist()
    special = np.isin(pack.ids, np.fromiter(specials, dtype=np.int64, count=len(specials)))
    kind = pack.loss_mask.astype(np.int8) * 2 + special  # a new run wherever target-ness or special-ness changes
    docs = []
    for a, b in pairwise(ends):
        bounds = [a, *(a + 1 + np.flatnonzero(np.diff(kind[a:b]))).tolist(), b] if b > a else [a]
        docs.append([Run(s, e, bool(pack.loss_mask[s]), bool(special[s])) for s, e in pairwise(bounds)])
    return docs


def check_pack(ds: PackedDataset, i: int) -> None:
    if not 0 <= i < len(ds):
        raise InspectError(f"pack {i} is out of range: {ds.prefix} has {len(ds):,} packs"
                           + (f" (0 .. {len(ds) - 1})" if len(ds) else ""))


def _pack(ds: PackedDataset, i: int) -> Pack:
    check_pack(ds, i)
    return ds[i]


def _texts(pack: Pack, decoder: Decoder) -> list[str]:
    """Per-token text of a pack, each document decoded on its own (it was tokenized on its own)."""
    ends = cumulative_ends(pack.doc_lens, leading_zero=True).tolist()
    return [t for a, b in pairwise(ends) for t in decoder.texts(pack.ids[a:b])]


def _headline(ds: PackedDataset, i: int, pack: Pack) -> str:
    n = int(pack.ids.size)
    docs = f"{pack.doc_lens.size} document" + ("" if pack.doc_lens.size == 1 else "s")
    return (f"pack {i} of {len(ds):,} in {ds.prefix}: {docs}, {n:,}/{ds.seq_length:,} "
            f"tokens ({n / ds.seq_length:.1%}), {int(pack.loss_mask.sum()):,} targets")


# --- terminal -------------------------------------------------------------------------------------------------

ESC = "\x1b["
RESET = ESC + "0m"
STYLES = {(True, False): ESC + "1;32m", (False, False): ESC + "2m",  # (target, special): bold green, dim
          (True, True): ESC + "1;35m", (False, True): ESC + "2;35m"}  # special tokens magenta
RULE = ESC + "36m"
# Control characters would drive the terminal (a record holding ESC [ 2 J clears it): shown as \\xNN instead.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def _visible(text: str) -> str:
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def render_pack(ds: PackedDataset, i: int, decoder: Decoder, color: bool = False) -> str:
    """Pack `i` as text: a header, then each document after its marker, targets marked (see the docstring)."""
    pack = _pack(ds, i)
    layout, texts = pack_layout(pack, decoder.specials), _texts(pack, decoder)
    if color:
        legend = (f"{STYLES[True, False]}targets{RESET}, {STYLES[False, False]}other tokens{RESET}, "
                  f"{STYLES[True, True]}special tokens{RESET}; a {RULE}rule{RESET} starts each document")
    else:
        legend = "targets (loss_mask 1) are «…»; each document starts after ⟦doc K/N, L tokens⟧"
    out = [f"{_headline(ds, i, pack)}; {decoder.source}\n{legend}\n"]
    for d, runs in enumerate(layout, 1):
        length = sum(r.stop - r.start for r in runs)
        if color:
            label = f"── doc {d}/{len(layout)} · {length:,} tokens "
            out.append(f"{RULE}{label}{'─' * max(0, 72 - len(label))}{RESET}\n")
        else:
            out.append(f"⟦doc {d}/{len(layout)}, {length:,} tokens⟧\n")
        body, in_target = [], False
        for r in runs:
            text = _visible("".join(texts[r.start : r.stop]))
            if color:
                body.append(STYLES[r.target, r.special] + text + RESET)
                continue
            if r.target != in_target:
                body.append("«" if r.target else "»")
                in_target = r.target
            body.append(text)
        if in_target:
            body.append("»")
        text = "".join(body)
        out.append(text if text.endswith("\n") else text + "\n")
    return "".join(out)


# --- HTML -----------------------------------------------------------------------------------------------------

FILL_BINS = 20  # pack fill histogram: 5% bins of seq_length
MAX_BINS = 20

_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:72em;padding:0 1em;color:#222}
h1{font-size:1.4em;word-break:break-all}h2{font-size:1.15em;margin-top:2em}h3{font-size:1em}
table.summary{border-collapse:collapse}table.summary th{text-align:left;padding:2px 1.5em 2px 0;font-weight:500;
color:#555}table.summary td{font-variant-numeric:tabular-nums;word-break:break-all}
svg.hist{display:block;max-width:100%}svg.hist .bar{fill:#4a7fb5}svg.hist text{font-size:10px;fill:#555}
.note{color:#a15c00}.legend .tok{padding:0 .3em}
.doc{margin:.6em 0 1em}.rule{border-top:2px solid #2a9d8f;color:#2a9d8f;font-size:12px;padding-top:2px}
.text{font:13px/1.6 ui-monospace,SFMono-Regular,Menlo,monospace;white-space:pre-wrap;word-break:break-all}
.tok.context{color:#888}.tok.target{background:#d8f3dc;color:#0b3d1e}
.tok.special{outline:1px solid #b5179e;color:#b5179e;border-radius:2px}.tok:hover{background:#ffe8a3}
"""


def _bar_chart(counts: Sequence[int], labels: Sequence[str], titles: Sequence[str]) -> str:
    """Inline SVG bars: one `<rect class="bar" data-count=N>` per bin, its label under it, its title on hover."""
    w, h, left, bottom = 720, 160, 44, 22
    bar = (w - left) / max(1, len(counts))
    top = max(counts, default=0) or 1
    parts = [f'<svg class="hist" width="{w}" height="{h + bottom}" viewBox="0 0 {w} {h + bottom}" role="img">',
             f'<text x="{left - 6}" y="10" text-anchor="end">{top:,}</text>',
             f'<text x="{left - 6}" y="{h}" text-anchor="end">0</text>',
             f'<line x1="{left}" y1="{h}" x2="{w}" y2="{h}" stroke="#999"/>']
    for k, (c, label, title) in enumerate(zip(counts, labels, titles, strict=True)):
        bh = (h - 12) * c / top
        x = left + k * bar
        parts.append(f'<rect class="bar" data-count="{c}" x="{x + 1:.1f}" y="{h - bh:.1f}" width="{bar - 2:.1f}" '
                     f'height="{bh:.1f}"><title>{html.escape(title)}</title></rect>')
        parts.append(f'<text x="{x + bar / 2:.1f}" y="{h + 14}" text-anchor="middle">{html.escape(label)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _packs(n: int) -> str:
    return f"{n:,} pack" + ("" if n == 1 else "s")


def _integer_bins(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(counts, edges) over integers, at most MAX_BINS bins that never split an integer: bin k is
    [edges[k], edges[k+1])."""
    lo, hi = int(x.min()), int(x.max())
    step = max(1, -(-(hi - lo + 1) // MAX_BINS))
    edges = np.arange(lo, hi + step + 1, step)
    return np.histogram(x, bins=edges)[0], edges


def _histograms(ds: PackedDataset) -> str:
    """Pack fill and documents per pack, from the index alone (no token is read)."""
    lens, docs = ds.tokens.sequence_lengths.astype(np.int64), ds.tokens.document_indices
    if docs.size < 2:
        return "<p>(no packs)</p>"
    fill = tokens_per_pack(lens, docs) / ds.seq_length
    counts, _ = np.histogram(fill, bins=FILL_BINS, range=(0.0, 1.0))  # the last bin holds the full packs
    pct = [100 * k // FILL_BINS for k in range(FILL_BINS + 1)]
    fill_chart = _bar_chart(counts.tolist(), [f"{p}%" for p in pct[1:]],
                            [f"{a}–{b}% full: {_packs(c)}" for (a, b), c in zip(pairwise(pct), counts.tolist(), strict=True)])
    counts, edges = _integer_bins(np.diff(docs))
    spans = [(int(a), int(b) - 1) for a, b in pairwise(edges.tolist())]
    labels = [f"{a}" if a == b else f"{a}–{b}" for a, b in spans]
    docs_chart = _bar_chart(counts.tolist(), labels,
                            [f"{label} documents: {_packs(c)}" for label, c in zip(labels, counts.tolist(), strict=True)])
    return (f"<h2>Pack fill (tokens per pack / seq_length {ds.seq_length:,})</h2>\n"
            f"<p>Bars are labeled by their upper edge.</p>\n{fill_chart}\n"
            f"<h2>Documents per pack</h2>\n{docs_chart}\n")


def _summary(ds: PackedDataset, decoder: Decoder) -> str:
    from packer.verify import describe

    m = ds.manifest
    lens, docs = ds.tokens.sequence_lengths.astype(np.int64), ds.tokens.document_indices
    s = describe(m, lens, tokens_per_pack(lens, docs), np.diff(docs), m["counts"]["target_tokens"])
    tok, c = m["tokenizer"], m["counts"]
    share = f" ({s['target_tokens'] / s['tokens']:.1%} of tokens)" if s["tokens"] else ""
    rows = [("packs", f"{s['packs']:,} (lower bound {s['lower_bound']:,})"), ("samples", f"{s['samples']:,}"),
            ("tokens", f"{s['tokens']:,}"), ("target tokens", f"{s['target_tokens']:,}{share}"),
            ("efficiency", f"{s['efficiency']:.2%}"), ("seq_length", f"{ds.seq_length:,}"),
            ("records", f"{c.get('records', 0):,} (skipped {c.get('skipped', 0):,}, truncated "
                        f"{c.get('truncated', 0):,}, split {c.get('split', 0):,}, dropped {c.get('dropped', 0):,})"),
            ("handler", str(m.get("config", {}).get("handler", "?"))),
            ("packing", str(m.get("packing", {}).get("algorithm", "?"))),
            ("tokenizer", f"{tok.get('path')} (vocab {tok.get('vocab_size'):,})"),
            ("EOD", f"{tok.get('eod_token')!r} = {tok.get('eod_id')}"),
            ("BOS", "none" if tok.get("bos_id") is None else str(tok.get("bos_id"))),
            ("shown with", decoder.source)]
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
    notes = "".join(f'<p class="note">{html.escape(w)}</p>' for w in decoder.warnings)
    return f'<table class="summary">{body}</table>\n{notes}\n'


def _html_pack(ds: PackedDataset, i: int, decoder: Decoder) -> str:
    pack = _pack(ds, i)
    layout, texts = pack_layout(pack, decoder.specials), _texts(pack, decoder)
    ids = pack.ids.tolist()
    out = [f'<section class="pack" id="pack-{i}" data-pack="{i}">'
           f"<h3>{html.escape(_headline(ds, i, pack))}</h3>\n"]
    for d, runs in enumerate(layout, 1):
        length = sum(r.stop - r.start for r in runs)
        out.append(f'<div class="doc" data-doc="{d}" data-tokens="{length}">'
                   f'<div class="rule">doc {d}/{len(layout)} · {length:,} tokens</div><div class="text">')
        for r in runs:
            cls = "tok " + ("target" if r.target else "context") + (" special" if r.special else "")
            out.extend(f'<span class="{cls}" title="id {ids[k]}">{html.escape(texts[k])}</span>'
                       for k in range(r.start, r.stop))
        out.append("</div></div>\n")
    out.append("</section>\n")
    return "".join(out)


def render_html(ds: PackedDataset, packs: Sequence[int], decoder: Decoder) -> str:
    """One self-contained page (inline CSS and SVG, nothing fetched): summary, histograms, the packs `packs`."""
    for i in packs:  # every index checked before any work
        check_pack(ds, i)
    m = ds.manifest
    title = html.escape(f"packer inspect {ds.prefix}")
    legend = ('<p class="legend"><span class="tok target">target (loss_mask 1)</span> '
              '<span class="tok context">not a target</span> <span class="tok special target">special token</span>'
              " — hover a token for its id</p>")
    return "".join([
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
        f"<style>{_CSS}</style></head><body>\n",
        f"<h1>{html.escape(ds.prefix)}</h1>\n",
        f"<p>packer {html.escape(str(m.get('packer_version')))}, built {html.escape(str(m.get('created')))}</p>\n",
        _summary(ds, decoder),
        _histograms(ds),
        f"<h2>Packs {html.escape(', '.join(map(str, packs)))} of {len(ds):,}</h2>\n{legend}\n",
        *(_html_pack(ds, i, decoder) for i in packs),
        "</body></html>\n",
    ])


def choose_packs(ds: PackedDataset, spec: str | None) -> list[int]:
    """`--packs`: "0,5,9" (each checked against the build), or None for the first HTML_PACKS packs."""
    if spec is None:
        return list(range(min(HTML_PACKS, len(ds))))
    try:
        packs = [int(p) for p in spec.split(",")]
    except ValueError:
        raise InspectError(f"--packs {spec!r}: give pack numbers separated by commas, e.g. --packs 0,1,2") from None
    for i in packs:
        check_pack(ds, i)
    return packs


def write_html(ds: PackedDataset, out: str | os.PathLike, packs: Sequence[int], decoder: Decoder) -> Path:
    """Write `render_html` to `out` atomically: a temporary file next to it (`.NAME.tmp-PID-RANDOM`), fsynced,
    then renamed over it, so a reader never sees half a page."""
    text = render_html(ds, packs, decoder)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(8)}")
    try:
        with open(tmp, "x", encoding="utf-8", newline="\n") as f:  # "x": never an existing file or a link
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
