"""Seeded corruption fuzz: one small build, hundreds of corruptions of its five files, three promises.

    verify          catches every corruption that changes anything it can see; the few that change nothing
                    checkable are classified here, each with its reason, and counted
    PackedDataset   raises DatasetError (never another exception), or opens, which only a payload change or a
                    manifest field the reader does not use allows; a payload change then fails
                    `PackedDataset(prefix, verify_checksums=True)`
    IndexedDataset  raises DatasetError or opens, for each of the two indexes

`python -m pytest -q -s tests/packer/test_fuzz.py` prints the figures per class (tried / detected by verify /
raised by the reader / undetectable); PACKER_FUZZ_SCALE=4 tries four times as many positions per region.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from packer.dataset import DatasetError, PackedDataset
from packer.indexed import HEADER, IndexedDataset
from packer.manifest import FIELDS, SECTIONS, loss_mask_prefix
from packer.verify import UNFINISHED, verify

SEED = 20250611
SCALE = int(os.environ.get("PACKER_FUZZ_SCALE", "1"))
SUFFIXES = (".bin", ".idx", "_loss_mask.bin", "_loss_mask.idx", ".json")
ASSETS = Path(__file__).resolve().parents[2] / "packer" / "assets"

# Why a corruption can pass verify: each reason is a fact about the format, not a gap in the checks.
OPTION = "a build option kept for reference: nothing in the data depends on it"
OPTIONAL = "an optional field or section (older and hand-written manifests omit it)"
TIMING = "a timing: not derivable from the data"
VERSION = "packer_version: any string is a version"
TOKENIZER_PATH = "where the tokenizer was: without the file the tokenizer check is skipped (verify runs where it is not)"
SHARDS = "which shard a build holds is not in its data (num_shards stays above shard_index)"
SPLIT = "how many samples were split is not recoverable: the chunks of one sample are not linked in the index"
DROPPED = "a chunk dropped for want of targets leaves no trace in the data"
UNKNOWN_KEY = "unknown keys are ignored (newer manifests add fields)"
NEWLINE = "only the manifest's trailing newline is cut"
# Config keys verify checks; the others are OPTION.
CHECKED_CONFIG = {"seq_length", "overflow_effective", "num_shards", "shard_index", "pack", "streaming", "eod_token"}


@dataclass
class Case:
    cls: str  # the class in the figures
    what: str
    files: dict[str, bytes | None]  # suffix -> new bytes (None: the file is removed)
    undetectable: str = ""  # why verify may pass
    payload_only: bool = False  # only .bin bytes changed: the reader may open, its checksums may not


@dataclass
class Figures:
    tried: Counter = field(default_factory=Counter)
    detected: Counter = field(default_factory=Counter)
    raised: Counter = field(default_factory=Counter)
    undetectable: Counter = field(default_factory=Counter)  # (class, reason)
    failures: list[str] = field(default_factory=list)


FIGURES = Figures()


@dataclass
class Build:
    dir: Path
    prefix: Path  # a scratch copy, rewritten for every case
    original: dict[str, bytes]
    other: dict[str, bytes]  # another build of the same records (--pack none): same sizes of .bin, other order
    manifest: dict[str, Any]


@pytest.fixture(scope="module")
def build(tmp_path_factory, helpers) -> Build:
    from packer.build import build as run_build
    from packer.config import BuildConfig

    root = tmp_path_factory.mktemp("fuzz")
    tok = root / "tok"
    tok.mkdir()
    helpers.train_bpe(("<|endoftext|>", "<pad>", "<s>"), bos="<s>").save(str(tok / "tokenizer.json"))
    (tok / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>", "pad_token": "<pad>"}))
    records = json.loads((ASSETS / "demo_alpaca.json").read_text(encoding="utf-8"))[:6]
    records += [{"instruction": f"Add {i} and {i + 1}.", "input": "", "output": str(2 * i + 1)} for i in range(24)]
    helpers.write_jsonl(root / "in.jsonl", records)
    built = {}
    for name, pack in (("a", "bfd"), ("other", "none")):
        run_build(BuildConfig(handler="alpaca", inputs=(str(root / "in.jsonl"),), tokenizer=str(tok), seq_length=512,
                              output_prefix=str(root / name), overflow="split", pack=pack, tokenizer_backend="hf"),
                  progress=False)
        built[name] = {s: (root / f"{name}{s}").read_bytes() for s in SUFFIXES}
    manifest = json.loads(built["a"][".json"])
    c = manifest["counts"]
    # What the classification below assumes of this build: split chunks exist, and no sample of exactly
    # seq_length tokens ends with EOD (so counts.unterminated is exact), several samples share packs.
    assert c["unterminated"] > 0 and c["split"] > 0 and c["packs"] < c["samples"] and c["truncated"] == 0
    assert len(built["a"][".bin"]) == len(built["other"][".bin"]) and built["a"][".bin"] != built["other"][".bin"]
    work = root / "work"
    work.mkdir()
    b = Build(root, work / "a", built["a"], built["other"], manifest)
    _write(b, {})
    rep = verify(b.prefix)
    assert rep.ok and rep.stats["tokenizer"].endswith("checked"), rep.errors
    full = [n for n in PackedDataset(b.prefix).tokens.sequence_lengths.tolist() if n == manifest["config"]["seq_length"]]
    assert len(full) == c["unterminated"], "a full-length sample ending with EOD would make unterminated inexact"
    return b


def _write(b: Build, files: dict[str, bytes | None]) -> None:
    for s in SUFFIXES:
        path = Path(f"{b.prefix}{s}")
        data = files.get(s, b.original[s])
        if data is None:
            path.unlink(missing_ok=True)
        else:
            path.write_bytes(data)


def run_case(b: Build, case: Case) -> None:
    _write(b, case.files)
    FIGURES.tried[case.cls] += 1
    where = f"[{case.cls}] {case.what}"
    try:
        rep = verify(b.prefix)
    except Exception as e:  # noqa: BLE001 -- the point: nothing may escape
        FIGURES.failures.append(f"{where}: verify raised {type(e).__name__}: {e}")
        return
    if any(UNFINISHED in e for e in rep.errors):
        FIGURES.failures.append(f"{where}: verify hit its last-resort guard: {rep.errors}")
    if not rep.ok:
        FIGURES.detected[case.cls] += 1
    elif case.undetectable:
        FIGURES.undetectable[(case.cls, case.undetectable)] += 1
    else:
        FIGURES.failures.append(f"{where}: verify passed it")
    opened = _reader(b, case, where, PackedDataset, b.prefix)
    if opened is not None:
        if case.payload_only:
            try:
                PackedDataset(b.prefix, verify_checksums=True)
                FIGURES.failures.append(f"{where}: verify_checksums=True opened it")
            except DatasetError:
                pass
        elif not case.cls.startswith("manifest") and not case.undetectable:
            FIGURES.failures.append(f"{where}: PackedDataset opened a corrupt index")
        try:  # whatever it opened must read without surprises
            for _ in opened:
                pass
            for _ in opened.groups(4096):
                pass
        except Exception as e:  # noqa: BLE001
            FIGURES.failures.append(f"{where}: reading packs raised {type(e).__name__}: {e}")
    else:
        FIGURES.raised[case.cls] += 1
    for p in (b.prefix, loss_mask_prefix(b.prefix)):
        _reader(b, case, where, IndexedDataset, p)


def _reader(b: Build, case: Case, where: str, cls, prefix) -> Any:
    try:
        return cls(prefix)
    except DatasetError as e:
        if "packer verify" not in str(e) and cls is PackedDataset:
            FIGURES.failures.append(f"{where}: {cls.__name__}'s error names no fix: {e}")
        return None
    except Exception as e:  # noqa: BLE001
        FIGURES.failures.append(f"{where}: {cls.__name__} raised {type(e).__name__}: {e}")
        return None


def check(b: Build, cases: Iterator[Case]) -> None:
    before = len(FIGURES.failures)
    n = 0
    for case in cases:
        run_case(b, case)
        n += 1
    _write(b, {})
    assert n > 0
    new = FIGURES.failures[before:]
    assert not new, f"{len(new)} of {n} corruptions mishandled:\n" + "\n".join(new[:25])


# -- corruptions of the data files ---------------------------------------------------------------------------
def _flip(data: bytes, offset: int, bit: int | None = None, value: int | None = None) -> bytes:
    raw = bytearray(data)
    raw[offset] = value if value is not None else raw[offset] ^ (1 << bit)
    return bytes(raw)


def _positions(rng: random.Random, lo: int, hi: int, k: int) -> list[int]:
    """Offsets in [lo, hi): both ends and k - 2 more at random."""
    if hi <= lo:
        return []
    inside = range(lo + 1, hi - 1)
    return sorted({lo, hi - 1, *rng.sample(inside, min(len(inside), max(k - 2, 0)))})


def idx_regions(data: bytes) -> dict[str, tuple[int, int]]:
    _, _, _, n_seq, n_doc = HEADER.unpack(data[: HEADER.size])
    lengths, pointers = HEADER.size + 4 * n_seq, HEADER.size + 12 * n_seq
    return {"magic": (0, 9), "version": (9, 17), "dtype code": (17, 18), "sequence count": (18, 26),
            "document count": (26, 34), "lengths": (34, lengths), "pointers": (lengths, pointers),
            "document indices": (pointers, pointers + 8 * n_doc)}


def flips_in(cls: str, suffix: str, data: bytes, lo: int, hi: int, rng: random.Random, k: int,
             payload: bool = False) -> Iterator[Case]:
    for off in _positions(rng, lo, hi, k):
        bit = rng.randrange(8)
        yield Case(cls, f"{suffix} byte {off} bit {bit} flipped", {suffix: _flip(data, off, bit)}, payload_only=payload)
        value = rng.choice([v for v in range(256) if v != data[off]])
        yield Case(cls, f"{suffix} byte {off} set to {value}", {suffix: _flip(data, off, value=value)},
                   payload_only=payload)


def index_cases(b: Build) -> Iterator[Case]:
    rng = random.Random(f"{SEED}-idx")
    for suffix, name in ((".idx", "tokens"), ("_loss_mask.idx", "mask")):
        data = b.original[suffix]
        for region, (lo, hi) in idx_regions(data).items():
            cls = f"{name} idx {region}"
            yield from flips_in(cls, suffix, data, lo, hi, rng, 6 * SCALE if region not in ("magic", "version") else 9)
            if region == "dtype code":
                for code in (*range(10), 255):
                    if code != data[17]:
                        yield Case(cls, f"{suffix} dtype code set to {code}", {suffix: _flip(data, 17, value=code)})


def payload_cases(b: Build) -> Iterator[Case]:
    rng = random.Random(f"{SEED}-bin")
    for suffix, name in ((".bin", "tokens bin"), ("_loss_mask.bin", "mask bin")):
        data = b.original[suffix]
        yield from flips_in(f"{name} payload", suffix, data, 0, len(data), rng, 12 * SCALE, payload=True)


def truncation_cases(b: Build) -> Iterator[Case]:
    for suffix in SUFFIXES:
        data = b.original[suffix]
        points = sorted({0, 1, 9, 17, 33, 34, len(data) // 3, len(data) // 2, len(data) - 2, len(data) - 1})
        for n in points:
            if 0 <= n < len(data):
                why = NEWLINE if suffix == ".json" and data[n:] == b"\n" else ""
                yield Case(f"truncated {suffix}", f"{suffix} cut to {n} of {len(data)} bytes", {suffix: data[:n]},
                           undetectable=why)
        yield Case(f"truncated {suffix}", f"{suffix} removed", {suffix: None})
        yield Case(f"truncated {suffix}", f"{suffix} extended by one byte", {suffix: data + b"\0"})


def swap_cases(b: Build) -> Iterator[Case]:
    o, x = b.original, b.other
    yield Case("swapped files", "tokens idx <-> mask idx", {".idx": o["_loss_mask.idx"], "_loss_mask.idx": o[".idx"]})
    yield Case("swapped files", "tokens bin <-> mask bin", {".bin": o["_loss_mask.bin"], "_loss_mask.bin": o[".bin"]})
    yield Case("swapped files", "tokens bin and idx <-> mask bin and idx",
               {".bin": o["_loss_mask.bin"], "_loss_mask.bin": o[".bin"], ".idx": o["_loss_mask.idx"],
                "_loss_mask.idx": o[".idx"]})
    yield Case("swapped files", "tokens bin from another build (same size)", {".bin": x[".bin"]}, payload_only=True)
    yield Case("swapped files", "mask bin from another build (same size)", {"_loss_mask.bin": x["_loss_mask.bin"]},
               payload_only=True)
    yield Case("swapped files", "both bins from another build",
               {".bin": x[".bin"], "_loss_mask.bin": x["_loss_mask.bin"]}, payload_only=True)
    for s in (".idx", "_loss_mask.idx"):
        yield Case("swapped files", f"{s} from another build", {s: x[s]})
    yield Case("swapped files", "tokens bin+idx from another build", {".bin": x[".bin"], ".idx": x[".idx"]})
    yield Case("swapped files", "mask bin+idx from another build",
               {"_loss_mask.bin": x["_loss_mask.bin"], "_loss_mask.idx": x["_loss_mask.idx"]})
    yield Case("swapped files", "all four data files from another build", {s: x[s] for s in SUFFIXES[:4]})
    yield Case("swapped files", "the manifest from another build", {".json": x[".json"]})


def test_data_file_corruptions(build):
    check(build, index_cases(build))
    check(build, payload_cases(build))
    check(build, truncation_cases(build))
    check(build, swap_cases(build))


# -- corruptions of the manifest --------------------------------------------------------------------------------
def _paths(obj: Any, path: tuple = ()) -> Iterator[tuple[tuple, Any]]:
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        yield (*path, k), v
        yield from _paths(v, (*path, k))


def _mutations(v: Any) -> list[tuple[str, Any]]:
    if isinstance(v, bool):
        return [("flip", not v), ("null", None), ("int", 1)]
    if isinstance(v, int):
        return [("+1", v + 1), ("-1", v - 1), ("huge", 10**30), ("str", str(v)), ("null", None), ("float", v + 0.5)]
    if isinstance(v, float):
        return [("nudge", v * 1.01 + 1e-3), ("negative", -1.0), ("nan", math.nan), ("str", str(v)), ("null", None)]
    if isinstance(v, str):
        return [("+x", v + "x"), ("empty", ""), ("int", 7), ("null", None)]
    if v is None:
        return [("int", 3), ("str", "x")]
    return [("null", None), ("array" if isinstance(v, dict) else "object", [] if isinstance(v, dict) else {}),
            ("str", "x")]


def _required(path: tuple, manifest: dict) -> bool:
    dotted = ".".join(map(str, path))
    if len(path) == 1 and path[0] in SECTIONS:
        return SECTIONS[path[0]]
    if path[0] == "files" or dotted in ("format", "token_dtype"):
        return True
    return FIELDS.get(dotted, ("", False))[1]


def undetectable(path: tuple, mutation: str, manifest: dict) -> str:
    """Why this edit may pass verify; "" where verify must catch it."""
    dotted = ".".join(map(str, path))
    if path[0] == "config" and len(path) > 1 and path[1] not in CHECKED_CONFIG:
        return OPTION
    if mutation == "delete":
        return "" if _required(path, manifest) else OPTIONAL
    if path[0] == "seconds" and mutation == "nudge":
        return TIMING
    rules = {("packer_version", "+x"): VERSION, ("packer_version", "empty"): VERSION,
             ("tokenizer.path", "+x"): TOKENIZER_PATH, ("tokenizer.path", "empty"): TOKENIZER_PATH,
             ("config.num_shards", "+1"): SHARDS, ("counts.split", "+1"): SPLIT, ("counts.split", "-1"): SPLIT,
             ("counts.dropped_no_target", "+1"): DROPPED, ("counts.dropped_no_target", "-1"): DROPPED}
    return rules.get((dotted, mutation), "")


def _set(manifest: dict, path: tuple, value: Any, delete: bool = False) -> dict:
    m = copy.deepcopy(manifest)
    node = m
    for k in path[:-1]:
        node = node[k]
    if delete:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return m


def _dump(m: Any) -> bytes:
    return (json.dumps(m, indent=2) + "\n").encode()


def field_cases(b: Build) -> Iterator[Case]:
    m = b.manifest
    for path, v in _paths(m):
        dotted = ".".join(map(str, path))
        cls = f"manifest {path[0]}"
        for name, new in _mutations(v):
            yield Case(cls, f"{dotted} {name}", {".json": _dump(_set(m, path, new))}, undetectable(path, name, m))
        if not isinstance(path[-1], int):
            yield Case(cls, f"{dotted} delete", {".json": _dump(_set(m, path, None, delete=True))},
                       undetectable(path, "delete", m))
    for section in ("", "counts", "tokenizer"):
        target = m if not section else m[section]
        grown = copy.deepcopy(m)
        (grown if not section else grown[section])["new_key"] = 5
        assert "new_key" not in target
        yield Case("manifest unknown key", f"{section or 'top level'}.new_key added", {".json": _dump(grown)},
                   UNKNOWN_KEY)


def _map_leaves(obj: Any, f) -> Any:
    if isinstance(obj, dict):
        return {k: _map_leaves(v, f) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_map_leaves(v, f) for v in obj]
    return f(obj)


def malformed_cases(b: Build) -> Iterator[Case]:
    m = b.manifest
    is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
    texts = {
        "an array": b"[]", "null": b"null", "a string": b'"manifest"', "a number": b"42", "true": b"true",
        "an empty object": b"{}", "empty": b"", "whitespace": b"  \n", "not JSON": b"manifest",
        "an array nested 100000 deep": b"[" * 100_000 + b"]" * 100_000,
        "an object nested 100000 deep": b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
        "config nested 100000 deep": _dump(m)[:-3] + b', "deep": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n",
        "the manifest in an array": _dump([m]),
        "format only": _dump({"format": m["format"]}),
        "not UTF-8": b"\xff\xfe" + _dump(m),
        "a UTF-8 BOM": b"\xef\xbb\xbf" + _dump(m),
        "trailing garbage": _dump(m) + b"x",
        "seq_length 1e400 (infinity)": _dump(m).replace(b'"seq_length": 512', b'"seq_length": 1e400', 1),
        "an export's format": _dump(m | {"format": "packer.export.v1"}),
    }
    for what, new in {"[]": [], "null": None, '"x"': "x", "0": 0}.items():
        texts[f"every section {what}"] = _dump({k: (new if isinstance(v, dict) else v) for k, v in m.items()})
    for what, f in {"every integer 10**30": lambda v: 10**30 if is_int(v) else v,
                    "every integer -1": lambda v: -1 if is_int(v) else v,
                    "every integer a string": lambda v: str(v) if is_int(v) else v,
                    "every integer a float": lambda v: v + 0.5 if is_int(v) else v,
                    "every number NaN": lambda v: math.nan if is_int(v) or isinstance(v, float) else v,
                    "every string a number": lambda v: 1 if isinstance(v, str) and v != m["format"] else v,
                    "every value null": lambda v: v if v == m["format"] else None}.items():
        texts[what] = _dump(_map_leaves(m, f))
    for what, data in texts.items():
        yield Case("malformed manifest", what, {".json": data})


def test_manifest_corruptions(build):
    check(build, field_cases(build))
    check(build, malformed_cases(build))


def test_cli_never_shows_a_traceback(build):
    from click.testing import CliRunner

    from packer.cli import main

    for data in (b"[]", b"null", b"[" * 100_000 + b"]" * 100_000, _dump(_map_leaves(build.manifest, lambda v: None))):
        _write(build, {".json": data})
        r = CliRunner().invoke(main, ["verify", str(build.prefix)])
        assert r.exit_code == 1 and "error: " in r.output and "Traceback" not in r.output, r.output
    _write(build, {})


def test_figures():
    """The per-class figures (run last: pytest keeps file order); `-s` shows them."""
    if not FIGURES.tried:
        pytest.skip("no corruption ran (select the other tests of this file too)")
    width = max(map(len, FIGURES.tried))
    lines = [f"{'class':<{width}}  tried  verify  reader  undetectable"]
    for cls in FIGURES.tried:
        und = sum(n for (c, _), n in FIGURES.undetectable.items() if c == cls)
        lines.append(f"{cls:<{width}}  {FIGURES.tried[cls]:>5}  {FIGURES.detected[cls]:>6}  {FIGURES.raised[cls]:>6}  "
                     f"{und:>12}")
    total = sum(FIGURES.tried.values())
    lines.append(f"{'total':<{width}}  {total:>5}  {sum(FIGURES.detected.values()):>6}  "
                 f"{sum(FIGURES.raised.values()):>6}  {sum(FIGURES.undetectable.values()):>12}")
    reasons = defaultdict(int)
    for (_, why), n in FIGURES.undetectable.items():
        reasons[why] += n
    lines += ["", "undetectable, by reason:"] + [f"  {n:>4}  {why}" for why, n in sorted(reasons.items())]
    print("\n" + "\n".join(lines))
    assert not FIGURES.failures
