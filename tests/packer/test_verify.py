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
    assert f"manifest counts.{key} = " in errors_of(good)


def test_sequence_without_eod(tmp_path, helpers):
    prefix = tmp_path / "bad"
    helpers.write_dataset(prefix, [[([5, 6], [1, 1]), ([6, 0], [0, 1])]], eod=0, vocab=10, seq_length=8)
    assert "1 samples do not end with EOD id 0" in errors_of(prefix)
    helpers.write_dataset(prefix, [[([6, 0], [0, 1]), ([5, 6], [1, 1])]], eod=0, vocab=10, seq_length=8,
                          unterminated=1)  # a split chunk may lack its EOD, and the manifest says so
    assert verify(prefix).ok
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
    assert "token and loss-mask" in errors_of(good)


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
