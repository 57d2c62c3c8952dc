"""The one progress bar style of the package (tqdm; written to stderr, off unless asked)."""

from __future__ import annotations

from typing import Any


def progress_bar(
    total: int, *, enabled: bool, desc: str, unit: str = "item", initial: int = 0, leave: bool = True
) -> Any:
    """A tqdm bar over `total` units; a no-op bar when not enabled."""
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=initial,
        disable=not enabled,
        desc=desc,
        unit=unit,
        leave=leave,
        dynamic_ncols=True,
    )
