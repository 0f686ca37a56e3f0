"""Tokenizer throughput on one corpus: bare HF `tokenizers`, bare tiktoken, and `packer build` with each backend.

    python benchmarks/make_realistic_corpus.py --records 100000 --out benchmarks/_data/realistic_100k.jsonl
    python benchmarks/tokenizer_throughput.py benchmarks/_data/realistic_100k.jsonl --workers 1,2

Every row tokenizes the same texts (the `text` field of each line) in the same run; the rows are interleaved
(A B C ... A B C ...) --repeats times and the median is printed, so drift on a shared machine hits all rows alike.

    hf          `Tokenizer.encode_batch` as loaded
    hf-fast     `Tokenizer.encode_batch_fast` (no character offsets)
    tiktoken    `Encoding.encode(text, allowed_special=<all>)` per text (encode_batch's per-text thread-pool futures
                cost more than the tokenizing) on an Encoding built from the
                same tokenizer.json (byte-level ranks, the pre-tokenizer's split pattern, its special tokens)
    tiktoken-joined (only with --bare tiktoken-joined) `encode_to_numpy` once per batch, on the batch's texts
                joined at a special token, as packer calls it (packer/tiktoken_backend.py `encode_joined`): the
                same ids, without the per-call conversions

These run in N fork-started processes with an initializer that loads the tokenizer, over batches of 512 texts
already in memory (each worker reads them from the parent's copy; only the batch number and a count cross the
pipe), with TOKENIZERS_PARALLELISM=false and one tiktoken thread, so N processes use N cores. A warm-up of two
batches per worker is not timed. "vs tiktoken" is each row over the tiktoken row with the same N: the bare limit.

If `packer build --help` lists `--tokenizer-backend`, `packer build --handler text` runs as a subprocess with
`--tokenizer-backend hf` and `tiktoken`, global and `--streaming`, and its rate is the JSON summary's
counts.tokens over seconds.total: end to end (start-up, reading, packing and writing included; the count includes
one EOD per document, which the bare rows do not produce).

Before timing, HF and tiktoken ids are compared on every text of the corpus; the result is printed.

`--baseline DIR` adds the packer rows once more, run from another checkout of the repository (PYTHONPATH=DIR,
e.g. `git worktree add /tmp/base HEAD~3`), interleaved with the others, and prints each repeat's rate over the
baseline's; `--bare` and `--backends` choose the rows (the `hf` ones take most of the time):

    python benchmarks/tokenizer_throughput.py CORPUS --workers 2 --bare tiktoken --backends tiktoken \
        --baseline /tmp/base --repeats 5
"""

from __future__ import annotations

import os

os.environ["TOKENIZERS_PARALLELISM"] = "false"  # before tokenizers is imported, here and in every worker

import argparse
import json
import multiprocessing as mp
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "tokenizers"
BATCH = 512
# HF's ByteLevel pre-tokenizer regex (tokenizers/src/pre_tokenizers/byte_level.rs), used when use_regex is true
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

_texts: list[str] = []  # set in the parent before the pool forks; workers read their batches from it
_encode = None


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, which byte-level BPE vocabularies are written in."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def tiktoken_encoding(path: str):
    """A tiktoken Encoding with the ids of a byte-level BPE tokenizer.json (GPT-2 style: ids are merge ranks)."""
    import tiktoken

    spec = json.loads(Path(path).read_text(encoding="utf-8"))
    pre, model = spec.get("pre_tokenizer") or {}, spec["model"]
    if model.get("type") != "BPE" or spec.get("normalizer"):
        raise SystemExit(f"{path}: tiktoken needs a byte-level BPE tokenizer without a normalizer (GPT-2 style)")
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space"):
        pattern = GPT2_PATTERN
    elif pre.get("type") == "Sequence" and [p["type"] for p in pre["pretokenizers"]] == ["Split", "ByteLevel"]:
        pattern = pre["pretokenizers"][0]["pattern"]["Regex"]  # Qwen/Llama-3 style: Split(regex) + ByteLevel
    else:
        raise SystemExit(f"{path}: pre-tokenizer {pre.get('type')!r} has no tiktoken pattern here")
    decoder = {c: b for b, c in bytes_to_unicode().items()}
    special = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
    ranks = {bytes(decoder[c] for c in tok): i for tok, i in model["vocab"].items() if tok not in special}
    return tiktoken.Encoding(Path(path).stem, pat_str=pattern, mergeable_ranks=ranks, special_tokens=special)


