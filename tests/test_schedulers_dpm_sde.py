"""DPM++ SDE (DPMSolverSDEScheduler) side by side with diffusers' class of the same name: tables (timesteps dtype and
values, interleaved σ's, init_noise_sigma), the Brownian-tree noise (bit for bit), whole sampling loops over
prediction types × β schedules × timestep spacings × σ spacings × step counts, options, add_noise, begin index,
configs, errors, the fused linear_step path (Triton interpreter) and guidance; and, without torchsde, a clear
ImportError.

Loops run with the same noise_sampler_seed in both libraries, so their Brownian noise is the same to the bit, and
compare every model input, prev_sample and x̂0 at relative error ≤ 1e-5. On the cosine schedule (σ_max ≈ 2·10⁴)
diffusers' fp32 step is farther than that from exact: its Euler last step x + (0 − σ)·(x − x̂0)/σ cancels terms of size
σ_max·|ε|, and its σ_down = √(σ_to² − σ_up²) cancels in fp32 where σ_to ≪ σ_from (7·10⁻⁴ off at 2 steps). There
both loops run in float64 in lockstep, diffusers' σ tables widened to float64 (its per-step factors then exact) and
both schedulers fed the same scripted noise (the σ's each asks the noise for are checked to agree).
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import sys

import numpy as np
import pytest
import torch
from utils import assert_rel_close, rel_err

from fastdiff import dispatch
from fastdiff.schedulers.dpm_sde import BrownianTreeNoiseSampler, DPMSolverSDEScheduler

# diffusers' noise sampler lets torchsde warn when a σ passes the tree's ends by an ulp (fastdiff's keeps quiet)
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore:Should have t:UserWarning")]

TOL = 1e-5
SHAPE = (2, 3, 4, 4)
NAME = "DPMSolverSDEScheduler"
SPACINGS = ["leading", "trailing", "linspace"]
SIGMA_SPACINGS = [{}, {"use_karras_sigmas": True}, {"use_exponential_sigmas": True}, {"use_beta_sigmas": True}]
STEPS = [1, 2, 7, 25]
SEED = 1234


@pytest.fixture
def diffusers():
    """diffusers (the reference) with torchsde (which both libraries' DPM++ SDE need): the test is skipped without."""
    pytest.importorskip("torchsde")
    return pytest.importorskip("diffusers")


def fake_model(x: torch.Tensor, t) -> torch.Tensor:
    """A fixed, non-trivial function of (x, t) standing in for a UNet."""
    phase = torch.linspace(0, 3, x[0].numel(), dtype=x.dtype).reshape(x.shape[1:])
    return 0.7 * torch.tanh(x) + 0.3 * torch.cos(float(t) / 97.0 + phase)


def start(scheduler, dtype=torch.float32) -> torch.Tensor:
    return (torch.randn(SHAPE, generator=torch.Generator().manual_seed(SEED)) * float(scheduler.init_noise_sigma)).to(
        dtype)


def loop(scheduler, n, dtype=torch.float32, x=None, s_noise=1.0, **set_kwargs):
    """set_timesteps, then the pipeline loop; per model call: model input, prev_sample, x̂0."""
    if n is not None:
        scheduler.set_timesteps(n, **set_kwargs)
    x = start(scheduler, dtype) if x is None else x.to(dtype)
    trace = []
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(x, t)
        out = scheduler.step(fake_model(model_input, t), t, x, s_noise=s_noise)
        x = out.prev_sample
        trace.append((model_input, out.prev_sample, out.pred_original_sample))
    return trace


class ScriptedNoise:
    """A stand-in noise sampler: the k-th call returns the k-th of fixed float64 draws and records its σ's."""

    def __init__(self, count: int):
        self.draws = [torch.randn(SHAPE, generator=torch.Generator().manual_seed(100 + k), dtype=torch.float64)
                      for k in range(count)]
        self.calls: list[tuple[float, float]] = []

    def __call__(self, sigma, sigma_next):
        self.calls.append((float(sigma), float(sigma_next)))
        return self.draws[len(self.calls) - 1]


def compare64(diffusers, cfg: dict, n: int) -> int:
    """Both loops in float64 in lockstep (the model sees fastdiff's input, both step with its output), diffusers'
    σ tables widened to float64, the same scripted noise in both (see the module docstring)."""
    ours, ref = DPMSolverSDEScheduler(**cfg), diffusers.DPMSolverSDEScheduler(**cfg)
    ours.set_timesteps(n), ref.set_timesteps(n)
    assert torch.equal(ours.timesteps, ref.timesteps) and torch.equal(ours.sigmas, ref.sigmas), cfg
    ref.sigmas = ref.sigmas.double()
    ours.noise_sampler, ref.noise_sampler = ScriptedNoise(2 * n), ScriptedNoise(2 * n)
    x = y = start(ref, torch.float64)
    for i, t in enumerate(ref.timesteps):
        model_input = ours.scale_model_input(x, t)
        assert_rel_close(model_input, ref.scale_model_input(y, t), TOL, f"{cfg} n={n} call {i} input")
        m = fake_model(model_input, t)
        a, b = ours.step(m, t, x), ref.step(m, t, y)
        assert a.prev_sample.dtype == torch.float64
        assert_rel_close(a.prev_sample, b.prev_sample, TOL, f"{cfg} n={n} call {i} prev_sample")
        assert_rel_close(a.pred_original_sample, b.pred_original_sample, TOL, f"{cfg} n={n} call {i} x0")
        x, y = a.prev_sample, b.prev_sample
    calls_ours, calls_ref = ours.noise_sampler.calls, ref.noise_sampler.calls
    assert len(calls_ours) == len(calls_ref) == 2 * (n - 1)
    if calls_ours:
        np.testing.assert_allclose(calls_ours, calls_ref, rtol=1e-6)
    return len(ref.timesteps)


def compare(diffusers, cfg: dict, n, dtype=torch.float32, s_noise=1.0, **set_kwargs) -> int:
    """fastdiff's loop vs diffusers' with the same seeded Brownian noise; the model calls compared."""
    if dtype == torch.float64:
        return compare64(diffusers, cfg, n)
    cfg = {"noise_sampler_seed": 7, **cfg}
    ours, ref = DPMSolverSDEScheduler(**cfg), diffusers.DPMSolverSDEScheduler(**cfg)
    a = loop(ours, n, dtype, s_noise=s_noise, **set_kwargs)
    b = loop(ref, n, dtype, s_noise=s_noise, **set_kwargs)
    assert ours.timesteps.dtype == ref.timesteps.dtype, f"{cfg}: timesteps dtype {ours.timesteps.dtype}"
    assert torch.equal(ours.timesteps, ref.timesteps), f"{cfg}: {ours.timesteps} != {ref.timesteps}"
    assert torch.equal(ours.sigmas, ref.sigmas), f"{cfg}: sigmas"
    assert len(a) == len(b)
    for i, (u, v) in enumerate(zip(a, b)):
        for what, p, q in zip(("model input", "prev_sample", "x0"), u, v):
            assert p.dtype == q.dtype or what == "x0"
            assert_rel_close(p, q, TOL, f"{cfg} n={n} call {i} {what}")
    return len(a)


# --------------------------------------------------------------------------------------------- tables
def test_tables_equal_diffusers(diffusers):
    """timesteps (float64, the midpoints' interleaved), σ's, init_noise_sigma, num_inference_steps, before
    set_timesteps and after, every spacing option."""
    cases = itertools.product(["linear", "scaled_linear", "squaredcos_cap_v2"], SPACINGS,
                              SIGMA_SPACINGS + [{"steps_offset": 1}])
    for i, (beta, spacing, extra) in enumerate(cases):
        cfg = {"beta_schedule": beta, "timestep_spacing": spacing, **extra}
        ours, ref = DPMSolverSDEScheduler(**cfg), diffusers.DPMSolverSDEScheduler(**cfg)
        for n in [None, 1, 3, 25] if i % 4 == 0 else [1, 3, 25]:  # the T-step schedule of construction: a few
            if n is not None:
                ours.set_timesteps(n), ref.set_timesteps(n)
            assert ours.timesteps.dtype == ref.timesteps.dtype == torch.float64, (cfg, n)
            assert torch.equal(ours.timesteps, ref.timesteps), (cfg, n)
            assert torch.equal(ours.sigmas, ref.sigmas), (cfg, n)
            init = ours.init_noise_sigma
            assert isinstance(init, torch.Tensor) and init.dtype == torch.float32 and init.ndim == 0
            assert torch.equal(init, ref.init_noise_sigma), (cfg, n)
            assert ours.num_inference_steps == ref.num_inference_steps
            assert ours.order == ref.order == 2
            assert ours.state_in_first_order and ours.step_index is None and ours.begin_index is None
            assert ours.noise_sampler is None


def test_num_train_timesteps_argument_and_device(diffusers):
    ours, ref = DPMSolverSDEScheduler(), diffusers.DPMSolverSDEScheduler()
    ours.set_timesteps(6, num_train_timesteps=500), ref.set_timesteps(6, num_train_timesteps=500)
    assert torch.equal(ours.timesteps, ref.timesteps) and torch.equal(ours.sigmas, ref.sigmas)
    ours.set_timesteps(4, device="cpu")
    assert ours.timesteps.device.type == "cpu" and ours.sigmas.device.type == "cpu"


# --------------------------------------------------------------------------------------------- the noise
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize("seed", [3, [5, 11]], ids=["one seed", "a seed per sample"])
def test_noise_sampler_bit_identical_to_diffusers(diffusers, dtype, seed):
    """The same construction and queries give the same Brownian increments to the bit, in any order of σ's."""
    from diffusers.schedulers.scheduling_dpmsolver_sde import BrownianTreeNoiseSampler as Reference

    x = torch.randn(SHAPE).to(dtype)
    ours, ref = BrownianTreeNoiseSampler(x, 0.03, 14.6, seed), Reference(x, 0.03, 14.6, seed)
    for a, b in [(14.6, 3.2), (3.2, 3.1), (0.5, 0.03), (2.0, 9.0), (14.6, 0.03)]:
        a, b = torch.tensor(a), torch.tensor(b)
        z, w = ours(a, b), ref(a, b)
        assert z.dtype == w.dtype == dtype and z.shape == SHAPE
        assert torch.equal(z, w), (a, b)
    assert 0.7 < float(ours(torch.tensor(14.6), torch.tensor(0.03)).double().std()) < 1.3  # normalised: ~N(0, 1)
    with pytest.raises(ValueError, match="noise_sampler_seed"):
        BrownianTreeNoiseSampler(x, 0.03, 14.6, [1, 2, 3])


def test_unseeded_noise_draws_its_seed_like_diffusers(diffusers):
    """noise_sampler_seed=None: each library draws the tree's seed from torch's global generator at the first step
    after set_timesteps, so with the same global seed the loops agree; a new set_timesteps draws a new seed."""
    ours, ref = DPMSolverSDEScheduler(), diffusers.DPMSolverSDEScheduler()
    torch.manual_seed(5)
    a = loop(ours, 4)
    torch.manual_seed(5)
    b = loop(ref, 4)
    for u, v in zip(a, b):
        assert_rel_close(u[1], v[1], TOL, "unseeded loop")
    c = loop(ours, 4)
    assert rel_err(c[-1][1], a[-1][1]) > 1e-3  # a fresh seed, fresh noise


def test_seeded_loops_repeat_and_seed_attribute(diffusers):
    """A seed gives the same loop after every set_timesteps; the attribute ``noise_sampler_seed`` overrides the
    config's, as in diffusers."""
    s = DPMSolverSDEScheduler(noise_sampler_seed=9)
    a, b = loop(s, 5), loop(s, 5)
    assert torch.equal(a[-1][1], b[-1][1])
    ours, ref = DPMSolverSDEScheduler(), diffusers.DPMSolverSDEScheduler()
    ours.noise_sampler_seed = ref.noise_sampler_seed = 9
    assert ours.config["noise_sampler_seed"] is None
    assert torch.equal(loop(ours, 5)[-1][1], a[-1][1])
    assert_rel_close(loop(ref, 5)[-1][1], a[-1][1], TOL, "diffusers with the seed attribute")


# --------------------------------------------------------------------------------------------- whole loops
def grid():
    cases = list(itertools.product(["epsilon", "v_prediction"], ["linear", "scaled_linear", "squaredcos_cap_v2"],
                                   SPACINGS, range(len(SIGMA_SPACINGS))))
    # every config gets one of the step counts, in turn, so that each count meets every option
    return [(p, b, s, k, STEPS[i % len(STEPS)]) for i, (p, b, s, k) in enumerate(cases)]


@pytest.mark.parametrize("beta", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_loops_sweep(diffusers, beta):
    count = 0
    for prediction, b, spacing, k, n in grid():
        if b != beta:
            continue
        cfg = {"prediction_type": prediction, "beta_schedule": beta, "timestep_spacing": spacing,
               **SIGMA_SPACINGS[k]}
        # σ_max ≈ 2·10⁴ on the cosine schedule: float64 lockstep there (see the module docstring)
        count += compare(diffusers, cfg, n, torch.float64 if beta == "squaredcos_cap_v2" else torch.float32)
    assert count > 100


OPTION_CASES = [
    ("sd", {"beta_schedule": "scaled_linear", "steps_offset": 1, "timestep_spacing": "leading"}, 25, 1.0),
    ("karras-sd", {"beta_schedule": "scaled_linear", "use_karras_sigmas": True}, 20, 1.0),
    ("s-noise", {"beta_schedule": "scaled_linear", "prediction_type": "v_prediction"}, 8, 0.5),
    ("no-noise", {"use_exponential_sigmas": True}, 6, 0.0),
    ("trained", {"trained_betas": [1e-4 + 2e-5 * i for i in range(1000)]}, 9, 1.0),
    ("small-T", {"num_train_timesteps": 100, "timestep_spacing": "trailing"}, 100, 1.0),
]


@pytest.mark.parametrize("cfg, n, s_noise", [c[1:] for c in OPTION_CASES], ids=[c[0] for c in OPTION_CASES])
def test_option_loops(diffusers, cfg, n, s_noise):
    compare(diffusers, cfg, n, s_noise=s_noise)


def test_s_noise_scales_the_noise(diffusers):
    """s_noise = 0 leaves no noise: two seeds give the same loop; s_noise = 1 they differ."""
    quiet = [loop(DPMSolverSDEScheduler(noise_sampler_seed=s), 4, s_noise=0.0)[-1][1] for s in (1, 2)]
    noisy = [loop(DPMSolverSDEScheduler(noise_sampler_seed=s), 4)[-1][1] for s in (1, 2)]
    assert torch.equal(quiet[0], quiet[1])
    assert rel_err(noisy[0], noisy[1]) > 1e-3


# --------------------------------------------------------------------------------------------- the counter, add_noise
def test_stage_state_and_step_index(diffusers):
    ours, ref = DPMSolverSDEScheduler(noise_sampler_seed=1), diffusers.DPMSolverSDEScheduler(noise_sampler_seed=1)
    ours.set_timesteps(4), ref.set_timesteps(4)
    x = start(ref)
    y = x.clone()
    for i, t in enumerate(ref.timesteps):
        assert ours.state_in_first_order == ref.state_in_first_order == (i % 2 == 0)
        model_input = ours.scale_model_input(x, t)
        assert_rel_close(model_input, ref.scale_model_input(y, t), TOL, f"input {i}")
        x = ours.step(fake_model(model_input, t), t, x).prev_sample
        y = ref.step(fake_model(ref.scale_model_input(y, t), t), t, y).prev_sample
        assert ours.step_index == ref.step_index == i + 1
        if not ours.state_in_first_order:
            assert float(ours.mid_point_sigma) == float(ref.mid_point_sigma)
    assert_rel_close(x, y, TOL, "final sample")
    with pytest.raises(RuntimeError, match="set_timesteps"):
        ours.step(torch.randn(SHAPE), ref.timesteps[-1], x)


def test_add_noise_and_begin_index(diffusers):
    """add_noise before and after set_timesteps, and the image-to-image pattern: set_begin_index(k·order), add_noise at
    that timestep, then the rest of the loop."""
    ours, ref = DPMSolverSDEScheduler(noise_sampler_seed=4), diffusers.DPMSolverSDEScheduler(noise_sampler_seed=4)
    x0, noise = torch.randn(3, *SHAPE[1:]), torch.randn(3, *SHAPE[1:])
    ts = ref.timesteps[[0, 5, 9]]
    assert_rel_close(ours.add_noise(x0, noise, ts), ref.add_noise(x0, noise, ts), TOL, "add_noise before")
    ours.set_timesteps(10), ref.set_timesteps(10)
    for ts in (ref.timesteps[[0, 3, 8]], ref.timesteps[4:5]):
        assert_rel_close(ours.add_noise(x0, noise, ts), ref.add_noise(x0, noise, ts), TOL, f"add_noise at {ts}")
    begin = 4 * ref.order
    for s in (ours, ref):
        s.set_timesteps(10)
        s.set_begin_index(begin)
    t = ref.timesteps[begin:begin + 1].repeat(3)
    x, y = ours.add_noise(x0, noise, t), ref.add_noise(x0, noise, t)
    assert_rel_close(x, y, TOL, "add_noise at the begin index")
    for t in ref.timesteps[begin:]:
        x = ours.step(fake_model(ours.scale_model_input(x, t), t), t, x)[0]
        y = ref.step(fake_model(ref.scale_model_input(y, t), t), t, y)[0]
        assert_rel_close(x, y, TOL, f"img2img t={float(t)}")


# --------------------------------------------------------------------------------------------- outputs, configs
def test_step_output_shape_like_diffusers(diffusers):
    ours, ref = DPMSolverSDEScheduler(noise_sampler_seed=2), diffusers.DPMSolverSDEScheduler(noise_sampler_seed=2)
    ours.set_timesteps(5), ref.set_timesteps(5)
    x, m = torch.randn(SHAPE), torch.randn(SHAPE)
    t = ref.timesteps[0]
    a, b = ours.step(m, t, x), ref.step(m, t, x)
    assert list(a.keys()) == list(b.keys()) == ["prev_sample", "pred_original_sample"]
    assert len(a.to_tuple()) == len(b.to_tuple()) == 2
    t = ref.timesteps[1]
    a, b = ours.step(m, t, a.prev_sample, return_dict=False), ref.step(m, t, b.prev_sample, return_dict=False)
    assert isinstance(a, tuple) and len(a) == len(b) == 2
    for u, v in zip(a, b):
        assert_rel_close(u, v, TOL, "second stage")


def test_fp16_loop_stays_fp16(diffusers):
    cfg = {"noise_sampler_seed": 3}
    ours, ref = DPMSolverSDEScheduler(**cfg), diffusers.DPMSolverSDEScheduler(**cfg)
    a, b = loop(ours, 6, torch.float16), loop(ref, 6, torch.float16)
    assert a[-1][1].dtype == torch.float16
    assert rel_err(a[-1][1], b[-1][1]) < 5e-3


def shared_keys_match(ours, ref_config):
    """Every field but rescale_betas_zero_snr (which diffusers' DPM++ SDE lacks; always False here) equals
    diffusers'; diffusers' fields are all ours."""
    fields = ours.settings.to_dict()
    assert fields.pop("rescale_betas_zero_snr") is False
    public = {k for k in ref_config if not k.startswith("_")} - {"rescale_betas_zero_snr"}
    assert public == set(fields), public ^ set(fields)
    for key, value in fields.items():
        assert ref_config[key] == value, f"{key}: fastdiff {value!r} != diffusers {ref_config[key]!r}"


def test_config_round_trips(diffusers, tmp_path):
    kwargs = {"beta_schedule": "scaled_linear", "use_karras_sigmas": True, "prediction_type": "v_prediction",
              "timestep_spacing": "trailing", "steps_offset": 1, "noise_sampler_seed": 42}
    ours = DPMSolverSDEScheduler(**kwargs)
    ours.save_config(tmp_path / "ours")
    with open(tmp_path / "ours" / "scheduler_config.json") as f:
        assert json.load(f)["_class_name"] == NAME
    ref = diffusers.DPMSolverSDEScheduler.from_pretrained(tmp_path / "ours")
    shared_keys_match(ours, ref.config)
    ref.save_config(tmp_path / "ref")
    back = DPMSolverSDEScheduler.from_pretrained(tmp_path / "ref")
    assert back.settings == ours.settings
    assert DPMSolverSDEScheduler.from_config(ref.config).settings == ours.settings
    shared_keys_match(DPMSolverSDEScheduler.from_config(ours.config), ref.config)
    assert ours.noise_sampler_seed == 42 and ours.config.noise_sampler_seed == 42


@pytest.mark.parametrize("source", ["DDIMScheduler", "EulerDiscreteScheduler", "DPMSolverMultistepScheduler",
                                    "HeunDiscreteScheduler", "KDPM2DiscreteScheduler"])
def test_from_config_of_compatible_schedulers(diffusers, source):
    """X.from_config(other.config) as diffusers does it: defaulted keys take X's defaults, unknown keys ignored
    (rescale_betas_zero_snr too, as diffusers' DPM++ SDE ignores it)."""
    kwargs = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "steps_offset": 1,
              "timestep_spacing": "leading", "prediction_type": "v_prediction"}
    if source in ("DDIMScheduler", "EulerDiscreteScheduler"):
        kwargs["rescale_betas_zero_snr"] = True
    if source == "DPMSolverMultistepScheduler":
        kwargs["use_karras_sigmas"] = True
    src = getattr(diffusers, source)(**kwargs)
    ours, ref = DPMSolverSDEScheduler.from_config(src.config), diffusers.DPMSolverSDEScheduler.from_config(src.config)
    shared_keys_match(ours, ref.config)
    ours.set_timesteps(8), ref.set_timesteps(8)
    assert torch.equal(ours.timesteps, ref.timesteps) and torch.equal(ours.sigmas, ref.sigmas)
    # and back: diffusers' class of the source takes fastdiff's config
    assert getattr(diffusers, source).from_config(ours.config).config["prediction_type"] == "v_prediction"


# --------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("key, value", [("beta_schedule", "cubic"), ("prediction_type", "x0"),
                                        ("timestep_spacing", "middle"), ("steps_offset", -1),
                                        ("rescale_betas_zero_snr", True), ("num_train_timesteps", 0),
                                        ("noise_sampler_seed", -1), ("use_karras_sigmas", "yes")])
