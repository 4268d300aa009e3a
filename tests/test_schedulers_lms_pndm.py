"""LMSDiscreteScheduler and PNDMScheduler side by side with diffusers' classes of the same name: whole sampling loops
over the configs they support, the LMS coefficients, the PNDM phases and state, the API around step(), configs,
errors, and the fused linear_step path (torch vs the Triton interpreter, classifier-free guidance inside the op).

Where a loop differs from diffusers' fp32 loop by more than TOL, the same diffusers loop run in float64 (σ / ᾱ tables,
samples and model in float64) arbitrates: fastdiff must then be within TOL of it, or (where the schedule is so
ill-conditioned that no fp32 loop can be, see ``arbiter``) no farther from it than diffusers' fp32 loop.
"""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

import fastdiff
from fastdiff.schedulers.lms import LMSDiscreteScheduler, lagrange_integral
from fastdiff.schedulers.pndm import PNDMScheduler
from utils import assert_rel_close, rel_err

diffusers = pytest.importorskip("diffusers")

pytestmark = [pytest.mark.usefixtures("one_thread"),
              # diffusers' own noise: numpy's __array__ deprecation in its LMS, its "call scale_model_input" reminder
              pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:The `scale_model_input` function should be called")]

SHAPE = (2, 3, 4, 4)
TOL = 1e-5
BETAS = ("linear", "scaled_linear", "squaredcos_cap_v2")
SPACINGS = ("leading", "trailing", "linspace")
SD = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}


def fake_model(x: torch.Tensor, t) -> torch.Tensor:
    """A fixed, non-trivial function of (x, t) standing in for a UNet."""
    phase = torch.linspace(0, 3, x[0].numel(), dtype=x.dtype, device=x.device).reshape(x.shape[1:])
    return 0.7 * torch.tanh(x) + 0.3 * torch.cos(float(t) / 97.0 + phase)


def run_loop(scheduler, n: int, step_kwargs=None, dtype=torch.float32, widen=False, device="cpu"):
    """set_timesteps(n), then the pipeline loop; per step the model input, prev_sample and x̂0 (when given).
    widen: diffusers' σ / ᾱ tables in float64 (the arbiter)."""
    scheduler.set_timesteps(n, device=device)
    if widen:
        if isinstance(scheduler, diffusers.LMSDiscreteScheduler):
            scheduler.sigmas = scheduler.sigmas.double()  # the LMS integrand too: exact coefficients
        else:
            scheduler.alphas_cumprod = scheduler.alphas_cumprod.double()
            scheduler.final_alpha_cumprod = torch.as_tensor(scheduler.final_alpha_cumprod, dtype=torch.float64)
    x = (torch.randn(SHAPE, generator=torch.Generator().manual_seed(1234)) * float(scheduler.init_noise_sigma))
    x = x.to(dtype=dtype, device=device)
    trace = []
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(x, t)
        out = scheduler.step(fake_model(model_input, t), t, x, **(step_kwargs or {}))
        x = out.prev_sample
        step = {"model_input": model_input, "prev_sample": out.prev_sample}
        if "pred_original_sample" in out.keys():
            step["pred_original_sample"] = out.pred_original_sample
        trace.append(step)
    return scheduler, trace


def arbiter(ours, theirs, ref64, what):
    """fastdiff within TOL of diffusers' float64 loop, or no farther from it than diffusers' fp32 loop is."""
    ours_err, theirs_err = rel_err(ours, ref64), rel_err(theirs, ref64)
    assert ours_err <= max(TOL, theirs_err), (
        f"{what}: from diffusers fp64 fastdiff is {ours_err:.3e}, diffusers fp32 {theirs_err:.3e}")


