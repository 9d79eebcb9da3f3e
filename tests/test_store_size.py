"""The big-store benchmark never rots: its quick mode pads the demo's preprocess entry by 4 MiB, reruns that stage warm
over both stores against the suite's Prefect server, and `cache verify` must name the byte it flipped."""

from __future__ import annotations

from pathlib import Path

from benchmark_quick import run_quick


def test_quick_mode_reruns_warm_over_both_stores_and_verify_names_the_flip(cli_env: dict, tmp_path: Path) -> None:
    out = tmp_path / "RESULTS.md"
    run_quick("store_size.py", "--out", out, env=cli_env)
    text = out.read_text()
    assert "| demo's |" in text and "| preprocess entry padded |" in text
    assert "warm `boothflow stage preprocess` (median s)" in text
    # The entry the padded store's warm run looked up is 4 MiB bigger by its manifest: the padding was committed in it.
    assert "its own files plus 4,194,304 random bytes in" in text
    assert "a plain lookup also refuses the entry" in text
    assert "exits 1" in text and "padding.bin: bytes differ from the manifest's sha256`." in text
