"""`packer inspect --pack N` and `--html`: what a build trains on, checked against PackedDataset and the tokenizer."""

from __future__ import annotations

import errno
import json
import os
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from packer import inspect as view
from packer.boundaries import cumulative_ends, pack_tokens
from packer.build import build
from packer.cli import main
from packer.config import BuildConfig
from packer.dataset import PackedDataset
from packer.tokenize import load_tokenizer

ASSETS = Path(__file__).resolve().parents[2] / "packer" / "assets"
SCRIPT = "<script>alert('x')</script> & \"quotes\""
WIDE = "café 日本語 😀 naïve"  # CJK and the emoji are several byte-level tokens per character in GPT-2


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(ASSETS / "gpt2")[0]


@pytest.fixture(scope="module")
def prefix(tmp_path_factory) -> str:
    """A small alpaca build with the bundled GPT-2: several documents per pack, a record holding HTML and one
    holding characters split across tokens."""
    records = json.loads((ASSETS / "demo_alpaca.json").read_text(encoding="utf-8"))[:40]
    records += [{"instruction": f"Repeat {SCRIPT}", "input": "", "output": f"Here: {SCRIPT}"},
                {"instruction": "Say it in many scripts.", "input": "", "output": WIDE}]
    records += [{"instruction": f"Count to {n}.", "input": "", "output": " ".join(map(str, range(1, n + 1)))}
                for n in range(1, 9)]  # short ones, which fill the gaps: packs of 3 and more documents
    root = tmp_path_factory.mktemp("inspect")
    (root / "in.json").write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    out = str(root / "out" / "a")
    build(BuildConfig(handler="alpaca", inputs=(str(root / "in.json"),), tokenizer=str(ASSETS / "gpt2"),
                      seq_length=384, output_prefix=out), progress=False)
    return out


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def docs_of(ds: PackedDataset, i: int) -> list[tuple[np.ndarray, np.ndarray]]:
    pack = ds[i]
    ends = cumulative_ends(pack.doc_lens, leading_zero=True).tolist()
    return [(pack.ids[a:b], pack.loss_mask[a:b]) for a, b in zip(ends[:-1], ends[1:], strict=True)]


def target_texts(tokenizer, ids: np.ndarray, mask: np.ndarray) -> list[str]:
    """Decoded text of every maximal run of targets."""
    m = np.concatenate([[0], mask.astype(np.int8), [0]])
    edges = np.flatnonzero(np.diff(m)).tolist()
    return [tokenizer.decode(ids[a:b].tolist(), skip_special_tokens=False) for a, b in zip(edges[::2], edges[1::2], strict=True)]


def pack_with(ds: PackedDataset, tokenizer, needle: str) -> int:
    return next(i for i in range(len(ds)) if needle in tokenizer.decode(ds[i].ids.tolist(), skip_special_tokens=False))


def test_token_texts_keep_characters_split_across_tokens(tokenizer):
    ids = tokenizer.encode(WIDE).ids
    assert any(tokenizer.decode([i]).endswith("\ufffd") for i in ids)  # the case exists: pieces alone are garbage
    texts = view.token_texts(tokenizer, ids)
    assert len(texts) == len(ids) and "".join(texts) == tokenizer.decode(ids) == WIDE
    assert not any("\ufffd" in t for t in texts)
    assert "" in texts and " 日" in texts  # the first byte's token waits, the completing one holds the character


def test_pack_layout_runs_by_document_and_kind():
    from packer.records import Pack

    E, B = 9, 8
    pack = Pack(ids=np.array([B, 1, 2, 3, E, B, 4, E]), loss_mask=np.array([0, 0, 1, 1, 1, 0, 1, 1], dtype=np.uint8),
                doc_lens=np.array([5, 3], dtype=np.int32))
    layout = view.pack_layout(pack, frozenset({E, B}))
    assert [[(r.start, r.stop, r.target, r.special) for r in doc] for doc in layout] == [
        [(0, 1, False, True), (1, 2, False, False), (2, 4, True, False), (4, 5, True, True)],
        [(5, 6, False, True), (6, 7, True, False), (7, 8, True, True)]]


def test_pack_plain_marks_documents_and_targets(runner, prefix, tokenizer):
    ds = PackedDataset(prefix)
    i = next(i for i in range(len(ds)) if ds[i].doc_lens.size >= 3)
    r = runner.invoke(main, ["inspect", prefix, "--pack", str(i)])
    assert r.exit_code == 0, r.output
    assert "\x1b[" not in r.output  # not a terminal: no colour unless --color
    docs = r.output.split("\n⟦doc ")[1:]  # the legend names the marker too, mid-line
    assert len(docs) == ds[i].doc_lens.size
    for d, (text, (ids, mask)) in enumerate(zip(docs, docs_of(ds, i), strict=True), 1):
        assert text.startswith(f"{d}/{len(docs)}, {ids.size:,} tokens⟧\n")
        assert re.findall(r"«(.*?)»", text, flags=re.S) == target_texts(tokenizer, ids, mask)
        assert text.rstrip("\n").endswith("<|endoftext|>»")  # the EOD, shown as its text, is a target