def test_bad_config_values(diffusers, key, value):
    with pytest.raises((ValueError, TypeError), match=key):
        DPMSolverSDEScheduler(**{key: value})


def test_bad_options(diffusers):
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        DPMSolverSDEScheduler(use_karras_sigmas=True, use_beta_sigmas=True)
    with pytest.raises(TypeError, match="noise_sampler_seed"):
        DPMSolverSDEScheduler(noise_sampler_seed=1.5)
    with pytest.raises(TypeError, match="clip_sample"):
        DPMSolverSDEScheduler(clip_sample=True)  # not a DPM++ SDE option (diffusers: TypeError too)


def test_bad_set_timesteps_and_step_inputs(diffusers):
    s = DPMSolverSDEScheduler(noise_sampler_seed=0)
    for n in (0, 1001, 2.5):
        with pytest.raises(ValueError, match="num_inference_steps"):
            s.set_timesteps(n)
    with pytest.raises(ValueError, match="steps_offset"):
        DPMSolverSDEScheduler(timestep_spacing="leading", steps_offset=1).set_timesteps(1000)
    s.set_timesteps(5)
    t = s.timesteps[0]
    with pytest.raises(ValueError, match="model_output"):
        s.step(torch.randn(2, 3, 4, 5), t, torch.randn(SHAPE))
    with pytest.raises(ValueError, match="model_output"):
        s.step(torch.randn(SHAPE), t, torch.randn(SHAPE), guidance_scale=3.0)
    with pytest.raises(TypeError, match="s_noise"):
        s.step(torch.randn(SHAPE), t, torch.randn(SHAPE), s_noise="loud")
    with pytest.raises(ValueError, match="timestep"):
        DPMSolverSDEScheduler().step(torch.randn(SHAPE), 12.345, torch.randn(SHAPE))


