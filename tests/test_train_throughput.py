"""The training-throughput benchmark never rots: its quick mode runs all six measurements on tiny-sd15."""

from __future__ import annotations

from pathlib import Path

from benchmark_quick import quick_results, table_row


def test_quick_mode_measures_floor_cached_reference_cli_and_child(ephemeral_env: dict, tmp_path: Path) -> None:
    text = quick_results("train_throughput.py", tmp_path, ephemeral_env)
    cells = table_row(text, "tiny-sd15")
    floor, clipped, cached, reference, cli, child, *ratios, gflop = map(float, cells[3:])
    assert min(floor, clipped, cached, reference, cli, child) > 0
    assert ratios[3] > 1  # the VAE encode adds FLOPs
    # (c) differs from (b) as claimed: it alone went through the VAE, once per sample drawn (quick: 2 steps of 1).
    assert "- tiny-sd15: floor 0, clipped 0, cached 0, reference 2" in text
    assert gflop > 0 and "<!-- begin train_throughput -->" in text
