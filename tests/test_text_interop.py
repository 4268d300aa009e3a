"""A fastdiff TextToImagePipeline and diffusers: the converted components (``fastdiff.to_diffusers(text_pipe)``)
reproduce the pipeline's noise predictions and its whole guided sampling loop, and the diffusers-style folder
(``fastdiff.interop.save_diffusers_folder``) loads back into the same pipeline and, component by component, into
diffusers. The tiny random pipeline of tests/model_factories.py stands in for a trained model."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from model_factories import tiny_text_pipeline
from utils import assert_rel_close

import fastdiff
import fastdiff.pipelines
from fastdiff import interop

pytestmark = pytest.mark.usefixtures("one_thread")  # (conftest.py)

ATOL = 1e-4
PROMPTS = ["a thin slanted 4", "7"]


def dm():
    return pytest.importorskip("diffusers")


def test_converted_components():
    diffusers = dm()
    pipe = tiny_text_pipeline()
    c = fastdiff.to_diffusers(pipe)
    assert isinstance(c, interop.DiffusersTextComponents)
    assert type(c.unet) is diffusers.UNet2DConditionModel and c.unet.config.cross_attention_dim == 16
    assert type(c.vae) is diffusers.AutoencoderKL and c.vae.config.sample_size == 16
    assert type(c.scheduler) is diffusers.DDIMScheduler
    assert c.scheduler.config.clip_sample is False and c.scheduler.config.beta_schedule == "linear"
    # the text side is fastdiff's own, copied: changing the copy leaves the pipeline alone
    assert type(c.text_encoder) is type(pipe.text_encoder) and c.text_encoder is not pipe.text_encoder
    assert c.tokenizer is not pipe.tokenizer and c.tokenizer.vocabulary == pipe.tokenizer.vocabulary
    assert c.settings["default_guidance_scale"] == 3.0 and c.settings["sample_size"] == 8
    assert torch.equal(c.encode_prompt(PROMPTS), pipe.encode_prompt(PROMPTS))


def test_diffusers_unet_predicts_the_same_noise_from_the_text_states():
    dm()
    pipe = tiny_text_pipeline()
    c = fastdiff.to_diffusers(pipe)
    states = pipe.encode_prompt(PROMPTS + [""])  # (3, 8, 16) float32
    torch.manual_seed(1)
    x = torch.randn(3, 2, 8, 8)
    t = torch.tensor([999.0, 500.0, 1.0])
    with torch.no_grad():
        ours = pipe.unet(x, t, context=states)
        theirs = c.unet(x, t, encoder_hidden_states=states).sample
    torch.testing.assert_close(theirs, ours, atol=ATOL, rtol=0)


def test_diffusers_sampling_loop_reproduces_the_pipeline():
    """DDIM, 4 steps, guidance 3 with a negative prompt: the loop written with diffusers objects (CFG combined by
    hand, diffusers' scheduler and VAE decode) gives the pipeline's images."""
    dm()
    pipe = tiny_text_pipeline()
    c = fastdiff.to_diffusers(pipe)
    latents = torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(3))
    out = pipe(prompt=PROMPTS, negative_prompt="bold", guidance_scale=3, num_inference_steps=4, latents=latents,
               output_type="pt", progress=False)
    cond, uncond = c.encode_prompt(PROMPTS), c.encode_prompt(["bold", "bold"])
    scheduler = c.scheduler
    scheduler.set_timesteps(4)
    x = latents * scheduler.init_noise_sigma
    with torch.no_grad():
        for t in scheduler.timesteps:
            model_in = scheduler.scale_model_input(torch.cat([x, x]), t)
            eps_u, eps_c = c.unet(model_in, t, encoder_hidden_states=torch.cat([uncond, cond])).sample.chunk(2)
            x = scheduler.step(eps_u + 3.0 * (eps_c - eps_u), t, x).prev_sample
        ref = (c.vae.decode(x / c.vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    assert out.shape == (2, 1, 16, 16)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


def test_folder_round_trip_gives_identical_images(tmp_path):
    dm()
    pipe = tiny_text_pipeline()
    folder = interop.save_diffusers_folder(pipe, tmp_path / "sd")
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "TextToImagePipeline" and "_fastdiff_version" not in index
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"] and index["vae"] == ["diffusers", "AutoencoderKL"]
    assert index["scheduler"] == ["diffusers", "DDIMScheduler"]
    assert index["text_encoder"] == ["fastdiff", "TextEncoder"] and index["tokenizer"] == ["fastdiff", "WordTokenizer"]
    for name, file in (("unet", "diffusion_pytorch_model.safetensors"), ("vae", "diffusion_pytorch_model.safetensors"),
                       ("scheduler", "scheduler_config.json"), ("text_encoder", "model.safetensors"),
                       ("tokenizer", "tokenizer.json")):
        assert (folder / name / file).is_file(), name
    loaded = fastdiff.pipeline_from_diffusers(folder)
    assert type(loaded) is fastdiff.pipelines.TextToImagePipeline
    assert loaded.settings["default_steps"] == 4 and loaded.settings["default_guidance_scale"] == 3.0
    assert loaded.settings["sample_size"] == 8
    kwargs = {"prompt": PROMPTS, "negative_prompt": "bold", "generator": 0, "output_type": "pt", "progress": False}
    torch.testing.assert_close(loaded(**kwargs), pipe(**kwargs), atol=0, rtol=0)  # the model's 4 steps, guidance 3
    # the text components skipped: diffusers' unet + vae + scheduler as a plain latent pipeline
    latent = fastdiff.pipeline_from_diffusers(folder, ignore=("text_encoder", "tokenizer"))
    assert type(latent) is fastdiff.pipelines.LatentDiffusionPipeline


def test_diffusers_loads_the_folder_component_by_component(tmp_path):
    diffusers = dm()
    pipe = tiny_text_pipeline()
    folder = interop.save_diffusers_folder(pipe, tmp_path / "sd")
    unet = diffusers.UNet2DConditionModel.from_pretrained(folder, subfolder="unet").eval()
    vae = diffusers.AutoencoderKL.from_pretrained(folder, subfolder="vae").eval()
    scheduler = diffusers.DDIMScheduler.from_pretrained(folder, subfolder="scheduler")
    assert scheduler.config.num_train_timesteps == 1000
    states = pipe.encode_prompt(PROMPTS)
    x = torch.randn(2, 2, 8, 8)
    t = torch.tensor([10.0, 700.0])
    with torch.no_grad():
        assert_rel_close(unet(x, t, encoder_hidden_states=states).sample, pipe.unet(x, t, context=states), 1e-5,
                         "UNet from the folder")
        assert_rel_close(vae.decode(x).sample, pipe.vae.decode(x), 1e-5, "VAE from the folder")


def test_folder_loads_back_without_diffusers(tmp_path, monkeypatch):
    dm()
    pipe = tiny_text_pipeline()
    folder = interop.save_diffusers_folder(pipe, tmp_path / "sd")
    monkeypatch.setitem(sys.modules, "diffusers", None)
    loaded = fastdiff.pipeline_from_diffusers(folder)
    assert type(loaded) is fastdiff.pipelines.TextToImagePipeline
    with pytest.raises(ImportError, match=r"pip install 'fastdiff\[diffusers\]'"):
        interop.save_diffusers_folder(pipe, tmp_path / "again")
    with pytest.raises(ImportError, match=r"pip install 'fastdiff\[diffusers\]'"):
        fastdiff.to_diffusers(pipe)


def test_errors(tmp_path):
    dm()
    pipe = tiny_text_pipeline()
    pixel = fastdiff.pipelines.DiffusionPipeline(pipe.unet, pipe.scheduler, sample_size=8)
    with pytest.raises(ValueError, match="pipe must be a TextToImagePipeline.*DiffusionPipeline"):
        interop.save_diffusers_folder(pixel, tmp_path / "x")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a folder"):
        interop.save_diffusers_folder(pipe, tmp_path / "file")
    # a text encoder without its tokenizer
    folder = interop.save_diffusers_folder(pipe, tmp_path / "sd")
    index = json.loads((folder / "model_index.json").read_text())
    del index["tokenizer"]
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="text_encoder and tokenizer"):
        fastdiff.pipeline_from_diffusers(folder)
    # a scheduler diffusers lacks is named
    pipe.scheduler = type("OddScheduler", (fastdiff.schedulers.DDIMScheduler,), {})()
    with pytest.raises(ValueError, match="'OddScheduler'"):
        fastdiff.to_diffusers(pipe)
