"""fastdiff.interop: diffusers checkpoints in (folders and objects) with output parity, fastdiff models and pipelines
out to diffusers, diffusers pipeline folders, accelerate()/restore() on diffusers objects, diffusers staying optional.

Tests that need diffusers skip themselves without it; the ImportError and folder-without-diffusers tests run anyway.
(``pipe.scheduler = fastdiff.schedulers.DDIMScheduler.from_config(pipe.scheduler.config)`` inside diffusers'
DDIMPipeline / DDPMPipeline is tested in test_schedulers_interop.py.)
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from utils import assert_rel_close

import fastdiff
import fastdiff.pipelines
import fastdiff.schedulers as fs
from fastdiff import interop
from fastdiff.interop.diffusers_config import diffusers_config
from fastdiff.interop.diffusers_models import state_dict_to_diffusers
from fastdiff.models import VQVAE, AutoencoderKL, UNet

TOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")  # (conftest.py)


def dm():
    return pytest.importorskip("diffusers")


# --------------------------------------------------------------------------------------------- parity configs
UNET2D = {
    "attn-level1-classes": dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                                down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=8,
                                num_class_embeds=11),
    "attn-level0-one-head-sincos-no-mid-attn": dict(
        block_out_channels=(8, 16), layers_per_block=2, norm_num_groups=8, down_block_types=("AttnDownBlock2D",
        "DownBlock2D"), up_block_types=("UpBlock2D", "AttnUpBlock2D"), attention_head_dim=None, flip_sin_to_cos=False,
        freq_shift=1, add_attention=False, norm_eps=1e-6),
    "three-levels-head4-dropout": dict(
        block_out_channels=(8, 8, 16), layers_per_block=1, norm_num_groups=4, in_channels=1, out_channels=2,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"), attention_head_dim=4, dropout=0.1),
}
COND = {
    "linear-proj-2-heads": dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=12,
                                attention_head_dim=2, use_linear_projection=True),
    "per-level-heads-one-width-classes": dict(  # heads (1, 2) at (8, 16) channels: one head width 8
        block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=6, attention_head_dim=(1, 2),
        num_class_embeds=4, upcast_attention=True),
    "conv-proj-sincos-2-layers": dict(
        block_out_channels=(8, 16), layers_per_block=2, norm_num_groups=4, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=(6, 6), attention_head_dim=4, flip_sin_to_cos=False, freq_shift=1),
}
AKL = {
    "two-levels": dict(block_out_channels=(8, 16), latent_channels=4, norm_num_groups=4),
    "one-level-no-attn-no-quant": dict(block_out_channels=(8,), layers_per_block=2, latent_channels=2,
                                       norm_num_groups=4, in_channels=1, out_channels=1, mid_block_add_attention=False,
                                       use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.5,
                                       shift_factor=0.1),
}
VQ = {
    "two-levels": dict(block_out_channels=(8, 16), latent_channels=3, norm_num_groups=4, num_vq_embeddings=16),
    "embed-dim-no-attn": dict(block_out_channels=(8,), layers_per_block=2, latent_channels=3, vq_embed_dim=2,
                              norm_num_groups=4, num_vq_embeddings=8, mid_block_add_attention=False),
}
FAMILIES = {"UNet2DModel": UNET2D, "UNet2DConditionModel": COND, "AutoencoderKL": AKL, "VQModel": VQ}
CASES = [pytest.param(family, name, id=f"{family}-{name}") for family, cases in FAMILIES.items() for name in cases]


def build_diffusers(family: str, name: str, **overrides):
    kwargs = {**FAMILIES[family][name], **overrides}
    n = len(kwargs["block_out_channels"])
    if family in ("AutoencoderKL", "VQModel"):
        kwargs.update(down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n)
    else:
        kwargs.setdefault("sample_size", 8)
    if family == "UNet2DConditionModel":
        kwargs.setdefault("in_channels", 3)
        kwargs.setdefault("out_channels", 3)
    torch.manual_seed(0)
    return getattr(dm(), family)(**kwargs).eval()


def make_inputs(cfg, seed: int = 1) -> dict:
    """Random inputs for a model with diffusers config ``cfg`` (drawn from ``seed``: equal on every call)."""
    torch.manual_seed(seed)
    if "num_vq_embeddings" in cfg or "latent_channels" in cfg:
        return {"x": torch.randn(2, cfg.in_channels, 16, 16)}
    inputs = {"x": torch.randn(2, cfg.in_channels, 8, 8), "t": torch.tensor([10, 900]), "labels": None,
              "context": None}
    if cfg.num_class_embeds:
        inputs["labels"] = torch.randint(0, cfg.num_class_embeds, (2,))
    if "cross_attention_dim" in cfg:
        dim = cfg.cross_attention_dim
        inputs["context"] = torch.randn(2, 5, dim[0] if isinstance(dim, (list, tuple)) else dim)
    return inputs


@torch.no_grad()
def run_diffusers(theirs, seed: int = 1):
    i = make_inputs(theirs.config, seed)
    if "t" not in i:
        return theirs(i["x"]).sample
    kwargs = {"class_labels": i["labels"]} if i["labels"] is not None else {}
    if i["context"] is not None:
        kwargs["encoder_hidden_states"] = i["context"]
    return theirs(i["x"], i["t"], **kwargs).sample


@torch.no_grad()
def run_fastdiff(ours, theirs_config, seed: int = 1):
    i = make_inputs(theirs_config, seed)
    if "t" not in i:
        return ours(i["x"])[0]
    return ours(i["x"], i["t"], i["labels"], context=i["context"])


def outputs(theirs, ours, seed: int = 1):
    """(diffusers output, fastdiff output) for the same random inputs."""
    return run_diffusers(theirs, seed), run_fastdiff(ours, theirs.config, seed)


def assert_same_weights(ours, theirs):
    state = ours.state_dict()
    for key, ref in theirs.state_dict().items():
        key = key.replace(".to_out.0.", ".to_out.")
        assert torch.equal(state[key], ref), key


@pytest.mark.parametrize("family, name", CASES)
def test_parity_from_folder_and_object(family, name, tmp_path):
    theirs = build_diffusers(family, name)
    theirs.save_pretrained(tmp_path)
    expected_class = {"UNet2DModel": UNet, "UNet2DConditionModel": UNet, "AutoencoderKL": AutoencoderKL,
                      "VQModel": VQVAE}[family]
    for ours in (fastdiff.from_diffusers(tmp_path), fastdiff.from_diffusers(theirs)):
        assert type(ours) is expected_class and not ours.training
        assert_same_weights(ours, theirs)
        ref, out = outputs(theirs, ours)
        assert_rel_close(out, ref, TOL, what=f"{family} {name}")
        assert out.std() > 0.01


def test_mapped_configs():
    """The config facts behind the parity: null class, head count vs head width, scaling factors."""
    ours = fastdiff.from_diffusers(build_diffusers("UNet2DModel", "attn-level1-classes"))
    assert ours.config.num_classes == 10 and ours.null_class == 10 and ours.config.attention_head_dim == 8
    ours = fastdiff.from_diffusers(build_diffusers("UNet2DConditionModel", "linear-proj-2-heads"))
    assert ours.config.num_attention_heads == 2 and ours.config.context_dim == 12
    ours = fastdiff.from_diffusers(build_diffusers("UNet2DConditionModel", "per-level-heads-one-width-classes"))
    assert ours.config.attention_head_dim == 8 and ours.config.num_attention_heads is None
    ours = fastdiff.from_diffusers(build_diffusers("AutoencoderKL", "one-level-no-attn-no-quant"))
    assert (ours.config.scaling_factor, ours.config.shift_factor, ours.config.norm_eps) == (0.5, 0.1, 1e-6)


SD15_UNET = {"act_fn": "silu", "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
             "center_input_sample": False, "cross_attention_dim": 768, "down_block_types": ["CrossAttnDownBlock2D"] * 3
             + ["DownBlock2D"], "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
             "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
             "out_channels": 4, "sample_size": 64, "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3}


def test_real_world_configs_map():
    """Stable Diffusion 1.x / 2.x UNets and VAE configs (as on the Hub) map; SDXL's is rejected with its reasons."""
    _, sd15 = interop.convert_config("UNet2DConditionModel", SD15_UNET)
    assert (sd15.num_attention_heads, sd15.context_dim, sd15.attention_levels) == (8, 768, (0, 1, 2))
    _, sd21 = interop.convert_config("UNet2DConditionModel", {**SD15_UNET, "attention_head_dim": [5, 10, 20, 20],
                                     "cross_attention_dim": 1024, "use_linear_projection": True,
                                     "upcast_attention": True, "sample_size": 96})
    assert (sd21.attention_head_dim, sd21.num_attention_heads, sd21.use_linear_projection) == (64, None, True)
    _, vae = interop.convert_config("AutoencoderKL", {"block_out_channels": [128, 256, 512, 512],
                                                      "down_block_types": ["DownEncoderBlock2D"] * 4,
                                                      "up_block_types": ["UpDecoderBlock2D"] * 4, "latent_channels": 4,
                                                      "layers_per_block": 2, "sample_size": 512})
    assert vae.scaling_factor == 0.18215 and vae.norm_eps == 1e-6
    sdxl = {**SD15_UNET, "addition_embed_type": "text_time", "transformer_layers_per_block": [1, 2, 10],
            "projection_class_embeddings_input_dim": 2816}
    with pytest.raises(ValueError, match="addition_embed_type='text_time'.*transformer_layers_per_block"):
        interop.convert_config("UNet2DConditionModel", sdxl)


