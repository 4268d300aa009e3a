"""LCMScheduler side by side with diffusers' LCMScheduler: timesteps (every schedule option), whole sampling loops
(prev_sample and denoised at every step, fp32, relative error ≤ 1e-5) over prediction types × β schedules × clipping /
thresholding × step counts, add_noise / get_velocity / previous_timestep, the output mapping, configs in both
directions, errors, and the fused path (Triton interpreter) against the torch path. Skips the diffusers comparisons
where diffusers is not installed.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from utils import assert_rel_close

import fastdiff
import fastdiff.schedulers as fs

SHAPE = (2, 3, 4, 4)
TOL = 1e-5


def diffusers_lcm():
    return pytest.importorskip("diffusers").LCMScheduler


def fake_model(x: torch.Tensor, t) -> torch.Tensor:
    phase = torch.linspace(0, 3, x[0].numel(), dtype=x.dtype).reshape(x.shape[1:])
    return 0.7 * torch.tanh(x) + 0.3 * torch.cos(float(t) / 97.0 + phase)


def run_loop(scheduler, steps=None, seed=0, **set_kwargs):
    scheduler.set_timesteps(steps, **set_kwargs) if steps is not None else scheduler.set_timesteps(**set_kwargs)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1)) * scheduler.init_noise_sigma
    trace = []
    for t in scheduler.timesteps:
        out = scheduler.step(fake_model(scheduler.scale_model_input(x, t), t), t, x, generator=generator)
        x = out.prev_sample
        trace.append(out)
    return scheduler.timesteps, trace


def compare(config, steps=None, **set_kwargs):
    ours_t, ours = run_loop(fs.LCMScheduler(**config), steps, **set_kwargs)
    ref_t, ref = run_loop(diffusers_lcm()(**config), steps, **set_kwargs)
    assert ours_t.dtype == ref_t.dtype and torch.equal(ours_t, ref_t), (ours_t, ref_t)
    for i, (a, b) in enumerate(zip(ours, ref)):
        assert list(a.keys()) == list(b.keys())
        for key in b.keys():
            assert_rel_close(a[key], b[key], TOL, f"{config} step {i} {key}")
    return ours


CONFIGS = [dict(prediction_type=p, beta_schedule=b, **extra) for p, b, extra in itertools.product(
    ["epsilon", "sample", "v_prediction"], ["linear", "scaled_linear", "squaredcos_cap_v2"],
    [{}, {"clip_sample": True}, {"thresholding": True, "sample_max_value": 1.5}])]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(f"{v}" for v in c.values()))
@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_loops_match_diffusers(config, steps):
    compare(config, steps)


@pytest.mark.parametrize("config", [{"set_alpha_to_one": False}, {"timestep_scaling": 2.5},
                                    {"original_inference_steps": 20}, {"rescale_betas_zero_snr": True,
                                                                       "prediction_type": "v_prediction"},
                                    {"num_train_timesteps": 500, "original_inference_steps": 37},
                                    {"clip_sample": True, "clip_sample_range": 0.5}], ids=str)
def test_config_options_match_diffusers(config):
    compare(config, 4)


@pytest.mark.parametrize("set_kwargs", [{"num_inference_steps": 4, "strength": 0.5},
                                        {"num_inference_steps": 3, "original_inference_steps": 10},
                                        {"num_inference_steps": 50},
                                        {"timesteps": [999, 759, 499, 259]},
                                        {"timesteps": [999, 700, 400, 100, 3], "strength": 0.6},
                                        {"timesteps": [800, 3]}], ids=str)
def test_schedules_match_diffusers(set_kwargs):
    compare({}, **set_kwargs)


def test_step_output_and_tuple():
    ours = fs.LCMScheduler()
    ours.set_timesteps(4)
    x = torch.randn(SHAPE)
    out = ours.step(torch.randn(SHAPE), ours.timesteps[0], x, generator=torch.Generator().manual_seed(0))
    assert isinstance(out, fs.LCMSchedulerOutput) and list(out.keys()) == ["prev_sample", "denoised"]
    assert out.to_tuple() == (out.prev_sample, out.denoised) and out["denoised"] is out.denoised
    tup = ours.step(torch.randn(SHAPE), ours.timesteps[1], x, return_dict=False)
    assert isinstance(tup, tuple) and len(tup) == 2
    ours.step(torch.randn(SHAPE), ours.timesteps[2], x)
    last = ours.step(torch.randn(SHAPE), ours.timesteps[3], x)
    assert torch.equal(last.prev_sample, last.denoised)  # no noise at the last step


def test_fp16_step_keeps_the_dtype_and_draws_fp16_noise_as_diffusers():
    x, model_output = torch.randn(SHAPE).half(), torch.randn(SHAPE).half()
    for cls in (fs.LCMScheduler, diffusers_lcm()):
        s = cls()
        s.set_timesteps(2)
        out = s.step(model_output, s.timesteps[0], x, generator=torch.Generator().manual_seed(0))
        assert out.prev_sample.dtype == out.denoised.dtype == torch.float16
        if cls is fs.LCMScheduler:
            ours = out.prev_sample
    assert_rel_close(ours, out.prev_sample, 2e-3)


def test_add_noise_velocity_previous_timestep_match_diffusers():
    ours, theirs = fs.LCMScheduler(), diffusers_lcm()()
    x0, noise = torch.randn(SHAPE), torch.randn(SHAPE)
    t = torch.tensor([10, 500])
    assert_rel_close(ours.add_noise(x0, noise, t), theirs.add_noise(x0, noise, t), 1e-6)
    assert_rel_close(ours.get_velocity(x0, noise, t), theirs.get_velocity(x0, noise, t), 1e-6)
    for s in (ours, theirs):
        s.set_timesteps(4)
    for t in ours.timesteps:
        assert int(ours.previous_timestep(t)) == int(theirs.previous_timestep(t))
    assert ours.init_noise_sigma == theirs.init_noise_sigma == 1.0
    assert ours.order == theirs.order == 1 and len(ours) == len(theirs)
    assert torch.equal(ours.scale_model_input(x0, 5), x0)


def test_configs_round_trip_both_ways(tmp_path):
    ours = fs.LCMScheduler(original_inference_steps=25, timestep_scaling=4.0, beta_schedule="linear")
    ours.save_config(tmp_path / "ours")
    theirs = diffusers_lcm().from_pretrained(tmp_path / "ours")
    for key in ("original_inference_steps", "timestep_scaling", "beta_schedule", "set_alpha_to_one"):
        assert theirs.config[key] == ours.config[key]
    theirs.save_config(tmp_path / "theirs")
    back = fs.LCMScheduler.from_pretrained(tmp_path / "theirs")
    assert back.settings == ours.settings
    assert fs.LCMScheduler.from_config(theirs.config).settings == ours.settings
    assert [c.__name__ for c in ours.compatibles] == ["LCMScheduler"]
    assert {c.__name__ for c in theirs.compatibles} == {"LCMScheduler"}
    assert "LCMScheduler" not in {c.__name__ for c in fs.DDIMScheduler().compatibles}


def test_guided_step_equals_the_step_on_the_combined_output():
    a, b = fs.LCMScheduler(), fs.LCMScheduler()
    for s in (a, b):
        s.set_timesteps(4)
    x = torch.randn(SHAPE)
    both = torch.randn((2 * SHAPE[0], *SHAPE[1:]))
    combined = both[:2] + 6.0 * (both[2:] - both[:2])
    for t in a.timesteps:
        ga, gb = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
        out_a = a.step(both, t, x, generator=ga, guidance_scale=6.0)
        out_b = b.step(combined, t, x, generator=gb)
        assert_rel_close(out_a.prev_sample, out_b.prev_sample, 1e-6)
        x = out_a.prev_sample


@pytest.mark.parametrize("config", [{}, {"prediction_type": "v_prediction", "clip_sample": True}], ids=str)
def test_fused_path_matches_the_torch_path(monkeypatch, config):
    _, torch_trace = run_loop(fs.LCMScheduler(**config), 4)
    monkeypatch.setenv("FASTDIFF_BACKEND", "triton")
    fastdiff.reset_counts()
    _, fused_trace = run_loop(fs.LCMScheduler(**config), 4)
    assert fastdiff.counts() == {("linear_step", "interpreter"): 4}  # one fused call per step
    for a, b in zip(fused_trace, torch_trace):
        assert_rel_close(a.prev_sample, b.prev_sample, 1e-6)
        assert_rel_close(a.denoised, b.denoised, 1e-6)


@pytest.mark.parametrize("kwargs, match", [
    ({"beta_schedule": "cosine"}, "beta_schedule"),
    ({"original_inference_steps": 0}, "original_inference_steps"),
    ({"timestep_scaling": -1.0}, "timestep_scaling"),
    ({"prediction_type": "noise"}, "prediction_type"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fs.LCMScheduler(**kwargs)


@pytest.mark.parametrize("call, match", [
    (lambda s: s.set_timesteps(0), "num_inference_steps"),
    (lambda s: s.set_timesteps(2.5), "num_inference_steps"),
    (lambda s: s.set_timesteps(51), "num_inference_steps"),
    (lambda s: s.set_timesteps(30, strength=0.5), "num_inference_steps"),
    (lambda s: s.set_timesteps(4, strength=0.0), "strength"),
    (lambda s: s.set_timesteps(4, original_inference_steps=1001), "original_inference_steps"),
    (lambda s: s.set_timesteps(timesteps=[10, 20]), "timesteps"),
    (lambda s: s.set_timesteps(timesteps=[1000, 20]), "timesteps"),
    (lambda s: s.set_timesteps(4, timesteps=[999, 20]), "num_inference_steps"),
    (lambda s: s.set_timesteps(), "num_inference_steps"),
])
def test_bad_set_timesteps(call, match):
    s = fs.LCMScheduler()
    s.set_timesteps(4)
    before = s.timesteps.clone()
    with pytest.raises(ValueError, match=match):
        call(s)
    assert torch.equal(s.timesteps, before)  # a refused call changes nothing


def test_step_errors():
    s = fs.LCMScheduler()
    with pytest.raises(ValueError, match="set_timesteps"):
        s.step(torch.randn(SHAPE), 999, torch.randn(SHAPE))
    s.set_timesteps(2)
    with pytest.raises(ValueError, match="model_output"):
        s.step(torch.randn(3, 3, 4, 4), s.timesteps[0], torch.randn(SHAPE))
    assert s.step_index is None  # the refused call did not advance the counter
    s.step(torch.randn(SHAPE), s.timesteps[0], torch.randn(SHAPE))
    s.step(torch.randn(SHAPE), s.timesteps[1], torch.randn(SHAPE))
    with pytest.raises(RuntimeError, match="steps are done"):
        s.step(torch.randn(SHAPE), s.timesteps[1], torch.randn(SHAPE))
