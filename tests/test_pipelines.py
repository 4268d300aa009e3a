"""Pipelines: outputs, guidance inside the fused step, save/load, edge cases and errors, CUDA graphs."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

import fastdiff
from fastdiff.models import VQVAE, AutoencoderKL, DCGANGenerator, StyleGenerator, UNet
from fastdiff.pipelines import (
    DiffusionPipeline,
    GANPipeline,
    LatentDiffusionPipeline,
    NonFiniteError,
    Pipeline,
    VQPipeline,
)
from fastdiff.schedulers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
)
from tests.utils import assert_rel_close

SCHEDULERS = [DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
              EulerAncestralDiscreteScheduler]


def tiny_unet(in_channels=1, num_classes=10, context_dim=None):
    torch.manual_seed(0)
    return UNet(in_channels=in_channels, out_channels=in_channels, base_channels=8, channel_mult=(1, 2),
                layers_per_block=1, attention_levels=(1,), norm_num_groups=4, attention_head_dim=8,
                num_classes=num_classes, context_dim=context_dim).eval()


def pixel_pipe(scheduler_cls=DDIMScheduler, num_classes=10, **sched_kwargs):
    return DiffusionPipeline(tiny_unet(num_classes=num_classes), scheduler_cls(**sched_kwargs), sample_size=8)


@pytest.mark.parametrize("scheduler_cls", SCHEDULERS)
def test_every_scheduler_samples_deterministically(scheduler_cls):
    pipe = pixel_pipe(scheduler_cls)
    kw = dict(batch_size=3, num_inference_steps=4, class_labels=[1, 2, 3], guidance_scale=2.0, output_type="np",
              progress=False)
    a = pipe(generator=7, **kw)
    b = pipe(generator=torch.Generator().manual_seed(7), **kw)
    assert a.shape == (3, 8, 8, 1) and a.dtype == np.float32
    assert np.isfinite(a).all() and 0 <= a.min() and a.max() <= 1
    np.testing.assert_array_equal(a, b)
    c = pipe(generator=8, **kw)
    assert not np.array_equal(a, c)


def test_output_types():
    pipe = pixel_pipe()
    kw = dict(batch_size=2, num_inference_steps=2, generator=0, class_labels=4, progress=False)
    pil = pipe(output_type="pil", **kw)
    pt = pipe(output_type="pt", **kw)
    arr = pipe(output_type="np", **kw)
    assert len(pil) == 2 and isinstance(pil[0], Image.Image) and pil[0].size == (8, 8) and pil[0].mode == "L"
    assert pt.shape == (2, 1, 8, 8)
    np.testing.assert_allclose(pt.permute(0, 2, 3, 1).numpy(), arr)
    np.testing.assert_array_equal(np.asarray(pil[1]), (arr[1, ..., 0] * 255).round().astype(np.uint8))


@pytest.mark.parametrize("scheduler_cls", [DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler])
def test_guidance_combined_in_the_step_equals_explicit_guidance(scheduler_cls):
    """The pipeline's [uncond; cond] batch + guidance inside the step == a hand-written CFG loop."""
    pipe = pixel_pipe(scheduler_cls)
    s, labels = 3.0, torch.tensor([0, 5])
    out = pipe(batch_size=2, num_inference_steps=3, generator=1, guidance_scale=s, class_labels=labels,
               output_type="pt", progress=False)

    sched = scheduler_cls()
    sched.set_timesteps(3)
    g = torch.Generator().manual_seed(1)
    x = torch.randn((2, 1, 8, 8), generator=g) * sched.init_noise_sigma
    with torch.no_grad():
        for t in sched.timesteps:
            xin = sched.scale_model_input(x, t)
            uncond = pipe.unet(xin, t, class_labels=torch.full((2,), 10))
            cond = pipe.unet(xin, t, class_labels=labels)
            eps = uncond + s * (cond - uncond)
            x = sched.step(eps, t, x, generator=g).prev_sample
    assert_rel_close(out, (x / 2 + 0.5).clamp(0, 1), 1e-5, "pipeline CFG vs explicit CFG")


