"""End-to-end `packer build` throughput and peak memory vs the bare tokenizer limit.

    python benchmarks/make_corpus.py --records 100000 --only-stanford --out benchmarks/_data/stanford_100k.jsonl
    python benchmarks/build_throughput.py --corpus benchmarks/_data/stanford_100k.jsonl

For each (tokenizer, workers, streaming) it runs `packer build --handler text --json-keys text` under
`/usr/bin/time -v` (wall seconds, peak RSS) and prints tokens/s. Two limits are measured over the same texts in
N processes (texts already in memory, batches of 512, nothing else done, with and without tokenizers' rayon
threads: the faster counts):

    bare       `Tokenizer.encode_batch` as loaded: the limit the issue names
    bare-fast  what packer itself calls for all-target samples: `encode_batch_fast` (no character offsets)
               with the BPE word cache enlarged to packer.tokenize.WORD_CACHE; the same ids, less work

"vs bare" and "vs fast" are build tokens/s over each, with the same tokenizer and process count.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tokenizers"
_tok = None
_fn = None


def _init(path: str, parallel: bool, fast: bool) -> None:
    global _tok, _fn
    import os

    from tokenizers import Tokenizer

    from packer.tokenize import _enlarge_word_cache

    os.environ["TOKENIZERS_PARALLELISM"] = "true" if parallel else "false"
    _tok = Tokenizer.from_file(path)
    _fn = _tok.encode_batch
    if fast:
        _enlarge_word_cache(_tok)
        _fn = _tok.encode_batch_fast


def _encode(batch: list[str]) -> int:
    return sum(len(e.ids) for e in _fn(batch))


def bare(texts: list[str], tokenizer: str, procs: int, fast: bool = False) -> tuple[float, int]:
    """The faster of encoding with and without tokenizers' own rayon threads in each process."""
    batches = [texts[i : i + 512] for i in range(0, len(texts), 512)]
    best = (float("inf"), 0)
    for parallel in (True, False):
        with mp.get_context("fork").Pool(procs, initializer=_init, initargs=(tokenizer, parallel, fast)) as pool:
            pool.map(_encode, batches[: 2 * procs])  # warm every worker
            t = time.perf_counter()
            tokens = sum(pool.imap(_encode, batches))
            best = min(best, (time.perf_counter() - t, tokens))
    return best


def build(corpus: Path, tokenizer: str, workers: int, streaming: bool, out: Path) -> dict:
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "packer.cli", "build", "--handler", "text", "--input",
           str(corpus), "--tokenizer", tokenizer, "--seq-length", "2048", "--output-prefix", str(out),
           "--workers", str(workers), "--json-summary", "-q"]
    if streaming:
        cmd.append("--streaming")
    p = subprocess.run(cmd, capture_output=True, text=True, check=True)
    summary = json.loads(p.stdout)
    wall = float(re.search(r"Elapsed \(wall clock\) time.*: (?:(\d+):)?(\d+):([\d.]+)", p.stderr).group(3)) + \
        60 * float(re.search(r"Elapsed \(wall clock\) time.*: (?:(\d+):)?(\d+):", p.stderr).group(2))
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr).group(1))
    return {"tokens": summary["counts"]["tokens"], "wall": wall, "rss_mib": rss / 1024,
            "efficiency": summary["packing"]["efficiency"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, required=True)
    ap.add_argument("--tokenizers", default="gpt2,llama2")
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--modes", default="global,streaming")
    args = ap.parse_args()
    with open(args.corpus, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    print(f"corpus {args.corpus}: {len(texts):,} texts")
    print(f"{'tokenizer':<9} {'procs':>5} {'mode':<10} {'tokens':>11} {'wall s':>7} {'Mtok/s':>7} {'RSS MiB':>8} "
          f"{'vs bare':>7} {'vs fast':>7}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.tokenizers.split(","):
            tok = str(SHARED / name / "tokenizer.json")
            for w in map(int, args.workers.split(",")):
                limits = {}
                for label, fast in (("bare", False), ("bare-fast", True)):
                    secs, tokens = bare(texts, tok, w, fast)
                    limits[label] = tokens / secs
                    print(f"{name:<9} {w:>5} {label:<10} {tokens:>11,} {secs:>7.2f} {tokens / secs / 1e6:>7.3f}",
                          flush=True)
                for mode in args.modes.split(","):
                    r = build(args.corpus, tok, w, mode == "streaming", Path(tmp) / f"{name}_{w}_{mode}")
                    rate = r["tokens"] / r["wall"]
                    print(f"{name:<9} {w:>5} {mode:<10} {r['tokens']:>11,} {r['wall']:>7.2f} {rate / 1e6:>7.3f} "
                          f"{r['rss_mib']:>8.0f} {rate / limits['bare']:>7.1%} {rate / limits['bare-fast']:>7.1%}",
                          flush=True)


if __name__ == "__main__":
    main()
