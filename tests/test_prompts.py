"""fastdiff.prompts: measured digit attributes, their thresholds and words, prompt templates and the vocabulary."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from fastdiff.prompts import (
    ATTRIBUTE_THRESHOLDS,
    DIGIT_WORDS,
    SLANT_SYNONYMS,
    THICKNESS_SYNONYMS,
    VOCABULARY,
    attribute_thresholds,
    attribute_words,
    digit_attributes,
    make_prompt,
    split_words,
)


def _blank(n=1, size=16):
    return -torch.ones(n, 1, size, size)


def _bar(shift_per_row: float, size=16):
    """A 1-pixel stroke over rows 2…13 whose column moves by ``shift_per_row`` per row going UP."""
    x = _blank(size=size)
    for row in range(2, 14):
        col = round(8 + shift_per_row * (7.5 - row))
        x[0, 0, row, col] = 1.0
    return x


def _reference(img: torch.Tensor) -> tuple[float, float]:
    """Hand loop over pixels in Python floats: (mass, slant in degrees)."""
    h, w = img.shape[-2:]
    pix = [((float(img[0, 0, r, c]) + 1) / 2, c, -r) for r in range(h) for c in range(w)]
    total = sum(p for p, _, _ in pix)
    mass = total / (h * w)
    if total == 0:
        return mass, 0.0
    cb = sum(p * c for p, c, _ in pix) / total
    vb = sum(p * v for p, _, v in pix) / total
    cv = sum(p * (c - cb) * (v - vb) for p, c, v in pix) / total
    vv = sum(p * (v - vb) ** 2 for p, _, v in pix) / total
    return mass, math.degrees(math.atan(cv / vv))


def test_blank_image_has_zero_mass_and_slant():
    a = digit_attributes(_blank(3))
    assert a["mass"].dtype == torch.float64 and a["slant"].dtype == torch.float64
    assert a["mass"].tolist() == [0.0, 0.0, 0.0]
    assert a["slant"].tolist() == [0.0, 0.0, 0.0]


def test_single_row_of_ink_has_zero_slant_not_nan():
    x = _blank()
    x[0, 0, 5, 3:12] = 1.0
    a = digit_attributes(x)
    assert a["slant"].item() == 0.0
    assert a["mass"].item() == pytest.approx(9 / 256)


def test_full_image_mass_one():
    assert digit_attributes(torch.ones(1, 1, 16, 16))["mass"].item() == pytest.approx(1.0)


def test_bars_sign_of_slant():
    vertical = digit_attributes(_bar(0.0))["slant"].item()
    right = digit_attributes(_bar(0.5))["slant"].item()
    left = digit_attributes(_bar(-0.5))["slant"].item()
    assert abs(vertical) < 1e-9
    assert right > 20  # atan(0.5) ≈ 26.6°, rounding to pixels keeps it near
    assert left < -20
    assert right == pytest.approx(-left, abs=1e-9)  # mirror images


def test_exact_diagonal_is_45_degrees():
    x = _blank()
    for i in range(10):
        x[0, 0, 12 - i, 3 + i] = 1.0  # up one row, right one column
    assert digit_attributes(x)["slant"].item() == pytest.approx(45.0, abs=1e-9)


def test_matches_hand_loop_on_real_digits():
    from fastdiff.data import load_digits

    x, _ = load_digits("test")
    got = digit_attributes(x[:4])
    for i in range(4):
        mass, slant = _reference(x[i:i + 1])
        assert got["mass"][i].item() == pytest.approx(mass, abs=1e-6)
        assert got["slant"][i].item() == pytest.approx(slant, abs=1e-6)


def test_digit_attributes_bad_inputs():
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        digit_attributes([[0.0]])
    with pytest.raises(TypeError, match="x must be a floating"):
        digit_attributes(torch.zeros(1, 1, 16, 16, dtype=torch.long))
    with pytest.raises(ValueError, match=r"x must have shape \(N, 1, H, W\)"):
        digit_attributes(torch.zeros(1, 3, 16, 16))
    bad = _blank()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="x must be finite"):
        digit_attributes(bad)


def test_thresholds_constants_match_train_split():
    from fastdiff.data import load_digits

    x, _ = load_digits("train")
    got = attribute_thresholds(x)
    assert set(got) == set(ATTRIBUTE_THRESHOLDS)
    for name in got:
        for a, b in zip(got[name], ATTRIBUTE_THRESHOLDS[name]):
            assert abs(a - b) < 1e-6, (name, got[name], ATTRIBUTE_THRESHOLDS[name])
        assert got[name][0] < got[name][1]
    # quartiles: a quarter of the train images on each side, half in the middle
    words = attribute_words(digit_attributes(x))
    n = len(words)
    for key, value, expected in (("thickness", "thin", 0.25), ("thickness", "bold", 0.25), ("thickness", None, 0.5),
                                 ("slant", "slanted left", 0.25), ("slant", "slanted right", 0.25),
                                 ("slant", "upright", 0.5)):
        share = sum(w[key] == value for w in words) / n
        assert abs(share - expected) < 0.03, (value, share)


def test_attribute_words_cut_points():
    th = {"mass": (0.2, 0.4), "slant": (-5.0, 5.0)}
    attrs = {"mass": torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5], dtype=torch.float64),
             "slant": torch.tensor([-9.0, -5.0, 0.0, 5.0, 9.0], dtype=torch.float64)}
    words = attribute_words(attrs, th)
    assert [w["thickness"] for w in words] == ["thin", "thin", None, None, "bold"]
    assert [w["slant"] for w in words] == ["slanted left", "slanted left", "upright", "upright", "slanted right"]


def test_attribute_words_bad_inputs():
    attrs = {"mass": torch.zeros(2), "slant": torch.zeros(2)}
    with pytest.raises(ValueError, match="thresholds"):
        attribute_words(attrs, {"mass": (0.3, 0.1), "slant": (0, 1)})
    with pytest.raises(ValueError, match="thresholds"):
        attribute_words(attrs, {"mass": (0.1, 0.3)})
    with pytest.raises(ValueError, match="attrs"):
        attribute_words({"mass": torch.zeros(2)})
    with pytest.raises(ValueError, match=r"attrs\['mass'\]"):
        attribute_words({"mass": torch.zeros(2), "slant": torch.zeros(3)})


def test_make_prompt_is_seeded_and_mentions_the_digit():
    words = {"thickness": "bold", "slant": "slanted right"}
    a = [make_prompt(7, words, torch.Generator().manual_seed(3)) for _ in range(2)]
    assert a[0] == a[1]
    g = torch.Generator().manual_seed(0)
    prompts = [make_prompt(7, words, g) for _ in range(400)]
    assert all(set(split_words(p)) & {"7", "seven"} for p in prompts)
    bold = set(THICKNESS_SYNONYMS["bold"])
    right = {"right"}
    kinds = {(bool(set(split_words(p)) & bold), bool(set(split_words(p)) & right)) for p in prompts}
    assert kinds == {(False, False), (True, False), (False, True), (True, True)}  # none, one, both
    assert not any(set(split_words(p)) & {"thin", "left", "upright"} for p in prompts)


def test_make_prompt_without_thickness_word_never_mentions_thickness():
    g = torch.Generator().manual_seed(1)
    thick_words = {w for ws in THICKNESS_SYNONYMS.values() for w in ws}
    prompts = [make_prompt(3, {"thickness": None, "slant": "upright"}, g) for _ in range(200)]
    assert not any(set(split_words(p)) & thick_words for p in prompts)
    assert any(set(split_words(p)) & set(SLANT_SYNONYMS["upright"]) for p in prompts)
    plain = [make_prompt(3, None, g) for _ in range(50)]
    assert all(set(split_words(p)) <= set(VOCABULARY) - thick_words - {"left", "right", "upright"} for p in plain)


def test_articles():
    g = torch.Generator().manual_seed(0)
    prompts = [make_prompt(8, {"thickness": None, "slant": "upright"}, g) for _ in range(300)]
    assert not any(" a 8" in f" {p}" or " a eight" in f" {p}" or " a upright" in f" {p}" for p in prompts)
    assert any(p.startswith("an ") for p in prompts)


def test_make_prompt_bad_inputs():
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="label"):
        make_prompt(10, None, g)
    with pytest.raises(TypeError, match="label"):
        make_prompt("7", None, g)
    with pytest.raises(TypeError, match="generator"):
        make_prompt(7, None, 0)
    with pytest.raises(ValueError, match="words"):
        make_prompt(7, {"thickness": "huge", "slant": "upright"}, g)
    with pytest.raises(ValueError, match="words"):
        make_prompt(7, {"thickness": None}, g)


def test_vocabulary_shape():
    assert VOCABULARY == sorted(set(VOCABULARY))
    assert "," in VOCABULARY
    assert all(w == w.lower() and split_words(w) == [w] for w in VOCABULARY)
    for forms in DIGIT_WORDS.values():
        assert set(forms) <= set(VOCABULARY)
    expected = {"a", "an", "the", "digit", "number", "bold", "thin", "slanted", "upright", "left", "right"}
    assert expected <= set(VOCABULARY)


def test_2000_prompts_tokenize_without_unknown_words():
    from fastdiff.models import WordTokenizer
    from fastdiff.models.text_encoder import UNK_ID

    tok = WordTokenizer(VOCABULARY)
    g = torch.Generator().manual_seed(0)
    thick = [None, "thin", "bold"]
    slant = ["slanted left", "upright", "slanted right"]
    prompts = []
    for i in range(2000):
        words = {"thickness": thick[i % 3], "slant": slant[(i // 3) % 3]}
        prompts.append(make_prompt(i % 10, words if i % 7 else None, g))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no unknown-word or truncation warning
        enc = tok(prompts)
    assert not bool((enc["input_ids"] == UNK_ID).any())
    assert len(set(prompts)) > 300
