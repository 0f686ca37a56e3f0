"""`packer merge` verifies every input first: a build that fails `packer verify` is refused, named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from packer.dataset import PackedDataset
from packer.manifest import manifest_path
from packer.merge import MergeError, merge
from packer.verify import verify

A = [[([5, 0], [1, 1]), ([6, 7, 0], [0, 1, 1])], [([7, 8, 9, 0], [0, 0, 1, 1])]]  # eod 0, seq_length 8
B = [[([1, 2, 3, 4, 5, 6, 0], [0] * 6 + [1])], [([3, 0], [1, 1]), ([4, 0], [0, 1])]]


@pytest.fixture
def inputs(tmp_path, helpers) -> tuple[Path, Path]:
    for name, packs in (("a", A), ("b", B)):
        helpers.write_dataset(tmp_path / name, packs, eod=0, vocab=10, seq_length=8)
    return tmp_path / "a", tmp_path / "b"


def test_merged_hand_builds_verify(inputs, tmp_path):
    m = merge(str(tmp_path / "ab"), [str(p) for p in inputs])
    rep = verify(tmp_path / "ab")
    assert rep.ok, rep.errors
    assert m["packing"] | {"efficiency": 0} == {  # recomputed from the copied index, not the inputs' manifests
        "algorithm": "merge(none)", "seq_length": 8, "packs": 4, "lower_bound": 3, "efficiency": 0,
        "max_pack_tokens": 7, "min_pack_tokens": 4, "max_docs_per_pack": 2}
    assert m["eod_scan"] == {"agrees": 4, "packs": 4}  # measured by verify: the hand inputs claim nothing
    assert [p.ids.tolist() for p in PackedDataset(tmp_path / "ab")] == [
        [5, 0, 6, 7, 0], [7, 8, 9, 0], [1, 2, 3, 4, 5, 6, 0], [3, 0, 4, 0]]


def test_refuses_an_input_with_a_bad_checksum(inputs, tmp_path):
    bin_path = Path(f"{inputs[1]}.bin")
    raw = bytearray(bin_path.read_bytes())
    raw[0] ^= 1  # a token id changes; nothing structural
    bin_path.write_bytes(bytes(raw))
    with pytest.raises(MergeError, match=rf"{inputs[1]} fails `packer verify`: .*b.bin: sha256 differs"):
        merge(str(tmp_path / "ab"), [str(p) for p in inputs])
    assert not list(tmp_path.glob("ab*"))


def test_refuses_an_input_whose_manifest_disagrees_with_its_data(inputs, tmp_path):
    m = json.loads(manifest_path(inputs[0]).read_text())
    m["counts"]["target_tokens"] += 1  # the merged manifest would sum a wrong count and pass verify
    manifest_path(inputs[0]).write_text(json.dumps(m))
    with pytest.raises(MergeError, match=r"a fails `packer verify`: .*counts.target_tokens = 7, but the data has 6"):
        merge(str(tmp_path / "ab"), [str(p) for p in inputs])


def test_refuses_an_input_with_a_broken_index(inputs, tmp_path, helpers):
    idx = Path(f"{inputs[0]}_loss_mask.idx")
    idx.write_bytes(idx.read_bytes()[:-8])
    helpers.refresh_checksums(inputs[0])  # checksums that agree do not make the index sound
    with pytest.raises(MergeError, match=r"a fails `packer verify`: .*a_loss_mask.idx: file size"):
        merge(str(tmp_path / "ab"), [str(p) for p in inputs])
