"""Generate a large Alpaca-style JSON Lines corpus from the shared real data, without committing it.

    python benchmarks/make_corpus.py --records 1000000 --out benchmarks/_data/alpaca_1M.jsonl

Records are drawn with a fixed seed from every Alpaca-format file in ../shared/data/alpaca (about 30k real
records); each output line has `instruction`, `input`, `output` and `text` (the three joined by newlines,
what Megatron's preprocess_data.py would read with --json-keys text).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "alpaca"
FILES = ("stanford_alpaca_pr152_alpaca_5000.json", "fastchat_alpaca_data_cleaned_1000.json",
         "llamafactory_alpaca_en_demo.json", "gpteacher_roleplay_deduped.json", "gpteacher_toolformer_dedupe_only.json",
         "alpacacleaned_gsm_8k_train.json")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=100_000)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--only-stanford", action="store_true", help="draw from the Stanford Alpaca 5000 file only")
    args = ap.parse_args()
    pool = []
    for name in FILES[:1] if args.only_stanford else FILES:
        for r in json.loads((SHARED / name).read_text(encoding="utf-8")):
            rec = {k: r.get(k) or "" for k in ("instruction", "input", "output")}
            rec["text"] = "\n".join(v for v in rec.values() if v)
            pool.append(json.dumps(rec, ensure_ascii=False))
    pick = np.random.default_rng(args.seed).integers(0, len(pool), size=args.records)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        for i in pick.tolist():
            f.write(pool[i])
            f.write("\n")
    print(f"wrote {args.records:,} records ({args.out.stat().st_size / 2**20:.1f} MiB) from {len(pool):,} real ones "
          f"to {args.out}")


if __name__ == "__main__":
    main()
