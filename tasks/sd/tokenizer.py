"""CLIP's byte-level BPE tokenizer, generated offline: presets build without downloading CLIP's vocab, and only the
words their prompts use need to be single tokens.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import CLIPTokenizer

# Words the tiny tokenizer merges into single tokens; everything else falls back to byte tokens.
TOKENIZER_WORDS = ("photo", "of", "sks", "dog", "cat", "toy", "person", "in", "the")


def _byte_unicode_chars() -> list[str]:
    """CLIP's (GPT-2's) printable stand-ins for the 256 bytes, in CLIP's vocab order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(256 - len(printable))]


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """How CLIP's BPE splits `word`: the lowest-ranked adjacent pair merges (everywhere), until none is left."""
    symbols = [*word[:-1], word[-1] + "</w>"]
    while len(symbols) > 1:
        pair = min(itertools.pairwise(symbols), key=lambda p: ranks.get(p, len(ranks)))
        if pair not in ranks:
            break
        merged, i = [], 0
        while i < len(symbols):
            if tuple(symbols[i : i + 2]) == pair:
                merged.append(pair[0] + pair[1])
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return symbols


def _clip_vocab(words: tuple[str, ...]) -> tuple[dict[str, int], list[str]]:
    """A byte-level BPE vocab in CLIP's order (bytes, bytes</w>, merges, specials) and merge rules that make each
    of `words` one token (each new rule ranks after the earlier words' rules, so it never splits them)."""
    chars = _byte_unicode_chars()
    tokens = chars + [c + "</w>" for c in chars]
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        while len(symbols := _bpe(word, ranks)) > 1:
            ranks[symbols[0], symbols[1]] = len(ranks)
            if symbols[0] + symbols[1] not in tokens:
                tokens.append(symbols[0] + symbols[1])
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(tokens)}, [f"{a} {b}" for a, b in ranks]


def tiny_tokenizer(folder: Path, words: tuple[str, ...] = TOKENIZER_WORDS, max_length: int = 77) -> CLIPTokenizer:
    """Write vocab.json and merges.txt into `folder` and build CLIP's tokenizer from them, offline: each of
    `words` is one token, everything else falls back to byte tokens."""
    from transformers import CLIPTokenizer

    vocab, merges = _clip_vocab(words)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("\n".join(["#version: 0.2", *merges]) + "\n", encoding="utf-8")
    # transformers 5 leaves model_max_length unbounded without it, and prompts overflow the text positions.
    return CLIPTokenizer(
        vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"), model_max_length=max_length
    )
