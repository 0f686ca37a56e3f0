"""Segment boundaries survive tokenization: decode(tokens whose last char is in a target) == the answer.

The pipeline tokenizes the joined text once and keeps a token as a target iff the last character of its
span is inside a target segment. These tests apply that rule with real tokenizers (GPT-2 byte-level BPE,
Llama-2 sentencepiece BPE) and with a tiny byte-level BPE trained here, so they run without shared data too.
"""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from packer.handlers import HandlerOptions, RecordError, get_handler
from packer.handlers.alpaca import TEMPLATES

END = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>"}


def _alpaca_targets(tokenizer, records, template, decode_targets):
    handler = get_handler("alpaca", HandlerOptions(template=template))
    pairs = []
    for record in records:
        try:
            segments = handler(record)
        except RecordError:
            continue
        pairs.append((decode_targets(tokenizer, segments), record["output"] + END.get(template, "")))
    return pairs


def test_alpaca_template_round_trips_every_record(real_tokenizer, alpaca_5000, decode_targets):
    pairs = _alpaca_targets(real_tokenizer, alpaca_5000, "alpaca", decode_targets)
    assert len(pairs) == 4998
    assert [p for p in pairs if p[0] != p[1]] == []


@pytest.mark.parametrize("template", [t for t in TEMPLATES if t != "alpaca"])
def test_other_templates_round_trip(real_tokenizer, alpaca_5000, template, decode_targets):
    pairs = _alpaca_targets(real_tokenizer, alpaca_5000[:200], template, decode_targets)
    assert len(pairs) == 200
    gpt2 = real_tokenizer.get_vocab_size() > 50000
    for got, want in pairs:
        if template == "llama2" and gpt2:
            # "[/INST] " + answer: byte-level BPE gives the space to the answer's first token (" No"), a
            # target since its last char is in the answer. Llama's own tokenizer has the same "▁No" piece.
            assert got == " " + want
        else:
            assert got == want


def test_belle_boundary_only_moves_whitespace(real_tokenizer, belle_dev1k, decode_targets):
    """832 dev1K answers start with "\\n"; after "Assistant: \\n" that may merge into one "\\n\\n" token."""
    handler = get_handler("belle")
    for record in belle_dev1k[:300]:
        got = decode_targets(real_tokenizer, handler(record))
        assert got == record["output"] or got.lstrip() == record["output"].lstrip()
        assert got.endswith(record["output"].lstrip())


def test_moss_targets_round_trip(real_tokenizer, moss_1120, decode_targets):
    handler = get_handler("moss")
    for record in moss_1120[:100]:
        segments = handler(record)
        assert decode_targets(real_tokenizer, segments) == "".join(s.text for s in segments if s.target)


def test_with_a_tokenizer_trained_in_memory(decode_targets):
    records = [
        {"instruction": "Add the numbers.", "input": "2, 3", "output": "5"},
        {"instruction": "Say hi.", "output": "Hi there!"},
        {"instruction": "Name a color.", "output": " red\n", "history": [["Name a fruit.", "apple"]]},
    ]
    texts = ["".join(s.text for s in get_handler("alpaca")(r)) for r in records]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts * 3, trainer)
    for template in TEMPLATES:
        handler = get_handler("alpaca", HandlerOptions(template=template))
        for record in records[:2]:
            got = decode_targets(tokenizer, handler(record))
            want = record["output"] + END.get(template, "")
            # llama2's "[/INST] " space joins the answer's first token only if the tiny vocab merged it.
            assert got == want or (template == "llama2" and got == " " + want)
    # History: every answer is a target; " red\n" keeps its own leading space and trailing newline.
    got = decode_targets(tokenizer, get_handler("alpaca")(records[2]))
    assert got == "apple red\n"
