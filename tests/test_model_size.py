"""The big-model benchmark never rots: its quick mode pads the VAE of a copy of toy-sd by 64 MiB, reruns the demo's
`stage latents` warm over both copies against the suite's Prefect server, then changes one byte of the padding in place
and runs again."""

from __future__ import annotations

import re
from pathlib import Path

from benchmark_quick import quick_results, table_row

PAD = 64 * 2**20


def bytes_read(text: str, model: str) -> int:
    return int(table_row(text, model)[5].replace(",", ""))


def test_quick_mode_reads_no_model_file_warm_and_the_changed_byte_changes_the_keys(cli_env, tmp_path: Path) -> None:
    text = quick_results("model_size.py", tmp_path, cli_env)
    plain, padded = table_row(text, "toy-sd"), table_row(text, "toy-sd + padding")
    assert int(padded[1].removesuffix(" B").replace(",", "")) - int(plain[1].removesuffix(" B").replace(",", "")) == PAD
    assert abs(bytes_read(text, "toy-sd + padding") - bytes_read(text, "toy-sd")) < PAD // 2  # no model file read
    keys = {stage: table_row(text, stage)[1:] for stage in ("preprocess", "latents")}
    assert [stage for stage, (before, after) in keys.items() if before != after] == ["latents"]
    before, after = re.search(r"`(\w{16})…` before, `(\w{16})…` after", text).groups()
    assert before != after
    assert "Keys changed: latents; unchanged: preprocess." in text
