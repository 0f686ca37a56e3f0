"""Context parallel on CPU: step time and peak memory per rank, CP=1 (one process) vs CP=N (N gloo ranks).

    python benchmarks/cp_throughput.py                                   # small100m, seq 8192, CP 1 vs 2
    python benchmarks/cp_throughput.py --model tiny --seq-length 4096 --steps 4

Builds the shared Alpaca file with `packer build --cp-size N` (documents padded to a multiple of 2N, packed
to --seq-length) into a temp dir, then trains the same packs with `packer train` twice: one process with
N threads (CP=1, the padded layout the build planned) and N processes of one thread each under torchrun
(--context-parallel-size N). Same cores, same packs, same steps. Reported: median step time after the warm-up
steps, real tokens per second, and each rank's peak RSS (resource.getrusage at exit). CPU figures show the
scaling shape (memory per rank, what the ring's communication and recomputation cost), not device speed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
ALPACA = SHARED / "alpaca" / "stanford_alpaca_pr152_alpaca_5000.json"
GPT2 = SHARED / "tokenizers" / "gpt2" / "tokenizer.json"

WORKER = """
import json, resource, sys, torch
from packer.trainer.train import TrainConfig, train
kw = json.loads(sys.argv[1])
torch.set_num_threads(kw.pop("threads"))
rss_out = kw.pop("rss_out")
train(TrainConfig(**kw))
import os
rank = int(os.environ.get("RANK", "0"))
with open(f"{rss_out}.{rank}", "w") as f:
    f.write(str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024))
"""


def build(out: Path, seq_length: int, cp: int) -> str:
    prefix = out / f"alpaca_cp{cp}_{seq_length}"
    cmd = [
        sys.executable, "-m", "packer.cli", "build", "--handler", "alpaca", "--input", str(ALPACA),
        "--tokenizer", str(GPT2), "--seq-length", str(seq_length), "--cp-size", str(cp),
        "--output-prefix", str(prefix), "--on-error", "skip", "-q",
    ]  # fmt: skip
    subprocess.run(cmd, check=True)
    return str(prefix)


def run(tmp: Path, nproc: int, kw: dict) -> dict:
    script = tmp / "worker.py"
    script.write_text(textwrap.dedent(WORKER))
    log = tmp / f"log_cp{kw['context_parallel_size']}.jsonl"
    rss = tmp / f"rss_cp{kw['context_parallel_size']}"
    args = json.dumps({**kw, "log_jsonl": str(log), "rss_out": str(rss), "progress": False, "device": "cpu"})
    env = {**os.environ, "OMP_NUM_THREADS": str(kw["threads"])}
    if nproc == 1:
        cmd = [sys.executable, str(script), args]
    else:
        torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
        cmd = [torchrun, "--nproc-per-node", str(nproc), "--standalone", str(script), args]
    subprocess.run(cmd, check=True, env=env)
    records = [json.loads(line) for line in log.read_text().splitlines()]
    return {
        "records": records,
        "rss": [int(Path(f"{rss}.{r}").read_text()) for r in range(nproc)],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="small100m")
    ap.add_argument("--seq-length", type=int, default=8192)
    ap.add_argument("--cp", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if not ALPACA.is_file() or not GPT2.is_file():
        sys.exit(f"needs the shared data: {ALPACA} and {GPT2}")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        prefix = build(tmp, args.seq_length, args.cp)
        common = {"data": prefix, "model": args.model, "steps": args.steps, "warmup_steps": 1, "seed": 1}
        results = {}
        for cp in (1, args.cp):
            nproc, threads = (1, args.cp) if cp == 1 else (args.cp, 1)
            results[cp] = run(tmp, nproc, {**common, "context_parallel_size": cp, "threads": threads})
    rows = []
    for cp, res in results.items():
        measured = res["records"][args.warmup :]
        step = statistics.median(r["step_time_s"] for r in measured)
        tokens = statistics.median(r["tokens"] for r in measured)
        rows.append({
            "cp": cp,
            "ranks": 1 if cp == 1 else cp,
            "step_time_s": step,
            "real_tokens_per_s": tokens / step,
            "peak_rss_mib_per_rank": [round(x / 2**20) for x in res["rss"]],
            "loss": [round(r["loss"], 5) for r in res["records"]],
        })  # fmt: skip
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{args.model}, seq {args.seq_length}, {args.steps} steps ({args.warmup} warm-up), alpaca --cp-size {args.cp}")
    print(f"{'CP':>3} {'ranks':>5} {'step s':>8} {'real tok/s':>11} {'peak RSS MiB/rank':>20}  loss per step")
    for r in rows:
        rss = "/".join(str(x) for x in r["peak_rss_mib_per_rank"])
        print(f"{r['cp']:>3} {r['ranks']:>5} {r['step_time_s']:>8.2f} {r['real_tokens_per_s']:>11.0f} {rss:>20}  {r['loss']}")


if __name__ == "__main__":
    main()
