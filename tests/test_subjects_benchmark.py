"""The subjects benchmark never rots: its quick mode runs three nights of two toy subjects against the suite's
server, and only the changed subject trains again."""

from __future__ import annotations

from pathlib import Path

from benchmark_quick import quick_results, table_row


def test_quick_mode_measures_a_cold_a_one_change_and_an_unchanged_night(cli_env: dict, tmp_path: Path) -> None:
    text = quick_results("subjects.py", tmp_path, cli_env)
    cold, changed, quiet = (table_row(text, night) for night in ("cold", "one photo changed", "nothing changed"))
    assert cold[5] == "subject_01, subject_02" and float(cold[2]) > 0
    assert changed[5] == "subject_01" and changed[6].startswith("<= ")
    assert quiet[5] == "none" and float(quiet[2]) == float(quiet[3]) == 0 and quiet[7] in ("yes", "no")
