"""`packer verify`: passes on good builds, names every kind of corruption, exits 1 through the CLI."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from click.testing import CliRunner

from packer.cli import main
from packer.manifest import loss_mask_prefix, manifest_path, read_manifest
from packer.verify import verify

ALPACA = "alpaca/stanford_alpaca_pr152_alpaca_5000.json"
GOOD = [  # eod = 0, seq_length 8
    [([5, 0], [1, 1]), ([6, 7, 0], [0, 1, 1])],
    [([7, 8, 9, 0], [0, 0, 1, 1])],
]


def errors_of(prefix, **kw) -> str:
    rep = verify(prefix, **kw)
    assert not rep.ok
    return "\n".join(rep.errors)


@pytest.fixture
def good(tmp_path, helpers):
    prefix = tmp_path / "good"
    helpers.write_dataset(prefix, GOOD, eod=0, vocab=10, seq_length=8)
    return prefix


def test_good_hand_build(good):
    rep = verify(good)
    assert rep.ok, rep.errors
    assert (rep.stats["packs"], rep.stats["samples"], rep.stats["tokens"], rep.stats["target_tokens"]) == (2, 3, 9, 6)


def test_good_real_build(real_build):
    prefix = real_build("alpaca", ALPACA, "gpt2", 2048, "bfd", on_error="skip")
    rep = verify(prefix)
    assert rep.ok, rep.errors
    m = read_manifest(prefix)
    assert rep.stats["packs"] == m["counts"]["packs"] and rep.stats["tokens"] == m["counts"]["tokens"]


def flip_byte(path, offset=-1):
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x01
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("name", ["good.bin", "good.idx", "good_loss_mask.bin", "good_loss_mask.idx"])
def test_flipped_byte_fails_checksum(good, name):
    flip_byte(good.parent / name, offset=40 if name.endswith(".idx") else 0)
    assert f"{name}: sha256 differs" in errors_of(good)


def test_flipped_byte_in_real_build(real_build, copy_build):
    prefix = copy_build(real_build("alpaca", ALPACA, "gpt2", 2048, "bfd", on_error="skip"))
    flip_byte(Path(prefix + ".bin"), offset=12345)
    assert "sha256 differs" in errors_of(prefix)


def test_truncated_idx(good, helpers):
    idx = good.parent / "good.idx"
    idx.write_bytes(idx.read_bytes()[:-8])
    assert "good.idx: " in errors_of(good) and "manifest says" in errors_of(good)
    helpers.refresh_checksums(good)  # even with a manifest that agrees, the index itself is inconsistent
    assert "truncated or corrupt" in errors_of(good)
    idx.write_bytes(b"")
    helpers.refresh_checksums(good)
    assert "too short" in errors_of(good)


@pytest.mark.parametrize("key", ["samples", "tokens", "packs", "target_tokens"])
def test_modified_manifest_count(good, key):
    m = read_manifest(good)
    m["counts"][key] += 1
    manifest_path(good).write_text(json.dumps(m))
    assert f"good.json: counts.{key} = " in errors_of(good)


def test_sequence_without_eod(tmp_path, helpers):
    prefix = tmp_path / "bad"
    helpers.write_dataset(prefix, [[([5, 6], [1, 1]), ([6, 0], [0, 1])]], eod=0, vocab=10, seq_length=8)
    assert "1 samples do not end with EOD id 0" in errors_of(prefix)
    m = helpers.write_dataset(prefix, [[([6, 0], [0, 1])], [([5, 6], [1, 1])]], eod=0, vocab=10, seq_length=2,
                              unterminated=1)  # a split chunk may lack its EOD, and the manifest says so
    m["counts"] |= {"records": 1, "split": 1}  # one record, split into two chunks
    helpers.refresh_checksums(prefix, m)
    assert verify(prefix).ok, verify(prefix).errors
    # ... but only at the end of its pack: an EOD scan would otherwise glue it to the next sample
    helpers.write_dataset(prefix, [[([5, 6], [1, 1]), ([6, 0], [0, 1])]], eod=0, vocab=10, seq_length=8,
                          unterminated=1)
    assert "1 samples without EOD (split chunks) are followed by another sample" in errors_of(prefix)


def test_eod_byte_patched_in_place(good, helpers):
    """Patch the last token of the first sample (an EOD) and recompute checksums: the contents check catches it."""
    bin_path = good.parent / "good.bin"
    raw = bytearray(bin_path.read_bytes())
    raw[2:4] = struct.pack("<H", 3)  # uint16 ids: sample 0 is ids[0:2]
    bin_path.write_bytes(bytes(raw))
    helpers.refresh_checksums(good)
    assert "do not end with EOD" in errors_of(good)


@pytest.mark.parametrize(("packs", "message"), [
    ([[([5, 0], [1, 0])]], "EOD tokens have loss mask 0"),
    ([[([12, 0], [1, 1])]], "token ids are >= the vocabulary size 10"),
    ([[([5, 0], [2, 1])]], "loss-mask values are not 0/1"),
    ([[([1, 2, 3, 4, 0], [1] * 5), ([1, 2, 3, 4, 0], [1] * 5)]], "1 packs exceed --seq-length 8"),
    ([[([5, 0], [1, 1])], []], "1 packs are empty"),
])
def test_bad_contents(tmp_path, helpers, packs, message):
    prefix = tmp_path / "bad"
    helpers.write_dataset(prefix, packs, eod=0, vocab=10, seq_length=8)
    assert message in errors_of(prefix)


def test_mask_index_disagrees(good, helpers):
    helpers.write_dataset(good.parent / "other", [[([5, 0], [1, 1])], [([6, 7, 0], [0, 1, 1]), ([7, 8, 9, 0], [0] * 4)]],
                          eod=0, vocab=10, seq_length=8)
    for ext in ("bin", "idx"):
        (good.parent / f"good_loss_mask.{ext}").write_bytes((good.parent / f"other_loss_mask.{ext}").read_bytes())
    helpers.refresh_checksums(good)
    assert "good_loss_mask.idx: document indices differ from" in errors_of(good)


def test_missing_files_and_manifest(good, helpers):
    (good.parent / "good_loss_mask.idx").unlink()
    assert "good_loss_mask.idx: missing" in errors_of(good)
    manifest_path(good).unlink()
    assert "did not complete" in errors_of(good)
    assert "did not complete" in errors_of(good.parent / "nonexistent")


def test_malformed_manifest_is_reported_not_raised(good):
    m = read_manifest(good)
    del m["files"]
    manifest_path(good).write_text(json.dumps(m))
    assert "malformed manifest" in errors_of(good)
    m["format"] = "something.else"
    manifest_path(good).write_text(json.dumps(m))
    assert "is not 'packer.packed.v1'" in errors_of(good)


def test_no_checksums_still_checks_structure(good, helpers):
    bin_path = good.parent / "good.bin"
    raw = bytearray(bin_path.read_bytes())
    raw[2:4] = struct.pack("<H", 3)
    bin_path.write_bytes(bytes(raw))
    assert "do not end with EOD" in errors_of(good, checksums=False)
    assert "sha256" in errors_of(good)


def test_cli_exit_codes(good):
    runner = CliRunner()
    ok = runner.invoke(main, ["verify", str(good)])
    assert ok.exit_code == 0, ok.output
    assert ok.output.startswith(f"OK {good}: 2 packs, 3 samples, 9 tokens")
    flip_byte(good.parent / "good.bin", 0)
    bad = runner.invoke(main, ["verify", str(good)])
    assert bad.exit_code == 1
    assert "error: " in bad.stderr and "sha256 differs" in bad.stderr
    assert "Traceback" not in bad.output
    assert runner.invoke(main, ["verify", str(good), "--no-checksums"]).exit_code == 0  # only a non-EOD id changed
    missing = runner.invoke(main, ["verify", str(loss_mask_prefix(good)) + "_nope"])
    assert missing.exit_code == 1 and "did not complete" in missing.stderr


@pytest.mark.parametrize("text", ["[]", "null", '"x"', "7", "[" * 100_000 + "]" * 100_000, '{"format": "packer.packed.v1"}',
                                  '{"format": "packer.packed.v1", "config": [], "tokenizer": null, "counts": "x"}'])
def test_malformed_manifest_never_raises(good, text):
    manifest_path(good).write_text(text)
    assert "good.json: " in errors_of(good)
    r = CliRunner().invoke(main, ["verify", str(good)])
    assert r.exit_code == 1 and "Traceback" not in r.output


def test_every_bad_field_is_listed(good):
    m = read_manifest(good)
    m["config"]["seq_length"] = 10**30
    m["counts"]["samples"] = "3"
    m["tokenizer"]["pad_id"] = -1
    del m["packing"]
    manifest_path(good).write_text(json.dumps(m))
    errors = errors_of(good)
    for what in ("config.seq_length is 1000000000000000000000000000000, expected an integer >= 1",
                 "counts.samples is '3', expected an integer >= 0", "tokenizer.pad_id is -1",
                 "section 'packing' is missing"):
        assert what in errors


def test_structure_is_reported_with_failed_checksums(good):
    idx = good.parent / "good.idx"
    raw = bytearray(idx.read_bytes())
    raw[34] ^= 0x04  # the first sequence length: the pointers after it no longer follow
    idx.write_bytes(bytes(raw))
    errors = errors_of(good)
    assert "good.idx: sha256 differs" in errors and "good.idx: sequence pointers: pointer 1 is 4" in errors


@pytest.mark.parametrize(("edit", "message"), [
    (lambda m: m["config"].update(seq_length=9), "packing.seq_length = 8, but config.seq_length says 9"),
    (lambda m: m["config"].update(seq_length=4), "packs exceed --seq-length 4"),
    (lambda m: m["packing"].update(lower_bound=3), "packing.lower_bound = 3, but the index says 2"),
    (lambda m: m["tokenizer"].update(vocab_size=9), "token ids are >= the vocabulary size 9"),
    (lambda m: m["tokenizer"].update(pad_id=10), "tokenizer.pad_id = 10 is outside the vocabulary of 10 ids"),
    (lambda m: m.update(token_dtype="int32"), "good.idx: dtype: uint16, but the manifest's token_dtype is 'int32'"),
    (lambda m: m["counts"].update(unterminated=1), "counts.unterminated = 1 and counts.truncated = 0"),
    (lambda m: m["counts"].update(records=4), "counts: 4 records - 0 skipped - 0 dropped should end 4 samples"),
    (lambda m: m["counts"].update(skipped=1), "should end 2 samples, but the index has 3"),
    (lambda m: m["counts"].update(interior_eod=1), "counts.interior_eod = 1, but the data has 0"),
    (lambda m: m["files"].update({"extra.bin": {"bytes": 1, "sha256": "0" * 64}}), "files lists 'extra.bin'"),
])
def test_manifest_fields_against_the_data(good, edit, message):
    m = read_manifest(good)
    edit(m)
    manifest_path(good).write_text(json.dumps(m))
    assert message in errors_of(good)


@pytest.fixture
def tiny_build(tmp_path, make_tokenizer, helpers):
    from packer.build import build
    from packer.config import BuildConfig

    tok = make_tokenizer(("<|endoftext|>", "<pad>"), config={"eos_token": "<|endoftext|>", "pad_token": "<pad>"})
    records = [{"instruction": f"Add {i} and 1.", "input": "", "output": str(i + 1)} for i in range(6)]
    helpers.write_jsonl(tmp_path / "in.jsonl", records)
    build(BuildConfig(handler="alpaca", inputs=(str(tmp_path / "in.jsonl"),), tokenizer=str(tok), seq_length=256,
                      output_prefix=str(tmp_path / "b"), tokenizer_backend="hf"), progress=False)
    return tmp_path / "b", tok / "tokenizer.json"


def test_tokenizer_fields_against_the_tokenizer_file(tiny_build):
    prefix, tok = tiny_build
    rep = verify(prefix)
    assert rep.ok and rep.stats["tokenizer"] == f"{tok.resolve()}: checked", rep.errors
    good = read_manifest(prefix)
    for key, value, message in (("pad_id", 0, "tokenizer.pad_id = 0, but"), ("eod_token", "<pad>", "eod_token"),
                                ("sha256", "0" * 64, "the tokenizer changed since the build, or the manifest was edited")):
        manifest_path(prefix).write_text(json.dumps(good | {"tokenizer": good["tokenizer"] | {key: value}}))
        assert message in errors_of(prefix)
    manifest_path(prefix).write_text(json.dumps(good))
    tok.write_text(tok.read_text() + " ")  # the file changed since the build
    assert "hashes to" in errors_of(prefix)
    tok.unlink()  # verify also runs where the tokenizer is not: it says what it could not check
    rep = verify(prefix)
    assert rep.ok and "not at hand" in rep.stats["tokenizer"]
