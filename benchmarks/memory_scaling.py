"""Peak RSS of `packer build` as the input grows 4x (streaming and global), measured with /usr/bin/time -v.

    python benchmarks/make_corpus.py --records 250000 --out benchmarks/_data/alpaca_250k.jsonl
    python benchmarks/make_corpus.py --records 1000000 --out benchmarks/_data/alpaca_1M.jsonl
    python benchmarks/memory_scaling.py benchmarks/_data/alpaca_250k.jsonl benchmarks/_data/alpaca_1M.jsonl
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

GPT2 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tokenizers" / "gpt2" / "tokenizer.json"


def run(corpus: Path, mode: str, workers: int, out: Path) -> tuple[float, float, int]:
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "packer.cli", "build", "--handler", "alpaca", "--input",
           str(corpus), "--tokenizer", str(GPT2), "--seq-length", "2048", "--output-prefix", str(out),
           "--workers", str(workers), "--json-summary", "-q", "--on-error", "skip"] + (["--streaming"] if mode == "streaming" else [])
    p = subprocess.run(cmd, capture_output=True, text=True, check=True)
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr).group(1)) / 1024
    m = re.search(r"Elapsed \(wall clock\) time.*: (?:(\d+):)?(\d+):([\d.]+)", p.stderr)
    wall = 3600 * float(m.group(1) or 0) + 60 * float(m.group(2)) + float(m.group(3))
    return rss, wall, json.loads(p.stdout)["counts"]["tokens"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("corpora", nargs="+", type=Path)
    ap.add_argument("--modes", default="streaming,global")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3, help="runs per case; the median peak counts (peaks vary "
                    "by 10-20 MiB from run to run)")
    args = ap.parse_args()
    print(f"{'corpus':<36} {'mode':<10} {'tokens':>12} {'wall s':>7} {'peak RSS MiB':>12} {'runs':>15} "
          f"{'vs first':>8}")
    first: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in args.modes.split(","):
            for corpus in args.corpora:
                runs = [run(corpus, mode, args.workers, Path(tmp) / f"{mode}_{corpus.stem}")
                        for _ in range(args.repeat)]
                rss = statistics.median(r[0] for r in runs)
                wall = statistics.median(r[1] for r in runs)
                tokens = runs[0][2]
                spread = "/".join(f"{r[0]:.0f}" for r in runs)
                base = first.setdefault(mode, rss)
                print(f"{corpus.name:<36} {mode:<10} {tokens:>12,} {wall:>7.1f} {rss:>12.0f} {spread:>15} "
                      f"{rss / base - 1:>+8.1%}", flush=True)


if __name__ == "__main__":
    main()
