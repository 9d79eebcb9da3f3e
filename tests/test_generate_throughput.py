"""The generation-throughput benchmark never rots: its quick mode renders at batch 1 and at the configured batch,
and times both ways of loading the weight sets, on tiny-sd15."""

from __future__ import annotations

from pathlib import Path

from benchmark_quick import quick_results, table_row


def test_quick_mode_measures_both_batch_sizes_and_both_ways_of_loading(tmp_path: Path) -> None:
    text = quick_results("generate_throughput.py", tmp_path)
    cells = table_row(text, "tiny-sd15")
    single, batch, batched, sets = float(cells[5]), int(cells[6]), float(cells[7]), int(cells[9])
    shared, per_set = map(float, cells[10:12])
    assert single > 0 and batched > 0 and batch == 2  # the quick mode's batch
    assert sets == 4  # configs/demo.toml: the base, sample steps 10 and 20, the final model
    assert shared > 0 and per_set > 0
    # The two ways of loading differ as claimed: one base pipeline wears every set, or each set loads a pipeline (the
    # final model as its own).
    assert "- tiny-sd15: 1 with one base pipeline, 4 with one per set" in text
    assert "<!-- begin generate_throughput -->" in text
