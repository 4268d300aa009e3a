"""fastdiff train: every recipe runs end to end (a few steps) into a loadable pipeline folder with a model card, and
the discriminator augmentation of digits-dcgan shifts images exactly as documented."""

from __future__ import annotations

import json

import pytest
import torch

import fastdiff
from fastdiff import training

pytest.importorskip("sklearn")


def _shift_reference(img: torch.Tensor, dy: int, dx: int, fill: float) -> torch.Tensor:
    """out[y, x] = img[y + dy, x + dx] where that is inside the image, else fill (loops, no gather)."""
    out = torch.full_like(img, fill)
    _, h, w = img.shape
    for y in range(h):
        for x in range(w):
            if 0 <= y + dy < h and 0 <= x + dx < w:
                out[:, y, x] = img[:, y + dy, x + dx]
    return out


def test_translate_matches_an_explicit_shift():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 2, 7, 9, generator=g)
    out = training.translate(x, 2, torch.Generator().manual_seed(5), fill=-1.0)
    # the shifts it drew: the same generator draws sy then sx
    g2 = torch.Generator().manual_seed(5)
    sy = torch.randint(0, 5, (32,), generator=g2) - 2
    sx = torch.randint(0, 5, (32,), generator=g2) - 2
    assert len(set(zip(sy.tolist(), sx.tolist()))) > 5  # several different shifts were exercised
    for i in range(32):
        torch.testing.assert_close(out[i], _shift_reference(x[i], int(sy[i]), int(sx[i]), -1.0), rtol=0, atol=0)


def test_translate_is_differentiable():
    x = torch.randn(4, 1, 6, 6, requires_grad=True)
    out = training.translate(x, 1, torch.Generator().manual_seed(1))
    out.sum().backward()
    # every input pixel that stays inside gets gradient 1, the shifted-out ones 0
    assert set(x.grad.unique().tolist()) <= {0.0, 1.0} and x.grad.sum() > 0


@pytest.mark.parametrize("name", sorted(training.RECIPES))
def test_every_recipe_trains_and_saves_a_loadable_folder(name, tmp_path):
    torch.manual_seed(0)
    metrics = training.train(name, tmp_path / name, steps=2, progress=False)
    saved = json.loads((tmp_path / name / "train_metrics.json").read_text())
    assert saved == json.loads(json.dumps(metrics))
    assert saved["recipe"] == name and saved["seed"] == 0 and saved["train_seconds"] >= 0
    card = (tmp_path / name / "MODEL_CARD.md").read_text()
    assert card.startswith(f"# {name}") and "CPU time" in card and "Preprocessing" in card
    if name == "digits-classifier":
        assert 0.0 <= saved["held_out_accuracy"] <= 1.0
        return
    pipe = fastdiff.load(tmp_path / name)
    kwargs = {"batch_size": 2, "output_type": "np", "progress": False, "generator": 0}
    if hasattr(pipe, "tokenizer"):  # text-to-image: the prompts set the batch
        kwargs = {**kwargs, "prompt": ["a bold seven", "3"], "batch_size": None}
        del kwargs["batch_size"]
    if hasattr(pipe, "unet"):
        kwargs["num_inference_steps"] = 2
    images = pipe(**kwargs)
    assert images.shape == (2, 16, 16, 1) and images.min() >= 0 and images.max() <= 1


def test_unknown_recipe_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown recipe 'digits-nothing'"):
        training.train("digits-nothing", tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists()
