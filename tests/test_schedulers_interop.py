"""fastdiff schedulers and diffusers' config files and pipelines: from_config from a diffusers scheduler's config and
from a folder diffusers wrote, save_config read back by diffusers, and a fastdiff scheduler dropped into a real
diffusers DDIMPipeline / DDPMPipeline giving the same images. Each test skips itself without diffusers."""

from __future__ import annotations

import json

import pytest
import torch
from utils import assert_rel_close

import fastdiff.schedulers as fs

NAMES = ["DDPMScheduler", "DDIMScheduler", "DPMSolverMultistepScheduler", "EulerDiscreteScheduler",
         "EulerAncestralDiscreteScheduler"]
# non-default values every scheduler has, plus per-scheduler ones
SHARED = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "prediction_type": "v_prediction",
          "timestep_spacing": "trailing", "steps_offset": 1, "num_train_timesteps": 500}
SPECIFIC = {
    "DDPMScheduler": {"variance_type": "fixed_large", "clip_sample": False, "clip_sample_range": 2.0},
    "DDIMScheduler": {"set_alpha_to_one": False, "clip_sample": False, "clip_sample_range": 2.0},
    "DPMSolverMultistepScheduler": {"solver_order": 1, "use_karras_sigmas": True, "lower_order_final": False,
                                    "final_sigmas_type": "sigma_min", "solver_type": "heun"},
    "EulerDiscreteScheduler": {"use_karras_sigmas": True, "final_sigmas_type": "sigma_min", "sigma_max": 30.0},
    "EulerAncestralDiscreteScheduler": {"rescale_betas_zero_snr": True},
}


def diffusers_module():
    return pytest.importorskip("diffusers")


def assert_same_schedule(ours, ref, n=10):
    ours.set_timesteps(n), ref.set_timesteps(n)
    assert torch.equal(ours.timesteps, ref.timesteps), (ours.timesteps, ref.timesteps)
    if hasattr(ref, "sigmas"):
        assert torch.equal(ours.sigmas, ref.sigmas)
    assert torch.equal(ours.alphas_cumprod, ref.alphas_cumprod)


def assert_config_matches(ours, ref_config):
    for key, value in ours.settings.to_dict().items():  # the fields (trained_betas as a list)
        assert ref_config[key] == value, f"{key}: fastdiff {value!r} != diffusers {ref_config[key]!r}"


@pytest.mark.parametrize("name", NAMES)
def test_from_a_diffusers_scheduler_config(name):
    ref = getattr(diffusers_module(), name)(**SHARED, **SPECIFIC[name])
    ours = getattr(fs, name).from_config(ref.config)  # a diffusers FrozenDict, with _class_name etc.
    assert_config_matches(ours, ref.config)
    assert_same_schedule(ours, ref)


@pytest.mark.parametrize("name", NAMES)
def test_from_a_folder_written_by_diffusers(name, tmp_path):
    ref = getattr(diffusers_module(), name)(**SHARED, **SPECIFIC[name])
    ref.save_config(tmp_path / "scheduler")
    for source in (tmp_path / "scheduler", tmp_path):  # the scheduler folder, or the pipeline folder above it
        ours = getattr(fs, name).from_config(source)
        assert_config_matches(ours, ref.config)
        assert_same_schedule(ours, ref)
    assert getattr(fs, name).from_pretrained(tmp_path, subfolder="scheduler").settings == ours.settings


@pytest.mark.parametrize("name", NAMES)
def test_save_config_is_read_by_diffusers(name, tmp_path):
    diffusers = diffusers_module()
    ours = getattr(fs, name)(**SHARED, **SPECIFIC[name])
    ours.save_config(tmp_path)
    with open(tmp_path / "scheduler_config.json") as f:
        assert json.load(f)["_class_name"] == name
    for ref in (getattr(diffusers, name).from_pretrained(tmp_path),
                getattr(diffusers, name).from_config(getattr(diffusers, name).load_config(tmp_path)),
                getattr(diffusers, name).from_config(ours.config)):  # a dict, as diffusers requires
        assert_config_matches(ours, ref.config)
        assert_same_schedule(ours, ref)


def test_trained_betas_round_trip_through_diffusers(tmp_path):
    diffusers = diffusers_module()
    betas = [0.0001 * (i + 1) for i in range(100)]
    ours = fs.DDIMScheduler(num_train_timesteps=100, trained_betas=betas)
    ours.save_config(tmp_path)
    ref = diffusers.DDIMScheduler.from_pretrained(tmp_path)
    assert torch.equal(ref.betas, ours.betas)
    assert fs.DDIMScheduler.from_config(ref.config).settings == ours.settings