def test_fp16_checkpoint_keeps_its_dtype(tmp_path):
    theirs = build_diffusers("AutoencoderKL", "two-levels").half()
    theirs.save_pretrained(tmp_path)
    assert next(fastdiff.from_diffusers(tmp_path).parameters()).dtype == torch.float16
    assert next(fastdiff.from_diffusers(tmp_path, dtype=torch.float32).parameters()).dtype == torch.float32


# --------------------------------------------------------------------------------------------- unsupported options
BASE = {
    "UNet2DModel": {"block_out_channels": [8, 16], "norm_num_groups": 4,
                    "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
                    "up_block_types": ["AttnUpBlock2D", "UpBlock2D"]},
    "UNet2DConditionModel": {"block_out_channels": [8, 16], "norm_num_groups": 4, "cross_attention_dim": 6,
                             "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                             "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]},
    "AutoencoderKL": {"block_out_channels": [8, 16], "norm_num_groups": 4,
                      "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2},
}
BASE["VQModel"] = BASE["AutoencoderKL"]


@pytest.mark.parametrize("class_name, changes, pattern", [
    ("UNet2DModel", {"resnet_time_scale_shift": "scale_shift"},
     r"resnet_time_scale_shift='scale_shift' \(supported: 'default'\)"),
    ("UNet2DModel", {"mid_block_scale_factor": 2}, r"mid_block_scale_factor=2 \(supported: 1\)"),
    ("UNet2DModel", {"down_block_types": ["SkipDownBlock2D", "AttnDownBlock2D"], "act_fn": "mish"},
     r"act_fn='mish'.*down_block_types\[0\]='SkipDownBlock2D' \(supported: DownBlock2D, AttnDownBlock2D\)"),
    ("UNet2DModel", {"up_block_types": ["UpBlock2D", "AttnUpBlock2D"]}, "do not mirror"),
    ("UNet2DModel", {"time_embedding_type": "fourier"}, "time_embedding_type='fourier'"),
    ("UNet2DConditionModel", {"attention_head_dim": [1, 4]}, "do not reduce to one head width or one head count"),
    ("UNet2DConditionModel", {"transformer_layers_per_block": 2}, r"transformer_layers_per_block=2 \(supported: 1"),
    ("UNet2DConditionModel", {"addition_embed_type": "text_time", "class_embed_type": "timestep"},
     "class_embed_type='timestep'.*addition_embed_type='text_time'"),
    ("UNet2DConditionModel", {"mid_block_type": "UNetMidBlock2DSimpleCrossAttn"}, "mid_block_type="),
    ("VQModel", {"norm_type": "spatial"}, r"norm_type='spatial' \(supported: 'group'\)"),
    ("AutoencoderKL", {"up_block_types": ["UpDecoderBlock2D", "AttnUpDecoderBlock2D"]}, "up_block_types="),
])
def test_unsupported_options_are_clear_errors(class_name, changes, pattern, tmp_path):
    """Rejected from config.json alone (no weights file: nothing is read before the check), listing what is wrong and
    what is supported."""
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": class_name, **BASE[class_name], **changes}))
    with pytest.raises(ValueError, match=pattern) as info:
        fastdiff.from_diffusers(tmp_path)
    assert f"cannot convert diffusers {class_name}" in str(info.value) and "Supported:" in str(info.value)


