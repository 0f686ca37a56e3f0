"""`packer export` tokens/s and peak RSS per target, on builds of N and 4N samples (memory must stay flat).

    python benchmarks/make_corpus.py --records 100000 --out benchmarks/_data/alpaca_100k.jsonl
    python benchmarks/make_corpus.py --records 400000 --out benchmarks/_data/alpaca_400k.jsonl
    python benchmarks/export_throughput.py benchmarks/_data/alpaca_100k.jsonl benchmarks/_data/alpaca_400k.jsonl

Each corpus is built once (alpaca handler, GPT-2, --seq-length 2048); every export then runs in its own process
under /usr/bin/time -v (input verification with checksums included), `--repeat` times; medians are printed.
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
CASES = {"mindspeed": [], "mindspeed-eod": ["--eod-boundaries"], "bridge": [], "hf": [], "hf-per-sample":
         ["--per-sample"]}


def timed(cmd: list[str]) -> tuple[float, float, str]:
    p = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, check=True)
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr).group(1)) / 1024
    m = re.search(r"Elapsed \(wall clock\) time.*: (?:(\d+):)?(\d+):([\d.]+)", p.stderr)
    return 3600 * float(m.group(1) or 0) + 60 * float(m.group(2)) + float(m.group(3)), rss, p.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("corpora", nargs="+", type=Path)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    packer = [sys.executable, "-m", "packer"]
    print(f"{'corpus':<24} {'export':<14} {'samples':>9} {'tokens':>12} {'wall s':>7} {'Mtok/s':>7} "
          f"{'peak RSS MiB':>12} {'vs first':>8}")
    first: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for corpus in args.corpora:
            prefix = Path(tmp) / corpus.stem
            _, _, out = timed([*packer, "build", "--handler", "alpaca", "--input", str(corpus), "--tokenizer",
                               str(GPT2), "--seq-length", "2048", "--output-prefix", str(prefix), "--workers", "2",
                               "--on-error", "skip", "--json-summary", "-q"])
            counts = json.loads(out)["counts"]
            for case in args.cases.split(","):
                to = case.split("-")[0]
                runs = [timed([*packer, "export", str(prefix), "--to", to, "--output", str(Path(tmp) / f"{case}_{i}"),
                               "-q", *CASES[case]]) for i in range(args.repeat)]
                wall = statistics.median(r[0] for r in runs)
                rss = statistics.median(r[1] for r in runs)
                base = first.setdefault(case, rss)
                print(f"{corpus.name:<24} {case:<14} {counts['samples']:>9,} {counts['tokens']:>12,} {wall:>7.2f} "
                      f"{counts['tokens'] / wall / 1e6:>7.2f} {rss:>12.0f} {rss / base - 1:>+8.1%}", flush=True)


if __name__ == "__main__":
    main()
