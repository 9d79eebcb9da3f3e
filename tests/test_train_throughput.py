"""The training-throughput benchmark never rots: its quick mode runs all five measurements on tiny-sd15."""

from __future__ import annotations

from pathlib import Path

from benchmark_quick import quick_results, table_row


def test_quick_mode_measures_floor_cached_reference_cli_and_child(ephemeral_env: dict, tmp_path: Path) -> None:
    text = quick_results("train_throughput.py", tmp_path, ephemeral_env)
    cells = table_row(text, "tiny-sd15")
    floor, cached, reference, cli, child, *ratios, gflop = map(float, cells[3:])
    assert min(floor, cached, reference, cli, child) > 0
    assert abs(ratios[0] - cached / floor) < 0.01 and ratios[2] > 1  # the VAE encode adds FLOPs
    assert abs(ratios[3] - cli / child) < 0.05  # what the temporary Prefect server costs
    assert gflop > 0 and "<!-- begin train_throughput -->" in text
