"""The toy figures benchmark never rots: its quick mode trains two seeds with and without prior preservation against
the suite's server and writes every figure's row, with the thresholds of tasks/toy/figures.py."""

from __future__ import annotations

from pathlib import Path

from benchmark_quick import quick_results, table_row

from tasks.toy.figures import LEAKS_WITHOUT_PRIOR, WITH_PRIOR


def test_quick_mode_writes_each_figure_over_the_seeds_with_its_margin(cli_env: dict, tmp_path: Path) -> None:
    text = quick_results("toy_figures.py", tmp_path, cli_env)
    for figure in (*WITH_PRIOR, LEAKS_WITHOUT_PRIOR):
        _, threshold, *seeds, mean, _, margin = table_row(text, figure.name)
        assert threshold == f"{'>=' if figure.at_least else '<='} {100 * figure.threshold:.0f}%"
        rates = [float(cell.rstrip("%")) for cell in seeds]
        assert len(rates) == 2 and all(0 <= rate <= 100 for rate in rates)
        assert float(mean.rstrip("%")) == round(sum(rates) / 2, 1) and int(margin) <= 2  # two samples per prompt