def test_unknown_class_and_wrong_inputs(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet3DConditionModel"}))
    with pytest.raises(ValueError, match="UNet3DConditionModel.*UNet2DModel, UNet2DConditionModel, AutoencoderKL"):
        fastdiff.from_diffusers(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        fastdiff.from_diffusers(tmp_path / "nowhere")
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", **BASE["AutoencoderKL"]}))
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.safetensors"):
        fastdiff.from_diffusers(tmp_path)
    with pytest.raises(TypeError, match="path_or_model"):
        fastdiff.from_diffusers(42)


def test_unsupported_model_object():
    diffusers = dm()
    theirs = diffusers.UNet2DModel(sample_size=8, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                                   down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2,
                                   resnet_time_scale_shift="scale_shift")
    with pytest.raises(ValueError, match="resnet_time_scale_shift='scale_shift'"):
        fastdiff.from_diffusers(theirs)
    with pytest.raises(ValueError, match="fastdiff converts diffusers UNet2DModel"):
        fastdiff.from_diffusers(torch.nn.Linear(2, 2))


# --------------------------------------------------------------------------------------------- fastdiff → diffusers
def fastdiff_models():
    torch.manual_seed(0)
    return {
        "unet-classes": UNet(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, attention_levels=(1,),
                             attention_head_dim=8, num_classes=3),
        "unet-context-heads": UNet(base_channels=8, channel_mult=(1, 2), layers_per_block=1, norm_num_groups=4,
                                   attention_levels=(0, 1), num_attention_heads=2, context_dim=6),
        "unet-context-width": UNet(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                                   attention_levels=(1,), attention_head_dim=4, context_dim=6,
                                   use_linear_projection=True, num_classes=2),
        "autoencoder-kl": AutoencoderKL(block_out_channels=(8, 16), latent_channels=4, norm_num_groups=4,
                                        shift_factor=0.25),
        "vqvae": VQVAE(block_out_channels=(8, 16), latent_channels=3, norm_num_groups=4, num_embeddings=16,
                       embedding_dim=2),
    }


@pytest.mark.parametrize("name", list(fastdiff_models()))
def test_to_diffusers_parity_and_exact_round_trip(name):
    ours = fastdiff_models()[name].eval()
    theirs = fastdiff.to_diffusers(ours, sample_size=8)
    ref, out = outputs(theirs, ours)
    assert_rel_close(out, ref, TOL, what=f"{name} vs its diffusers conversion")
    back = fastdiff.from_diffusers(theirs)
    assert type(back) is type(ours)
    if isinstance(ours, UNet):  # the channels come back as block_out_channels, whichever way they were given
        assert back.config.channels == ours.config.channels
        different = {k for k, v in vars(back.config).items() if getattr(ours.config, k) != v}
        inert = {"attention_head_dim"} if ours.config.num_attention_heads is not None else set()  # heads win
        assert different <= {"base_channels", "channel_mult", "block_out_channels"} | inert, different
    else:
        assert back.config == ours.config
    state = back.state_dict()
    assert list(state) == list(ours.state_dict())
    for key, value in ours.state_dict().items():
        assert torch.equal(state[key], value), key
    assert torch.equal(run_fastdiff(back, theirs.config), run_fastdiff(ours, theirs.config))


def test_to_diffusers_rejects_what_diffusers_cannot_express():
    with pytest.raises(ValueError, match="head widths"):
        diffusers_config(UNet(block_out_channels=(8, 16), norm_num_groups=4, attention_levels=(0, 1),
                              num_attention_heads=2))
    with pytest.raises(ValueError, match="UNetMidBlock2DCrossAttn"):
        diffusers_config(UNet(block_out_channels=(8, 16), norm_num_groups=4, context_dim=4, mid_attention=False))
    with pytest.raises(ValueError, match="epsilon"):
        diffusers_config(AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, norm_eps=1e-5))
    with pytest.raises(TypeError, match="UNet, AutoencoderKL, VQVAE or DiffusionPipeline"):
        diffusers_config(torch.nn.Linear(2, 2))


def tiny_pipeline(scheduler_class=fs.DDIMScheduler, num_classes=3):
    torch.manual_seed(0)
    unet = UNet(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, attention_levels=(1,),
                attention_head_dim=8, num_classes=num_classes).eval()
    return fastdiff.pipelines.DiffusionPipeline(unet, scheduler_class(), sample_size=8)


def test_pipeline_to_diffusers_samples_like_fastdiff():
    """A class-conditional DDIM pipeline: diffusers' DDIMPipeline passes no labels, so the null class is supplied and
    both sample unconditionally, with the same images for the same seed."""
    diffusers = dm()
    pipe = tiny_pipeline()
    theirs = fastdiff.to_diffusers(pipe)
    assert type(theirs) is diffusers.DDIMPipeline and type(theirs.scheduler) is diffusers.DDIMScheduler
    theirs.set_progress_bar_config(disable=True)
    kwargs = {"batch_size": 2, "num_inference_steps": 4, "output_type": "np"}
    ref = theirs(generator=torch.Generator().manual_seed(0), **kwargs).images
    out = pipe(generator=0, progress=False, **kwargs)
    assert_rel_close(torch.from_numpy(out), torch.from_numpy(ref), TOL, "DiffusionPipeline vs diffusers DDIMPipeline")
    ddpm = fastdiff.to_diffusers(tiny_pipeline(fs.DDPMScheduler, num_classes=None))
    assert type(ddpm) is diffusers.DDPMPipeline and type(ddpm.scheduler) is diffusers.DDPMScheduler


def test_pipeline_to_diffusers_errors():
    dm()
    pipe = tiny_pipeline(fs.EulerDiscreteScheduler)
    with pytest.raises(ValueError, match="DDIMScheduler.*EulerDiscreteScheduler"):
        fastdiff.to_diffusers(pipe)
    latent = fastdiff.pipelines.LatentDiffusionPipeline(pipe.unet, AutoencoderKL(block_out_channels=(8,),
                                                        norm_num_groups=4), fs.DDIMScheduler(), sample_size=8)
    with pytest.raises(ValueError, match="LatentDiffusionPipeline"):
        fastdiff.to_diffusers(latent)


# --------------------------------------------------------------------------------------------- pipeline folders
def test_ddim_pipeline_folder(tmp_path):
    diffusers = dm()
    theirs = diffusers.DDIMPipeline(unet=build_diffusers("UNet2DModel", "attn-level0-one-head-sincos-no-mid-attn"),
                                    scheduler=diffusers.DDIMScheduler(beta_schedule="squaredcos_cap_v2"))
    theirs.save_pretrained(tmp_path)
    pipe = fastdiff.pipeline_from_diffusers(tmp_path)
    assert type(pipe) is fastdiff.pipelines.DiffusionPipeline and isinstance(pipe.scheduler, fs.DDIMScheduler)
    assert pipe.settings["sample_size"] == 8 and pipe.scheduler.config.beta_schedule == "squaredcos_cap_v2"
    theirs.set_progress_bar_config(disable=True)
    kwargs = {"batch_size": 2, "num_inference_steps": 4, "output_type": "np"}
    ref = theirs(generator=torch.Generator().manual_seed(0), **kwargs).images
    out = pipe(generator=0, progress=False, **kwargs)
    assert_rel_close(torch.from_numpy(out), torch.from_numpy(ref), TOL, "DDIMPipeline folder")


def test_latent_pipeline_folder(tmp_path):
    """A Stable-Diffusion-shaped folder (unet with cross-attention, vae, scheduler, text encoder): the text encoder must
    be ignored explicitly; the latent pipeline then matches diffusers' components run by hand."""
    diffusers = dm()
    unet = build_diffusers("UNet2DConditionModel", "linear-proj-2-heads", in_channels=4, out_channels=4)
    vae = build_diffusers("AutoencoderKL", "two-levels")
    scheduler = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                        clip_sample=False, steps_offset=1)
    unet.save_pretrained(tmp_path / "unet")
    vae.save_pretrained(tmp_path / "vae")
    scheduler.save_pretrained(tmp_path / "scheduler")
    (tmp_path / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "safety_checker": [None, None]}))
    with pytest.raises(ValueError, match=r"\['text_encoder', 'tokenizer'\].*ignore="):
        fastdiff.pipeline_from_diffusers(tmp_path)
    pipe = fastdiff.pipeline_from_diffusers(tmp_path, ignore=("text_encoder", "tokenizer"))
    assert type(pipe) is fastdiff.pipelines.LatentDiffusionPipeline and pipe.settings["sample_size"] == 8
    context = torch.randn(2, 5, 12)
    out = pipe(batch_size=2, num_inference_steps=3, generator=0, context=context, output_type="pt", progress=False)
    # the same loop with diffusers' components
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn((2, 4, 8, 8), generator=generator)
    scheduler.set_timesteps(3)
    with torch.no_grad():
        for t in scheduler.timesteps:
            eps = unet(latents, t, encoder_hidden_states=context).sample
            latents = scheduler.step(eps, t, latents).prev_sample
        ref = (vae.decode(latents / vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    assert_rel_close(out, ref, TOL, "latent pipeline folder")


def test_ldm_pipeline_folder_with_a_vqvae(tmp_path):
    diffusers = dm()
    unet = build_diffusers("UNet2DModel", "attn-level1-classes", in_channels=2, out_channels=2, num_class_embeds=None,
                           sample_size=4)  # denoises the 2-dim codebook vectors of a one-level VQModel
    theirs = diffusers.LDMPipeline(vqvae=build_diffusers("VQModel", "embed-dim-no-attn"), unet=unet,
                                   scheduler=diffusers.DDIMScheduler())
    theirs.save_pretrained(tmp_path)
    pipe = fastdiff.pipeline_from_diffusers(tmp_path)
    assert type(pipe) is fastdiff.pipelines.VQPipeline
    theirs.set_progress_bar_config(disable=True)
    ref = theirs(batch_size=2, num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                 output_type="np").images
    out = pipe(batch_size=2, num_inference_steps=3, generator=0, output_type="np", progress=False)
    assert_rel_close(torch.from_numpy(out), torch.from_numpy(ref), TOL, "LDMPipeline folder")


def test_pipeline_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        fastdiff.pipeline_from_diffusers(tmp_path)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "X", "unet": ["diffusers", "UNet2DModel"],
                                                           "scheduler": ["diffusers", "TCDScheduler"]}))
    write_diffusers_unet(tmp_path / "unet")
    with pytest.raises(ValueError, match="'TCDScheduler' has no fastdiff equivalent.*DDIMScheduler"):
        fastdiff.pipeline_from_diffusers(tmp_path)
    pipe = fastdiff.pipeline_from_diffusers(tmp_path, scheduler=fs.DDPMScheduler())
    assert isinstance(pipe.scheduler, fs.DDPMScheduler)


