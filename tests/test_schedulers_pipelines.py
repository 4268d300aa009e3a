"""Every fastdiff scheduler dropped into a real diffusers pipeline (issue 17, point 4): a diffusers LDMPipeline (the
scheduler-generic loop: init_noise_sigma, scale_model_input, step's extra keywords found by inspecting its
signature, prev_sample) with a tiny random UNet2DModel and VQModel gives the same images with
``pipe.scheduler = fastdiff.schedulers.X.from_config(pipe.scheduler.config)`` as with diffusers' own X, for the same
seed; and ``fastdiff.accelerate(pipe)`` on the pipeline holding diffusers' X swaps in fastdiff's X (fused GroupNorm +
SiLU, attention, scheduler) and still gives those images. Skipped without diffusers.
"""

from __future__ import annotations

import pytest
import torch
from utils import assert_rel_close

import fastdiff
import fastdiff.interop
import fastdiff.schedulers as fs

pytestmark = pytest.mark.usefixtures("one_thread")  # (conftest.py)

# (scheduler class, config options beyond the defaults, steps): the pipeline's base config is Stable Diffusion's β range
CASES = [
    ("DDIMScheduler", {}, 6),
    ("DDPMScheduler", {}, 6),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}, 6),
    ("DPMSolverMultistepScheduler", {"solver_order": 3}, 6),
    ("EulerDiscreteScheduler", {"use_karras_sigmas": True}, 6),
    ("EulerAncestralDiscreteScheduler", {}, 6),
    ("LCMScheduler", {}, 4),
    ("UniPCMultistepScheduler", {}, 6),
    ("HeunDiscreteScheduler", {}, 4),
    ("PNDMScheduler", {"skip_prk_steps": True}, 6),
    ("PNDMScheduler", {}, 6),
    ("LMSDiscreteScheduler", {}, 6),
    ("DPMSolverSinglestepScheduler", {}, 6),
    ("KDPM2DiscreteScheduler", {}, 4),
    ("DEISMultistepScheduler", {}, 6),
    ("DPMSolverSDEScheduler", {}, 4),
]
BASE = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}


def make_pipe(scheduler):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16),
                                 layers_per_block=1, norm_num_groups=4, down_block_types=("DownBlock2D",) * 2,
                                 up_block_types=("UpBlock2D",) * 2).eval()
    vqvae = diffusers.VQModel(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                              up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,), latent_channels=3,
                              norm_num_groups=4, num_vq_embeddings=16, vq_embed_dim=3).eval()
    # decode the latents as they are: a nearest-code lookup would turn a 1e-7 difference into a different code
    vqvae.decode = lambda z, _decode=vqvae.decode: _decode(z, force_not_quantize=True)
    pipe = diffusers.LDMPipeline(vqvae=vqvae, unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def images(pipe, steps):
    torch.manual_seed(0)  # the pipeline passes no generator to step(): the ancestral noise comes from the global RNG
    return torch.from_numpy(pipe(batch_size=2, num_inference_steps=steps, output_type="np",
                                 generator=torch.Generator().manual_seed(0)).images)


def diffusers_scheduler(name, options):
    diffusers = pytest.importorskip("diffusers")
    if name == "DPMSolverSDEScheduler":
        pytest.importorskip("torchsde")  # its Brownian-tree noise (the optional sde extra), in both libraries
    if not hasattr(fs, name):
        pytest.fail(f"fastdiff.schedulers has no {name}")
    return getattr(diffusers, name)(**BASE, **options)


@pytest.mark.parametrize("name, options, steps", CASES, ids=lambda v: str(v) if isinstance(v, dict) else v)
def test_swapped_into_a_diffusers_pipeline_gives_the_same_images(name, options, steps):
    pipe = make_pipe(diffusers_scheduler(name, options))
    ref = images(pipe, steps)
    pipe.scheduler = getattr(fs, name).from_config(pipe.scheduler.config)
    assert type(pipe.scheduler) is getattr(fs, name)
    out = images(pipe, steps)
    assert out.shape == ref.shape == (2, 8, 8, 3)
    assert_rel_close(out, ref, 1e-5, f"{name} images")
    assert out.std() > 0.01  # a real image, not a constant


@pytest.mark.parametrize("name, options, steps", CASES, ids=lambda v: str(v) if isinstance(v, dict) else v)
def test_accelerate_swaps_in_the_fastdiff_scheduler(name, options, steps):
    pipe = make_pipe(diffusers_scheduler(name, options))
    ref = images(pipe, steps)
    fastdiff.accelerate(pipe)
    report = fastdiff.interop.accelerate_report(pipe)
    assert report["scheduler"] == 1 and report["group_norm_silu"] > 0
    assert type(pipe.scheduler) is getattr(fs, name)
    assert_rel_close(images(pipe, steps), ref, 1e-4, f"accelerated {name} images")
    fastdiff.restore(pipe)
    assert type(pipe.scheduler).__module__.startswith("diffusers")
    # a pipeline already holding a fastdiff scheduler keeps it
    pipe.scheduler = getattr(fs, name).from_config(pipe.scheduler.config)
    fastdiff.accelerate(pipe)
    assert type(pipe.scheduler) is getattr(fs, name)
    assert_rel_close(images(pipe, steps), ref, 1e-4, f"accelerated {name} images (fastdiff scheduler)")
