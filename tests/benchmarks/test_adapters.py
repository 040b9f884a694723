"""The shared pieces of the benchmark adapters: item order under --limit, flags, caption rules."""

from __future__ import annotations

import os

import pytest

from benchmarks.adapters import (
    BenchItem,
    Rules,
    caption_is_good,
    check_images,
    check_rules,
    csv_choices,
    interleave,
)


def test_interleave_centres_each_kind_and_shuffles_within_it_reproducibly():
    def kind(name: str) -> str:
        return name[0]

    # the i-th of n items at (i + 0.5) / n: a at 1/4, 3/4; b at 1/6, 1/2, 5/6
    assert interleave(["a0", "a1", "b0", "b1", "b2"], kind, seed=None) == [
        "b0", "a0", "b1", "a1", "b2"
    ]  # fmt: skip
    items = [f"a{i:02d}" for i in range(20)] + [f"b{i:02d}" for i in range(10)]
    shuffled = interleave(items, kind, seed=0)
    assert [kind(i) for i in shuffled] == ["a", "b", "a"] * 10
    assert sorted(shuffled) == items and shuffled == interleave(items, kind, seed=0)
    assert shuffled != interleave(items, kind, seed=None)
    assert interleave(items, kind, seed=1) != shuffled


def test_check_images_needs_one_of_the_first_images(tmp_path):
    items = [BenchItem(str(i), tmp_path / f"{i}.jpg", "q") for i in range(25)]
    (tmp_path / "1.jpg").write_bytes(b"")  # one present: a folder with some images missing
    check_images(items)
    (tmp_path / "1.jpg").unlink()
    (tmp_path / "22.jpg").write_bytes(b"")  # only past the first 20
    with pytest.raises(
        FileNotFoundError, match=r"none of the first 20 images exists, e.g. .*0.jpg"
    ):
        check_images(items)
    check_images([])


def test_flags_and_caption_rules_at_their_bounds():
    assert csv_choices(" yesno, caption ,", ("yesno", "open", "caption"), "--kinds") == [
        "yesno", "caption"
    ]  # fmt: skip
    for text in ("", " , ", "yesno,opne"):
        with pytest.raises(ValueError, match="--kinds"):
            csv_choices(text, ("yesno", "open", "caption"), "--kinds")
    for share in (0.0, 1.0):
        check_rules(Rules(min_cover=share))
    with pytest.raises(ValueError, match="--min-cover 1.01: give a share from 0 to 1"):
        check_rules(Rules(min_cover=1.01))
    half = {"min_cover": 0.5}
    cases = [  # (hallucinated, cover) -> GOOD under no-hallucination, cover, both
        ((0, 0.5), (True, True, True)),  # cover at --min-cover counts
        ((0, 0.4), (True, False, False)),
        ((1, 1.0), (False, True, False)),
        ((2, 0.0), (False, False, False)),
    ]
    for (hallucinated, cover), expected in cases:
        got = tuple(
            caption_is_good(hallucinated, cover, Rules(caption_rule=rule, **half))
            for rule in ("no-hallucination", "cover", "both")
        )
        assert got == expected, (hallucinated, cover)
    assert Rules(questions_dir="labels").questions_dir == os.path.abspath("labels")