def compare_loops(cls, ref_cls, cfg: dict, n: int, step_kwargs=None):
    ours_s, ours = run_loop(cls(**cfg), n, step_kwargs)
    ref_s, ref = run_loop(ref_cls(**cfg), n, step_kwargs)
    assert ours_s.timesteps.dtype == ref_s.timesteps.dtype
    assert torch.equal(ours_s.timesteps, ref_s.timesteps), (ours_s.timesteps.tolist(), ref_s.timesteps.tolist())
    if hasattr(ref_s, "sigmas"):
        assert torch.equal(ours_s.sigmas, ref_s.sigmas), (ours_s.sigmas.tolist(), ref_s.sigmas.tolist())
    assert len(ours) == len(ref)
    ref64 = None
    for i, (a, b) in enumerate(zip(ours, ref)):
        assert a.keys() == b.keys()
        for key in a:
            what = f"{cls.__name__}({cfg}) n={n} step {i} {key}"
            if rel_err(a[key], b[key]) <= TOL:
                continue
            if ref64 is None:
                ref64 = run_loop(ref_cls(**cfg), n, step_kwargs, torch.float64, widen=True)[1]
            arbiter(a[key], b[key], ref64[i][key], what)


# --------------------------------------------------------------------------------------------- LMS loops
LMS_CASES = [dict(prediction_type=p, beta_schedule=b, timestep_spacing=s)
             for p, b, s in itertools.product(("epsilon", "sample", "v_prediction"), BETAS, SPACINGS)]


@pytest.mark.parametrize("cfg", LMS_CASES, ids=lambda c: "-".join(c.values()))
def test_lms_loops_match_diffusers(cfg):
    for n in (1, 2, 7, 25):
        compare_loops(LMSDiscreteScheduler, diffusers.LMSDiscreteScheduler, cfg, n)


SIGMA_SPACINGS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")


@pytest.mark.parametrize("spacing", SIGMA_SPACINGS)
@pytest.mark.parametrize("beta_schedule", BETAS)
@pytest.mark.parametrize("prediction_type", ("epsilon", "v_prediction"))
def test_lms_sigma_spacings_match_diffusers(spacing, beta_schedule, prediction_type):
    if spacing == "use_beta_sigmas":
        pytest.importorskip("scipy")
    cfg = {spacing: True, "beta_schedule": beta_schedule, "prediction_type": prediction_type}
    for n, timestep_spacing in ((2, "linspace"), (7, "leading"), (25, "trailing")):
        compare_loops(LMSDiscreteScheduler, diffusers.LMSDiscreteScheduler,
                      {**cfg, "timestep_spacing": timestep_spacing}, n)


@pytest.mark.parametrize("order", (1, 2, 3, 5, 7))
def test_lms_orders_match_diffusers(order):
    compare_loops(LMSDiscreteScheduler, diffusers.LMSDiscreteScheduler, SD, 12, {"order": order})


def test_lms_steps_offset_and_trained_betas():
    betas = torch.linspace(1e-4, 0.02, 1000).tolist()
    compare_loops(LMSDiscreteScheduler, diffusers.LMSDiscreteScheduler,
                  {"timestep_spacing": "leading", "steps_offset": 1, "trained_betas": betas}, 10)


def test_lms_order_changed_between_steps():
    """The history keeps diffusers' rule (append, drop the oldest once beyond the order) when the order changes."""
    ours, ref = LMSDiscreteScheduler(**SD), diffusers.LMSDiscreteScheduler(**SD)
    ours.set_timesteps(10), ref.set_timesteps(10)
    x = y = torch.randn(SHAPE)
    for i, t in enumerate(ref.timesteps):
        order = (4, 4, 4, 4, 2, 1, 3, 4, 4, 2)[i]
        x = ours.step(fake_model(ours.scale_model_input(x, t), t), t, x, order=order).prev_sample
        y = ref.step(fake_model(ref.scale_model_input(y, t), t), t, y, order=order).prev_sample
        assert_rel_close(x, y, TOL, f"step {i} order {order}")
        assert len(ours.derivatives) == len(ref.derivatives)
        for d_ours, d_ref in zip(ours.derivatives, ref.derivatives):
            assert_rel_close(d_ours, d_ref, TOL, f"step {i} derivatives")


# --------------------------------------------------------------------------------------------- LMS coefficients
def scipy_coefficient(sigmas: list[float], order: int, t: int, k: int) -> float:
    """diffusers' definition, in float64: scipy's quad of the Lagrange basis polynomial."""
    integrate = pytest.importorskip("scipy.integrate")

    def basis(tau):
        return math.prod((tau - sigmas[t - j]) / (sigmas[t - k] - sigmas[t - j]) for j in range(order) if j != k)

    return integrate.quad(basis, sigmas[t], sigmas[t + 1], epsrel=1e-13, epsabs=0.0)[0]


