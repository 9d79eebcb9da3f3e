"""The toy figures' margin arithmetic, and the benchmark that measures it never rots: its quick mode trains two seeds
with and without prior preservation against the suite's server and writes every figure's row, with the thresholds of
tasks/toy/figures.py."""

from __future__ import annotations

from pathlib import Path

from benchmark_quick import quick_results, table_row

from tasks.toy.figures import KEPT_OUT, LEAKS_WITHOUT_PRIOR, LEARNED, WITH_PRIOR


def test_spare_counts_the_images_that_could_be_read_the_other_way_and_still_clear() -> None:
    assert [LEARNED.spare(hits, 64) for hits in (9, 10, 11, 30)] == [-1, 0, 1, 20]  # at least 15% of 64: 9.6
    assert [KEPT_OUT.spare(hits, 64) for hits in (14, 13, 12, 0)] == [-2, -1, 0, 12]  # at most 20% of 64: 12.8
    assert LEARNED.spare(10, 60) == 1  # 15% of 60 is exactly 9


def test_quick_mode_writes_each_figure_over_the_seeds_with_its_margin(cli_env: dict, tmp_path: Path) -> None:
    text = quick_results("toy_figures.py", tmp_path, cli_env)
    for figure in (*WITH_PRIOR, LEAKS_WITHOUT_PRIOR):
        _, threshold, *seeds, mean, _, margin = table_row(text, figure.name)
        assert threshold == f"{'>=' if figure.at_least else '<='} {100 * figure.threshold:.0f}%"
        rates = [float(cell.rstrip("%")) for cell in seeds]
        assert len(rates) == 2 and all(0 <= rate <= 100 for rate in rates)
        assert float(mean.rstrip("%")) == round(sum(rates) / 2, 1) and int(margin) <= 2  # two samples per prompt
