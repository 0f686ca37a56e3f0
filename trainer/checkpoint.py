"""Step-numbered, atomic, checksummed checkpoints.

    DIR/step_000050/state.pt             torch.save(state) -- the dict below
    DIR/step_000050/checksums.json       {"format": "packer.checkpoint.v1",
                                          "files": {"state.pt": {"bytes": int, "sha256": hex}}}
    DIR/.tmp_step_000100.<random>/       a save in progress, or one whose run died: never read

A save writes into a fresh temporary directory made by `tempfile.mkdtemp` (a new name, created exclusively,
so nothing planted at a predictable name can block or redirect it), fsyncs state.pt, then writes and fsyncs
checksums.json, fsyncs the directory, renames it to step_N and fsyncs DIR. A crash at any point leaves
either no step_N or a whole one. Before writing, a save removes the `.tmp_step_*` directories that earlier
saves left behind (a symlink at such a name is removed itself, never followed).

A load checks state.pt's size and sha256 against checksums.json before `torch.load`, so a flipped byte is
an error naming the file, not a model that trains on from garbage. `--resume DIR` takes the newest step_N that
passes and reports each newer one it passed over; `--resume DIR/step_N` is that checkpoint or an error.

Everything is stored as tensors and primitive containers so it loads with `torch.load(weights_only=True)`:

    state.pt = {
        "step": int,                          # optimizer steps done
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": {"step": int, ...},      # and the fields of train.Schedule: the lr curve a resume follows
        "data": {"epoch": int, "index": int}, # PackOrder position (same on every rank)
        "rng": {"python": ..., "numpy": ..., "torch": Tensor, "cuda": [Tensor, ...]},
        "args": dict,                         # TrainConfig, model config, world size, data_files fingerprint
    }
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from packer.manifest import sha256_file

FORMAT = "packer.checkpoint.v1"
STATE_FILE = "state.pt"
CHECKSUMS_FILE = "checksums.json"
TMP_PREFIX = ".tmp_step_"
_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint failed a check; the message names the file and the check."""


def step_dir(save_dir: str | os.PathLike, step: int) -> Path:
    return Path(save_dir) / f"step_{step:06d}"


def rng_state() -> dict:
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), np_pos, np_has_gauss, np_gauss],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------- saving


def save(save_dir: str | os.PathLike, step: int, state: dict) -> Path:
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(save_dir)
    final = step_dir(save_dir, step)
    tmp = Path(tempfile.mkdtemp(dir=save_dir, prefix=f"{TMP_PREFIX}{step:06d}."))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0o700; a checkpoint gets what mkdir would give
        with open(tmp / STATE_FILE, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        # Hashed from disk after the fsync, and written after it: checksums.json only vouches for bytes that
        # are already down.
        sums = {"format": FORMAT, "files": {STATE_FILE: _file_entry(tmp / STATE_FILE)}}
        with open(tmp / CHECKSUMS_FILE, "w", encoding="utf-8") as f:
            f.write(json.dumps(sums, indent=2) + "\n")
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        if final.is_symlink() or final.is_file():
            final.unlink()
        elif final.exists():  # re-saving the same step (a rerun into the same --save): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(save_dir)  # makes the rename itself durable
    return final


def remove_stale_temps(save_dir: str | os.PathLike) -> list[Path]:
    """Remove the `.tmp_step_*` directories of saves that died, and symlinks at such names (the link itself).

    Plain files at such names are not ours (mkdtemp makes directories) and are left alone; being unique,
    the new temporary name steps around them. Whatever cannot be removed cannot block the save either.
    """
    removed = []
    for p in Path(save_dir).iterdir():
        if not p.name.startswith(TMP_PREFIX):
            continue
        try:
            if p.is_symlink():
                p.unlink()
            elif p.is_dir():
                shutil.rmtree(p)  # deletes links inside it, never what they point to
            else:
                continue
        except OSError:
            continue
        removed.append(p)
    return removed


def _file_entry(path: Path) -> dict:
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


def _fsync_dir(path: Path) -> None:
    if os.name == "nt":  # a directory cannot be opened for fsync there
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)  # there is no way to read it without setting it
    os.umask(mask)
    return mask


