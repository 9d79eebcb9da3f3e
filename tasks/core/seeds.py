"""Seeds derived from names and numbers: every random draw gets its own stream, so resuming needs no RNG state."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed named by any JSON-able parts (the first 8 bytes of their sha256, kept positive for torch and
    random): independent streams without shared RNG state."""
    return int.from_bytes(hashlib.sha256(json.dumps(parts).encode()).digest()[:8], "big") >> 1


def generator(*parts: Any) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(*parts))
