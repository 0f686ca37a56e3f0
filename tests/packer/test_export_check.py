"""`packer verify OUT` on exports: checksums of every file, then each format's own invariants."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from packer.export import TARGETS, ExportConfig, export
from packer.indexed import IndexedDataset
from packer.verify import verify

from .conftest import MOSS


@pytest.fixture(scope="module")
def moss(real_build_module) -> str:
    return real_build_module("moss", MOSS, seq_length=4096, on_error="skip")


@pytest.fixture(scope="module")
def real_build_module(tmp_path_factory):
    from packer.build import build
    from packer.config import BuildConfig

    from .conftest import data_file

    def get(handler, data, **kw):
        prefix = tmp_path_factory.mktemp("src") / handler
        build(BuildConfig(handler=handler, inputs=(str(data_file(data)),),
                          tokenizer=str(data_file("tokenizers/gpt2/tokenizer.json")), output_prefix=str(prefix),
                          **kw), progress=False)
        return str(prefix)

    return get


def refresh(out: Path, name: str) -> None:
    m = json.loads(out.with_suffix(".json").read_text())
    data = (out.parent / name).read_bytes()
    m["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    out.with_suffix(".json").write_text(json.dumps(m))


@pytest.mark.parametrize("to", TARGETS)
def test_exports_verify_and_corruption_is_caught(moss, tmp_path, to):
    out = tmp_path / "x"
    m = export(ExportConfig(moss, to, str(out)))
    rep = verify(out)
    assert rep.ok, rep.errors
    assert rep.stats["export"] == to
    name = sorted(m["files"])[0]
    path = tmp_path / name
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(raw))
    assert any("sha256 differs" in e for e in verify(out).errors)
    path.write_bytes(bytes(raw[:-10]))
    assert any("bytes, manifest says" in e for e in verify(out).errors)


def test_mindspeed_structure_is_checked_even_with_fresh_checksums(moss, tmp_path):
    out = tmp_path / "ms"
    export(ExportConfig(moss, "mindspeed", str(out)))
    labels = IndexedDataset(str(out) + "_packed_labels_document")
    name = "ms_packed_labels_document.bin"
    values = np.fromfile(tmp_path / name, np.int32)
    values[int(labels.sequence_pointers[2]) // 4 + 7] = 12345  # a label that is not its token
    values.tofile(tmp_path / name)
    refresh(out, name)
    assert any("break the MindSpeed layout" in e for e in verify(out).errors)


def test_missing_export_file(moss, tmp_path):
    out = tmp_path / "br"
    export(ExportConfig(moss, "bridge", str(out)))
    (tmp_path / "br_metadata.jsonl").unlink()
    assert any("missing" in e for e in verify(out).errors)


def test_malformed_export_manifest_is_an_error_not_a_traceback(moss, tmp_path):
    out = tmp_path / "hf"
    export(ExportConfig(moss, "hf", str(out)))
    m = json.loads(out.with_suffix(".json").read_text())
    for broken in ({k: v for k, v in m.items() if k != "source"}, m | {"files": {"x": 5}}, m | {"files": None}):
        out.with_suffix(".json").write_text(json.dumps(broken))
        rep = verify(out)
        assert not rep.ok and any("manifest" in e for e in rep.errors), rep.errors


def test_files_beside_an_export_that_a_trainer_would_load_are_errors(moss, tmp_path):
    hf = tmp_path / "hf"
    export(ExportConfig(moss, "hf", str(hf)))
    (hf / "train-00000-of-00002.parquet").write_bytes((hf / "train-00000-of-00001.parquet").read_bytes())
    assert any("not in its manifest" in e for e in verify(hf).errors)
    ms = tmp_path / "ms"
    export(ExportConfig(moss, "mindspeed", str(ms)))
    for ext in ("bin", "idx"):
        (tmp_path / f"ms_packed_extra_document.{ext}").write_bytes((tmp_path / f"ms_packed_labels_document.{ext}")
                                                                   .read_bytes())
    assert any("more fields" in e for e in verify(ms).errors)
