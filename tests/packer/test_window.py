"""The streaming window packer: bounded, complete, and close to the global packer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from packer.config import parse_window
from packer.packing import pack
from packer.window import WindowPacker

LENGTHS = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "lengths"


def run(lengths: np.ndarray, capacity: int, window: int, by_tokens: bool = False):
    wp = WindowPacker(capacity, window, by_tokens=by_tokens)
    packs, peak = [], 0
    for i, n in enumerate(lengths.tolist()):
        packs += wp.add(i, n).lists()
        peak = max(peak, len(wp))
    packs += wp.flush().lists()
    return packs, peak


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("window", [2, 7, 64, 1000])
def test_every_sample_once_and_no_overflow(seed: int, window: int) -> None:
    rng = np.random.default_rng(seed)
    capacity = int(rng.integers(8, 200))
    lengths = rng.integers(1, capacity + 1, size=int(rng.integers(0, 600)))
    packs, peak = run(lengths, capacity, window)
    members = sorted(k for p in packs for k in p)
    assert members == list(range(lengths.size))
    assert all(sum(lengths[k] for k in p) <= capacity for p in packs)
    assert all(p == sorted(p) for p in packs), "samples keep arrival order inside a pack"
    assert peak <= window, "memory is bounded by the window"


def test_token_window_is_bounded() -> None:
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 100, size=5000)
    wp = WindowPacker(100, 1000, by_tokens=True)
    emitted = 0
    for i, n in enumerate(lengths.tolist()):
        emitted += int(wp.add(i, n).sizes.sum())
        assert sum(int(lengths[k]) for k in wp._keys) < 1000 + 100  # the window plus at most one sample
    emitted += int(wp.flush().sizes.sum())
    assert emitted == lengths.size


@pytest.mark.parametrize(("name", "capacity"), [("alpaca", 2048), ("moss", 8192)])
def test_within_half_a_percent_of_global(name: str, capacity: int) -> None:
    path = LENGTHS / f"{name}_gpt2_1M.npy"
    if not path.exists():
        pytest.skip(f"{path} not found (shared data lives next to the repo)")
    lengths = np.minimum(np.load(path)[:50_000], capacity)
    global_packs = pack(lengths, capacity, "bfd").num_packs
    packs, _ = run(lengths, capacity, 4096)
    assert len(packs) <= global_packs * 1.005


def test_parse_window() -> None:
    assert parse_window("16384") == (16384, False)
    assert parse_window("16k") == (16000, False)
    assert parse_window("8M-tokens") == (8_000_000, True)
    assert parse_window("500000t") == (500_000, True)
    with pytest.raises(ValueError, match="pack-window"):
        parse_window("lots")


def test_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError):
        WindowPacker(100, 1)
    with pytest.raises(ValueError, match="two packs"):
        WindowPacker(100, 150, by_tokens=True)
    with pytest.raises(ValueError, match="outside"):
        WindowPacker(10, 10).add(0, 11)


@pytest.mark.parametrize("by_tokens", [False, True])
@pytest.mark.parametrize("seed", range(20))
def test_extend_equals_adding_one_by_one(seed: int, by_tokens: bool) -> None:
    """The build hands over whole chunks; the rounds (and so the packs) must not depend on chunking."""
    rng = np.random.default_rng(seed)
    capacity = int(rng.integers(8, 300))
    window = int(rng.integers(2 * capacity, 6 * capacity)) if by_tokens else int(rng.integers(2, 300))
    lengths = rng.integers(1, capacity + 1, size=int(rng.integers(0, 3000)))
    one_by_one, _ = run(lengths, capacity, window, by_tokens)
    wp, chunked, i = WindowPacker(capacity, window, by_tokens=by_tokens), [], 0
    while i < lengths.size:
        k = int(rng.integers(1, 700))
        chunked += wp.extend(np.arange(i, min(i + k, lengths.size)), lengths[i : i + k]).lists()
        i += k
    chunked += wp.flush().lists()
    assert chunked == one_by_one