@pytest.mark.parametrize("source", ["DDIMScheduler", "PNDMScheduler", "EulerDiscreteScheduler"])
@pytest.mark.parametrize("target", NAMES)
def test_switching_scheduler_class_like_diffusers(source, target):
    """X.from_config(other.config): keys the source only defaulted take the target's defaults (diffusers'
    _use_default_values), explicit ones carry over, keys the target does not know are ignored — from a diffusers
    config, and from a fastdiff one (the same switch made within fastdiff, and from fastdiff into diffusers)."""
    diffusers = diffusers_module()
    kwargs = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "steps_offset": 1}
    src = getattr(diffusers, source)(**kwargs)
    ref = getattr(diffusers, target).from_config(src.config)
    ours = getattr(fs, target).from_config(src.config)
    assert_config_matches(ours, ref.config)
    assert_same_schedule(ours, ref)
    if hasattr(fs, source):
        ours_src = getattr(fs, source)(**kwargs)
        for switched in (getattr(fs, target).from_config(ours_src.config),
                         getattr(diffusers, target).from_config(ours_src.config)):
            assert_config_matches(ours, switched.config)
            assert_same_schedule(ours, switched)


def test_unsupported_option_in_a_diffusers_config_is_an_error():
    diffusers = diffusers_module()
    with pytest.raises(ValueError, match="variance_type"):
        fs.DPMSolverMultistepScheduler.from_config(
            diffusers.DPMSolverMultistepScheduler(variance_type="learned_range").config)


# --------------------------------------------------------------------------------------------- inside pipelines
pytestmark = pytest.mark.usefixtures("one_thread")  # (conftest.py)


def tiny_unet():
    diffusers = diffusers_module()
    torch.manual_seed(0)
    return diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16),
                                 layers_per_block=1, norm_num_groups=4, down_block_types=("DownBlock2D",) * 2,
                                 up_block_types=("UpBlock2D",) * 2).eval()


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("config", [{}, {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                                         "steps_offset": 1, "clip_sample": False, "timestep_spacing": "trailing"}],
                         ids=["default", "sd-like"])
def test_ddim_scheduler_inside_a_diffusers_ddim_pipeline(config, eta):
    """pipe.scheduler = fastdiff.schedulers.DDIMScheduler.from_config(pipe.scheduler.config) gives the same images
    as diffusers' own scheduler, for the same generator seed."""
    diffusers = diffusers_module()
    pipe = diffusers.DDIMPipeline(unet=tiny_unet(), scheduler=diffusers.DDIMScheduler(**config))
    pipe.set_progress_bar_config(disable=True)
    kwargs = {"batch_size": 2, "num_inference_steps": 10, "eta": eta, "output_type": "np"}
    ref = pipe(generator=torch.Generator().manual_seed(0), **kwargs).images
    pipe.scheduler = fs.DDIMScheduler.from_config(pipe.scheduler.config)
    assert isinstance(pipe.scheduler, fs.DDIMScheduler)
    out = pipe(generator=torch.Generator().manual_seed(0), **kwargs).images
    assert out.shape == ref.shape == (2, 8, 8, 3)
    assert_rel_close(torch.from_numpy(out), torch.from_numpy(ref), 1e-5, "DDIMPipeline images")
    assert out.std() > 0.01  # a real image, not a constant


def test_ddpm_scheduler_inside_a_diffusers_ddpm_pipeline():
    diffusers = diffusers_module()
    pipe = diffusers.DDPMPipeline(unet=tiny_unet(), scheduler=diffusers.DDPMScheduler())
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(batch_size=2, num_inference_steps=8, generator=torch.Generator().manual_seed(0), output_type="np")
    pipe.scheduler = fs.DDPMScheduler.from_config(pipe.scheduler.config)
    out = pipe(batch_size=2, num_inference_steps=8, generator=torch.Generator().manual_seed(0), output_type="np")
    assert_rel_close(torch.from_numpy(out.images), torch.from_numpy(ref.images), 1e-5, "DDPMPipeline images")


def test_pipeline_helpers_see_what_they_expect():
    """What diffusers' pipelines inspect: step() parameters named eta and generator (prepare_extra_step_kwargs),
    set_timesteps(timesteps=...) where diffusers has it (retrieve_timesteps), config as a mapping."""
    import inspect

    diffusers = diffusers_module()
    for name in NAMES:
        ours, ref = getattr(fs, name), getattr(diffusers, name)
        for method in ("step", "set_timesteps"):
            ours_params = set(inspect.signature(getattr(ours, method)).parameters)
            ref_params = set(inspect.signature(getattr(ref, method)).parameters) - {"mu"}
            assert ref_params <= ours_params, f"{name}.{method} lacks {ref_params - ours_params}"
    s = fs.DDIMScheduler()
    assert {**s.config}["steps_offset"] == 0 and getattr(s.config, "steps_offset", 1) == 0
