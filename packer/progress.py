"""Progress bars: tqdm where they are shown, a silent stand-in otherwise (importing tqdm costs ~20 ms of every
start-up, a tenth of a quiet build of a few records)."""

from __future__ import annotations

from typing import Any


class _Silent:
    """What the callers use of a tqdm bar, doing nothing."""

    def __init__(self) -> None:
        self.format_dict: dict[str, Any] = {"elapsed": 0.0}

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> _Silent:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def bar(show: bool, **kwargs: Any):
    """`tqdm(**kwargs)` when `show`, else a bar that prints nothing (and imports nothing)."""
    if not show:
        return _Silent()
    from tqdm import tqdm

    return tqdm(**kwargs)