# --------------------------------------------------------------------------------------------- accelerate / restore
def snapshot(module):
    """Everything restore must give back: state dict (keys, values), parameter objects, module objects and classes."""
    return ({k: v.clone() for k, v in module.state_dict().items()}, dict(module.named_parameters()),
            [(name, m, type(m)) for name, m in module.named_modules()])


def assert_unchanged(module, snap):
    state, params, _ = snap
    now = module.state_dict()
    assert list(now) == list(state)
    assert all(torch.equal(now[k], v) for k, v in state.items())
    assert all(p is params[name] for name, p in module.named_parameters())


def assert_restored(module, snap):
    assert_unchanged(module, snap)
    assert [(name, m, type(m)) for name, m in module.named_modules()] == snap[2]


def attention_processors(module):
    return {name: m.processor for name, m in module.named_modules() if type(m).__name__ == "Attention"}


@pytest.mark.parametrize("family, name", [("UNet2DModel", "attn-level1-classes"),
                                          ("UNet2DConditionModel", "per-level-heads-one-width-classes"),
                                          ("AutoencoderKL", "two-levels")])
def test_accelerate_and_restore_a_diffusers_model(family, name, caplog):
    model = build_diffusers(family, name)
    ref = run_diffusers(model)
    snap, processors = snapshot(model), attention_processors(model)
    resnets = sum(type(m).__name__ == "ResnetBlock2D" for m in model.modules())
    with caplog.at_level(logging.INFO, logger="fastdiff"):
        assert fastdiff.accelerate(model) is model
    expected = {"group_norm_silu": 2 * resnets + (1 if family != "AutoencoderKL" else 2),
                "attention": len(processors), "scheduler": 0}
    assert interop.accelerate_report(model) == expected
    line = (f"fastdiff.accelerate({family}): replaced group_norm_silu={expected['group_norm_silu']}, "
            f"attention={expected['attention']}, scheduler=0")
    assert [r.getMessage() for r in caplog.records if "accelerate" in r.getMessage()] == [line]
    assert_unchanged(model, snap)
    fastdiff.reset_counts()
    out = run_diffusers(model)
    counts = fastdiff.counts()
    assert counts.get(("attention", "torch"), 0) >= expected["attention"]
    assert counts.get(("group_norm_silu", "torch"), 0) >= expected["group_norm_silu"]
    assert_rel_close(out, ref, TOL, f"accelerated {family}")
    assert fastdiff.accelerate(model) is model and interop.accelerate_report(model) == expected  # idempotent
    assert fastdiff.restore(model) is model and interop.accelerate_report(model) is None
    assert_restored(model, snap)
    assert all(attention_processors(model)[k] is p for k, p in processors.items())
    again = run_diffusers(model)
    assert torch.equal(again, ref)


