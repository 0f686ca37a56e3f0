"""Step-numbered, atomic checkpoints: DIR/step_000050/state.pt.

Each checkpoint is written into DIR/.tmp_step_000050/ and renamed into place only once complete, so any
`step_*` directory is a whole checkpoint and a crash mid-save leaves nothing that looks valid.
Everything is stored as tensors and primitive containers so it loads with `torch.load(weights_only=True)`.

    state.pt = {
        "step": int,                          # optimizer steps done
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": {"step": int},           # the lr is a pure function of the step (see train.lr_at)
        "data": {"epoch": int, "index": int}, # PackOrder position (same on every rank)
        "rng": {"python": ..., "numpy": ..., "torch": Tensor, "cuda": [Tensor, ...]},
        "args": dict,                         # the TrainConfig of the run, model config included
    }
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

STATE_FILE = "state.pt"
_STEP_DIR = re.compile(r"^step_(\d+)$")


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


def save(save_dir: str | os.PathLike, step: int, state: dict) -> Path:
    final = step_dir(save_dir, step)
    tmp = final.with_name(f".tmp_{final.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save(state, tmp / STATE_FILE)
    if final.exists():  # re-saving the same step (e.g. --save-every hit the last step): replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def latest(save_dir: str | os.PathLike) -> Path | None:
    steps = [
        (int(m.group(1)), p)
        for p in Path(save_dir).iterdir()
        if (m := _STEP_DIR.match(p.name)) and (p / STATE_FILE).is_file()
    ]
    return max(steps)[1] if steps else None


def resolve(path: str | os.PathLike) -> Path:
    """`--resume` accepts a checkpoint directory or the `--save` directory holding step_* checkpoints."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return path
    if path.is_dir() and (found := latest(path)) is not None:
        return found
    raise FileNotFoundError(
        f"--resume {path}: no checkpoint there; pass a step_NNNNNN directory or the --save directory "
        f"that holds them"
    )


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    return torch.load(resolve(path) / STATE_FILE, map_location=map_location, weights_only=True)