def test_edge_step_counts_and_bad_numbers():
    pipe = pixel_pipe(num_train_timesteps=20)
    for n in (1, 20):
        img = pipe(batch_size=1, num_inference_steps=n, generator=0, output_type="np", progress=False)
        assert np.isfinite(img).all()
    # one convention (fastdiff.validation): a wrong value is a ValueError, a wrong type a TypeError, both named
    for bad, error in ((0, ValueError), (-1, ValueError), (21, ValueError), (2.5, TypeError), ("5", TypeError),
                       (True, TypeError)):
        with pytest.raises(error, match="num_inference_steps"):
            pipe(batch_size=1, num_inference_steps=bad, progress=False)
    for bad, error in ((0, ValueError), (-2, ValueError), (1.5, TypeError)):
        with pytest.raises(error, match="batch_size"):
            pipe(batch_size=bad, num_inference_steps=2, progress=False)
    with pytest.raises(ValueError, match="output_type"):
        pipe(batch_size=1, num_inference_steps=2, output_type="jpeg", progress=False)


def test_bad_conditioning():
    pipe = pixel_pipe()
    with pytest.raises(ValueError, match="class_labels"):
        pipe(batch_size=2, num_inference_steps=2, class_labels=[0, 10], progress=False)
    with pytest.raises(ValueError, match="class_labels"):
        pipe(batch_size=2, num_inference_steps=2, class_labels=[-1, 0], progress=False)
    with pytest.raises(ValueError, match="class_labels"):
        pipe(batch_size=3, num_inference_steps=2, class_labels=[0, 1], progress=False)
    with pytest.raises(ValueError, match="guidance_scale"):
        pipe(batch_size=2, num_inference_steps=2, guidance_scale=2.0, progress=False)  # nothing to guide towards
    uncond = pixel_pipe(num_classes=None)
    with pytest.raises(ValueError, match="unconditional"):
        uncond(batch_size=2, num_inference_steps=2, class_labels=[0, 1], progress=False)
    with pytest.raises(ValueError, match="guidance_scale"):
        uncond(batch_size=2, num_inference_steps=2, guidance_scale=3.0, progress=False)


def test_nan_in_latents_stops_naming_the_step():
    pipe = pixel_pipe(EulerDiscreteScheduler)
    calls = {"n": 0}
    real_forward = pipe.unet.forward

    def broken(x, t, **kw):
        calls["n"] += 1
        out = real_forward(x, t, **kw)
        return out * float("nan") if calls["n"] == 2 else out

    pipe.unet.forward = broken
    with pytest.raises(NonFiniteError, match=r"step 2/4"):
        pipe(batch_size=1, num_inference_steps=4, generator=0, progress=False)


def test_latent_pipeline_with_context_and_guidance():
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=1, out_channels=1, latent_channels=2, block_out_channels=(8, 8),
                        layers_per_block=1, norm_num_groups=4, scaling_factor=0.5).eval()
    unet = tiny_unet(in_channels=2, num_classes=None, context_dim=6)
    pipe = LatentDiffusionPipeline(unet, vae, DDIMScheduler(), sample_size=4)
    ctx = torch.randn(2, 5, 6)
    img = pipe(batch_size=2, num_inference_steps=2, generator=0, context=ctx, guidance_scale=4.0, output_type="pt",
               progress=False)
    assert img.shape == (2, 1, 8, 8) and torch.isfinite(img).all()
    with pytest.raises(ValueError, match="context"):
        pipe(batch_size=2, num_inference_steps=2, progress=False)


def test_vq_pipeline_decodes_and_samples_codes():
    torch.manual_seed(0)
    vq = VQVAE(in_channels=1, out_channels=1, latent_channels=4, block_out_channels=(8, 8), layers_per_block=1,
               norm_num_groups=4, num_embeddings=16, embedding_dim=4).eval()
    codes = torch.randint(0, 16, (2, 4, 4))
    decoder_only = VQPipeline(vq)
    img = decoder_only.decode_indices(codes, output_type="pt")
    assert img.shape == (2, 1, 8, 8)
    with pytest.raises(ValueError, match="indices"):
        decoder_only.decode_indices(codes + 16)
    with pytest.raises(ValueError, match="prior"):
        decoder_only(batch_size=1)
    pipe = VQPipeline(vq, tiny_unet(in_channels=4), DDIMScheduler(clip_sample=False), sample_size=4)
    img = pipe(batch_size=2, num_inference_steps=2, generator=0, class_labels=[3, 4], output_type="pt",
               progress=False)
    assert img.shape == (2, 1, 8, 8) and pipe.last_indices.shape == (2, 4, 4)
    # the sampled image is exactly the decoding of the sampled codes
    assert_rel_close(img, decoder_only.decode_indices(pipe.last_indices, output_type="pt"), 1e-6, "codes → image")