@pytest.mark.parametrize("cfg", [SD, {"use_karras_sigmas": True}, {"beta_schedule": "squaredcos_cap_v2"}])
def test_lms_coefficients_exact(cfg):
    """Ours (Gauss–Legendre) equal diffusers' integral computed in float64 to ~1e-12; diffusers' own
    get_lms_coefficient evaluates its integrand in fp32 (σ are fp32 tensors), so it agrees only to ~1e-7."""
    ours, ref = LMSDiscreteScheduler(**cfg), diffusers.LMSDiscreteScheduler(**cfg)
    ours.set_timesteps(20), ref.set_timesteps(20)
    sigmas = ref.sigmas.double().tolist()
    for order in (1, 2, 3, 4, 7):
        for t in range(order - 1, 20):
            for k in range(order):
                c = ours.get_lms_coefficient(order, t, k)
                exact = scipy_coefficient(sigmas, order, t, k)
                assert abs(c - exact) <= 1e-12 * max(1.0, abs(exact)), (order, t, k, c, exact)
                if order <= 4:
                    theirs = ref.get_lms_coefficient(order, t, k)
                    assert abs(c - theirs) <= 1e-6 * max(1.0, abs(exact)), (order, t, k, c, theirs)


def test_lagrange_integral_against_expanded_polynomial():
    """The integral of the expanded basis polynomial (numpy.polynomial), for random nodes, orders 1–7."""
    rng = torch.Generator().manual_seed(3)
    P = __import__("numpy").polynomial.Polynomial
    for order in range(1, 8):
        nodes = (torch.rand(order, generator=rng, dtype=torch.float64) * 10).tolist()
        lo, hi = nodes[0], nodes[0] - 1.7
        for k in range(order):
            p = P([1.0])
            for j, node in enumerate(nodes):
                if j != k:
                    p = p * P([-node, 1.0]) / (nodes[k] - node)
            integral = p.integ()
            expected = integral(hi) - integral(lo)
            got = lagrange_integral(nodes, k, lo, hi)
            assert abs(got - expected) <= 1e-10 * max(1.0, abs(expected)), (order, k, got, expected)
    assert lagrange_integral([2.0, 1.0], 0, 2.0, 2.0) == 0.0


# --------------------------------------------------------------------------------------------- PNDM loops
PNDM_CASES = [dict(prediction_type=p, beta_schedule=b, timestep_spacing=s, skip_prk_steps=skip)
              for p, b, s, skip in itertools.product(("epsilon", "v_prediction"), BETAS, SPACINGS, (True, False))]


