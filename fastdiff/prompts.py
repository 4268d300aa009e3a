"""Text prompts for the digits: measured attributes (ink mass, slant), their words, and random prompt templates.

Groundwork for a text-to-image model on :func:`fastdiff.data.load_digits` (issue 19): each training image gets a
caption such as ``"a bold seven"``, ``"the digit 4, slanted right"`` or ``"7"`` built from its label and from
attributes measured on the image itself.

* :func:`digit_attributes` measures ``mass`` and ``slant`` of images (N, 1, H, W) in [−1, 1];
* :func:`attribute_thresholds` cuts them at the quartiles of the train split (stored as :data:`ATTRIBUTE_THRESHOLDS`);
* :func:`attribute_words` turns measured attributes into words; :func:`make_prompt` samples a caption;
* :data:`VOCABULARY` lists every token a caption can contain (for :class:`fastdiff.models.WordTokenizer`).
"""

from __future__ import annotations

import itertools
import math
import re
from typing import Optional

import torch
from torch import Tensor

__all__ = [
    "digit_attributes",
    "attribute_thresholds",
    "attribute_words",
    "ATTRIBUTE_THRESHOLDS",
    "DIGIT_WORDS",
    "THICKNESS_WORDS",
    "SLANT_WORDS",
    "THICKNESS_SYNONYMS",
    "SLANT_SYNONYMS",
    "TEMPLATES",
    "make_prompt",
    "split_words",
    "VOCABULARY",
]

# ----------------------------------------------------------------------------------------------- attributes


def _check_images(x) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor of images (N, 1, H, W), got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating tensor, got dtype {x.dtype}")
    if x.ndim != 4 or x.shape[1] != 1 or x.shape[2] < 1 or x.shape[3] < 1:
        raise ValueError(f"x must have shape (N, 1, H, W), got {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x must be finite (it holds NaN or inf)")
    return x


def digit_attributes(x: Tensor) -> dict[str, Tensor]:
    """Measured attributes of images ``x`` (N, 1, H, W), floating, in [−1, 1] (background −1, ink +1).

    Computed in float64 on the CPU from the ink weights ``w = (clamp(x, −1, 1) + 1) / 2`` ∈ [0, 1] (values outside
    [−1, 1], e.g. of generated samples, are clamped). With pixel column ``c`` (rightwards) and height
    ``v = −row`` (upwards), ``W = Σ w``, centroid ``c̄ = Σ w·c / W``, ``v̄ = Σ w·v / W`` and the ink-weighted
    central second moments ``μ_cv = Σ w·(c − c̄)(v − v̄) / W``, ``μ_vv = Σ w·(v − v̄)² / W``:

    * ``mass = W / (H·W_img)``: the mean ink, 0 for a blank image, 1 for a full one;
    * ``slant = degrees(atan(μ_cv / μ_vv))``: the angle from vertical of the ink's main axis, taken as the
      regression line of horizontal position on height (the shear that the classic "deskewing" removes), in
      (−90, 90); positive when the top leans right, 0 for a vertical stroke. Defined as 0 when there is no ink
      or no vertical extent (``μ_vv`` ≤ 1e-12, e.g. a single row of ink), so it is never NaN.

    Returns ``{"mass": (N,) float64, "slant": (N,) float64}`` on the CPU.
    Raises TypeError / ValueError naming ``x`` for a non-tensor, non-floating, mis-shaped or non-finite input.
    """
    x = _check_images(x)
    w = (x.detach().to(device="cpu", dtype=torch.float64).clamp(-1, 1)[:, 0] + 1) / 2  # (N, H, W)
    n, h, wd = w.shape
    mass = w.mean(dim=(1, 2))
    cols = torch.arange(wd, dtype=torch.float64).view(1, 1, wd)
    heights = -torch.arange(h, dtype=torch.float64).view(1, h, 1)
    total = w.sum(dim=(1, 2))
    has_ink = total > 0
    safe_total = torch.where(has_ink, total, torch.ones_like(total))
    c_bar = (w * cols).sum(dim=(1, 2)) / safe_total
    v_bar = (w * heights).sum(dim=(1, 2)) / safe_total
    dc = cols - c_bar.view(n, 1, 1)
    dv = heights - v_bar.view(n, 1, 1)
    mu_cv = (w * dc * dv).sum(dim=(1, 2)) / safe_total
    mu_vv = (w * dv * dv).sum(dim=(1, 2)) / safe_total
    defined = has_ink & (mu_vv > 1e-12)
    ratio = mu_cv / torch.where(defined, mu_vv, torch.ones_like(mu_vv))
    slant = torch.where(defined, torch.rad2deg(torch.atan(ratio)), torch.zeros_like(ratio))
    return {"mass": mass, "slant": slant}


