"""Generate a JSON Lines corpus in which no text repeats, from the shared real data, without committing it.

    python benchmarks/make_realistic_corpus.py --records 100000 --out benchmarks/_data/realistic_100k.jsonl

`make_corpus.py` draws 1M records from ~30k real ones, so every text comes back ~30 times and tokenizers' word
caches look better than they will on real data. Here every text is distinct:

1. every distinct text of ../shared/data/{alpaca,belle,moss,sharegpt}, in file order: each record's text fields
   flattened into `text` (Alpaca/BELLE instruction, input, output; MOSS meta_instruction and every field of every
   turn; ShareGPT/OpenAI conversation values or message contents), joined by newlines;
2. then, up to --records, documents recombined from real sentences: a real record is drawn as a template, its
   language picks the sentence pool (the sentences of every real text of that language) and its length the
   target; random sentences are appended until the target is reached. A hash set of the texts rejects a
   collision and the document is drawn again.

Each line has `text`, `lang` (zh/en/other, by script) and `source` (the data folder; `gen:` for recombined);
records from Alpaca-shaped sources (and those recombined from them, field by field) also carry `instruction`,
`input` and `output`, so the alpaca handler reads them. Lines are written as they are made.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
FOLDERS = ("alpaca", "belle", "moss", "sharegpt")
FIELDS = ("instruction", "input", "output")

# A sentence runs to terminal punctuation followed by whitespace (so "3.14" and "e.g.x" stay whole), to CJK
# terminal punctuation (no space follows it in Chinese), or to a line break; it keeps what ends it, so joining
# sentences back restores real spacing and line structure.
SENTENCE = re.compile(r".*?(?:[.!?]+[\"'”’)\]]*\s+|[。！？；]+[”’」』）]*\s*|\n+|$)", re.S)
CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
LETTER = re.compile(r"[^\W\d_]")
ASCII_LETTER = re.compile(r"[A-Za-z]")


@dataclass(frozen=True, slots=True)
class Real:
    text: str
    lang: str
    source: str
    fields: tuple[str, str, str] | None  # instruction, input, output where the source has them


def language(text: str) -> str:
    letters = len(LETTER.findall(text))
    if letters and len(CJK.findall(text)) >= 0.2 * letters:
        return "zh"
    if not letters or len(ASCII_LETTER.findall(text)) >= 0.5 * letters:
        return "en"
    return "other"


def load(path: Path) -> list:
    raw = path.read_text(encoding="utf-8")
    try:
        data = json.loads(raw)
        return data if isinstance(data, list) else [data]
    except json.JSONDecodeError:  # JSON Lines, whatever the suffix (the BELLE .json files are)
        return [json.loads(line) for line in raw.splitlines() if line.strip()]


def content(c) -> str:
    # OpenAI content is a string or a list of parts ({"type": "text", "text"|"value": ...})
    if isinstance(c, str):
        return c
    if isinstance(c, list):
        return "\n".join(p.get("text") or p.get("value") or "" for p in c if isinstance(p, dict))
    return ""


def flatten(r) -> tuple[list[str], tuple[str, str, str] | None]:
    """(text parts, alpaca fields or None) of one raw record of any of the shared formats."""
    if isinstance(r, list):  # a bare OpenAI message list (xtuner)
        return [content(m.get("content")) for m in r if isinstance(m, dict)], None
    if "chat" in r:  # MOSS: meta_instruction, then every field of turn_1, turn_2, ...
        turns = sorted(r["chat"].items(), key=lambda kv: int(kv[0].rsplit("_", 1)[-1]))
        return [r.get("meta_instruction") or ""] + [v for _, t in turns for v in t.values() if isinstance(v, str)], None
    if "conversations" in r:  # ShareGPT
        return [m.get("value") or "" for m in r["conversations"]], None
    if "messages" in r:  # OpenAI
        return [content(m.get("content")) for m in r["messages"]], None
    if "question" in r:  # BELLE eval set
        fields = (r["question"] or "", "", r.get("std_answer") or "")
        return list(fields), fields
    if "instances" in r:  # self-instruct seed tasks: the first instance is the Alpaca record, all go in text
        inst = r["instances"] or [{}]
        fields = (r.get("instruction") or "", inst[0].get("input") or "", inst[0].get("output") or "")
        return [fields[0]] + [i.get(k) or "" for i in inst for k in ("input", "output")], fields
    fields = tuple(str(r.get(k) or "") for k in FIELDS)
    return list(fields), fields


def real_records() -> list[Real]:
    out = []
    for folder in FOLDERS:
        for path in sorted((SHARED / folder).iterdir()):
            if path.suffix not in (".json", ".jsonl"):
                continue
            for r in load(path):
                parts, fields = flatten(r)
                text = "\n".join(p for p in parts if p)
                if text:
                    out.append(Real(text, language(text), folder, fields))
    return out


def sentences(text: str) -> list[str]:
    return [s for s in SENTENCE.findall(text) if s]


def key(text: str) -> int:
    # 8 bytes per text: a false hit only makes the generator draw again, a real repeat is always caught
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def compose(rng: random.Random, pool: list[str], target: int) -> str:
    parts, n = [], 0
    while n < target:
        s = pool[rng.randrange(len(pool))]
        parts.append(s)
        n += len(s)
    return "".join(parts).strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args()

    reals = real_records()
    firsts: dict[int, Real] = {}
    for r in reals:
        firsts.setdefault(key(r.text), r)
    distinct = list(firsts.values())
    del firsts
    pools: dict[str, list[str]] = {}
    for r in distinct:  # sentences deduplicated per pool, first occurrence order (deterministic)
        pools.setdefault(r.lang, []).extend(sentences(r.text))
    pools = {lang: list(dict.fromkeys(p)) for lang, p in pools.items()}

    rng = random.Random(args.seed)
    seen: set[int] = set()  # keys of the texts written
    records = chars = collisions = alpaca_shaped = 0
    mix: Counter[str] = Counter()
    mix_chars: Counter[str] = Counter()
    made: Counter[str] = Counter()  # per data folder, real or recombined
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:

        def emit(text: str, lang: str, source: str, fields) -> None:
            nonlocal records, chars, alpaca_shaped
            seen.add(key(text))
            rec = {"text": text, "lang": lang, "source": source}
            if fields is not None:
                rec.update(zip(FIELDS, fields, strict=True))
                alpaca_shaped += 1
            f.write(json.dumps(rec, ensure_ascii=False))
            f.write("\n")
            records += 1
            chars += len(text)
            mix[lang] += 1
            mix_chars[lang] += len(text)
            made[source] += 1

        for r in distinct[: args.records]:
            emit(r.text, r.lang, r.source, r.fields)
        while records < args.records:
            t = distinct[rng.randrange(len(distinct))]  # template: language, shape and length of a real record
            pool = pools[t.lang]
            if t.fields is not None:
                fields = tuple(compose(rng, pool, len(v)) if v else "" for v in t.fields)
                text = "\n".join(v for v in fields if v)
            else:
                fields, text = None, compose(rng, pool, len(t.text))
            if not text or key(text) in seen:
                collisions += 1
                continue
            emit(text, t.lang, "gen:" + t.source, fields)

    print(f"wrote {args.out} ({args.out.stat().st_size / 2**20:.1f} MiB), seed {args.seed}")
    print(f"records          {records:,}")
    print(f"distinct texts   {len(seen):,}")
    print(f"total characters {chars:,}  (mean {chars / max(records, 1):,.0f} per record)")
    print(f"real records     {min(len(distinct), records):,} distinct of {len(reals):,} read; "
          f"recombined {records - min(len(distinct), records):,} ({collisions:,} collisions drawn again)")
    print("sentence pools   " + ", ".join(f"{lang} {len(p):,}" for lang, p in sorted(pools.items())))
    print("language mix     " + ", ".join(
        f"{lang} {mix[lang]:,} records ({mix[lang] / records:.1%}), {mix_chars[lang] / chars:.1%} of chars"
        for lang in sorted(mix)))
    print("source mix       " + ", ".join(f"{s} {n:,}" for s, n in sorted(made.items())))
    print(f"alpaca-shaped    {alpaca_shaped:,} records carry instruction/input/output")


if __name__ == "__main__":
    main()