@pytest.mark.parametrize("cfg", PNDM_CASES, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_pndm_loops_match_diffusers(cfg):
    for n in ((1, 2, 7, 25) if cfg["skip_prk_steps"] else (4, 5, 25)):
        compare_loops(PNDMScheduler, diffusers.PNDMScheduler, cfg, n)


@pytest.mark.parametrize("set_alpha_to_one", (True, False))
@pytest.mark.parametrize("steps_offset", (0, 1))
@pytest.mark.parametrize("skip_prk_steps", (True, False))
def test_pndm_stable_diffusion_configs(set_alpha_to_one, steps_offset, skip_prk_steps):
    cfg = {**SD, "set_alpha_to_one": set_alpha_to_one, "steps_offset": steps_offset, "skip_prk_steps": skip_prk_steps}
    for n in (4, 10, 50):
        compare_loops(PNDMScheduler, diffusers.PNDMScheduler, cfg, n)


def test_pndm_state_matches_diffusers():
    """counter, ets, cur_sample and the PRK/PLMS timesteps as diffusers keeps them, step by step."""
    for skip in (False, True):
        ours, ref = PNDMScheduler(skip_prk_steps=skip, **SD), diffusers.PNDMScheduler(skip_prk_steps=skip, **SD)
        ours.set_timesteps(8), ref.set_timesteps(8)
        assert ours.prk_timesteps.tolist() == ref.prk_timesteps.tolist()
        assert ours.plms_timesteps.tolist() == ref.plms_timesteps.tolist()
        assert ours._timesteps.tolist() == ref._timesteps.tolist()
        x = y = torch.randn(SHAPE)
        for t in ref.timesteps:
            x = ours.step(fake_model(x, t), t, x).prev_sample
            y = ref.step(fake_model(y, t), t, y).prev_sample
            assert ours.counter == ref.counter
            assert len(ours.ets) == len(ref.ets)
            for a, b in zip(ours.ets, ref.ets):
                assert_rel_close(a, b, TOL, "ets")
            assert (ours.cur_sample is None) == (ref.cur_sample is None)
            if ref.cur_sample is not None:
                assert_rel_close(ours.cur_sample, ref.cur_sample, TOL, "cur_sample")


def test_pndm_repeated_timesteps():
    """With the PRK steps, 12 PRK timesteps (half-steps, repeated) then the PLMS ones; without, the second repeated."""
    s = PNDMScheduler(num_train_timesteps=1000)
    s.set_timesteps(10)
    assert s.timesteps.tolist()[:12] == [900, 850, 850, 800, 800, 750, 750, 700, 700, 650, 650, 600]
    assert s.timesteps.tolist()[12:] == [600, 500, 400, 300, 200, 100, 0]
    s = PNDMScheduler(skip_prk_steps=True, steps_offset=1)
    s.set_timesteps(10)
    assert s.timesteps.tolist() == [901, 801, 801, 701, 601, 501, 401, 301, 201, 101, 1]
    assert s.timesteps.dtype == torch.int64


# --------------------------------------------------------------------------------------------- the API around step
def test_lms_api():
    ours, ref = LMSDiscreteScheduler(**SD), diffusers.LMSDiscreteScheduler(**SD)
    assert ours.num_inference_steps == ref.num_inference_steps == 1000  # both build the full schedule at start
    assert torch.equal(ours.timesteps, ref.timesteps) and torch.equal(ours.sigmas, ref.sigmas)
    ours.set_timesteps(10), ref.set_timesteps(10)
    assert ours.order == ref.order == 1
    assert isinstance(ours.init_noise_sigma, torch.Tensor) and ours.init_noise_sigma.dtype == ref.init_noise_sigma.dtype
    assert torch.equal(ours.init_noise_sigma, ref.init_noise_sigma)
    for spacing in ("leading",):
        a, b = LMSDiscreteScheduler(timestep_spacing=spacing), diffusers.LMSDiscreteScheduler(timestep_spacing=spacing)
        a.set_timesteps(5), b.set_timesteps(5)
        assert abs(float(a.init_noise_sigma) - float(b.init_noise_sigma)) <= 1e-6 * float(b.init_noise_sigma)
    x = torch.randn(SHAPE)
    assert ours.step_index is None and ours.begin_index is None
    assert_rel_close(ours.scale_model_input(x, ours.timesteps[3]), ref.scale_model_input(x, ref.timesteps[3]), 1e-7)
    assert ours.step_index == ref.step_index == 3
    # add_noise at a batch of timesteps (a fresh scheduler: no begin index, σ by the timestep's place)
    ours, ref = LMSDiscreteScheduler(**SD), diffusers.LMSDiscreteScheduler(**SD)
    ours.set_timesteps(10), ref.set_timesteps(10)
    noise = torch.randn(SHAPE)
    ts = ref.timesteps[[1, 6]]
    assert_rel_close(ours.add_noise(x, noise, ts), ref.add_noise(x, noise, ts), 1e-7, "add_noise")
    # set_begin_index: step() starts there, add_noise uses it
    ours.set_begin_index(4), ref.set_begin_index(4)
    assert ours.begin_index == ref.begin_index == 4
    assert_rel_close(ours.add_noise(x, noise, ts[:1]), ref.add_noise(x, noise, ts[:1]), 1e-7, "add_noise begin")
    for t in ref.timesteps[4:7]:
        a = ours.step(fake_model(x, t), t, x)
        b = ref.step(fake_model(x, t), t, x)
        assert ours.step_index == ref.step_index
        assert_rel_close(a.prev_sample, b.prev_sample, TOL, "begin_index step")
        x = b.prev_sample


def test_pndm_api():
    ours, ref = PNDMScheduler(**SD), diffusers.PNDMScheduler(**SD)
    assert ours.timesteps is None and ref.timesteps is None
    assert ours.order == ref.order == 1
    assert type(ours.init_noise_sigma) is type(ref.init_noise_sigma) and ours.init_noise_sigma == ref.init_noise_sigma
    x, noise = torch.randn(SHAPE), torch.randn(SHAPE)
    assert ours.scale_model_input(x, 5) is x
    ts = torch.tensor([999, 10])
    assert_rel_close(ours.add_noise(x, noise, ts), ref.add_noise(x, noise, ts), 1e-7, "add_noise")
    assert len(ours) == len(ref) == 1000


@pytest.mark.parametrize("cls, ref_cls, fields", [
    (LMSDiscreteScheduler, "LMSDiscreteScheduler", ("prev_sample", "pred_original_sample")),
    (PNDMScheduler, "PNDMScheduler", ("prev_sample",)),
])
def test_step_outputs_as_diffusers(cls, ref_cls, fields):
    ours, ref = cls(), getattr(diffusers, ref_cls)()
    ours.set_timesteps(10), ref.set_timesteps(10)
    x = torch.randn(SHAPE)
    t = ref.timesteps[0]
    a = ours.step(fake_model(x, t), t, x)
    b = ref.step(fake_model(x, t), t, x)
    assert tuple(a.keys()) == tuple(b.keys()) == fields
    assert len(a.to_tuple()) == len(b.to_tuple())
    ours.set_timesteps(10), ref.set_timesteps(10)
    a = ours.step(fake_model(x, t), t, x, return_dict=False)
    b = ref.step(fake_model(x, t), t, x, return_dict=False)
    assert isinstance(a, tuple) and len(a) == len(b)
    for u, v in zip(a, b):
        assert_rel_close(u, v, TOL, "tuple output")


# --------------------------------------------------------------------------------------------- configs
SD_PNDM = {**SD, "skip_prk_steps": True, "set_alpha_to_one": False, "steps_offset": 1, "trained_betas": None,
           "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "clip_sample": False}


@pytest.mark.parametrize("cls, ref_cls, cfg", [
    (LMSDiscreteScheduler, "LMSDiscreteScheduler", {"use_karras_sigmas": True, "prediction_type": "v_prediction"}),
    (PNDMScheduler, "PNDMScheduler", {"skip_prk_steps": True, "steps_offset": 1, "timestep_spacing": "trailing"}),
])
def test_config_round_trip(cls, ref_cls, cfg, tmp_path):
    ours = cls(**cfg)
    ours.save_config(tmp_path / "a")
    ref = getattr(diffusers, ref_cls).from_pretrained(tmp_path / "a")
    for key, value in cfg.items():
        assert ref.config[key] == value
    ref.save_config(tmp_path / "b")
    back = cls.from_pretrained(tmp_path / "b")
    assert back.settings == ours.settings
    assert cls.from_config(ref.config).settings == ours.settings
    assert getattr(diffusers, ref_cls).from_config(ours.config).config[next(iter(cfg))] == next(iter(cfg.values()))


@pytest.mark.parametrize("ref_cls, extra", [
    ("DDIMScheduler", {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing", "clip_sample": False}),
    ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True, "algorithm_type": "sde-dpmsolver++"}),
    ("EulerDiscreteScheduler", {"prediction_type": "v_prediction"}),
    ("EulerAncestralDiscreteScheduler", {}),
    ("PNDMScheduler", {"skip_prk_steps": True}),
    ("LMSDiscreteScheduler", {"use_exponential_sigmas": True}),
    ("UniPCMultistepScheduler", {"solver_type": "bh2"}),
    ("DEISMultistepScheduler", {}),
    ("HeunDiscreteScheduler", {}),
    ("KDPM2DiscreteScheduler", {}),
])
@pytest.mark.parametrize("cls", (LMSDiscreteScheduler, PNDMScheduler))
def test_from_compatible_configs(ref_cls, extra, cls):
    """Any compatible diffusers scheduler's config loads into ours as it loads into diffusers' class of our name."""
    config = getattr(diffusers, ref_cls)(**{**SD, **extra}).config
    ours, ref = cls.from_config(config), getattr(diffusers, cls.__name__).from_config(config)
    for key, value in ours.config.items():
        # (diffusers keeps a foreign rescale_betas_zero_snr=True in its config but ignores it, as ours does)
        if key in ref.config and not key.startswith("_") and key != "rescale_betas_zero_snr":
            assert ref.config[key] == value or (key == "trained_betas" and value is None), (key, value, ref.config[key])
    assert not ours.settings.rescale_betas_zero_snr
    ours.set_timesteps(6), ref.set_timesteps(6)
    assert torch.equal(ours.timesteps, ref.timesteps)


def test_stable_diffusion_pndm_config_file(tmp_path):
    (tmp_path / "scheduler_config.json").write_text(json.dumps(SD_PNDM))
    ours, ref = PNDMScheduler.from_pretrained(tmp_path), diffusers.PNDMScheduler.from_pretrained(tmp_path)
    assert ours.settings.skip_prk_steps and ours.settings.steps_offset == 1
    ours.set_timesteps(50), ref.set_timesteps(50)
    assert torch.equal(ours.timesteps, ref.timesteps)
    assert LMSDiscreteScheduler.from_config(ours.config).settings.beta_schedule == "scaled_linear"


# --------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("cls, key, value", [
    (LMSDiscreteScheduler, "prediction_type", "x0"),
    (LMSDiscreteScheduler, "timestep_spacing", "uniform"),
    (LMSDiscreteScheduler, "beta_schedule", "cosine"),
    (LMSDiscreteScheduler, "rescale_betas_zero_snr", True),
    (LMSDiscreteScheduler, "num_train_timesteps", 0),
    (PNDMScheduler, "prediction_type", "sample"),
    (PNDMScheduler, "timestep_spacing", "uniform"),
    (PNDMScheduler, "rescale_betas_zero_snr", True),
    (PNDMScheduler, "steps_offset", -1),
])
def test_bad_config_values(cls, key, value):
    with pytest.raises(ValueError, match=key):
        cls(**{key: value})


