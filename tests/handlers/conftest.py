"""Fixtures for the handler tests: real data from ../shared/data (skipped where absent) and mask helpers."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from tokenizers import Tokenizer

from packer.records import Segment

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def _data_file(relative: str) -> Path:
    path = DATA / relative
    if not path.is_file():
        pytest.skip(f"real data {relative} not found under {DATA} (the shared data lives next to the repo)")
    return path


def _json(relative: str) -> list[dict[str, Any]]:
    return json.loads(_data_file(relative).read_text(encoding="utf-8"))


def _jsonl(relative: str) -> list[dict[str, Any]]:
    with _data_file(relative).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="session")
def load_json() -> Callable[[str], list[dict[str, Any]]]:
    return _json


@pytest.fixture(scope="session")
def alpaca_5000() -> list[dict[str, Any]]:
    return _json("alpaca/stanford_alpaca_pr152_alpaca_5000.json")


@pytest.fixture(scope="session")
def belle_dev1k() -> list[dict[str, Any]]:
    return _jsonl("belle/belle_train_utils_data_dev1K.json")


@pytest.fixture(scope="session")
def belle_medical_1k() -> list[dict[str, Any]]:
    return _jsonl("belle/medicalgpt_Belle_open_source_1k.json")


@pytest.fixture(scope="session")
def moss_1120() -> list[dict[str, Any]]:
    return _jsonl("moss/moss_003_sft_samples_combined.jsonl")


@pytest.fixture(scope="session", params=["gpt2", "llama2"])
def real_tokenizer(request: pytest.FixtureRequest) -> Tokenizer:
    return Tokenizer.from_file(str(_data_file(f"tokenizers/{request.param}/tokenizer.json")))


def target_token_ids(tokenizer: Tokenizer, segments: Sequence[Segment]) -> list[int]:
    """The pipeline's rule: a token is a target iff the last character of its span is in a target segment."""
    text = "".join(s.text for s in segments)
    spans, pos = [], 0
    for s in segments:
        if s.target:
            spans.append((pos, pos + len(s.text)))
        pos += len(s.text)
    enc = tokenizer.encode(text)
    return [
        token
        for token, (start, end) in zip(enc.ids, enc.offsets, strict=True)
        if end > start and any(lo <= end - 1 < hi for lo, hi in spans)
    ]


@pytest.fixture(scope="session")
def decode_targets() -> Callable[[Tokenizer, Sequence[Segment]], str]:
    """decode(target token ids) for a sample's segments."""

    def decode(tokenizer: Tokenizer, segments: Sequence[Segment]) -> str:
        return tokenizer.decode(target_token_ids(tokenizer, segments), skip_special_tokens=False)

    return decode
