"""`PREFIX.json`: the build manifest, written last, so its presence means the build completed.

`check_manifest` is the manifest's schema: every field a reader or `packer verify` relies on, with its type and
range, so that a hand-edited, truncated or foreign manifest is reported field by field and never reaches the
checks that use it (a manifest that is an array, `null`, nested 100,000 deep or holds 10**30 is an error, not a
crash).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from datetime import datetime
from pathlib import Path
from typing import Any

from packer.overflow import POLICIES

FORMAT = "packer.packed.v1"
LOSS_MASK_SUFFIX = "_loss_mask"
_MAX_INT = 1 << 62  # larger counts, sizes and ids are corrupt (and would overflow the int64 index arithmetic)


class DatasetError(ValueError):
    """A build whose manifest or files fail a check: the one error the readers (`PackedDataset`,
    `IndexedDataset`, `read_manifest`) raise on bad data. `problems` lists each failed check, naming its file;
    the message adds the fix."""

    def __init__(self, problems: str | list[str], prefix: str | os.PathLike | None = None):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.prefix = None if prefix is None else os.fspath(prefix)
        text = "; ".join(self.problems[:3]) + (f"; and {len(self.problems) - 3} more" if len(self.problems) > 3
                                               else "")
        if self.prefix is not None:
            text += f"; run `packer verify {self.prefix}` for the full report"
        super().__init__(text)


class MissingFileError(DatasetError, FileNotFoundError):
    """A file of the build does not exist (also a FileNotFoundError, for callers that catch that)."""


def manifest_path(prefix: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(prefix)}.json")


def loss_mask_prefix(prefix: str | os.PathLike) -> str:
    return f"{os.fspath(prefix)}{LOSS_MASK_SUFFIX}"


def output_files(prefix: str | os.PathLike) -> list[Path]:
    """The four data files of a build, in the order they are committed (each .idx after its .bin)."""
    p, m = os.fspath(prefix), loss_mask_prefix(prefix)
    return [Path(p + ".bin"), Path(m + ".bin"), Path(m + ".idx"), Path(p + ".idx")]


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_entries(files: dict[str, Path], known: dict[Path, str] | None = None) -> dict[str, dict[str, Any]]:
    """The manifest's `files` section: size and sha256 of each data file, keyed by its final name
    (`files` maps that name to where the bytes are now, e.g. a temporary file not yet renamed). `known`: the
    sha256 of files hashed as they were written (IndexedDatasetWriter.sha256); the others are read."""
    known = known or {}
    return {name: {"bytes": Path(p).stat().st_size, "sha256": known.get(Path(p)) or sha256_file(p)}
            for name, p in files.items()}


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}-{os.urandom(4).hex()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, sort_keys=False, ensure_ascii=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_json_object(path: str | os.PathLike, prefix: str | os.PathLike | None = None) -> dict[str, Any]:
    """A JSON object from `path`; anything else (unreadable, not UTF-8, not JSON, nested too deeply for the
    parser, an array, null, ...) raises DatasetError naming the file (and `packer verify PREFIX` as the fix)."""
    path = Path(path)
    if not path.exists():
        raise MissingFileError(f"{path} does not exist", prefix)
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetError(f"{path}: not a readable JSON file ({type(e).__name__}: {e})", prefix) from e
    except RecursionError as e:
        raise DatasetError(f"{path}: not a manifest (JSON nested too deeply to parse)", prefix) from e
    if not isinstance(obj, dict):
        raise DatasetError(f"{path}: a manifest is a JSON object, this file holds {_kind(obj)}", prefix)
    return obj


def read_manifest(prefix: str | os.PathLike) -> dict[str, Any]:
    path = manifest_path(prefix)
    if not path.exists():
        raise MissingFileError(
            f"{path} does not exist: the build of {os.fspath(prefix)!r} did not complete (the manifest is "
            "written last), or the prefix is wrong", prefix
        )
    manifest = load_json_object(path, prefix)
    if manifest.get("format") != FORMAT:
        raise DatasetError(f"{path}: format {_short(manifest.get('format'))} is not {FORMAT!r}", prefix)
    return manifest


# -- schema ------------------------------------------------------------------------------------------------
# Section -> required. Fields: dotted path -> (kind, required when its section is present). Sections and
# fields not named here are not checked (older builds and hand-written manifests lack some; newer add some).
SECTIONS = {"config": True, "tokenizer": True, "counts": True, "packing": True, "files": True, "eod": False,
             "eod_scan": False, "seconds": False, "context_parallel": False, "attention_cost": False}
FIELDS: dict[str, tuple[str, bool]] = {
    "packer_version": ("str", False),
    "created": ("time", False),
    "token_dtype": ("str", True),
    "config.seq_length": ("positive", True),
    "config.overflow_effective": ("policy", False),
    "config.num_shards": ("positive", False),
    "config.shard_index": ("count", False),
    "config.pack": ("str", False),
    "config.streaming": ("bool", False),
    "config.eod_token": ("str?", False),
    "config.cp_size": ("positive", False),
    "config.tp_size": ("positive", False),
    "tokenizer.path": ("str", False),
    "tokenizer.sha256": ("str", False),
    "tokenizer.vocab_size": ("positive", True),
    "tokenizer.eod_token": ("str", False),
    "tokenizer.eod_id": ("count", True),
    "tokenizer.eod_source": ("str", False),
    "tokenizer.eod_reason": ("str", False),
    "tokenizer.eod_special": ("bool", False),
    "tokenizer.bos_id": ("count?", False),
    "tokenizer.pad_id": ("count?", False),
    "counts.samples": ("count", True),
    "counts.tokens": ("count", True),
    "counts.target_tokens": ("count", True),
    "counts.packs": ("count", True),
    "eod.token": ("str", True),
    "eod.id": ("count", True),
    "eod.source": ("str", False),
    "eod.reason": ("str", False),
    "eod.interior": ("count", True),
    "eod.interior_cause": ("str?", False),
    "eod_scan.agrees": ("count", True),
    "eod_scan.packs": ("count", True),
    "packing.algorithm": ("str", True),
    "packing.seq_length": ("positive", True),
    "packing.packs": ("count", True),
    "packing.lower_bound": ("count", False),
    "packing.efficiency": ("fraction", False),
    "packing.max_pack_tokens": ("count", False),
    "packing.min_pack_tokens": ("count", False),
    "packing.max_docs_per_pack": ("count", False),
    # Only in builds made with --cp-size/--tp-size (packer/cp.py): what every reader needs to pad the samples.
    "context_parallel.cp_size": ("positive", True),
    "context_parallel.tp_size": ("positive", True),
    "context_parallel.multiple": ("positive", True),
    "context_parallel.rule": ("str", False),
    "context_parallel.pad_id": ("count", False),
    "context_parallel.real_tokens": ("count", True),
    "context_parallel.padded_tokens": ("count", True),
    "context_parallel.max_padded_pack_tokens": ("count", False),
    "attention_cost.multiple": ("positive", True),
    "attention_cost.total": ("count", True),
    "attention_cost.max": ("count", True),
    "attention_cost.mean": ("number", False),
    "attention_cost.p50": ("number", False),
    "attention_cost.p99": ("number", False),
}
_OPEN_SECTIONS = {"counts": "count", "seconds": "seconds"}  # every entry of these has this kind
_HEX64 = re.compile(r"[0-9a-f]{64}")
_WHAT = {"count": "an integer >= 0", "positive": "an integer >= 1", "count?": "null or an integer >= 0",
         "str": "a string", "str?": "null or a string", "bool": "true or false", "policy": f"one of {POLICIES}",
         "time": "an ISO 8601 time", "fraction": "a number in [0, 1]", "seconds": "a number >= 0", "number": "a number >= 0",
         "sha256": "64 hex digits", "object": "an object", "list": "an array"}


def _valid(kind: str, v: Any) -> bool:
    is_int = isinstance(v, int) and not isinstance(v, bool)
    is_num = (is_int or isinstance(v, float)) and not isinstance(v, bool) and math.isfinite(v)
    if kind.endswith("?"):
        return v is None or _valid(kind[:-1], v)
    if kind == "count":
        return is_int and 0 <= v < _MAX_INT
    if kind == "positive":
        return is_int and 1 <= v < _MAX_INT
    if kind == "str":
        return isinstance(v, str)
    if kind == "bool":
        return isinstance(v, bool)
    if kind == "policy":
        return v in POLICIES
    if kind == "fraction":
        return is_num and 0 <= v <= 1
    if kind in ("seconds", "number"):
        return is_num and v >= 0
    if kind == "sha256":
        return isinstance(v, str) and _HEX64.fullmatch(v) is not None
    if kind == "time":
        try:
            datetime.fromisoformat(v)
        except (TypeError, ValueError):
            return False
        return True
    if kind == "object":
        return isinstance(v, dict)
    if kind == "list":
        return isinstance(v, list)
    raise AssertionError(kind)


def _kind(v: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(v), "a number")


def _short(v: Any) -> str:
    text = repr(v) if not isinstance(v, dict | list) else _kind(v)
    return text if len(text) <= 60 else text[:57] + "..."


def check_manifest(manifest: dict[str, Any], where: str | os.PathLike = "manifest") -> tuple[dict[str, Any], list[str]]:
    """(every schema field that is present and valid, by dotted path, e.g. `fields["counts.samples"]`;
    a problem for each field that is missing, of the wrong type or out of range).

    Dynamic entries come as `counts.<key>`, `seconds.<key>`, `files.<name>.bytes` / `.sha256` and
    `merged_from` (the list, each entry an object whose `config` is an object)."""
    fields: dict[str, Any] = {}
    problems: list[str] = []

    def bad(path: str, value: Any, kind: str) -> None:
        problems.append(f"{where}: malformed manifest: {path} is {_short(value)}, expected {_WHAT[kind]}")

    for section, required in SECTIONS.items():
        if section not in manifest:
            if required:
                problems.append(f"{where}: malformed manifest: section {section!r} is missing")
        elif not isinstance(manifest[section], dict):
            bad(section, manifest[section], "object")
    for path, (kind, required) in FIELDS.items():
        section, _, key = path.rpartition(".")
        parent = manifest.get(section) if section else manifest
        if not isinstance(parent, dict):
            continue  # the section is missing or malformed: said above
        if key not in parent:
            if required:
                problems.append(f"{where}: malformed manifest: {path} is missing")
        elif _valid(kind, parent[key]):
            fields[path] = parent[key]
        else:
            bad(path, parent[key], kind)
    for section, kind in _OPEN_SECTIONS.items():
        values = manifest.get(section)
        for key, v in (values.items() if isinstance(values, dict) else ()):
            path = f"{section}.{key}"
            if path in FIELDS:
                continue
            if _valid(kind, v):
                fields[path] = v
            else:
                bad(path, v, kind)
    files = manifest.get("files")
    for name, entry in (files.items() if isinstance(files, dict) else ()):
        if not isinstance(entry, dict):
            bad(f"files.{name}", entry, "object")
            continue
        for key, kind in (("bytes", "count"), ("sha256", "sha256")):
            if key not in entry:
                problems.append(f"{where}: malformed manifest: files.{name}.{key} is missing")
            elif _valid(kind, entry[key]):
                fields[f"files.{name}.{key}"] = entry[key]
            else:
                bad(f"files.{name}.{key}", entry[key], kind)
    if "merged_from" in manifest:
        merged = manifest["merged_from"]
        if not isinstance(merged, list):
            bad("merged_from", merged, "list")
        elif not all(isinstance(m, dict) and isinstance(m.get("config"), dict) for m in merged):
            problems.append(f"{where}: malformed manifest: every merged_from entry must be an object with a config")
        else:
            fields["merged_from"] = merged
            for i, m in enumerate(merged):
                if "overflow_effective" in m["config"] and not _valid("policy", m["config"]["overflow_effective"]):
                    bad(f"merged_from[{i}].config.overflow_effective", m["config"]["overflow_effective"], "policy")
    return fields, problems
