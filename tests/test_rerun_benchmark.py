"""The rerun benchmark never rots: its quick mode runs a cold and a warm demo run with a temporary server."""

from __future__ import annotations

from pathlib import Path

from benchmark_quick import quick_results, table_row


def test_quick_mode_measures_a_cold_run_and_an_all_cached_rerun(ephemeral_env: dict, tmp_path: Path) -> None:
    text = quick_results("rerun.py", tmp_path, ephemeral_env)
    cold = table_row(text, "quick | ephemeral | cold")
    warm = table_row(text, "quick | ephemeral | warm")
    assert float(cold[3]) > 0 and "train 4" in cold[5]
    assert all(part.endswith(" 0") for part in warm[5].split(", ")), warm  # nothing ran
    assert int(cold[6]) > 0 and warm[6] == "0"  # the cold run loads models; a fully cached one loads none