def test_pack_colour_only_when_asked(runner, prefix):
    colour = runner.invoke(main, ["inspect", prefix, "--pack", "0", "--color"])
    assert colour.exit_code == 0, colour.output
    assert view.STYLES[True, False] in colour.output and view.RULE in colour.output and "«" not in colour.output
    plain = runner.invoke(main, ["inspect", prefix, "--pack", "0", "--no-color"])
    assert plain.exit_code == 0 and "\x1b" not in plain.output and "«" in plain.output


def test_pack_shows_split_characters_and_escapes_control_characters(runner, prefix, tokenizer, tmp_path):
    ds = PackedDataset(prefix)
    r = runner.invoke(main, ["inspect", prefix, "--pack", str(pack_with(ds, tokenizer, WIDE))])
    assert r.exit_code == 0 and f"«{WIDE}<|endoftext|>»" in r.output and "\ufffd" not in r.output
    assert view._visible("a\x1b[2Jb\r\n\t") == "a\\x1b[2Jb\\x0d\n\t"  # the terminal is never driven by data


def test_pack_out_of_range(runner, prefix):
    n = len(PackedDataset(prefix))
    for bad in (str(n), "-1"):
        r = runner.invoke(main, ["inspect", prefix, "--pack", bad])
        assert r.exit_code == 1 and f"pack {bad} is out of range" in r.output and f"has {n} packs (0 .. {n - 1})" in r.output
        assert "Traceback" not in r.output
    r = runner.invoke(main, ["inspect", prefix, "--html", "x.html", "--packs", f"0,{n}"])
    assert r.exit_code == 1 and f"pack {n} is out of range" in r.output
    r = runner.invoke(main, ["inspect", prefix, "--html", "x.html", "--packs", "0;1"])
    assert r.exit_code == 1 and "separated by commas" in r.output


def test_options_that_do_not_go_together(runner, prefix):
    assert runner.invoke(main, ["inspect", prefix, "--json", "--pack", "0"]).exit_code == 2
    r = runner.invoke(main, ["inspect", prefix, "--packs", "0"])
    assert r.exit_code == 2 and "pass --html" in r.output


def test_pack_without_the_tokenizer_shows_ids(runner, prefix, helpers, tmp_path):
    r = runner.invoke(main, ["inspect", prefix, "--pack", "0", "--tokenizer", str(tmp_path / "gone.json")])
    assert r.exit_code == 0 and "showing token ids, not text" in r.output and "does not exist" in r.output
    ids = PackedDataset(prefix)[0].ids
    assert f"[{ids[0]}][{ids[1]}]" in r.output and "<|endoftext|>»" in r.output

    helpers.write_dataset(tmp_path / "hand", [[([5, 6, 0], [0, 1, 1]), ([7, 0], [1, 1])]], eod=0)  # tokenizer "hand"
    r = runner.invoke(main, ["inspect", str(tmp_path / "hand"), "--pack", "0"])
    assert r.exit_code == 0, r.output
    assert "⟦doc 1/2, 3 tokens⟧\n[5]«[6]<eod>»\n⟦doc 2/2, 2 tokens⟧\n«[7]<eod>»\n" in r.output


