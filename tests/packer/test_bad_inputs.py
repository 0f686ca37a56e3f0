"""Every kind of bad input, in every reading mode: no crash, a clear error or a counted skip, and the same
records, values, errors and skips with and without --streaming and --workers.

Each kind is a file (its bytes and suffix). A run's outcome is either the project's error (its message,
with the temporary paths taken out) or the build's figures, the rejects file and the samples written
(in no order: the global and the window packer order them differently). The outcomes of one kind must be
equal over the modes; only the project's error types may come out of `build()`.
"""

from __future__ import annotations

import gzip
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from packer.build import build
from packer.config import BuildConfig, BuildError
from packer.dataset import PackedDataset
from packer.sources import InputError
from packer.tokenize import TokenizerError

GPT2 = str(Path(__file__).resolve().parents[2] / "packer" / "assets" / "gpt2")  # the bundled tokenizer

GOOD = {"instruction": "Say hi.", "input": "", "output": "Hi!"}


def lines(*records) -> bytes:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records).encode("utf-8")


def deep(n: int) -> str:
    return '{"instruction": "x", "input": "", "output": "y", "deep": ' + "[" * n + "]" * n + "}"


def parquet(table_dict: dict, schema=None) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.table(table_dict, schema=schema), buf)
    return buf.getvalue()