def _init(kind: str, path: str) -> None:
    global _encode
    if kind == "tiktoken-joined":
        enc = tiktoken_encoding(path)
        joiner = next(iter(enc.special_tokens_set))

        def _encode(batch):
            # packer's call: one per batch, the texts joined at a special token; the joiners are not counted
            ids = enc.encode_to_numpy(joiner.join(batch) + joiner, allowed_special=enc.special_tokens_set,
                                      disallowed_special=())
            return [range(ids.size - len(batch))]
        return
    if kind == "tiktoken":
        enc = tiktoken_encoding(path)

        def _encode(batch):
            # One call per text: encode_batch's thread pool (a future per text) costs more than the tokenizing.
            allowed = enc.special_tokens_set
            return [enc.encode(t, allowed_special=allowed, disallowed_special=()) for t in batch]
        return
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(path)
    fn = tok.encode_batch_fast if kind == "hf-fast" else tok.encode_batch

    def _encode(batch):
        return [e.ids for e in fn(batch)]


def _count(i: int) -> int:
    return sum(map(len, _encode(_texts[i * BATCH : (i + 1) * BATCH])))


def _compare(i: int) -> tuple[int, int | None]:
    """(mismatching texts, the first one's index) for batch i, HF against tiktoken, inside one worker."""
    batch = _texts[i * BATCH : (i + 1) * BATCH]
    hf = [e.ids for e in _hf.encode_batch_fast(batch)]
    tt = _tt.encode_batch(batch, allowed_special="all", num_threads=1)
    bad = [j for j, (a, b) in enumerate(zip(hf, tt, strict=True)) if a != b]
    return len(bad), (i * BATCH + bad[0] if bad else None)


def _init_compare(path: str) -> None:
    global _hf, _tt
    from tokenizers import Tokenizer

    _hf, _tt = Tokenizer.from_file(path), tiktoken_encoding(path)


def bare(kind: str, path: str, procs: int) -> tuple[float, int]:
    """(seconds, tokens) for one pass over every batch in `procs` processes."""
    n = (len(_texts) + BATCH - 1) // BATCH
    with mp.get_context("fork").Pool(procs, initializer=_init, initargs=(kind, path)) as pool:
        pool.map(_count, range(min(n, 2 * procs)), chunksize=1)  # warm every worker
        t = time.perf_counter()
        tokens = sum(pool.imap_unordered(_count, range(n), chunksize=4))
        return time.perf_counter() - t, tokens


def packer_has_backend() -> bool:
    p = subprocess.run([sys.executable, "-m", "packer.cli", "build", "--help"], capture_output=True, text=True)
    return "--tokenizer-backend" in p.stdout


def packer_build(corpus: Path, path: str, backend: str, procs: int, streaming: bool, out: Path,
                 checkout: str | None = None) -> tuple[float, int]:
    """(seconds.total, counts.tokens) of one `packer build`; `checkout`: the repository to run it from."""
    out = out.resolve()
    cmd = [sys.executable, "-m", "packer.cli", "build", "--handler", "text", "--input", str(corpus.resolve()),
           "--tokenizer", str(Path(path).resolve()), "--tokenizer-backend", backend, "--seq-length", "2048",
           "--output-prefix", str(out / "b"), "--workers", str(procs), "--json-summary", "-q"]
    cmd += ["--streaming"] if streaming else []
    # Run from `out`, with the checkout (default: this one) first on PYTHONPATH: `python -m` puts the working
    # directory before PYTHONPATH, so a run from a checkout would import that checkout's packer whatever is asked.
    env = os.environ | {"PYTHONPATH": str(Path(checkout or REPO).resolve())}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=out)
    if p.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stderr[-2000:]}")
    s = json.loads(p.stdout)
    return s["seconds"]["total"], s["counts"]["tokens"]