class Page(HTMLParser):
    """The parts of an inspect page the tests check."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags: set[str] = set()
        self.links: list[tuple[str, str]] = []  # (attribute, value) of src/href
        self.packs: dict[int, list[dict]] = {}  # pack -> documents: {"tokens": int, "spans": [(classes, id, text)]}
        self.charts: list[list[int]] = []  # data-count of each bar, chart by chart
        self._span: tuple[set[str], int] | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.add(tag)
        self.links += [(k, v) for k, v in attrs if k in ("src", "href")]
        if tag == "section" and "pack" in a.get("class", "").split():
            self.pack = self.packs.setdefault(int(a["data-pack"]), [])
        elif tag == "div" and a.get("class") == "doc":
            self.pack.append({"tokens": int(a["data-tokens"]), "spans": []})
        elif tag == "span" and "tok" in a.get("class", "").split() and "title" in a:
            self._span = (set(a["class"].split()), int(a["title"].removeprefix("id ")))
            self.pack[-1]["spans"].append((*self._span, ""))
        elif tag == "svg":
            self.charts.append([])
        elif tag == "rect" and a.get("class") == "bar":
            self.charts[-1].append(int(a["data-count"]))

    def handle_endtag(self, tag):
        if tag == "span":
            self._span = None

    def handle_data(self, data):
        if self._span is not None:
            cls, i, text = self.pack[-1]["spans"][-1]
            self.pack[-1]["spans"][-1] = (cls, i, text + data)


def parse(path: Path) -> tuple[Page, str]:
    text = path.read_text(encoding="utf-8")
    page = Page()
    page.feed(text)
    page.close()
    return page, text


def test_html_page(runner, prefix, tokenizer, tmp_path):
    out = tmp_path / "new" / "page.html"  # the folder does not exist yet
    r = runner.invoke(main, ["inspect", prefix, "--html", str(out)])
    assert r.exit_code == 0, r.output
    page, text = parse(out)
    ds = PackedDataset(prefix)
    assert sorted(page.packs) == [0, 1, 2] and max(len(d) for d in page.packs.values()) >= 2
    for i, docs in page.packs.items():
        expected = docs_of(ds, i)
        assert [d["tokens"] for d in docs] == ds[i].doc_lens.tolist()  # every boundary, in order
        targets = []
        for d, (ids, mask) in zip(docs, expected, strict=True):
            assert [s[1] for s in d["spans"]] == ids.tolist()  # one span per token, its id in the title
            assert "".join(s[2] for s in d["spans"]) == tokenizer.decode(ids.tolist(), skip_special_tokens=False)
            assert [("target" in s[0]) for s in d["spans"]] == mask.astype(bool).tolist()
            assert [("special" in s[0]) for s in d["spans"]] == (ids == ds.eod_id).tolist()
            targets += [s[2] for s in d["spans"] if "target" in s[0]]
        assert "".join(targets) == "".join(t for ids, mask in expected for t in target_texts(tokenizer, ids, mask))
    assert len(page.charts) == 2 and all(sum(c) == len(ds) for c in page.charts)
    full = int((pack_tokens(ds.tokens.sequence_lengths, ds.tokens.document_indices)
                >= 0.95 * ds.seq_length).sum())
    assert page.charts[0][-1] == full
    m = ds.manifest
    for figure in (f"{m['counts']['packs']:,}", f"{m['counts']['samples']:,}", f"{m['counts']['tokens']:,}",
                   f"{m['packing']['efficiency']:.2%}", m["tokenizer"]["path"], "&#x27;&lt;|endoftext|&gt;&#x27; = 50256"):
        assert figure in text
    assert page.links == [] and not {"script", "link", "img", "iframe", "object"} & page.tags
    assert "url(" not in text and "@import" not in text
    assert [p.name for p in out.parent.iterdir()] == ["page.html"]  # no temporary file left


def test_html_escapes_the_data(runner, prefix, tokenizer, tmp_path):
    ds = PackedDataset(prefix)
    i = pack_with(ds, tokenizer, SCRIPT)
    out = tmp_path / "p.html"
    r = runner.invoke(main, ["inspect", prefix, "--html", str(out), "--packs", f"{i},0"])
    assert r.exit_code == 0, r.output
    page, text = parse(out)
    assert list(page.packs) == [i, 0]
    shown = "".join(s[2] for d in page.packs[i] for s in d["spans"])
    assert f"Here: {SCRIPT}" in shown and "script" not in page.tags and "<script" not in text


def test_html_without_the_tokenizer(prefix, tmp_path):
    ds = PackedDataset(prefix)
    decoder = view.open_decoder(ds, tmp_path / "gone.json")
    page, text = parse(view.write_html(ds, tmp_path / "p.html", [1], decoder))
    spans = [s for d in page.packs[1] for s in d["spans"]]
    assert [s[2] for s in spans] == ["<|endoftext|>" if s[1] == ds.eod_id else f"[{s[1]}]" for s in spans]
    assert "showing token ids, not text" in text


def test_html_write_is_atomic(prefix, tmp_path, monkeypatch):
    ds = PackedDataset(prefix)
    decoder = view.open_decoder(ds)
    out = tmp_path / "p.html"
    out.write_text("earlier page")

    def refuse(src, dst):
        raise OSError(errno.EIO, "I/O error", str(dst))

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OSError):
        view.write_html(ds, out, [0], decoder)
    assert out.read_text() == "earlier page" and [p.name for p in tmp_path.iterdir()] == ["p.html"]
    monkeypatch.undo()
    view.write_html(ds, out, [0], decoder)
    assert out.read_text().startswith("<!DOCTYPE html>") and [p.name for p in tmp_path.iterdir()] == ["p.html"]