# Cut points (lower, upper): the quartiles of each attribute on load_digits("train"), from attribute_thresholds (the
# outer quarters get a word: with thirds, the bold third's mean mass is only 1.28× the thin third's in the data);
# test_prompts.py recomputes them. mass ≤ lower → "thin", mass > upper → "bold"; slant ≤ lower → "slanted left",
# slant > upper → "slanted right", else "upright".
ATTRIBUTE_THRESHOLDS: dict[str, tuple[float, float]] = {
    "mass": (0.279296875, 0.330078125),
    "slant": (-6.943558637467511, 2.5240871387571895),
}


def attribute_thresholds(x_train: Tensor) -> dict[str, tuple[float, float]]:
    """The quartiles (the 1/4 and 3/4 quantiles, linear interpolation, float64) of ``mass`` and ``slant`` over
    ``x_train``.

    ``x_train``: (N, 1, H, W) floating images in [−1, 1], N ≥ 1 (the train split of :func:`fastdiff.data.load_digits`
    gives :data:`ATTRIBUTE_THRESHOLDS`). Returns ``{"mass": (lower, upper), "slant": (lower, upper)}`` as floats.
    """
    _check_images(x_train)
    if x_train.shape[0] < 1:
        raise ValueError("x_train must hold at least one image")
    attrs = digit_attributes(x_train)
    q = torch.tensor([1 / 4, 3 / 4], dtype=torch.float64)
    out = {}
    for name in ("mass", "slant"):
        lo, hi = torch.quantile(attrs[name], q).tolist()
        out[name] = (float(lo), float(hi))
    return out


THICKNESS_WORDS = ("thin", None, "bold")
SLANT_WORDS = ("slanted left", "upright", "slanted right")


def _check_thresholds(thresholds) -> dict[str, tuple[float, float]]:
    if not isinstance(thresholds, dict) or set(thresholds) != {"mass", "slant"}:
        raise ValueError(f"thresholds must be a dict with keys 'mass' and 'slant', got {thresholds!r}")
    out = {}
    for name in ("mass", "slant"):
        pair = thresholds[name]
        try:
            lo, hi = (float(v) for v in pair)
        except (TypeError, ValueError):
            raise ValueError(f"thresholds[{name!r}] must be a (lower, upper) pair of numbers, got {pair!r}") from None
        if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
            raise ValueError(f"thresholds[{name!r}] must be finite with lower ≤ upper, got {pair!r}")
        out[name] = (lo, hi)
    return out


def attribute_words(attrs: dict[str, Tensor], thresholds: Optional[dict] = None) -> list[dict[str, Optional[str]]]:
    """Words for measured attributes: one ``{"thickness": …, "slant": …}`` dict per image.

    ``attrs``: the output of :func:`digit_attributes` (``mass`` and ``slant``, (N,) tensors). ``thresholds``: as
    :func:`attribute_thresholds` (default :data:`ATTRIBUTE_THRESHOLDS`). thickness: ``"thin"`` when
    mass ≤ lower, ``"bold"`` when mass > upper, else None (the middle half gets no word); slant:
    ``"slanted left"`` when slant ≤ lower, ``"slanted right"`` when slant > upper, else ``"upright"``.
    """
    thresholds = _check_thresholds(ATTRIBUTE_THRESHOLDS if thresholds is None else thresholds)
    if not isinstance(attrs, dict) or not {"mass", "slant"} <= set(attrs):
        raise ValueError("attrs must be a dict with 'mass' and 'slant' tensors (the output of digit_attributes)")
    mass, slant = (torch.as_tensor(attrs[k], dtype=torch.float64).reshape(-1) for k in ("mass", "slant"))
    if mass.shape != slant.shape:
        raise ValueError(f"attrs['mass'] and attrs['slant'] must have the same length, "
                         f"got {mass.numel()} and {slant.numel()}")
    (m_lo, m_hi), (s_lo, s_hi) = thresholds["mass"], thresholds["slant"]
    words = []
    for m, s in zip(mass.tolist(), slant.tolist()):
        thickness = "thin" if m <= m_lo else ("bold" if m > m_hi else None)
        tilt = "slanted left" if s <= s_lo else ("slanted right" if s > s_hi else "upright")
        words.append({"thickness": thickness, "slant": tilt})
    return words


# ----------------------------------------------------------------------------------------------- prompts