def test_two_sigma_spacings_refused():
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        LMSDiscreteScheduler(use_karras_sigmas=True, use_exponential_sigmas=True)
    with pytest.raises(TypeError, match="unexpected"):
        PNDMScheduler(use_karras_sigmas=True)


@pytest.mark.parametrize("cls", (LMSDiscreteScheduler, PNDMScheduler))
@pytest.mark.parametrize("n", (0, 1001, 2.5, "7", True))
def test_bad_num_inference_steps(cls, n):
    with pytest.raises(ValueError, match="num_inference_steps"):
        cls(skip_prk_steps=True).set_timesteps(n) if cls is PNDMScheduler else cls().set_timesteps(n)


def test_pndm_prk_needs_four_steps_and_timesteps():
    with pytest.raises(ValueError, match="num_inference_steps"):
        PNDMScheduler().set_timesteps(3)
    s = PNDMScheduler()
    with pytest.raises(ValueError, match="set_timesteps"):
        s.step(torch.randn(SHAPE), 999, torch.randn(SHAPE))
    s.set_timesteps(10)
    with pytest.raises(ValueError, match="PRK"):
        s.step_plms(torch.randn(SHAPE), 900, torch.randn(SHAPE))
    with pytest.raises(ValueError, match="timestep"):
        s.step(torch.randn(SHAPE), 1000, torch.randn(SHAPE))
    with pytest.raises(ValueError, match="steps_offset"):
        PNDMScheduler(steps_offset=200).set_timesteps(5)


