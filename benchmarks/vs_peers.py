"""`packer build` side by side with the preprocessors of Megatron-LM and MindSpeed-LLM, on one corpus.

    python benchmarks/make_realistic_corpus.py --records 100000 --out benchmarks/_data/realistic_100k.jsonl
    python benchmarks/vs_peers.py benchmarks/_data/realistic_100k.jsonl \
        --megatron-python /path/venv-megatron/bin/python --mindspeed-python /path/venv-mindspeed/bin/python

Two pairs, each run A B A B ... after one warm-up of each (--runs, --warmup), every run under /usr/bin/time -v:

    text    packer build --handler text (GPT-2, --workers 2)  vs  Megatron-LM tools/preprocess_data.py
            (--json-keys text --append-eod --workers 2) through ../shared/peers/megatron_lm/run.sh
    alpaca  packer build --handler alpaca --seq-length S      vs  MindSpeed-LLM preprocess_data.py
            (AlpacaStyleInstructionHandler, --pack --neat-pack --seq-length S) through
            ../shared/peers/mindspeed_llm_preprocess/run.sh, on the corpus's records that carry
            instruction/input/output and a non-empty output (written once to a side file)

Both tools get the same tokenizer directory, built as the peers' READMEs describe (GPT-2 tokenizer.json plus
vocab.json, merges.txt and a tokenizer_config.json with eos_token, which Megatron's --append-eod needs). Printed:
medians of wall, user+sys CPU and peak RSS (the largest single process), and the median of the per-pair ratios
packer/peer. packer also packs in the text pair (Megatron does not), so that ratio is conservative for packer.
A peer whose Python is not given or found, or whose run fails, is reported with the reason and skipped.
Each peer needs its own venv; the install lines are in its README.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
GPT2 = SHARED / "data" / "tokenizers" / "gpt2"
MEGATRON = SHARED / "peers" / "megatron_lm"
MINDSPEED = SHARED / "peers" / "mindspeed_llm_preprocess"
TOKENIZER_CONFIG = {"tokenizer_class": "GPT2Tokenizer", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
                    "unk_token": "<|endoftext|>", "model_max_length": 1024, "add_prefix_space": False}


@dataclass(frozen=True, slots=True)
class Run:
    wall: float
    cpu: float
    rss_mib: float
    stdout: str


def timed(cmd: list[str], env: dict[str, str] | None = None) -> Run:
    p = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=env)
    if p.returncode:
        raise RuntimeError(f"exit {p.returncode}: {' '.join(cmd)}\n{p.stderr[-1500:]}")
    wall = re.search(r"Elapsed \(wall clock\) time.*: (?:(\d+):)?(\d+):([\d.]+)", p.stderr)
    h, m, s = wall.groups()
    user = float(re.search(r"User time \(seconds\): ([\d.]+)", p.stderr).group(1))
    sys_ = float(re.search(r"System time \(seconds\): ([\d.]+)", p.stderr).group(1))
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr).group(1))
    return Run(3600 * int(h or 0) + 60 * int(m) + float(s), user + sys_, rss / 1024, p.stdout)


def tokenizer_dir(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    shutil.copy(GPT2 / "tokenizer.json", d / "tokenizer.json")
    shutil.copy(GPT2 / "encoder.json", d / "vocab.json")
    shutil.copy(GPT2 / "vocab.bpe", d / "merges.txt")
    (d / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG))
    (d / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 50257}))
    return d


def alpaca_side_file(corpus: Path, out: Path) -> int:
    n = 0
    with open(corpus, encoding="utf-8") as f, open(out, "w", encoding="utf-8") as g:
        for line in f:
            r = json.loads(line)
            if r.get("instruction") and (r.get("output") or "").strip():  # packer refuses nothing-to-train; same records for both
                g.write(json.dumps({k: r[k] for k in ("instruction", "input", "output")}, ensure_ascii=False))
                g.write("\n")
                n += 1
    return n


def find_python(given: str | None, env_name: str, venv: str) -> str | None:
    for cand in (given, os.environ.get(env_name), ROOT / venv / "bin" / "python", Path.cwd() / venv / "bin" / "python"):
        if cand and Path(cand).exists():
            return str(cand)
    return None


def pair(name: str, a: list[str], b: list[str], b_env: dict[str, str], runs: int, warmup: int,
         b_out: Callable[[], str]) -> None:
    print(f"\n== {name}\n  A (packer): {' '.join(a)}\n  B (peer):   {' '.join(b)}", flush=True)
    try:
        for _ in range(warmup):
            timed(a)
            timed(b, b_env)
        ra, rb = [], []
        for i in range(runs):
            ra.append(timed(a))
            rb.append(timed(b, b_env))
            print(f"  run {i + 1}/{runs}: packer {ra[-1].wall:.1f} s wall, {ra[-1].cpu:.1f} s cpu, "
                  f"{ra[-1].rss_mib:.0f} MiB | peer {rb[-1].wall:.1f} s wall, {rb[-1].cpu:.1f} s cpu, "
                  f"{rb[-1].rss_mib:.0f} MiB", flush=True)
    except RuntimeError as e:
        print(f"  skipped: a run failed: {e}")
        return
    med = statistics.median
    print(f"  {'':<8}{'wall s':>9}{'cpu s':>9}{'peak RSS MiB':>14}   (medians of {runs})")
    for who, r in (("packer", ra), ("peer", rb)):
        print(f"  {who:<8}{med(x.wall for x in r):>9.1f}{med(x.cpu for x in r):>9.1f}{med(x.rss_mib for x in r):>14.0f}")
    ratio = [x.wall / y.wall for x, y in zip(ra, rb, strict=True)]
    cpu = [x.cpu / y.cpu for x, y in zip(ra, rb, strict=True)]
    rss = [x.rss_mib / y.rss_mib for x, y in zip(ra, rb, strict=True)]
    print(f"  packer/peer, median of pairs: wall {med(ratio):.2f} (peer/packer {1 / med(ratio):.2f}), "
          f"cpu {med(cpu):.2f}, peak RSS {med(rss):.2f}")
    summary = json.loads(ra[-1].stdout)
    print(f"  output: packer {summary['counts']}; peer {b_out()}")


def ready(pair_name: str, pairs: set[str], title: str, peer: Path, python: str | None, flag: str) -> bool:
    """Is this pair asked for and its peer runnable? Says why it is skipped otherwise."""
    if pair_name not in pairs:
        return False
    if not (peer / "run.sh").exists():
        print(f"\n== {title}: skipped: {peer / 'run.sh'} not found")
        return False
    if python is None:
        print(f"\n== {title}: skipped: no venv for it (pass {flag}; install lines in {peer / 'README.md'})")
        return False
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("corpus", type=Path)
    ap.add_argument("--megatron-python", help="python of a venv made per ../shared/peers/megatron_lm/README.md "
                    "(default: $MEGATRON_PYTHON, else venv-megatron/ here)")
    ap.add_argument("--mindspeed-python", help="python of a venv made per "
                    "../shared/peers/mindspeed_llm_preprocess/README.md (default: $MINDSPEED_PYTHON, else venv-mindspeed/)")
    ap.add_argument("--seq-length", type=int, default=2048)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--pairs", default="text,alpaca", help="which comparisons to run, comma-separated")
    args = ap.parse_args()
    pairs = set(args.pairs.split(","))
    corpus = args.corpus.resolve()
    work = Path(tempfile.mkdtemp(prefix="vs_peers_", dir=corpus.parent))
    tok = tokenizer_dir(work / "gpt2-hf")
    packer = [sys.executable, "-m", "packer.cli", "build", "--tokenizer", str(tok), "--seq-length",
              str(args.seq_length), "--workers", str(args.workers), "-q", "--json-summary"]
    print(f"corpus {corpus}; tokenizer dir {tok}; {os.cpu_count()} CPUs; seq length {args.seq_length}; "
          f"{args.workers} workers; {args.warmup} warm-up + {args.runs} interleaved runs per tool")

    py = find_python(args.megatron_python, "MEGATRON_PYTHON", "venv-megatron")
    if ready("text", pairs, "text vs Megatron-LM", MEGATRON, py, "--megatron-python"):
        mlm = work / "mlm"
        pair("text: packer --handler text vs Megatron-LM preprocess_data.py",
             packer + ["--handler", "text", "--input", str(corpus), "--output-prefix", str(work / "packer_text")],
             [str(MEGATRON / "run.sh"), str(corpus), str(mlm), str(tok), str(args.workers)],
             {**os.environ, "PYTHON": py}, args.runs, args.warmup,
             lambda: f"{(work / 'mlm_text_document.bin').stat().st_size // 2:,} tokens (uint16 .bin)")

    py = find_python(args.mindspeed_python, "MINDSPEED_PYTHON", "venv-mindspeed")
    if ready("alpaca", pairs, "alpaca vs MindSpeed-LLM", MINDSPEED, py, "--mindspeed-python"):
        alp = work / "alpaca.jsonl"
        n = alpaca_side_file(corpus, alp)
        print(f"\nalpaca side file: {n:,} records with an instruction and a non-empty output -> {alp}")
        msp = work / "msp"
        pair(f"alpaca, packed at {args.seq_length}: packer --handler alpaca vs MindSpeed-LLM --pack --neat-pack",
             packer + ["--handler", "alpaca", "--input", str(alp), "--output-prefix", str(work / "packer_alpaca")],
             [str(MINDSPEED / "run.sh"), str(alp), str(msp), str(tok), "--pack", "--neat-pack", "--seq-length",
              str(args.seq_length), "--workers", str(args.workers)],
             {**os.environ, "PYTHON": py}, args.runs, args.warmup,
             lambda: f"{(work / 'msp_packed_input_ids_document.bin').stat().st_size // 4 // args.seq_length:,}"
                     f" packs of {args.seq_length} (int32 .bin)")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
