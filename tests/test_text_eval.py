"""fastdiff eval of a text-to-image model: evaluate_prompts (digits, attributes, negative prompts) recomputed here
from the pipeline's own samples, the targets on planted reports, the report text, the model card and prompt_grid."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from model_factories import tiny_text_pipeline
from PIL import Image

from fastdiff import evaluation, training
from fastdiff.prompts import digit_attributes

pytest.importorskip("sklearn")  # the held-out digits of the Fréchet distance


@pytest.fixture(scope="module")
def pipe():
    return tiny_text_pipeline()


def _samples(pipe, prompts, negative=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    kwargs = {"negative_prompt": negative} if negative is not None else {}
    return pipe(prompt=prompts, num_inference_steps=2, guidance_scale=3.0, generator=gen, output_type="pt",
                progress=False, **kwargs) * 2 - 1


def test_evaluate_prompts_measures_the_samples_of_each_prompt(pipe):
    report = evaluation.evaluate_prompts(pipe, num=10, per_attribute=10, steps=2, guidance=3.0, seed=0,
                                         batch_size=4, progress=False)
    assert report["num"] == 10 and report["per_attribute"] == 10 and report["steps"] == 2
    assert report["guidance"] == 3.0 and sum(report["histogram"]) == 10
    assert report["fd_ratio"] == pytest.approx(report["fd"] / report["fd_real"])
    # each attribute row: the measured mean of that prompt's samples (same seed, drawn in one batch here)
    for word in ("bold", "slanted left"):
        row = report["attributes"][word]
        images = _samples(pipe, [row["prompt"].format(d=d % 10) for d in range(10)])
        attrs = digit_attributes(images)
        assert row["mass"] == pytest.approx(float(attrs["mass"].mean()), abs=1e-5)
        assert row["slant"] == pytest.approx(float(attrs["slant"].mean()), abs=1e-3)
    plain = [str(d) for d in range(10)]
    assert report["negative"]["none"] == pytest.approx(float(digit_attributes(_samples(pipe, plain))["mass"].mean()),
                                                       abs=1e-5)
    bold = float(digit_attributes(_samples(pipe, plain, negative="bold"))["mass"].mean())
    assert report["negative"]["bold"] == pytest.approx(bold, abs=1e-5)
    assert report["negative"]["bold"] != report["negative"]["none"]  # the negative prompt changed the samples
    assert report["bold_thin_mass_ratio"] == pytest.approx(report["attributes"]["bold"]["mass"]
                                                           / report["attributes"]["thin"]["mass"])
    text = evaluation.format_prompt_report("tiny", report)
    assert "| `a bold {d}` |" in text and "targets:" in text and "bold/thin mean-mass ratio" in text
    assert set(report["targets"]) == set(evaluation.prompt_targets(report))


def _planted(**over):
    attributes = {w: {"prompt": t, "mass": 0.3, "slant": 0.0, "accuracy": 1.0}
                  for w, t in evaluation.ATTRIBUTE_PROMPTS.items()}
    attributes["thin"]["mass"], attributes["bold"]["mass"] = 0.25, 0.35
    attributes["slanted left"]["slant"], attributes["slanted right"]["slant"] = -5.0, 5.0
    report = {"accuracy": 0.96, "fd_ratio": 2.5, "attributes": attributes,
              "negative": {"none": 0.3, "bold": 0.28, "thin": 0.32}, "bold_thin_mass_ratio": 0.35 / 0.25}
    report.update(over)
    return report


def test_prompt_targets_on_planted_reports():
    assert all(evaluation.prompt_targets(_planted()).values())
    assert not evaluation.prompt_targets(_planted(accuracy=0.94))["digit accuracy ≥ 95%"]
    assert not evaluation.prompt_targets(_planted(bold_thin_mass_ratio=1.29))["bold/thin mass ≥ 1.3×"]
    assert not evaluation.prompt_targets(_planted(fd_ratio=3.01))["Fréchet ratio ≤ 3"]
    swapped = _planted()
    swapped["attributes"]["upright"]["slant"] = 6.0  # upright beyond slanted right
    assert not evaluation.prompt_targets(swapped)["slant: right > upright > left"]
    neg = _planted(negative={"none": 0.3, "bold": 0.31, "thin": 0.29})
    targets = evaluation.prompt_targets(neg)
    assert not targets['negative "bold" lowers mass'] and not targets['negative "thin" raises mass']


def test_model_card_lists_the_prompt_eval_and_the_vocabulary(tmp_path):
    training.write_json_atomic(tmp_path / "train_metrics.json", {
        "recipe": "digits-sd", "seed": 0, "torch": "x", "threads": 1, "train_seconds": 1, "prompt_dropout": 0.1,
        "max_length": 16, "attribute_thresholds": {"mass": [0.28, 0.33], "slant": [-6.9, 2.5]}})
    report = _planted(num=10, per_attribute=10, steps=2, guidance=3.0, fd=1.0, fd_real=0.4, histogram=[1] * 10)
    report["targets"] = evaluation.prompt_targets(report)
    card = training.write_model_card(tmp_path, report).read_text()
    assert "| `a bold {d}` | 0.3500 |" in card and "bold/thin mean-mass ratio 1.400" in card
    assert "mass ≤ 0.2800 → \"thin\"" in card and "> 2.50° → \"slanted right\"" in card
    assert "`skinny`" in card and "`leaning`" in card and "max length 16" in card


def test_prompt_grid_rows_share_their_noises(pipe, tmp_path):
    path = evaluation.prompt_grid(pipe, ["a bold 4", "a bold 4", "3"], tmp_path / "g.png", columns=3, steps=2,
                                  guidance=3.0, scale=2)
    im = Image.open(path)
    assert im.mode == "L"
    pixels = torch.from_numpy(np.asarray(im).astype(np.int32))
    cell = 32 + 2
    rows = [pixels[2 + r * cell:2 + r * cell + 32, -3 * cell:] for r in range(3)]
    assert torch.equal(rows[0], rows[1])  # same prompt, same noises → the same row
    assert not torch.equal(rows[0], rows[2])
    with pytest.raises(ValueError, match="prompts"):
        evaluation.prompt_grid(pipe, [], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_the_shipped_digits_sd_follows_digits_and_thickness():
    import fastdiff
    from fastdiff.hub import ASSETS
    from fastdiff.models.classifier import DigitClassifier

    pipe = fastdiff.load("digits-sd")
    classifier = DigitClassifier.from_pretrained(ASSETS / "digits-classifier").eval()
    digits = [d % 10 for d in range(20)]
    with torch.no_grad():
        named = _samples_steps(pipe, [f"the digit {d}" for d in digits], 10)
        preds = classifier(named).argmax(1)
    assert (preds == torch.tensor(digits)).float().mean() >= 0.9
    thin = digit_attributes(_samples_steps(pipe, [f"a thin {d}" for d in digits], 10))["mass"].mean()
    bold = digit_attributes(_samples_steps(pipe, [f"a bold {d}" for d in digits], 10))["mass"].mean()
    assert bold > 1.2 * thin, (float(bold), float(thin))


def _samples_steps(pipe, prompts, steps):
    return pipe(prompt=prompts, num_inference_steps=steps, generator=0, output_type="pt", progress=False) * 2 - 1