@pytest.mark.parametrize("cls", (LMSDiscreteScheduler, PNDMScheduler))
def test_step_shape_errors(cls):
    s = cls()
    s.set_timesteps(10)
    t = s.timesteps[0]
    counter = getattr(s, "counter", None)
    with pytest.raises(ValueError, match="model_output"):
        s.step(torch.randn(2, 3, 4, 5), t, torch.randn(SHAPE))
    with pytest.raises(ValueError, match="model_output"):
        s.step(torch.randn(SHAPE), t, torch.randn(SHAPE), guidance_scale=5.0)
    with pytest.raises(TypeError, match="model_output"):
        s.step(None, t, torch.randn(SHAPE))
    assert getattr(s, "counter", None) == counter  # nothing ran
    assert getattr(s, "derivatives", []) == []


def test_lms_order_errors():
    s = LMSDiscreteScheduler()
    s.set_timesteps(10)
    for order in (0, 8, 2.0):
        with pytest.raises((ValueError, TypeError), match="order"):
            s.step(torch.randn(SHAPE), s.timesteps[0], torch.randn(SHAPE), order=order)
    assert s.step_index is None and s.derivatives == []


# --------------------------------------------------------------------------------------------- the fused path
FUSED_CASES = [
    (LMSDiscreteScheduler, {**SD, "prediction_type": "v_prediction"}, 6),
    (PNDMScheduler, {**SD, "skip_prk_steps": True}, 6),
    (PNDMScheduler, {**SD, "prediction_type": "v_prediction"}, 5),
]