def main() -> None:
    global _texts
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("corpus", type=Path)
    ap.add_argument("--workers", default="1,2", help="comma-separated process counts")
    ap.add_argument("--tokenizer", default="gpt2", help="a folder name under ../shared/data/tokenizers, or a path")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--bare", default="hf,hf-fast,tiktoken", help="comma-separated bare rows")
    ap.add_argument("--backends", default="hf,tiktoken", help="comma-separated packer --tokenizer-backend rows")
    ap.add_argument("--baseline", help="another checkout of this repository: its packer rows too, interleaved")
    args = ap.parse_args()
    bare_kinds = [k for k in args.bare.split(",") if k]
    if "tiktoken" not in bare_kinds:
        raise SystemExit("--bare must include tiktoken: every row is compared with it")
    if args.baseline and not (Path(args.baseline) / "packer" / "cli.py").exists():
        raise SystemExit(f"--baseline {args.baseline}: no packer/cli.py there; pass a checkout of this repository")
    path = args.tokenizer if Path(args.tokenizer).exists() else str(SHARED / args.tokenizer)
    if Path(path).is_dir():
        path = str(Path(path) / "tokenizer.json")
    workers = [int(w) for w in args.workers.split(",")]

    with open(args.corpus, encoding="utf-8") as f:
        _texts = [json.loads(line)["text"] for line in f if line.strip()]
    chars = sum(map(len, _texts))
    print(f"corpus {args.corpus}: {len(_texts):,} texts ({len(set(_texts)):,} distinct), {chars:,} characters; "
          f"tokenizer {path}; {os.cpu_count()} CPUs")

    n = (len(_texts) + BATCH - 1) // BATCH
    with mp.get_context("fork").Pool(max(workers), initializer=_init_compare, initargs=(path,)) as pool:
        results = pool.map(_compare, range(n), chunksize=4)
    bad = sum(r[0] for r in results)
    first = next((r[1] for r in results if r[1] is not None), None)
    print(f"ids identical (HF encode_batch_fast vs tiktoken encode_batch, allowed_special='all'): {bad == 0} "
          f"on {len(_texts):,} texts" + (f"; {bad:,} differ, first at text {first}" if bad else ""))

    rows: list[tuple[str, int, object]] = []
    for procs in workers:
        for kind in bare_kinds:
            rows.append((kind, procs, lambda kind=kind, procs=procs: bare(kind, path, procs)))
    tmp = None
    if packer_has_backend():
        tmp = Path(tempfile.mkdtemp(prefix="tok_tp_", dir=args.corpus.parent))
        checkouts = [(None, "")] + ([(args.baseline, " (baseline)")] if args.baseline else [])
        for procs in workers:
            for backend in [b for b in args.backends.split(",") if b]:
                for streaming in (False, True):
                    for checkout, tag in checkouts:
                        name = f"packer {backend}" + (" --streaming" if streaming else "") + tag
                        rows.append((name, procs, lambda b=backend, p=procs, s=streaming, c=checkout:
                                     packer_build(args.corpus, path, b, p, s, tmp, c)))
    else:
        print("packer build --help lists no --tokenizer-backend: packer rows skipped")

    rates: dict[tuple[str, int], list[float]] = {}
    tokens: dict[tuple[str, int], int] = {}
    for r in range(args.repeats):
        for name, procs, run in rows:
            secs, tok = run()
            rates.setdefault((name, procs), []).append(tok / secs / 1e6)
            tokens[(name, procs)] = tok
            print(f"  repeat {r + 1}/{args.repeats} {name:<38} N={procs}: {tok / secs / 1e6:6.2f} Mtok/s "
                  f"({tok:,} tokens, {secs:.2f} s)", flush=True)
    if tmp is not None:
        shutil.rmtree(tmp)

    print(f"\nmedians of {args.repeats} interleaved repeats (Mtok/s; min-max)")
    width = max(len(name) for name, _, _ in rows) + 2
    print(f"{'row':<{width}}{'N':>3}{'Mtok/s':>9}{'min-max':>14}{'vs tiktoken':>13}{'tokens':>14}")
    for name, procs, _ in rows:
        v = rates[(name, procs)]
        limit = statistics.median(rates[("tiktoken", procs)])
        med = statistics.median(v)
        print(f"{name:<{width}}{procs:>3}{med:>9.2f}{f'{min(v):.2f}-{max(v):.2f}':>14}{med / limit:>12.0%}"
              f"{tokens[(name, procs)]:>14,}")
    for name, procs, _ in rows:
        if (base := rates.get((f"{name} (baseline)", procs))) is not None:
            ratios = [a / b for a, b in zip(rates[(name, procs)], base, strict=True)]
            print(f"{name} N={procs} over its baseline, repeat by repeat: "
                  f"{', '.join(f'{r:.3f}' for r in ratios)}; median {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
