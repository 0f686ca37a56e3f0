"""Tokenizer loading (EOD/BOS resolution) and segments -> ids + loss mask."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from tokenizers import Tokenizer

from packer.handlers import get_handler
from packer.records import Segment
from packer.tokenize import WELL_KNOWN_EOD, SampleEncoder, TokenizerError, load_tokenizer

# -- EOD resolution: --eod-token > tokenizer_config.json eos_token > well-known ---------------------------


def test_eod_from_config_string(make_tokenizer):
    d = make_tokenizer(["<|endoftext|>", "</s>", "<eod>"], config={"eos_token": "<eod>"})
    tok, info = load_tokenizer(d)
    assert (info.eod_token, info.eod_id, info.eod_source) == ("<eod>", tok.token_to_id("<eod>"), "tokenizer_config.json")


def test_eod_from_config_dict(make_tokenizer):
    d = make_tokenizer(["<|endoftext|>", "<eod>"], config={"eos_token": {"content": "<eod>", "lstrip": False}})
    tok, info = load_tokenizer(d)
    assert (info.eod_token, info.eod_source) == ("<eod>", "tokenizer_config.json")
    assert info.eod_id == tok.token_to_id("<eod>")


def test_eod_option_beats_config(make_tokenizer):
    d = make_tokenizer(["<|endoftext|>", "</s>", "<eod>"], config={"eos_token": "<eod>"})
    tok, info = load_tokenizer(d, eod_token="</s>")
    assert (info.eod_token, info.eod_id, info.eod_source) == ("</s>", tok.token_to_id("</s>"), "--eod-token")


def test_eod_well_known_in_listed_order(make_tokenizer):
    d = make_tokenizer(["</s>", "<|endoftext|>"])  # vocabulary order must not matter
    tok, info = load_tokenizer(d)
    assert WELL_KNOWN_EOD.index("<|endoftext|>") < WELL_KNOWN_EOD.index("</s>")
    assert (info.eod_token, info.eod_id, info.eod_source) == ("<|endoftext|>", tok.token_to_id("<|endoftext|>"),
                                                              "well-known")


def test_config_eos_not_in_vocab_falls_back(make_tokenizer):
    d = make_tokenizer(["</s>"], config={"eos_token": "<|im_end|>"})
    _, info = load_tokenizer(d)
    assert (info.eod_token, info.eod_source) == ("</s>", "well-known")


def test_no_eod_is_a_clear_error(make_tokenizer):
    d = make_tokenizer(["<pad>"])
    with pytest.raises(TokenizerError, match="--eod-token"):
        load_tokenizer(d)
    tok, info = load_tokenizer(d, eod_token="<pad>")
    assert info.eod_id == tok.token_to_id("<pad>")


def test_unknown_eod_option(make_tokenizer):
    d = make_tokenizer()
    with pytest.raises(TokenizerError, match="'<nope>' is not in the vocabulary"):
        load_tokenizer(d, eod_token="<nope>")


# -- where the tokenizer comes from --------------------------------------------------------------------------


def test_directory_and_file_are_equivalent(make_tokenizer):
    d = make_tokenizer(["<|endoftext|>", "<eod>"], config={"eos_token": "<eod>", "pad_token": "<|endoftext|>"})
    _, from_dir = load_tokenizer(d)
    _, from_file = load_tokenizer(d / "tokenizer.json")  # reads the sibling tokenizer_config.json too
    assert from_dir == from_file
    assert from_dir.eod_token == "<eod>" and from_dir.pad_id is not None
    assert from_dir.sha256 == hashlib.sha256((d / "tokenizer.json").read_bytes()).hexdigest()
    assert from_dir.path == str((d / "tokenizer.json").resolve())
    assert from_dir.vocab_size == Tokenizer.from_file(str(d / "tokenizer.json")).get_vocab_size(True)


def test_loading_errors(tmp_path, make_tokenizer):
    with pytest.raises(TokenizerError, match="does not exist"):
        load_tokenizer(tmp_path / "missing.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TokenizerError, match="without tokenizer.json"):
        load_tokenizer(tmp_path / "empty")
    (tmp_path / "bad.json").write_text("{not a tokenizer")
    with pytest.raises(TokenizerError, match="not a Hugging Face tokenizers file"):
        load_tokenizer(tmp_path / "bad.json")
    d = make_tokenizer()
    (d / "tokenizer_config.json").write_text("{oops")
    with pytest.raises(TokenizerError, match="tokenizer_config.json: invalid JSON"):
        load_tokenizer(d)


# -- encoding ------------------------------------------------------------------------------------------------


def encode(tokenizer_dir, segments, train_on_prompt=False, eod_token=None):
    tok, info = load_tokenizer(tokenizer_dir, eod_token)
    return SampleEncoder(tok, info, train_on_prompt).encode_batch([segments])[0], tok, info


def test_docstring_example(gpt2_tokenizer):
    s, tok, info = encode(gpt2_tokenizer, [Segment("### Response:\n"), Segment("Hi there", target=True)])
    assert [tok.id_to_token(i) for i in s.ids] == ["###", "ĠResponse", ":", "Ċ", "Hi", "Ġthere", "<|endoftext|>"]
    assert s.loss_mask.tolist() == [0, 0, 0, 0, 1, 1, 1]
    assert s.ids.dtype == np.int64 and s.loss_mask.dtype == np.uint8


def test_prompt_only_trains_on_eod_alone(make_tokenizer):
    s, _, info = encode(make_tokenizer(), [Segment("Hello there")])
    assert s.loss_mask.tolist() == [0] * (s.ids.size - 1) + [1]
    assert s.ids[-1] == info.eod_id


def test_train_on_prompt(make_tokenizer):
    d = make_tokenizer(["<|endoftext|>", "<s>"], bos="<s>")
    s, tok, info = encode(d, [Segment("Hello there, "), Segment("fine", target=True)], train_on_prompt=True)
    assert s.ids[0] == info.bos_id
    assert s.loss_mask.tolist() == [0] + [1] * (s.ids.size - 1)  # everything but the BOS


@pytest.mark.parametrize("seed", range(15))
def test_mask_follows_the_last_character_rule(make_tokenizer, seed):
    """A token is a target iff the last character it covers lies in a target segment; then one EOD target."""
    rng = np.random.default_rng(seed)
    d = make_tokenizer()
    words = ["Hello", "there", ",", "how", "are", "you", "today", "?", "The", "quick", "brown", "fox", "\n", "###", "Response", ":", "5", "0123"]
    segments, target_chars = [], []
    for _ in range(int(rng.integers(1, 8))):
        text = "".join(rng.choice(words, int(rng.integers(0, 5))) + " ")
        target = bool(rng.integers(0, 2))
        segments.append(Segment(text, target))
        target_chars += [target] * len(text)
    s, tok, info = encode(d, segments)
    full = "".join(seg.text for seg in segments)
    enc = tok.encode(full)
    assert s.ids.tolist() == enc.ids + [info.eod_id]
    expected = [int(target_chars[end - 1]) if end > 0 else 0 for _, end in enc.offsets] + [1]
    if all(seg.target for seg in segments):
        expected = [int(end > 0) for _, end in enc.offsets] + [1]
    assert s.loss_mask.tolist() == expected


# -- BOS ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["Hello", "<s>Hello", "<s> Hello"])
@pytest.mark.parametrize("train_on_prompt", [False, True])
def test_post_processor_bos_exactly_once(make_tokenizer, text, train_on_prompt):
    d = make_tokenizer(["<|endoftext|>", "<s>"], bos="<s>")
    s, tok, info = encode(d, [Segment(text), Segment(" fine", target=True)], train_on_prompt)
    assert info.bos_id == tok.token_to_id("<s>")
    assert s.ids[0] == info.bos_id and (s.ids == info.bos_id).sum() == 1
    assert s.loss_mask[0] == 0  # a BOS is never a target, even when its text was in the sample
    assert s.ids[-1] == info.eod_id and (s.ids == info.eod_id).sum() == 1


@pytest.mark.parametrize("text", ["Hello", "<s>Hello"])
def test_llama2_bos_exactly_once(llama2_tokenizer, text):
    for train_on_prompt in (False, True):
        s, tok, info = encode(llama2_tokenizer.parent, [Segment(text), Segment("Hi", target=True)], train_on_prompt)
        assert info.bos_id == 1 and info.eod_id == 2 and info.eod_token == "</s>"
        assert s.ids[0] == 1 and (s.ids == 1).sum() == 1
        assert s.loss_mask[0] == 0
        assert s.ids[-1] == 2 and (s.ids == 2).sum() == 1 and s.loss_mask[-1] == 1


def test_config_requested_bos_added_once(make_tokenizer):
    d = make_tokenizer(["<|endoftext|>", "<s>"], config={"bos_token": "<s>", "add_bos_token": True})
    for text in ("Hello", "<s>Hello"):
        s, tok, info = encode(d, [Segment(text), Segment(" fine", target=True)])
        assert info.bos_id == tok.token_to_id("<s>")
        assert s.ids[0] == info.bos_id and (s.ids == info.bos_id).sum() == 1 and s.loss_mask[0] == 0
    _, info = load_tokenizer(make_tokenizer(["<|endoftext|>", "<s>"], config={"bos_token": "<s>"}))
    assert info.bos_id is None  # add_bos_token absent: no BOS


def test_post_processor_with_bos_and_eos(make_tokenizer):
    d = make_tokenizer(["<s>", "</s>"], bos="<s>", eos_post="</s>")
    s, tok, info = encode(d, [Segment("Hello"), Segment(" there", target=True)])
    assert info.bos_id == tok.token_to_id("<s>")
    assert info.eod_token == "</s>"
    assert s.ids[0] == info.bos_id and (s.ids == info.bos_id).sum() == 1 and s.loss_mask[0] == 0
    assert s.ids[-1] == info.eod_id and (s.ids == info.eod_id).sum() == 1 and s.loss_mask[-1] == 1


# -- real tokenizers, real records -----------------------------------------------------------------------


def test_alpaca_samples(real_tokenizer, helpers):
    """ids == encode(full text) + [EOD]; exactly one EOD, a target; targets decode to output exactly."""
    records = helpers.read_records("alpaca/stanford_alpaca_pr152_alpaca_5000.json")[:600]
    records = [r for r in records if r["output"].strip()]
    tok, info = load_tokenizer(real_tokenizer)
    handler = get_handler("alpaca")
    segments = [handler(r) for r in records]
    samples = SampleEncoder(tok, info).encode_batch(segments)
    texts = ["".join(s.text for s in segs) for segs in segments]
    for text, segs, record, s in zip(texts, segments, records, samples, strict=True):
        assert s.ids.tolist() == tok.encode(text).ids + [info.eod_id]
        assert s.ids.size == s.loss_mask.size
        assert set(np.unique(s.loss_mask).tolist()) <= {0, 1}
        assert (s.ids == info.eod_id).sum() == 1 and s.ids[-1] == info.eod_id and s.loss_mask[-1] == 1
        if info.bos_id is not None:
            assert s.ids[0] == info.bos_id and (s.ids == info.bos_id).sum() == 1 and s.loss_mask[0] == 0
        target_ids = s.ids[s.loss_mask == 1]
        assert helpers.decode_exact(tok, target_ids[:-1].tolist()) == record["output"]
        assert helpers.check_targets(tok, s.ids, s.loss_mask, segs, info.eod_id) == 0


def test_encode_batch_equals_one_by_one(gpt2_tokenizer):
    tok, info = load_tokenizer(gpt2_tokenizer)
    enc = SampleEncoder(tok, info)
    batch = [[Segment("a b "), Segment("c", True)], [Segment("x", True)], [Segment("")]]
    together = enc.encode_batch(batch)
    for segs, s in zip(batch, together, strict=True):
        alone = enc.encode_batch([segs])[0]
        assert s.ids.tolist() == alone.ids.tolist() and s.loss_mask.tolist() == alone.loss_mask.tolist()
    assert together[2].ids.tolist() == [info.eod_id]  # an empty text is just an EOD


def test_tokenizer_info_is_json(gpt2_tokenizer):
    _, info = load_tokenizer(gpt2_tokenizer)
    assert json.loads(json.dumps(info.to_json()))["eod_id"] == 50256


def test_ordinary_token_as_eod_is_not_swallowed(make_tokenizer):
    """With an ordinary --eod-token, an answer ending in that token keeps it and still gets its own EOD."""
    d = make_tokenizer()
    with_bang, tok, info = encode(d, [Segment("Q: "), Segment("Hi!", target=True)], eod_token="!")
    without, _, _ = encode(d, [Segment("Q: "), Segment("Hi", target=True)], eod_token="!")
    assert with_bang.ids.tolist() == tok.encode("Q: Hi!").ids + [info.eod_id]
    assert with_bang.ids.tolist() != without.ids.tolist()
    assert with_bang.ids[-1] == info.eod_id and with_bang.loss_mask[-1] == 1


# -- the offset-free fast path (every token a target) ----------------------------------------------------

FAST_TEXTS = ["Hello world", "", " ", "<s>Hi", "x </s> y", "<|endoftext|> inside", "tail <|endoftext|>",
              "Ünïcödé 中文 🙂", "a\n\nb\tc", "!"]


def _both_paths(tok, info, batch, train_on_prompt=False):
    fast = SampleEncoder(tok, info, train_on_prompt)
    slow = SampleEncoder(tok, info, train_on_prompt)
    slow._encode_fast = None  # force encode_batch + character offsets
    return fast.encode_flat(batch), slow.encode_flat(batch)


@pytest.mark.parametrize("kind", ["plain", "bos", "bos+eos", "llama2", "gpt2", "bang-eod"])
def test_fast_path_equals_offsets_path(make_tokenizer, gpt2_tokenizer, llama2_tokenizer, kind):
    d = {"plain": lambda: make_tokenizer(["<|endoftext|>", "<s>", "</s>"]),
         "bos": lambda: make_tokenizer(["<|endoftext|>", "<s>"], bos="<s>"),
         "bos+eos": lambda: make_tokenizer(["<s>", "</s>"], bos="<s>", eos_post="</s>"),
         "llama2": lambda: llama2_tokenizer, "gpt2": lambda: gpt2_tokenizer,
         "bang-eod": lambda: make_tokenizer()}[kind]()
    tok, info = load_tokenizer(d, "!" if kind == "bang-eod" else None)
    enc = SampleEncoder(tok, info)
    assert enc._affix == {"plain": (0, 0), "bos": (1, 0), "bos+eos": (1, 1), "llama2": (1, 0), "gpt2": (0, 0),
                          "bang-eod": (0, 0)}[kind]
    batch = [[Segment(t, target=True)] for t in FAST_TEXTS]
    (fi, fm, fl), (si, sm, sl) = _both_paths(tok, info, batch)
    assert fl.tolist() == sl.tolist() and fi.tolist() == si.tolist() and fm.tolist() == sm.tolist()
    # --train-on-prompt makes mixed segments all-target: the fast path again
    mixed = [[Segment("Q: "), Segment(t, target=True)] for t in FAST_TEXTS]
    (fi, fm, fl), (si, sm, sl) = _both_paths(tok, info, mixed, train_on_prompt=True)
    assert fl.tolist() == sl.tolist() and fi.tolist() == si.tolist() and fm.tolist() == sm.tolist()


def test_fast_path_on_real_records(real_tokenizer, helpers):
    tok, info = load_tokenizer(real_tokenizer)
    records = helpers.read_records("alpaca/stanford_alpaca_pr152_alpaca_5000.json")[:800]
    batch = [[Segment(f"{r['instruction']}\n{r['input']}\n{r['output']}", target=True)] for r in records]
    (fi, fm, fl), (si, sm, sl) = _both_paths(tok, info, batch)
    assert np.array_equal(fl, sl) and np.array_equal(fi, si) and np.array_equal(fm, sm)


def test_word_cache_does_not_change_ids(gpt2_tokenizer):
    texts = [f"word{i} and more words {i * 7919}" for i in range(3000)]
    plain = Tokenizer.from_file(str(gpt2_tokenizer))
    tok, info = load_tokenizer(gpt2_tokenizer)
    SampleEncoder(tok, info)  # enlarges the cache
    assert [e.ids for e in tok.encode_batch(texts)] == [e.ids for e in plain.encode_batch(texts)]


# -- the EOD ends documents, not chat turns --------------------------------------------------------------

LLAMA3_TEMPLATE = ("{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                   "{{ m['content'] }}<|eot_id|>{% endfor %}")


def test_turn_terminator_eos_gives_way_to_the_document_end_token(make_tokenizer):
    """Llama-3-style: eos_token <|eot_id|> ends every turn; <|end_of_text|> ends documents."""
    d = make_tokenizer(["<|end_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"],
                       config={"eos_token": "<|eot_id|>", "chat_template": LLAMA3_TEMPLATE})
    tok, info = load_tokenizer(d)
    assert (info.eod_token, info.eod_source) == ("<|end_of_text|>", "document-end token")
    assert "'<|eot_id|>' ends chat turns" in info.eod_reason and info.eod_special


def test_template_that_writes_eos_after_turns_marks_it_a_turn_terminator(make_tokenizer):
    template = "{% for m in messages %}<t>{{ m['content'] }}{{ eos_token }}{% endfor %}"
    d = make_tokenizer(["<|endoftext|>", "<eos>", "<t>"], config={"eos_token": "<eos>", "chat_template": template})
    assert load_tokenizer(d)[1].eod_token == "<|endoftext|>"


def test_eos_written_once_at_the_end_is_a_document_end(make_tokenizer):
    """Phi-3-style: turns end with <|end|>, eos_token only closes the whole conversation."""
    template = "{% for m in messages %}<t>{{ m['content'] }}<|end|>{% endfor %}{{ eos_token }}"
    d = make_tokenizer(["<|endoftext|>", "<|end|>", "<t>", "</s>"],
                       config={"eos_token": "<|endoftext|>", "chat_template": template})
    _, info = load_tokenizer(d)
    assert (info.eod_token, info.eod_source, info.eod_reason) == ("<|endoftext|>", "tokenizer_config.json",
                                                                  "tokenizer_config.json's eos_token")


def test_turn_terminator_without_alternative_is_kept_and_said(make_tokenizer):
    d = make_tokenizer(["<|im_end|>"], config={"eos_token": "<|im_end|>"})
    _, info = load_tokenizer(d)
    assert info.eod_token == "<|im_end|>" and "no other document-end token" in info.eod_reason


@pytest.mark.parametrize(("name", "eod", "source"), [
    ("qwen2.5-instruct", "<|endoftext|>", "document-end token"),
    ("phi-3-mini-instruct", "<|endoftext|>", "tokenizer_config.json"),
    ("mistral-nemo-instruct-2407", "</s>", "tokenizer_config.json"),
    ("gpt2", "<|endoftext|>", "well-known"),
])
def test_eod_of_the_shared_chat_tokenizers(helpers, name, eod, source):
    directory = helpers.data_file(f"tokenizers/{name}/tokenizer.json").parent
    _, info = load_tokenizer(directory)
    assert (info.eod_token, info.eod_source) == (eod, source)


def test_template_ending_with_a_special_eod_is_not_doubled(make_tokenizer):
    """A text that ends with the special EOD ends the sample: one EOD, a target, never doubled."""
    d = make_tokenizer(["<|endoftext|>", "<|im_end|>", "<|im_start|>"])
    tok, info = load_tokenizer(d, eod_token="<|im_end|>")
    segs = [Segment("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"), Segment("Hello<|im_end|>", True)]
    (sample,) = SampleEncoder(tok, info).encode_batch([segs])
    assert int((sample.ids == info.eod_id).sum()) == 2  # the user turn's terminator, and the sample's end
    assert sample.ids[-1] == info.eod_id and sample.ids[-2] != info.eod_id and sample.loss_mask[-1] == 1
    # chatml ends the last turn "<|im_end|>\n" (as Qwen's template and TRL's EOS appending do): EOD after it
    segs = get_handler("alpaca", _opts(template="chatml"))({"instruction": "Hi", "output": "Hello"})
    (sample,) = SampleEncoder(tok, info).encode_batch([segs])
    assert int((sample.ids == info.eod_id).sum()) == 3 and sample.ids[-1] == info.eod_id


def test_ordinary_token_as_eod_is_still_appended(make_tokenizer):
    """An --eod-token that is a plain vocabulary entry is content when the text ends with it."""
    d = make_tokenizer(["<|endoftext|>"])
    tok, _ = load_tokenizer(d)
    bang = next(t for t in ("!", "Ġ!") if tok.token_to_id(t) is not None)
    tok, info = load_tokenizer(d, eod_token=bang)
    assert not info.eod_special
    (sample,) = SampleEncoder(tok, info).encode_batch([[Segment("Hello!", target=True)]])
    assert sample.ids[-1] == sample.ids[-2] == info.eod_id


def _opts(**kw):
    from packer.handlers import HandlerOptions

    return HandlerOptions(**kw)