def _parquet_cases() -> dict[str, tuple[str, bytes]]:
    import pyarrow as pa

    good = parquet({"instruction": ["a", "b"], "input": ["", ""], "output": ["x", "y"]})
    return {
        "parquet-good": (".parquet", good),
        "parquet-empty-file": (".parquet", b""),
        "parquet-text": (".parquet", lines(GOOD)),
        "parquet-truncated": (".parquet", good[: len(good) // 2]),
        "parquet-tail-cut": (".parquet", good[:-1]),
        "parquet-binary-column": (".parquet", parquet({"instruction": ["a", "b"], "input": ["", ""],
                                                        "output": [b"\x00\xffbytes", b"ok"]})),
        "parquet-nested-column": (".parquet", parquet({"instruction": ["a"], "input": [""],
                                                        "output": [{"text": "x", "turns": [1, 2]}]})),
        "parquet-nulls": (".parquet", parquet({"instruction": ["a", None], "input": [None, ""],
                                                "output": ["x", None]})),
        "parquet-int-column": (".parquet", parquet({"instruction": ["a"], "input": [""], "output": [7]})),
        "parquet-no-rows": (".parquet", parquet({"instruction": pa.array([], pa.string())})),
        "parquet-nan": (".parquet", parquet({"instruction": ["a"], "input": [""], "output": [float("nan")]})),
    }


CASES: dict[str, tuple[str, bytes]] = {
    # JSON Lines
    "jsonl-good": (".jsonl", lines(GOOD, GOOD)),
    "jsonl-broken-line": (".jsonl", lines(GOOD, '{"instruction": broken', GOOD)),
    "jsonl-two-objects-one-line": (".jsonl", lines(GOOD, json.dumps(GOOD) + json.dumps(GOOD))),
    "jsonl-array-line": (".jsonl", lines(GOOD, [1, 2], GOOD)),
    "jsonl-string-line": (".jsonl", lines(GOOD, '"just a string"')),
    "jsonl-null-line": (".jsonl", lines("null", GOOD)),
    "jsonl-missing-field": (".jsonl", lines(GOOD, {"instruction": "x", "input": ""})),
    "jsonl-number-field": (".jsonl", lines(GOOD, {"instruction": "x", "input": "", "output": 123})),
    "jsonl-null-field": (".jsonl", lines(GOOD, {"instruction": "x", "input": None, "output": "y"})),
    "jsonl-list-field": (".jsonl", lines({"instruction": ["a"], "input": "", "output": "y"}, GOOD)),
    "jsonl-deep-950": (".jsonl", lines(GOOD, deep(950))),
    "jsonl-deep-5000": (".jsonl", lines(GOOD, deep(5000), GOOD)),
    "jsonl-deep-100000": (".jsonl", lines(deep(100_000), GOOD)),
    "jsonl-big-int": (".jsonl", lines(GOOD, '{"instruction": "x", "input": "", "output": "y", "n": ' +
                                      "9" * 5000 + "}")),
    "jsonl-invalid-utf8": (".jsonl", lines(GOOD) + b'{"instruction": "\xff\xfe", "input": "", "output": "y"}\n'),
    "jsonl-raw-surrogate-bytes": (".jsonl", lines(GOOD) + b'{"instruction": "\xed\xa0\x80", "input": "", '
                                                           b'"output": "y"}\n'),
    "jsonl-escaped-lone-surrogate": (".jsonl", lines(GOOD, '{"instruction": "a\\ud800b", "input": "", '
                                                           '"output": "y"}')),
    "jsonl-bom": (".jsonl", b"\xef\xbb\xbf" + lines(GOOD, GOOD)),
    "jsonl-bare-cr": (".jsonl", (json.dumps(GOOD) + "\r" + json.dumps(GOOD) + "\r").encode()),
    "jsonl-crlf": (".jsonl", (json.dumps(GOOD) + "\r\n" + json.dumps(GOOD) + "\r\n").encode()),
    "jsonl-blank-lines": (".jsonl", lines("", GOOD, "   ", "\u00a0\u3000", GOOD, "")),
    "jsonl-empty-file": (".jsonl", b""),
    "jsonl-only-blank": (".jsonl", b"\n\n  \n"),
    "jsonl-no-final-newline": (".jsonl", lines(GOOD) + json.dumps(GOOD).encode()),
    "jsonl-duplicate-keys": (".jsonl", lines('{"instruction": "a", "instruction": "b", "input": "", "output": "y"}')),
    "jsonl-mixed-types": (".jsonl", lines({"instruction": "x", "input": "", "output": '"He said hi"'},
                                          {"instruction": "x", "input": "", "output": 5},
                                          {"instruction": "x", "input": "", "output": "a\\nb \n c"})),
    "jsonl-json-looking-strings": (".jsonl", lines(*({"instruction": v, "input": "", "output": v}
                                                     for v in ("123", "null", "true", "[1, 2]", "{}")))),
    "jsonl-nul-and-controls": (".jsonl", lines({"instruction": "a\u0000b\u0001", "input": "", "output": "\u001f"})),
    "jsonl-raw-control-char": (".jsonl", lines(GOOD) + b'{"instruction": "a\tb\x01", "input": "", "output": "y"}\n'),
    "jsonl-eod-text": (".jsonl", lines({"instruction": "<|endoftext|>", "input": "", "output": "y<|endoftext|>"})),
    "jsonl-empty-strings": (".jsonl", lines({"instruction": "", "input": "", "output": ""}, GOOD)),
    "jsonl-nan-literal": (".jsonl", lines(GOOD, '{"instruction": "x", "input": "", "output": NaN}')),
    "jsonl-long-record": (".jsonl", lines({"instruction": "word " * 20_000, "input": "", "output": "y"})),
    "jsonl-gzip": (".jsonl", gzip.compress(lines(GOOD))),
    "jsonl-zstd-magic": (".jsonl", b"\x28\xb5\x2f\xfd" + b"\x00" * 20),
    "jsonl-utf16": (".jsonl", lines(GOOD).decode().encode("utf-16")),
    "jsonl-latin1-words": (".jsonl", '{"instruction": "café", "input": "", "output": "y"}\n'.encode("latin-1")),
    # JSON documents
    "json-array-good": (".json", json.dumps([GOOD, GOOD]).encode()),
    "json-array-pretty": (".json", json.dumps([GOOD, GOOD], indent=2).encode()),
    "json-array-non-object": (".json", json.dumps([GOOD, 5, "x", None, [GOOD]]).encode()),
    "json-array-missing-comma": (".json", b"[" + json.dumps(GOOD).encode() + b" " + json.dumps(GOOD).encode() + b"]"),
    "json-array-trailing-comma": (".json", b"[" + json.dumps(GOOD).encode() + b",]"),
    "json-array-truncated": (".json", json.dumps([GOOD, GOOD]).encode()[:-10]),
    "json-array-extra-data": (".json", json.dumps([GOOD]).encode() + b" [1]"),
    "json-array-deep-element": (".json", ("[" + json.dumps(GOOD) + "," + deep(5000) + "," + json.dumps(GOOD)
                                          + "]").encode()),
    "json-array-big-int": (".json", ("[" + json.dumps(GOOD) + ', {"n": ' + "1" * 5000 + "}]").encode()),
    "json-array-invalid-utf8": (".json", b'[{"instruction": "\xff", "input": "", "output": "y"}]'),
    "json-array-bom": (".json", b"\xef\xbb\xbf" + json.dumps([GOOD]).encode()),
    "json-array-empty": (".json", b"[]"),
    "json-data-wrapper": (".json", json.dumps({"data": [GOOD, GOOD]}).encode()),
    "json-object-not-wrapper": (".json", json.dumps({"a": 1, "b": [GOOD]}).encode()),
    "json-top-level-null": (".json", b"null"),
    "json-top-level-number": (".json", b"42"),
    "json-empty-file": (".json", b""),
    "json-holding-jsonl": (".json", lines(GOOD, GOOD)),
    "json-jsonl-first-line-broken": (".json", lines('{"instruction": broken', GOOD)),
    "json-deep-document": (".json", ("[" * 5000 + "]" * 5000).encode()),
    **_parquet_cases(),
}

MODES = {
    "fail": dict(),
    "fail-streaming": dict(streaming=True, pack_window=(64, False)),
    "skip": dict(on_error="skip"),
    "skip-streaming": dict(on_error="skip", streaming=True, pack_window=(64, False)),
}
PROJECT_ERRORS = (BuildError, InputError, TokenizerError)


def outcome(tmp_path: Path, path: Path, name: str, **kw) -> tuple:
    prefix = tmp_path / name
    cfg = BuildConfig(handler="alpaca", inputs=(str(path),), tokenizer=GPT2, seq_length=256,
                      output_prefix=str(prefix), tokenizer_backend="hf", **kw)
    try:
        r = build(cfg, progress=False)
    except PROJECT_ERRORS as e:
        message = str(e).replace(str(prefix), "OUT")
        assert str(path.name) in message or "no samples" in message, message  # names the file
        return ("error", message, _rejects(prefix))
    ds = PackedDataset(prefix)
    found = sorted(bytes(p.ids[e - n : e].tobytes()) + bytes(p.loss_mask[e - n : e].tobytes())
                   for p in ds for n, e in zip(p.doc_lens.tolist(), np.cumsum(p.doc_lens).tolist(), strict=True))
    counts = r.manifest["counts"]
    counts.pop("packs")  # the window packer may need another pack
    return ("built", counts, _rejects(prefix), found)


def _rejects(prefix: Path):
    p = Path(f"{prefix}.rejects.jsonl")
    return p.read_text(encoding="utf-8") if p.exists() else None


@pytest.mark.parametrize("kind", sorted(CASES))
def test_bad_input_is_read_alike_in_every_mode(tmp_path: Path, kind: str) -> None:
    suffix, data = CASES[kind]
    path = tmp_path / f"input{suffix}"
    path.write_bytes(data)
    got = {mode: outcome(tmp_path, path, f"{mode}", **kw) for mode, kw in MODES.items()}
    assert got["fail"] == got["fail-streaming"], kind
    assert got["skip"] == got["skip-streaming"], kind
    if got["fail"][0] == "built":  # nothing to skip: skipping changes nothing
        assert got["skip"] == got["fail"], kind


EXPECTED_SKIPS = {  # kind: records skipped under --on-error skip (the rest are written)
    "jsonl-broken-line": 1, "jsonl-two-objects-one-line": 1, "jsonl-array-line": 1, "jsonl-string-line": 1,
    "jsonl-null-line": 1, "jsonl-missing-field": 1, "jsonl-number-field": 1, "jsonl-deep-5000": 1,
    "jsonl-deep-100000": 1, "jsonl-big-int": 1, "jsonl-invalid-utf8": 1, "jsonl-raw-surrogate-bytes": 1,
    "jsonl-escaped-lone-surrogate": 1, "json-array-non-object": 4, "json-array-deep-element": 1,
    "json-array-big-int": 1, "jsonl-nan-literal": 1, "jsonl-raw-control-char": 1,
}


@pytest.mark.parametrize("kind", sorted(EXPECTED_SKIPS))
def test_bad_records_are_skipped_and_counted(tmp_path: Path, kind: str) -> None:
    suffix, data = CASES[kind]
    path = tmp_path / f"input{suffix}"
    path.write_bytes(data)
    got = outcome(tmp_path, path, "s", on_error="skip")
    assert got[0] == "built" and got[1]["skipped"] == EXPECTED_SKIPS[kind], got[:2]
    assert len(got[2].splitlines()) == EXPECTED_SKIPS[kind]
    with pytest.raises(BuildError, match=r"input\.jsonl?: record \d+.*--on-error skip"):
        build(BuildConfig(handler="alpaca", inputs=(str(path),), tokenizer=GPT2, seq_length=256,
                          output_prefix=str(tmp_path / "f"), tokenizer_backend="hf"), progress=False)


def test_values_are_never_reparsed(tmp_path: Path) -> None:
    """What `datasets`' JSON reader changed once a column held mixed types: strings stay as written."""
    suffix, data = CASES["jsonl-mixed-types"]
    path = tmp_path / "input.jsonl"
    path.write_bytes(data)
    r = build(BuildConfig(handler="text", inputs=(str(path),), tokenizer=GPT2, seq_length=256,
                          output_prefix=str(tmp_path / "t"), json_keys=("output",), on_error="skip",
                          streaming=True, tokenizer_backend="hf"), progress=False)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(GPT2) / "tokenizer.json"))
    texts = [tok.decode(p.ids.tolist()) for p in PackedDataset(r.prefix)]
    assert r.counters.skipped == 1  # the number
    assert any('"He said hi"' in t for t in texts) and any("a\\nb \n c" in t for t in texts), texts