def test_accelerate_a_diffusers_ddim_pipeline():
    diffusers = dm()
    pipe = diffusers.DDIMPipeline(unet=build_diffusers("UNet2DModel", "attn-level0-one-head-sincos-no-mid-attn"),
                                  scheduler=diffusers.DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    kwargs = {"batch_size": 2, "num_inference_steps": 4, "output_type": "np", "eta": 0.5}
    ref = pipe(generator=torch.Generator().manual_seed(0), **kwargs).images
    original, config, snap = pipe.scheduler, dict(pipe.config), snapshot(pipe.unet)
    fastdiff.accelerate(pipe)
    assert isinstance(pipe.scheduler, fs.DDIMScheduler)
    report = interop.accelerate_report(pipe)
    resnets = sum(type(m).__name__ == "ResnetBlock2D" for m in pipe.unet.modules())
    assert report == {"group_norm_silu": 2 * resnets + 1, "attention": 5, "scheduler": 1}
    out = pipe(generator=torch.Generator().manual_seed(0), **kwargs).images
    assert_rel_close(torch.from_numpy(out), torch.from_numpy(ref), TOL, "accelerated DDIMPipeline")
    fastdiff.restore(pipe)
    assert pipe.scheduler is original and dict(pipe.config) == config
    assert_restored(pipe.unet, snap)


def test_accelerate_through_the_triton_interpreter(monkeypatch):
    """FASTDIFF_BACKEND=auto with TRITON_INTERPRET=1 (conftest): the patched GroupNorm+SiLU and attention run the
    Triton kernels through the interpreter. One-level models keep the kernel calls few (~0.2 s each)."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs TRITON_INTERPRET=1 (conftest sets it on machines without CUDA)")
    diffusers = dm()
    monkeypatch.setenv("FASTDIFF_BACKEND", "auto")
    torch.manual_seed(0)
    models = [
        (diffusers.UNet2DModel(sample_size=4, block_out_channels=(8,), layers_per_block=1, norm_num_groups=4,
                               down_block_types=("AttnDownBlock2D",), up_block_types=("AttnUpBlock2D",),
                               attention_head_dim=4), {}),
        (diffusers.UNet2DConditionModel(sample_size=4, in_channels=3, out_channels=3, block_out_channels=(8,),
                                        layers_per_block=1, norm_num_groups=4, cross_attention_dim=6,
                                        down_block_types=("CrossAttnDownBlock2D",),
                                        up_block_types=("CrossAttnUpBlock2D",), attention_head_dim=2),
         {"encoder_hidden_states": torch.randn(1, 3, 6)}),
    ]
    for model, kwargs in models:
        x = torch.randn(1, 3, 4, 4)
        with torch.no_grad():
            ref = model.eval()(x, 7, **kwargs).sample
            fastdiff.accelerate(model)
            fastdiff.reset_counts()
            out = model(x, 7, **kwargs).sample
        counts = fastdiff.counts()
        assert counts.get(("group_norm_silu", "interpreter"), 0) > 0 and counts.get(("attention", "interpreter"), 0) > 0
        assert_rel_close(out, ref, 1e-4, f"{type(model).__name__} through the interpreter")
        fastdiff.restore(model)


def test_attention_mask_falls_back_to_the_original_processor():
    dm()
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    attn = Attention(16, cross_attention_dim=12, heads=2, dim_head=8).eval()
    x, ctx = torch.randn(2, 6, 16), torch.randn(2, 5, 12)
    mask = torch.zeros(2, 1, 5)
    mask[0, :, 3:] = -1e4
    with torch.no_grad():
        ref, ref_masked = attn(x, ctx), attn(x, ctx, attention_mask=mask)
        fastdiff.accelerate(attn)
        assert isinstance(attn.processor, interop.FastdiffAttnProcessor)
        fastdiff.reset_counts()
        out = attn(x, ctx)
        assert fastdiff.counts().get(("attention", "torch")) == 1
        fastdiff.reset_counts()
        masked = attn(x, ctx, attention_mask=mask)
        assert not fastdiff.counts()  # the original processor ran
    assert_rel_close(out, ref, TOL, "attention")
    assert torch.equal(masked, ref_masked)


def test_processor_reproduces_attn_processor_2_0_options():
    """spatial_norm, group_norm on a (B, C, H, W) input, norm_cross, residual_connection and rescale_output_factor."""
    dm()
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    attn = Attention(32, cross_attention_dim=6, heads=2, dim_head=8, norm_num_groups=4, spatial_norm_dim=3,
                     cross_attention_norm="layer_norm", residual_connection=True, rescale_output_factor=2.0).eval()
    for p in attn.parameters():  # away from the identity-like default init of the norms
        p.data.normal_(0, 0.5)
    x, ctx, zq = torch.randn(2, 32, 3, 5), torch.randn(2, 4, 6), torch.randn(2, 3, 3, 5)
    with torch.no_grad():
        ref = attn(x, ctx, temb=zq)
        fastdiff.accelerate(attn)
        out = attn(x, ctx, temb=zq)
        fastdiff.restore(attn)
    assert_rel_close(out, ref, TOL, "processor with every AttnProcessor2_0 option")


def test_bin_and_sharded_checkpoints(tmp_path):
    theirs = build_diffusers("AutoencoderKL", "two-levels")
    theirs.save_pretrained(tmp_path / "bin", safe_serialization=False)
    theirs.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    for folder in ("bin", "sharded"):
        assert_same_weights(fastdiff.from_diffusers(tmp_path / folder), theirs)


def test_accelerate_a_plain_sequential():
    """GroupNorm → SiLU inside any nn.Sequential is fused; no diffusers involved."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.GroupNorm(4, 8), torch.nn.SiLU(),
                              torch.nn.Conv2d(8, 8, 1), torch.nn.GroupNorm(2, 8), torch.nn.ReLU(),
                              torch.nn.GroupNorm(8, 8), torch.nn.SiLU()).eval()
    x = torch.randn(2, 3, 5, 5)
    ref, snap = net(x), snapshot(net)
    fastdiff.accelerate(net)
    assert interop.accelerate_report(net) == {"group_norm_silu": 2, "attention": 0, "scheduler": 0}
    assert type(net[1]) is not torch.nn.GroupNorm and type(net[4]) is torch.nn.GroupNorm  # not followed by SiLU
    assert isinstance(net[2], torch.nn.Identity)
    assert_unchanged(net, snap)
    assert_rel_close(net(x), ref, TOL, "accelerated Sequential")
    fastdiff.restore(net)
    assert_restored(net, snap)
    assert torch.equal(net(x), ref)
    with pytest.raises(TypeError, match="nn.Module or a diffusers pipeline"):
        fastdiff.accelerate(42)
    pipe = tiny_pipeline()  # a fastdiff pipeline is fused already: nothing to replace
    nothing = {"group_norm_silu": 0, "attention": 0, "scheduler": 0}
    assert interop.accelerate_report(fastdiff.accelerate(pipe)) == nothing
    fastdiff.restore(pipe)


