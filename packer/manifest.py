"""`PREFIX.json`: the build manifest, written last, so its presence means the build completed."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

FORMAT = "packer.packed.v1"
LOSS_MASK_SUFFIX = "_loss_mask"


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


def file_entries(files: dict[str, Path]) -> dict[str, dict[str, Any]]:
    """The manifest's `files` section: size and sha256 of each data file, keyed by its final name
    (`files` maps that name to where the bytes are now, e.g. a temporary file not yet renamed)."""
    return {name: {"bytes": Path(p).stat().st_size, "sha256": sha256_file(p)} for name, p in files.items()}


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


def read_manifest(prefix: str | os.PathLike) -> dict[str, Any]:
    path = manifest_path(prefix)
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist: the build of {os.fspath(prefix)!r} did not complete (the manifest is "
            "written last), or the prefix is wrong"
        )
    with open(path, encoding="utf-8") as f:
        manifest = json.load(f)
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: format {manifest.get('format')!r} is not {FORMAT!r}")
    return manifest