@pytest.mark.parametrize("kind", ["json-array-good", "jsonl-broken-line", "json-array-deep-element",
                                  "parquet-binary-column"])
def test_workers_read_alike(tmp_path: Path, kind: str) -> None:
    suffix, data = CASES[kind]
    path = tmp_path / f"input{suffix}"
    path.write_bytes(data)
    one = outcome(tmp_path, path, "one", on_error="skip", streaming=True, pack_window=(64, False))
    two = outcome(tmp_path, path, "two", on_error="skip", streaming=True, pack_window=(64, False), workers=2)
    assert one == two


@pytest.mark.parametrize("kind", ["jsonl-deep-100000", "json-deep-document", "parquet-truncated",
                                  "json-top-level-null", "jsonl-invalid-utf8"])
def test_cli_gives_one_clean_line(tmp_path: Path, kind: str) -> None:
    """In a real process: no traceback and no signal (pyarrow and deep recursion crashed it before)."""
    suffix, data = CASES[kind]
    path = tmp_path / f"input{suffix}"
    path.write_bytes(data)
    p = subprocess.run([sys.executable, "-m", "packer", "build", "--handler", "alpaca", "--input", str(path),
                        "--tokenizer", GPT2, "--output-prefix", str(tmp_path / "o"), "--streaming", "-q"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode in (0, 1), (p.returncode, p.stderr[-2000:])
    assert "Traceback" not in p.stderr, p.stderr[-2000:]
    if p.returncode:
        assert str(path) in p.stderr


def test_parquet_json_columns_are_decoded_as_datasets_wrote_them(tmp_path: Path) -> None:
    """`datasets` stores a nested column (MOSS's `chat`) as Arrow's JSON extension type: the same records as
    the JSON Lines it came from, and a broken JSON value is that record's error."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    chat = {"turn_1": {"Human": "<|Human|>: hi<eoh>\n", "MOSS": "<|MOSS|>: hello<eom>\n"}}
    rows = [{"num_turns": 1, "chat": chat}, {"num_turns": 1, "chat": chat | {"turn_1": chat["turn_1"]}}]
    jsonl = tmp_path / "m.jsonl"
    jsonl.write_bytes(lines(*rows))
    table = pa.table({"num_turns": pa.array([1, 1, 1]),
                      "chat": pa.array([json.dumps(r["chat"]) for r in rows] + ['{"turn_1": '], pa.json_())})
    pq.write_table(table, tmp_path / "m.parquet")
    kw = dict(handler="moss", tokenizer=GPT2, seq_length=256, tokenizer_backend="hf", on_error="skip")
    a = build(BuildConfig(inputs=(str(jsonl),), output_prefix=str(tmp_path / "a"), **kw), progress=False)
    b = build(BuildConfig(inputs=(str(tmp_path / "m.parquet"),), output_prefix=str(tmp_path / "b"), **kw),
              progress=False)
    assert (a.counters.samples, b.counters.samples, b.counters.skipped) == (2, 2, 1)
    assert Path(a.prefix + ".bin").read_bytes() == Path(b.prefix + ".bin").read_bytes()
    assert "Arrow JSON type" in Path(b.prefix + ".rejects.jsonl").read_text(encoding="utf-8")