def test_gan_pipeline_truncation():
    torch.manual_seed(0)
    style = GANPipeline(StyleGenerator(resolution=8, latent_dim=8, w_dim=8, mapping_layers=2, base_channels=8,
                                       max_channels=8, channels=1).eval())
    a = style(batch_size=2, generator=0, output_type="pt", truncation=0.5)
    b = style(batch_size=2, generator=0, output_type="pt", truncation=0.5)
    c = style(batch_size=2, generator=0, output_type="pt", truncation=1.0)
    assert a.shape == (2, 1, 8, 8) and torch.equal(a, b) and not torch.equal(a, c)
    dc = GANPipeline(DCGANGenerator(resolution=16, latent_dim=8, channels=1, width=8).eval())
    assert dc(batch_size=3, generator=0, output_type="np").shape == (3, 16, 16, 1)
    with pytest.raises(ValueError, match="truncation"):
        dc(batch_size=1, truncation=0.7)
    with pytest.raises(ValueError, match="class_labels"):
        dc(batch_size=1, class_labels=[1])


@pytest.mark.parametrize("scheduler_cls", [DDIMScheduler, DPMSolverMultistepScheduler])
def test_save_and_load_round_trip(tmp_path, scheduler_cls):
    pipe = pixel_pipe(scheduler_cls)
    pipe.settings["description"] = "tiny"
    pipe.save_pretrained(tmp_path / "p")
    loaded = fastdiff.load(tmp_path / "p")
    assert type(loaded) is DiffusionPipeline and type(loaded.scheduler) is scheduler_cls
    assert loaded.settings["description"] == "tiny"
    kw = dict(batch_size=2, num_inference_steps=3, generator=0, class_labels=[1, 2], guidance_scale=2.0,
              output_type="np", progress=False)
    np.testing.assert_array_equal(pipe(**kw), loaded(**kw))
    assert type(Pipeline.from_pretrained(tmp_path / "p")) is DiffusionPipeline
    with pytest.raises(ValueError, match="GANPipeline"):
        GANPipeline.from_pretrained(tmp_path / "p")
    with pytest.raises(ValueError, match="unknown model"):
        fastdiff.load(tmp_path / "nothing-here")


def test_to_dtype_and_bad_device():
    pipe = pixel_pipe().to(dtype=torch.bfloat16)
    assert pipe.dtype == torch.bfloat16
    img = pipe(batch_size=2, num_inference_steps=2, generator=0, class_labels=[1, 2], output_type="np",
               progress=False)
    assert np.isfinite(img).all()
    with pytest.raises(TypeError, match="dtype"):
        pipe.to(dtype=torch.int8)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            pipe.to("cuda")


def test_cpu_sampler_state_stays_fp32_under_a_bf16_model(monkeypatch):
    """On the CPU a bf16 pipeline computes the UNet in bf16 but keeps the latents between steps in fp32: the step
    sees fp32 tensors, the first x_T is the fp32 draw of the same seed, and the images are close to fp32's."""
    pipe = pixel_pipe()
    ref = pipe(batch_size=2, num_inference_steps=3, generator=0, class_labels=[1, 2], output_type="pt",
               progress=False)
    pipe.to(dtype=torch.bfloat16)
    seen = []
    step = pipe.scheduler.step

    def spy(model_output, t, sample, **kwargs):
        seen.append((model_output.dtype, sample.dtype))
        return step(model_output, t, sample, **kwargs)

    monkeypatch.setattr(pipe.scheduler, "step", spy)
    out = pipe(batch_size=2, num_inference_steps=3, generator=0, class_labels=[1, 2], output_type="pt",
               progress=False)
    assert seen == [(torch.float32, torch.float32)] * 3
    assert out.dtype == torch.float32 and (out - ref).abs().max() < 0.05, (out - ref).abs().max()