# --------------------------------------------------------------------------------------------- diffusers optional
def write_diffusers_unet(folder):
    """A diffusers UNet2DModel folder written without diffusers (config from diffusers_config, renamed weights)."""
    torch.manual_seed(0)
    ours = UNet(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, attention_levels=(1,),
                attention_head_dim=8).eval()
    name, config = diffusers_config(ours, sample_size=8)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"_class_name": name, "_diffusers_version": "0.42.1", **config}))
    save_file(state_dict_to_diffusers(ours.state_dict()), str(folder / "diffusion_pytorch_model.safetensors"))
    return ours


def test_without_diffusers(monkeypatch, tmp_path):
    """Folders load without diffusers; what needs diffusers objects raises ImportError naming the extra."""
    ours = write_diffusers_unet(tmp_path / "unet")
    fs.DDIMScheduler().save_config(tmp_path / "scheduler")
    index = {"_class_name": "DDIMPipeline", "unet": ["diffusers", "UNet2DModel"],
             "scheduler": ["diffusers", "DDIMScheduler"]}
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    fake_pipeline = type("DDIMPipeline", (), {"__module__": "diffusers.pipelines.ddim", "components": {}})()
    monkeypatch.setitem(sys.modules, "diffusers", None)
    loaded = fastdiff.from_diffusers(tmp_path / "unet")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in ours.state_dict().items())
    assert type(fastdiff.pipeline_from_diffusers(tmp_path)) is fastdiff.pipelines.DiffusionPipeline
    for call in (lambda: fastdiff.from_diffusers(torch.nn.Linear(2, 2)), lambda: fastdiff.to_diffusers(ours),
                 lambda: fastdiff.to_diffusers(tiny_pipeline()), lambda: fastdiff.accelerate(fake_pipeline)):
        with pytest.raises(ImportError, match=r"pip install 'fastdiff\[diffusers\]'"):
            call()


def test_import_fastdiff_does_not_import_diffusers():
    code = ("import sys, fastdiff, fastdiff.interop, fastdiff.pipelines; "
            "assert 'diffusers' not in sys.modules, 'diffusers imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, cwd=Path(__file__).resolve().parent.parent)