@pytest.mark.parametrize("cls, cfg, n", FUSED_CASES, ids=("lms", "pndm-plms", "pndm-prk"))
def test_fused_kernel_matches_torch(cls, cfg, n, device, monkeypatch):
    """The same loop on the torch reference path (CPU) and through the Triton kernel on ``device`` (the interpreter
    on a CPU), with exactly one linear_step call per step()."""
    _, torch_trace = run_loop(cls(**cfg), n)
    monkeypatch.setenv("FASTDIFF_BACKEND", "triton")
    fastdiff.reset_counts()
    scheduler, triton_trace = run_loop(cls(**cfg), n, device=device)
    counts = fastdiff.counts()
    path = "triton" if device.type == "cuda" else "interpreter"
    assert counts.get(("linear_step", path)) == len(scheduler.timesteps), counts
    assert sum(c for (op, _), c in counts.items() if op == "linear_step") == len(scheduler.timesteps), counts
    for i, (a, b) in enumerate(zip(triton_trace, torch_trace)):
        for key in a:
            assert a[key].device.type == device.type
            assert_rel_close(a[key], b[key], 1e-6, f"{cls.__name__} step {i} {key}")


@pytest.mark.parametrize("cls, cfg, n", FUSED_CASES, ids=("lms", "pndm-plms", "pndm-prk"))
def test_half_precision_loop(cls, cfg, n):
    """fp16 samples and model outputs: prev_sample in fp16, close to the fp32 loop (fp16 rounding only)."""
    _, full = run_loop(cls(**cfg), n)
    _, half = run_loop(cls(**cfg), n, dtype=torch.float16)
    for a, b in zip(half, full):
        assert a["prev_sample"].dtype == torch.float16
        assert_rel_close(a["prev_sample"], b["prev_sample"], 2e-2, f"{cls.__name__} fp16")


@pytest.mark.parametrize("cls, cfg, n", FUSED_CASES, ids=("lms", "pndm-plms", "pndm-prk"))
def test_guidance_inside_the_step(cls, cfg, n):
    """step([uncond; cond], guidance_scale=s) equals step(uncond + s·(cond − uncond))."""
    guided, combined = cls(**cfg), cls(**cfg)
    guided.set_timesteps(n), combined.set_timesteps(n)
    x = y = torch.randn(SHAPE) * float(guided.init_noise_sigma)
    for t in guided.timesteps:
        uncond = fake_model(guided.scale_model_input(x, t), t)
        cond = fake_model(guided.scale_model_input(x, t) * 1.1, t + 3)
        out = guided.step(torch.cat([uncond, cond]), t, x, guidance_scale=7.5).prev_sample
        combined.scale_model_input(y, t)
        ref = combined.step(uncond + 7.5 * (cond - uncond), t, y).prev_sample
        assert_rel_close(out, ref, 1e-6, f"{cls.__name__} guided t={int(t)}")
        x, y = out, ref