def test_cuda_graph_request_is_ignored_on_cpu(caplog):
    pipe = pixel_pipe()
    with caplog.at_level(logging.INFO, logger="fastdiff"):
        assert pipe.enable_cuda_graph(max_graphs=2) is pipe
    assert any("enable_cuda_graph ignored" in r.message for r in caplog.records)
    img = pipe(batch_size=1, num_inference_steps=2, generator=0, output_type="np", progress=False)
    assert np.isfinite(img).all()
    with pytest.raises(ValueError, match="max_graphs"):
        pipe.enable_cuda_graph(max_graphs=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_replays_and_sees_in_place_weight_updates():
    pipe = pixel_pipe().to("cuda")
    kw = dict(batch_size=2, num_inference_steps=3, generator=0, class_labels=[1, 2], guidance_scale=2.0,
              output_type="pt", progress=False)
    eager = pipe(**kw)
    pipe.enable_cuda_graph(max_graphs=2)
    graphed = pipe(**kw)
    assert pipe._cuda_graphs.captures == 1 and pipe._cuda_graphs.replays >= 3
    assert_rel_close(graphed, eager, 1e-4, "graphed vs eager")
    # new weights loaded in place: the next replay must use them
    new_state = {k: v * 0.5 for k, v in pipe.unet.state_dict().items()}
    pipe.unet.load_state_dict(new_state)
    graphed_new = pipe(**kw)
    pipe.disable_cuda_graph()
    eager_new = pipe(**kw)
    assert_rel_close(graphed_new, eager_new, 1e-4, "graph after in-place weight update")
    assert not torch.allclose(graphed_new, graphed)
    # a new shape captures a second graph; a third evicts the oldest (LRU of 2)
    pipe.enable_cuda_graph(max_graphs=2)
    for b in (1, 2, 3):
        pipe(**{**kw, "batch_size": b, "class_labels": [1] * b})
    assert len(pipe._cuda_graphs) == 2


@pytest.mark.parametrize("name", ["DDIMScheduler", "DPMSolverMultistepScheduler", "EulerAncestralDiscreteScheduler"])
def test_whole_loop_matches_diffusers_scheduler_with_the_same_unet(name):
    """The same fastdiff UNet and seed through our pipeline: fastdiff's scheduler vs diffusers' → the same image."""
    diffusers = pytest.importorskip("diffusers")
    ours = getattr(fastdiff.schedulers, name)()
    theirs = getattr(diffusers, name).from_config(dict(ours.config))
    a = DiffusionPipeline(tiny_unet(num_classes=None), ours, sample_size=8)
    b = DiffusionPipeline(a.unet, theirs, sample_size=8)
    kw = dict(batch_size=2, num_inference_steps=6, output_type="pt", progress=False)
    assert_rel_close(a(generator=3, **kw), b(generator=3, **kw), 1e-5, f"{name}: fastdiff vs diffusers")


@pytest.mark.parametrize("scheduler_cls, eta", [(DDIMScheduler, 0.0), (DDIMScheduler, 0.7), (DDPMScheduler, 0.0)])
def test_graphed_step_body_equals_the_eager_step(scheduler_cls, eta):
    """What a CUDA graph captures for DDIM/DDPM — UNet + fused update with ᾱ as (B,) tensors refilled before every
    replay, noise copied into a static buffer — run uncaptured on the CPU equals scheduler.step() step by step."""
    from fastdiff.pipelines.cuda_graph import _StepGraph

    pipe = pixel_pipe(scheduler_cls)
    sched, unet, s = pipe.scheduler, pipe.unet, 2.5
    sched.set_timesteps(5)
    labels = torch.tensor([10, 10, 3, 7])  # [null; cond] for a batch of 2 under guidance
    x = torch.randn(2, 1, 8, 8)
    graph = None
    extra = {"eta": eta} if eta else {}
    with torch.no_grad():
        for t in sched.timesteps.tolist():
            model_in, t_batch = torch.cat([x, x]), torch.full((4,), float(t))
            g1, g2 = torch.Generator().manual_seed(t), torch.Generator().manual_seed(t)
            expected = sched.step(unet(model_in, t_batch, class_labels=labels), t, x, generator=g1,
                                  guidance_scale=s, **extra).prev_sample
            plan = sched.fused_step(t, x, generator=g2, **extra)
            if graph is None or (graph.noise is None) != (plan.noise is None):  # a capture per GraphCache key
                graph = _StepGraph(unet, plan, s, model_in, t_batch, labels, None, x, capture=False)
            got = graph.replay_step(plan, model_in, t_batch, labels, None, x)
            assert_rel_close(got, expected, 1e-6, f"graphed step body at t={t}")
            x = expected
