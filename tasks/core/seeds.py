"""Seeds derived from names and numbers: every random draw gets its own stream, so resuming needs no RNG state."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch


def seed_from(name: str) -> int:
    """A 63-bit seed named by a string: the first 8 bytes of its sha256, kept positive for torch and random."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") >> 1


def derive_seed(*parts: Any) -> int:
    """A seed from any JSON-able parts: independent streams without shared RNG state."""
    return seed_from(json.dumps(parts))


def generator(*parts: Any) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(*parts))