# --------------------------------------------------------------------------- finding and loading


def checkpoints(save_dir: str | os.PathLike) -> list[Path]:
    """The step_* checkpoints in a --save directory, newest first (temporary directories never count)."""
    steps = [
        (int(m.group(1)), p)
        for p in Path(save_dir).iterdir()
        if (m := _STEP_DIR.match(p.name)) and _is_checkpoint(p)
    ]
    return [p for _, p in sorted(steps, reverse=True)]


def latest(save_dir: str | os.PathLike) -> Path | None:
    found = checkpoints(save_dir)
    return found[0] if found else None


def verify(ckpt: str | os.PathLike) -> Path:
    """Check state.pt's size and sha256 against checksums.json; returns state.pt's path."""
    ckpt = Path(ckpt)
    state_path, sums_path = ckpt / STATE_FILE, ckpt / CHECKSUMS_FILE
    if not state_path.is_file():
        raise CheckpointError(f"{state_path}: missing")
    if not sums_path.exists():
        raise CheckpointError(
            f"{sums_path}: missing, so {state_path} cannot be verified (the checkpoint was not written by "
            f"this trainer's save, or predates checksums)"
        )
    try:
        sums = json.loads(sums_path.read_text(encoding="utf-8"))
        if sums.get("format") != FORMAT:
            raise ValueError(f"format {sums.get('format')!r} is not {FORMAT!r}")
        want = sums["files"][STATE_FILE]
        want_bytes, want_sha = int(want["bytes"]), str(want["sha256"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{sums_path}: unreadable ({type(e).__name__}: {e})") from e
    size = state_path.stat().st_size
    if size != want_bytes:
        how = "empty" if size == 0 else "truncated" if size < want_bytes else "grown"
        raise CheckpointError(f"{state_path}: {size} bytes, {CHECKSUMS_FILE} says {want_bytes} ({how})")
    if sha256_file(state_path) != want_sha:
        raise CheckpointError(f"{state_path}: sha256 differs from {CHECKSUMS_FILE} (the file is corrupt)")
    return state_path


@dataclass(frozen=True, slots=True)
class Loaded:
    state: dict
    path: Path  # the step_* directory it came from
    skipped: tuple[str, ...] = ()  # why each newer checkpoint of a --save directory was passed over


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Loaded:
    """`--resume PATH`: a step_* checkpoint (verified, else CheckpointError), or a --save directory: its
    newest checkpoint that passes the checks, with the reasons the newer ones failed in `skipped`."""
    path = Path(path)
    if _is_checkpoint(path):
        return Loaded(_load_one(path, map_location), path)
    found = checkpoints(path) if path.is_dir() else []
    if not found:
        raise FileNotFoundError(
            f"--resume {path}: no checkpoint there; pass a step_NNNNNN directory or the --save directory "
            f"that holds them"
        )
    skipped: list[str] = []
    for ckpt in found:
        try:
            return Loaded(_load_one(ckpt, map_location), ckpt, tuple(skipped))
        except CheckpointError as e:
            skipped.append(str(e))
    raise CheckpointError(f"--resume {path}: no checkpoint passes its checks: {'; '.join(skipped)}")


def _is_checkpoint(path: Path) -> bool:
    return (path / STATE_FILE).exists() or (path / CHECKSUMS_FILE).exists()


def _load_one(ckpt: Path, map_location: str | torch.device) -> dict:
    state_path = verify(ckpt)
    try:
        return torch.load(state_path, map_location=map_location, weights_only=True)
    except Exception as e:  # the checksums match, so these are the bytes saved: they never were a state
        first_line = (str(e).splitlines() or [""])[0]
        raise CheckpointError(
            f"{state_path}: matches {CHECKSUMS_FILE} but torch.load fails ({type(e).__name__}: {first_line})"
        ) from e