DIGIT_WORDS: dict[int, list[str]] = {
    0: ["0", "zero"], 1: ["1", "one"], 2: ["2", "two"], 3: ["3", "three"], 4: ["4", "four"],
    5: ["5", "five"], 6: ["6", "six"], 7: ["7", "seven"], 8: ["8", "eight"], 9: ["9", "nine"],
}
THICKNESS_SYNONYMS: dict[str, list[str]] = {
    "thin": ["thin", "light", "skinny"],
    "bold": ["bold", "thick", "heavy"],
}
SLANT_SYNONYMS: dict[str, list[str]] = {
    "slanted left": ["slanted left", "leaning left", "tilted left"],
    "upright": ["upright", "straight", "vertical"],
    "slanted right": ["slanted right", "leaning right", "tilted right"],
}
# {d}: the digit (numeral or word), {t}: thickness, {s}: slant, <a>: "a" or "an" by the next word.
TEMPLATES: dict[str, list[str]] = {
    "none": ["{d}", "<a> {d}", "the digit {d}", "digit {d}", "number {d}", "the number {d}", "<a> handwritten {d}"],
    "thickness": ["<a> {t} {d}", "{t} {d}", "the digit {d}, {t}", "<a> {d}, {t}"],
    "slant": ["<a> {d}, {s}", "the digit {d}, {s}", "{d}, {s}", "<a> {s} {d}"],
    "both": ["<a> {t} {s} {d}", "<a> {t} {d}, {s}", "the digit {d}, {t} and {s}", "{t} {d}, {s}"],
}

_WORD_RE = re.compile(r"\w+|[^\w\s]")


def split_words(text: str) -> list[str]:
    """Lower-cased word tokens of ``text``: runs of letters/digits, each punctuation mark (e.g. ``","``) its own."""
    return _WORD_RE.findall(text.lower())


def _articles(text: str) -> str:
    return re.sub(r"<a> (\w)", lambda m: ("an " if m.group(1) in "aeiou8" else "a ") + m.group(1), text)


def _render(template: str, digit: str, thickness: str = "", slant: str = "") -> str:
    return _articles(template.format(d=digit, t=thickness, s=slant))


def _pick(options: list, generator: torch.Generator):
    return options[int(torch.randint(len(options), (1,), generator=generator).item())]


def make_prompt(label: int, words: Optional[dict[str, Optional[str]]], generator: torch.Generator) -> str:
    """A random caption of a digit ``label`` (0…9) with attribute ``words`` (one item of :func:`attribute_words`,
    or None for none), drawn with the seeded ``generator`` (a CPU torch.Generator; same seed → same prompt).

    The kind of caption is uniform over those the words allow: no attribute, thickness only (when the thickness
    word is not None), slant only, or both; then a template of that kind, a synonym of each word and either the
    numeral or the name of the digit are drawn uniformly. E.g. ``"7"``, ``"number five"``, ``"a bold seven"``,
    ``"the digit 4, slanted right"``, ``"a thin upright 1"``.
    """
    if isinstance(label, bool) or not isinstance(label, int):
        if isinstance(label, Tensor) and label.numel() == 1 and not label.is_floating_point():
            label = int(label.item())
        else:
            raise TypeError(f"label must be an int, got {type(label).__name__}")
    if label not in DIGIT_WORDS:
        raise ValueError(f"label must be a digit 0…9, got {label}")
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    thickness = slant = None
    if words is not None:
        if not isinstance(words, dict) or set(words) != {"thickness", "slant"}:
            raise ValueError(f"words must be None or a dict with keys 'thickness' and 'slant', got {words!r}")
        thickness, slant = words["thickness"], words["slant"]
        if thickness not in THICKNESS_WORDS:
            raise ValueError(f"words['thickness'] must be one of {THICKNESS_WORDS}, got {thickness!r}")
        if slant not in SLANT_WORDS:
            raise ValueError(f"words['slant'] must be one of {SLANT_WORDS}, got {slant!r}")
    kinds = ["none"]
    if thickness is not None:
        kinds.append("thickness")
    if slant is not None:
        kinds.append("slant")
    if thickness is not None and slant is not None:
        kinds.append("both")
    kind = _pick(kinds, generator)
    template = _pick(TEMPLATES[kind], generator)
    digit = _pick(DIGIT_WORDS[label], generator)
    t = _pick(THICKNESS_SYNONYMS[thickness], generator) if kind in ("thickness", "both") else ""
    s = _pick(SLANT_SYNONYMS[slant], generator) if kind in ("slant", "both") else ""
    return _render(template, digit, t, s)


def _vocabulary() -> list[str]:
    thick = [w for ws in THICKNESS_SYNONYMS.values() for w in ws]
    slants = [w for ws in SLANT_SYNONYMS.values() for w in ws]
    digits = [w for ws in DIGIT_WORDS.values() for w in ws]
    words: set[str] = set()
    for templates in TEMPLATES.values():
        for template, d, t, s in itertools.product(templates, digits, thick, slants):
            words.update(split_words(_render(template, d, t, s)))
    return sorted(words)


# Every token make_prompt can produce (lower case; "," is a token), sorted.
VOCABULARY: list[str] = _vocabulary()
