"""Progress display: a tqdm bar on a terminal, nothing otherwise."""

from __future__ import annotations

import sys
from typing import Iterable, TypeVar

from tqdm import tqdm

Item = TypeVar("Item")


def progress(items: Iterable[Item], total: int | None, description: str, enabled: bool = True) -> Iterable[Item]:
    """Wrap `items` in a progress bar on stderr when it is a terminal and `enabled`."""
    if not enabled or not sys.stderr.isatty():
        return items
    return tqdm(items, total=total, desc=description, leave=False, dynamic_ncols=True, file=sys.stderr)
