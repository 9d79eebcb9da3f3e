"""Consecutive batches of a sequence (itertools.batched arrives with Python 3.12)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")


def batched(items: Sequence[T], size: int) -> list[Sequence[T]]:
    """Slices of at most `size` items, in order."""
    return [items[start : start + size] for start in range(0, len(items), size)]