def test_sample_prediction_refused_at_step_like_diffusers(diffusers):
    for s in (DPMSolverSDEScheduler(prediction_type="sample"),
              diffusers.DPMSolverSDEScheduler(prediction_type="sample")):
        s.set_timesteps(3)
        with pytest.raises(NotImplementedError):
            s.step(torch.randn(SHAPE), s.timesteps[0], torch.randn(SHAPE))


def test_without_torchsde_a_clear_import_error(monkeypatch):
    """torchsde is optional: without it, building the scheduler (or its noise sampler) is an ImportError naming it;
    importing fastdiff's module works (it imports torchsde only there)."""
    monkeypatch.setitem(sys.modules, "torchsde", None)  # what `import torchsde` finds when it is not installed
    with pytest.raises(ImportError, match="torchsde"):
        DPMSolverSDEScheduler()
    with pytest.raises(ImportError, match="pip install torchsde"):
        DPMSolverSDEScheduler.from_config({"beta_schedule": "scaled_linear"})
    with pytest.raises(ImportError, match="torchsde"):
        BrownianTreeNoiseSampler(torch.zeros(SHAPE), 0.1, 10.0, 0)


def test_fastdiff_imports_no_torchsde():
    """Only the noise sampler imports torchsde: importing fastdiff's scheduler modules does not."""
    import subprocess

    code = ("import sys; import fastdiff.schedulers, fastdiff.schedulers.dpm_sde; "
            "sys.exit(1 if 'torchsde' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


# --------------------------------------------------------------------------------------------- fused path, guidance
@pytest.mark.parametrize("cfg", [{}, {"prediction_type": "v_prediction", "use_karras_sigmas": True}])
def test_interpreter_path_equals_torch_path(diffusers, cfg, monkeypatch):
    cfg = {"noise_sampler_seed": 8, **cfg}
    torch_trace = loop(DPMSolverSDEScheduler(**cfg), 3)
    monkeypatch.setenv("FASTDIFF_BACKEND", "triton")
    dispatch.reset_counts()
    kernel_trace = loop(DPMSolverSDEScheduler(**cfg), 3)
    for i, (u, v) in enumerate(zip(kernel_trace, torch_trace)):
        for p, q in zip(u, v):
            assert_rel_close(p, q, 1e-6, f"call {i}")
    counts = dispatch.counts()
    assert counts.get(("linear_step", "interpreter"), 0) == len(torch_trace)  # one call per step()
    assert counts.get(("linear_step", "torch"), 0) == 0


def test_guided_step_equals_step_on_the_combined_output(diffusers):
    cfg = {"noise_sampler_seed": 6}
    a, b, ref = DPMSolverSDEScheduler(**cfg), DPMSolverSDEScheduler(**cfg), diffusers.DPMSolverSDEScheduler(**cfg)
    for s in (a, b, ref):
        s.set_timesteps(4)
    x = start(ref)
    y, z = x.clone(), x.clone()
    for t in ref.timesteps:
        uncond, cond = fake_model(a.scale_model_input(x, t), t), fake_model(a.scale_model_input(x, t) + 0.1, t)
        combined = uncond + 5.0 * (cond - uncond)
        b.scale_model_input(y, t), ref.scale_model_input(z, t)
        x = a.step(torch.cat([uncond, cond]), t, x, guidance_scale=5.0).prev_sample
        y = b.step(combined, t, y).prev_sample
        z = ref.step(combined, t, z).prev_sample
        assert_rel_close(x, y, 1e-6, f"guided t={float(t)}")
        assert_rel_close(x, z, TOL, f"guided vs diffusers t={float(t)}")


def test_torchsde_is_found_or_skipped():
    """Where torchsde is installed the tests above ran (not skipped)."""
    if importlib.util.find_spec("torchsde") is None:
        pytest.skip("torchsde is not installed: the comparisons with diffusers were skipped")
    assert DPMSolverSDEScheduler(noise_sampler_seed=0).order == 2
