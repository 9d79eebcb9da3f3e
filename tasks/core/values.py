"""The rules for values several settings share: amounts of memory, image sides, folders and URLs."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator

GIB = 2**30
CREDENTIALS = frozenset({"key", "secret", "token", "password", "username", "access_key", "secret_key", "session_token",
                         "aws_access_key_id", "aws_secret_access_key", "aws_session_token"})  # fmt: skip
MAX_SIDE = 4096  # 16x the pixels of SDXL's 1024: beyond it no model here was trained, and memory runs out
_UNITS = {"": GIB, "b": 1, "k": 1e3, "kb": 1e3, "kib": 2**10, "m": 1e6, "mb": 1e6, "mib": 2**20, "g": GIB,
          "gb": 1e9, "gib": GIB, "t": 2**40, "tb": 1e12, "tib": 2**40}  # fmt: skip


def parse_memory(value: str) -> int:
    """`24GiB`, `24 GB`, `80G` (a bare G or number means GiB), `24576MiB` -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", value)
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"{value!r} is not an amount of memory; write it like 24GiB, 80GB or 16384MiB")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def folder_or_url(given: str | Path) -> Path | str:
    """A folder made absolute, so every process of a run agrees; a URL as it is."""
    return given if isinstance(given, str) and "://" in given else Path(given).expanduser().resolve()


def fsspec_url(value: str) -> str:
    """`value`, when it is a URL of a protocol fsspec knows followed by a bucket or path; else ValueError."""
    import fsspec

    protocol, _, rest = value.partition("://")
    if not rest.strip("/") or protocol not in fsspec.available_protocols():
        raise ValueError("must be a URL like s3://bucket/prefix (a protocol fsspec knows, then a bucket or path)")
    return value


def _url_only(value: str) -> str:
    if "://" not in value:
        raise ValueError("not a URL")
    return value


Url = Annotated[str, AfterValidator(_url_only)]  # before Path in a union: a URL must not become a mangled Path


def image_side(value: int, or_else: str = "") -> int:
    """The one rule for image sides (the VAE downsamples by 8; the tiniest presets need 64)."""
    if value < 64 or value > MAX_SIDE or value % 8:
        raise ValueError(f"must be {or_else}a multiple of 8 from 64 to {MAX_SIDE}, e.g. 512 or 1024")
    return value


def no_credentials(options: dict[str, Any]) -> dict[str, Any]:
    """Store options without a credential: they come the standard ways (AWS environment variables, a profile), since
    a config travels to the Prefect server with every run."""
    if found := sorted(CREDENTIALS & {name.lower() for name in options}):
        raise ValueError(f"{', '.join(found)}: credentials never go in a config (it is sent to the Prefect "
                         "server); set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or a profile")  # fmt: skip
    return options
