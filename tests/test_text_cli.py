"""Text-to-image models on the command line and for the generic callers: ``fastdiff sample --prompt /
--negative-prompt`` (run as a subprocess, as tests/test_cli.py does), its usage errors (one line, exit 2, nothing
written), ``fastdiff generate`` (in-process ``cli.main``, as tests/test_generate.py does), and
``fastdiff.hub.sampling_defaults`` / ``fastdiff.evaluation.evaluate`` on a TextToImagePipeline (labels d → prompts
"d"). The tiny random pipeline of tests/model_factories.py, saved to a temporary folder, stands in for digits-sd."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from model_factories import tiny_text_pipeline
from PIL import Image

import fastdiff
from fastdiff import cli, hub
from fastdiff.generate import MANIFEST, image_generator
from tests.test_cli import run

pytestmark = pytest.mark.usefixtures("one_thread")  # (conftest.py)


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    """A tiny text-to-image pipeline folder: 16×16 grayscale images, default 4 DDIM steps, guidance 3."""
    folder = tmp_path_factory.mktemp("models") / "tiny-text"
    tiny_text_pipeline().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def unguided_text_model(tmp_path_factory):
    """The same without a default guidance scale."""
    folder = tmp_path_factory.mktemp("models") / "tiny-text-unguided"
    pipe = tiny_text_pipeline()
    del pipe.settings["default_guidance_scale"]
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def class_model(tmp_path_factory):
    """A tiny class-conditional pixel pipeline folder (not a text model)."""
    from tests.test_pipelines import pixel_pipe

    folder = tmp_path_factory.mktemp("models") / "tiny-class"
    pipe = pixel_pipe()
    pipe.settings.update(default_steps=2, default_guidance_scale=2.0)
    pipe.save_pretrained(folder)
    return folder


# --------------------------------------------------------------------------------------------- fastdiff sample
def test_prompt_writes_a_grid_and_class_d_is_prompt_d(tmp_path, text_model):
    prompt, by_class = tmp_path / "prompt.png", tmp_path / "class.png"
    res = run("sample", "--model", str(text_model), "--prompt", "4", "--num", "6", "--out", str(prompt),
              "--dtype", "fp32")
    assert res.returncode == 0, res.stderr
    assert str(prompt) in res.stdout and "prompt '4'" in res.stdout
    with Image.open(prompt) as im:  # 6 images of 16×16: a 3 × 2 grid with 2-pixel padding
        assert im.format == "PNG" and im.mode == "L" and im.size == (3 * 18 + 2, 2 * 18 + 2)
    res = run("sample", "--model", str(text_model), "--class", "4", "--num", "6", "--out", str(by_class),
              "--dtype", "fp32")
    assert res.returncode == 0, res.stderr
    assert by_class.read_bytes() == prompt.read_bytes()  # --class 4 stands for the prompt "4"


def test_the_example_prompt_and_a_negative_prompt(tmp_path, text_model):
    plain, negative = tmp_path / "x.png", tmp_path / "neg.png"
    res = run("sample", "--model", str(text_model), "--prompt", "a thin slanted 4", "--num", "16", "--out",
              str(plain))
    assert res.returncode == 0, res.stderr
    with Image.open(plain) as im:
        assert im.size == (4 * 18 + 2, 4 * 18 + 2)
    res = run("sample", "--model", str(text_model), "--prompt", "a thin slanted 4", "--negative-prompt", "bold",
              "--guidance", "4", "--num", "16", "--out", str(negative))
    assert res.returncode == 0, res.stderr
    with Image.open(plain) as a, Image.open(negative) as b:
        assert a.size == b.size and not np.array_equal(np.asarray(a), np.asarray(b))


def test_unconditional_grid_cycles_the_label_prompts(tmp_path, text_model):
    out = tmp_path / "labels.png"
    res = run("sample", "--model", str(text_model), "--num", "3", "--out", str(out), "--steps", "2")
    assert res.returncode == 0, res.stderr
    assert out.is_file()


@pytest.mark.parametrize("case, args, message", [
    ("prompt on a class model", ["--prompt", "a 4"], "--prompt: model"),
    ("negative prompt on a class model", ["--negative-prompt", "bold", "--guidance", "3"], "--negative-prompt: model"),
    ("prompt and class", ["--prompt", "a 4", "--class", "4"], "--prompt or --class"),
    ("negative prompt, guidance 1", ["--prompt", "a 4", "--negative-prompt", "bold", "--guidance", "1"],
     "--negative-prompt needs classifier-free guidance > 1"),
    ("negative prompt, guidance 0.5", ["--negative-prompt", "bold", "--guidance", "0.5"],
     "--negative-prompt needs classifier-free guidance > 1"),
    ("negative prompt, no default guidance", ["--prompt", "a 4", "--negative-prompt", "bold"],
     "--negative-prompt needs classifier-free guidance > 1"),
    ("class out of range", ["--class", "10"], "--class must be in [0, 10)"),
])
def test_usage_errors_are_one_line_exit_2_nothing_written(tmp_path, text_model, unguided_text_model, class_model,
                                                          case, args, message):
    model = {"prompt on a class model": class_model, "negative prompt on a class model": class_model,
             "negative prompt, no default guidance": unguided_text_model}.get(case, text_model)
    res = run("sample", "--model", str(model), "--num", "2", *args, "--out", str(tmp_path / "x.png"), cwd=tmp_path)
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and lines[0].startswith("fastdiff: error: "), res.stderr
    assert "Traceback" not in res.stderr
    assert not list(tmp_path.iterdir())  # nothing written


def test_sample_help_mentions_the_prompt_flags():
    res = run("sample", "--help")
    assert res.returncode == 0
    assert "--prompt TEXT" in res.stdout and "--negative-prompt TEXT" in res.stdout


# --------------------------------------------------------------------------------------------- fastdiff generate
def test_generate_writes_images_of_the_label_prompts(tmp_path, text_model, capsys):
    out = tmp_path / "out"
    rc = cli.main(["-q", "generate", "--model", str(text_model), "-n", "3", "--outdir", str(out), "--batch", "2",
                   "--format", "npz"])
    assert rc == 0, capsys.readouterr().err
    assert "generated 3 images" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["000000.npz", "000001.npz", "000002.npz", MANIFEST]
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["pipeline"] == "TextToImagePipeline" and manifest["num_classes"] == 10
    assert manifest["steps"] == 4 and manifest["guidance"] == 3.0
    # image 2 is the prompt "2" drawn with image 2's generator, as the pipeline makes it
    with np.load(out / "000002.npz") as f:
        image, label = f["image"], int(f["class_label"])
    assert label == 2 and image.shape == (16, 16, 1)
    ref = fastdiff.load(text_model)(prompt="2", generator=[image_generator(0, 2)], output_type="np", progress=False)
    np.testing.assert_allclose(image, ref[0], atol=1e-5, rtol=0)


def test_generate_png(tmp_path, text_model, capsys):
    out = tmp_path / "png"
    assert cli.main(["-q", "generate", "--model", str(text_model), "-n", "2", "--outdir", str(out),
                     "--steps", "2"]) == 0, capsys.readouterr().err
    with Image.open(out / "000001.png") as im:
        assert im.size == (16, 16)


# --------------------------------------------------------------------------------------------- generic callers
def test_sampling_defaults_of_a_text_model(text_model, unguided_text_model):
    pipe = fastdiff.load(text_model)
    defaults = hub.sampling_defaults(pipe)
    assert (defaults.num_classes, defaults.steps, defaults.guidance) == (10, 4, 3.0)
    assert defaults.class_labels(range(12)) == [*range(10), 0, 1]
    assert hub.sampling_defaults(pipe, steps=2, guidance=1.5).call_kwargs() == {"num_inference_steps": 2,
                                                                               "guidance_scale": 1.5}
    assert hub.sampling_defaults(fastdiff.load(unguided_text_model)).guidance is None


def test_default_guidance_applies_to_a_context_model():
    """The model's default guidance is for every conditional model, a cross-attention one included (no labels)."""
    from fastdiff.pipelines import LatentDiffusionPipeline

    text = tiny_text_pipeline()
    pipe = LatentDiffusionPipeline(text.unet, text.vae, text.scheduler, sample_size=8)
    pipe.settings.update(default_guidance_scale=2.5)
    defaults = hub.sampling_defaults(pipe)
    assert defaults.num_classes is None and defaults.guidance == 2.5


def test_evaluate_a_text_model(text_model):
    from fastdiff.evaluation import evaluate

    report = evaluate(fastdiff.load(text_model), num=10, batch_size=5, progress=False)
    assert report["steps"] == 4 and report["guidance"] == 3.0 and report["sampler"] == "DDIMScheduler"
    assert "accuracy" in report and sum(report["histogram"]) == 10
    images = fastdiff.load(text_model)(class_labels=[3, 4], batch_size=2, generator=0, output_type="pt",
                                       progress=False)
    assert images.shape == (2, 1, 16, 16) and torch.isfinite(images).all()
