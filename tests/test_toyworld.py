"""The toy world and its analyser: exact on clean renders, the subject never drawn for pretraining."""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tasks.sd.tokenizer import tiny_tokenizer
from tasks.toy.score import Asked, matches, parse, read
from tasks.toy.world import PALETTE, SHAPES, SUBJECT_COLOURS, VOCABULARY, render, scene, subject_scene

REPO = Path(__file__).resolve().parents[1]


def test_the_analyser_reads_500_held_out_renders_exactly() -> None:
    rng = random.Random(2024)
    scenes = [scene(rng) for _ in range(500)]
    readings = [read(render(s)) for s in scenes]
    assert [(r.colour, r.shape, r.background) for r in readings] == [(s.colour, s.shape, s.background) for s in scenes]
    assert not any(r.subject for r in readings)
    # every shape, colour and background occurs, one-colour and two-tone, so each class is exercised
    assert {s.shape for s in scenes} == set(SHAPES)
    assert {s.colours[0] for s in scenes} == {s.colours[-1] for s in scenes} == {s.background for s in scenes}
    assert {s.background for s in scenes} == set(PALETTE)
    assert 0.2 < sum(len(s.colours) == 2 for s in scenes) / len(scenes) < 0.3


def test_the_analyser_finds_the_subject_and_only_the_subject() -> None:
    rng = random.Random(5)
    subjects = [subject_scene(rng) for _ in range(200)]
    readings = [read(render(s)) for s in subjects]
    assert all(r.subject for r in readings)
    assert [r.background for r in readings] == [s.background for s in subjects]
    # the same circle with its halves swapped, or in one of its colours, is not the subject
    swapped = [replace(s, colours=("yellow", "red")) for s in subjects[:50]]
    plain = [replace(s, colours=("red",)) for s in subjects[:50]]
    square = [replace(s, shape="square") for s in subjects[:50]]
    assert not any(read(render(s)).subject for s in swapped + plain + square)


def test_pretraining_scenes_never_show_the_subject_nor_name_an_identifier() -> None:
    rng = random.Random(0)
    scenes = [scene(rng) for _ in range(20000)]
    assert not any(set(SUBJECT_COLOURS) <= set(s.colours) for s in scenes)  # red and yellow never share a shape
    assert sum(len(s.colours) == 2 and s.shape == "circle" for s in scenes) > 1000  # other two-tone circles do
    assert not any(read(render(s)).subject for s in scenes[:1000])
    words = {w for s in scenes[:2000] for w in s.caption().split()}
    assert words.isdisjoint({"sks", "zwx", "ohwx"})


def test_the_analyser_copes_with_noise_and_blank_images() -> None:
    item = subject_scene(random.Random(1), "blue")
    pixels = np.asarray(render(item), dtype=np.float32)
    noisy = np.clip(pixels + np.random.default_rng(0).normal(0, 20, pixels.shape), 0, 255).astype(np.uint8)
    reading = read(Image.fromarray(noisy))
    assert reading.subject and reading.background == "blue"
    blank = read(Image.new("RGB", (64, 64), PALETTE["green"]))
    assert (blank.background, blank.colour, blank.shape, blank.subject) == ("green", "", "", False)
    assert read(render(item).resize((512, 512))).subject  # any size is read at 64 px


def test_prompts_parse_into_the_attributes_they_name() -> None:
    assert parse("a photo of a red circle on a blue background") == Asked("red", "circle", "blue")
    assert parse("a photo of sks circle on a green background") == Asked("", "circle", "green")
    assert parse("a photo of a circle") == Asked("", "circle", "")
    two_tone = "a photo of a red and yellow circle on a white background"
    assert parse(two_tone) == Asked("red and yellow", "circle", "white")
    reading = read(render(subject_scene(random.Random(3), "green")))
    assert matches(reading, parse("a photo of sks circle on a green background")) == {
        "shape": True,
        "background": True,
        "all": True,
    }
    assert matches(reading, parse("a photo of a white square")) == {"colour": False, "shape": False, "all": False}
    assert matches(reading, parse("a photo of a red and yellow circle"))["all"]


def test_every_toy_word_is_one_token(tmp_path: Path) -> None:
    tokenizer = tiny_tokenizer(tmp_path / "tok", VOCABULARY, 16)
    for word in VOCABULARY:
        assert len(tokenizer(word).input_ids) == 3, word  # start, the word, end
    longest = "a photo of sks circle on a yellow background"
    assert len(tokenizer(longest).input_ids) <= tokenizer.model_max_length


@pytest.mark.parametrize("path", sorted((REPO / "data" / "toy").glob("*.png")), ids=lambda p: p.name)
def test_the_shipped_instance_images_show_the_subject_never_on_green(path: Path) -> None:
    reading = read(Image.open(path))
    assert reading.subject and reading.background not in ("green", *SUBJECT_COLOURS)
