"""DPMSolverSinglestepScheduler and DEISMultistepScheduler side by side with diffusers' classes of the same name:
timesteps (dtype and values), σ's, model inputs and every prev_sample of whole sampling loops (fp32, relative error
≤ 1e-5) over prediction types × β schedules × spacings × the classes' own options; config round trips, errors, the
fused path (Triton interpreter) and classifier-free guidance.

Where diffusers' own fp32 arithmetic is the larger error (both solvers convert between x̂0 and ε̂ and multiply by
α_t/α_s, which is large at the cosine schedule's first steps; diffusers forms the coefficients in fp32, fastdiff in
float64 and folds the conversion into them), a step is accepted only if fastdiff is within the tolerance of the same
diffusers loop run in float64 and closer to it than diffusers' fp32 loop is.
"""

from __future__ import annotations

import itertools
import json
import logging

import pytest
import torch
from utils import assert_rel_close, rel_err

from fastdiff import dispatch
from fastdiff.schedulers.deis import DEISMultistepScheduler
from fastdiff.schedulers.dpm_singlestep import DPMSolverSinglestepScheduler

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-5
SHAPE = (2, 3, 4, 4)
PREDICTIONS = ["epsilon", "sample", "v_prediction"]
BETAS = ["linear", "scaled_linear", "squaredcos_cap_v2"]
SPACINGS = ["leading", "trailing", "linspace"]
SIGMA_SPACINGS = ["use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"]
OURS = {"DPMSolverSinglestepScheduler": DPMSolverSinglestepScheduler, "DEISMultistepScheduler": DEISMultistepScheduler}


@pytest.fixture(autouse=True)
def _quiet():
    """diffusers warns on every singlestep set_timesteps (lower_order_final) and on algorithm_type="dpmsolver"."""
    level = diffusers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity_error()
    yield
    diffusers.utils.logging.set_verbosity(level)


def fake_model(x: torch.Tensor, t) -> torch.Tensor:
    """A fixed, non-trivial function of (x, t) standing in for a UNet."""
    phase = torch.linspace(0, 3, x[0].numel(), dtype=x.dtype, device=x.device).reshape(x.shape[1:])
    return 0.7 * torch.tanh(x) + 0.3 * torch.cos(float(t) / 97.0 + phase)


def sample_loop(scheduler, n: int, dtype=torch.float32, seed: int = 0):
    """set_timesteps(n), then the pipeline loop: (timesteps, σ's, per-step model inputs and prev_samples)."""
    scheduler.set_timesteps(n)
    if dtype == torch.float64:  # diffusers in float64: its coefficients come from the σ table
        scheduler.sigmas = scheduler.sigmas.double()
    step_kwargs = {}
    if "generator" in type(scheduler).step.__code__.co_varnames:
        step_kwargs["generator"] = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1234)).to(dtype)
    trace = []
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(x, t)
        x = scheduler.step(fake_model(model_input, t), t, x, **step_kwargs).prev_sample
        trace.append((model_input, x))
    return scheduler.timesteps, scheduler.sigmas, trace


def compare_loops(name: str, cfg: dict, n: int, monkeypatch, tol64: float = TOL) -> int:
    """fastdiff's and diffusers' loops step by step; returns the number of steps settled in float64."""
    ours_t, ours_s, ours = sample_loop(OURS[name](**cfg), n)
    ref_t, ref_s, ref = sample_loop(getattr(diffusers, name)(**cfg), n)
    assert ours_t.dtype == ref_t.dtype and torch.equal(ours_t, ref_t), (ours_t, ref_t)
    assert torch.equal(ours_s, ref_s), (ours_s, ref_s)
    ref64, arbitrated = None, 0
    for i, ((a_in, a), (b_in, b)) in enumerate(zip(ours, ref)):
        what = f"{name}({cfg}) n={n} step {i}"
        # the model sees x unscaled: the first input is the same x, the others the previous step's prev_sample
        assert torch.equal(a_in, b_in) if i == 0 else torch.equal(a_in, ours[i - 1][1]), f"{what} model input"
        err = rel_err(a, b)
        if err <= TOL:
            continue
        if ref64 is None:
            from diffusers.schedulers import scheduling_dpmsolver_singlestep as module

            draw = module.randn_tensor  # noise drawn in fp32 as the fp32 loop draws it, then widened
            monkeypatch.setattr(module, "randn_tensor", lambda shape, generator=None, device=None, dtype=None:
                                draw(shape, generator=generator, device=device, dtype=torch.float32).to(dtype))
            ref64 = sample_loop(getattr(diffusers, name)(**cfg), n, torch.float64)[2]
        ours64, theirs64 = rel_err(a, ref64[i][1]), rel_err(b, ref64[i][1])
        assert ours64 <= tol64 and ours64 < theirs64, (
            f"{what}: {err:.3e} from diffusers fp32; from diffusers fp64 fastdiff is {ours64:.3e}, diffusers fp32 "
            f"{theirs64:.3e}")
        arbitrated += 1
    return arbitrated


# --------------------------------------------------------------------------------------------- singlestep loops
ALGORITHMS = ["dpmsolver++", "sde-dpmsolver++", "dpmsolver"]
SINGLE_GRID = [c for c in itertools.product(PREDICTIONS, BETAS, [1, 2, 3], ALGORITHMS)
               # ε̂-space on x0/v models on the cosine schedule: ill-conditioned in fp32 (test below)
               if not (c[3] == "dpmsolver" and c[0] != "epsilon" and c[1] == "squaredcos_cap_v2")]


@pytest.mark.parametrize("prediction_type, beta_schedule, order, algorithm", SINGLE_GRID,
                         ids=["-".join(map(str, c)) for c in SINGLE_GRID])
def test_singlestep_loop(prediction_type, beta_schedule, order, algorithm, monkeypatch):
    cfg = {"prediction_type": prediction_type, "beta_schedule": beta_schedule, "solver_order": order,
           "algorithm_type": algorithm, "solver_type": ["midpoint", "heun"][(order + len(prediction_type)) % 2],
           "final_sigmas_type": "sigma_min" if algorithm == "dpmsolver" else "zero"}
    for n in (7, 12):
        compare_loops("DPMSolverSinglestepScheduler", cfg, n, monkeypatch)


SINGLE_OPTIONS = [
    ({"solver_order": o, "solver_type": st, "final_sigmas_type": f, "lower_order_final": lo, sp: True}, n)
    for (o, st, f, lo, sp), n in zip(itertools.product([2, 3], ["midpoint", "heun"], ["zero", "sigma_min"],
                                                        [False, True], SIGMA_SPACINGS), itertools.cycle([1, 2, 9, 25]))
]


@pytest.mark.parametrize("cfg, n", SINGLE_OPTIONS, ids=[f"{i}" for i in range(len(SINGLE_OPTIONS))])
def test_singlestep_options_loop(cfg, n, monkeypatch):
    """Orders × solver types × final σ × lower_order_final × σ spacings, 1–25 steps (n = 2 and 9 with order 3:
    the last group cut short)."""
    compare_loops("DPMSolverSinglestepScheduler", {**cfg, "algorithm_type": "sde-dpmsolver++"
                                                   if cfg["solver_order"] == 3 and n == 9 else "dpmsolver++"},
                  n, monkeypatch, tol64=5e-5 if "use_beta_sigmas" in cfg else TOL)


@pytest.mark.parametrize("cfg, n", [
    ({"thresholding": True, "prediction_type": "sample", "sample_max_value": 1.5}, 10),
    ({"thresholding": True, "algorithm_type": "sde-dpmsolver++", "solver_order": 3}, 12),
    ({"lambda_min_clipped": -5.1, "beta_schedule": "squaredcos_cap_v2", "solver_order": 3}, 12),
    ({"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "use_karras_sigmas": True}, 25),
    ({"solver_order": 2, "lower_order_final": False, "final_sigmas_type": "sigma_min"}, 10),  # stays False
    ({"num_train_timesteps": 100, "solver_order": 3}, 7),
    # diffusers maps them to dpmsolver++ / midpoint (and refuses "deis" with final_sigmas_type="zero", see below)
    ({"algorithm_type": "deis", "solver_type": "logrho", "final_sigmas_type": "sigma_min"}, 8),
])
def test_singlestep_more_options(cfg, n, monkeypatch):
    compare_loops("DPMSolverSinglestepScheduler", cfg, n, monkeypatch)


def test_singlestep_eps_solver_on_cosine_is_closer_to_fp64(monkeypatch):
    """algorithm_type="dpmsolver" on x0/v models on the cosine schedule: ε̂ = (x − α·x̂0)/σ then α_t/α_s·x − … cancel
    to 1e-1 in diffusers' fp32; fastdiff folds that into float64 coefficients and lands within 1e-4 of fp64."""
    for prediction_type in ("sample", "v_prediction"):
        cfg = {"prediction_type": prediction_type, "beta_schedule": "squaredcos_cap_v2", "solver_order": 2,
               "algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}
        compare_loops("DPMSolverSinglestepScheduler", cfg, 12, monkeypatch, tol64=1e-4)


# --------------------------------------------------------------------------------------------- DEIS loops
DEIS_GRID = list(itertools.product(PREDICTIONS, BETAS, SPACINGS))


@pytest.mark.parametrize("prediction_type, beta_schedule, spacing", DEIS_GRID,
                         ids=["-".join(c) for c in DEIS_GRID])
def test_deis_loop(prediction_type, beta_schedule, spacing, monkeypatch):
    for order, n in ((1, 7), (2, 12), (3, 16)):
        compare_loops("DEISMultistepScheduler", {"prediction_type": prediction_type, "beta_schedule": beta_schedule,
                                                 "timestep_spacing": spacing, "solver_order": order}, n, monkeypatch)


DEIS_OPTIONS = [({"solver_order": o, "lower_order_final": lo, "thresholding": th, **({sp: True} if sp else {})}, n)
                for (o, lo, th, sp), n in zip(itertools.product([2, 3], [False, True], [False, True],
                                                                [None, *SIGMA_SPACINGS]),
                                              itertools.cycle([1, 2, 7, 25]))]


@pytest.mark.parametrize("cfg, n", DEIS_OPTIONS, ids=[f"{i}" for i in range(len(DEIS_OPTIONS))])
def test_deis_options_loop(cfg, n, monkeypatch):
    """Orders × lower_order_final × thresholding × σ spacings (their last step has length 0), 1–25 steps. Beta σ's
    jump from σ ≈ 14 to σ_min in one step at n = 7, where the third-order weights are ill-conditioned in fp32."""
    compare_loops("DEISMultistepScheduler", {**cfg, "prediction_type": "v_prediction"}, n, monkeypatch,
                  tol64=1e-4 if "use_beta_sigmas" in cfg else TOL)


@pytest.mark.parametrize("cfg, n", [
    ({"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "steps_offset": 1,
      "timestep_spacing": "leading"}, 25),
    ({"num_train_timesteps": 100, "timestep_spacing": "trailing", "solver_order": 3}, 7),
    ({"algorithm_type": "dpmsolver++", "solver_type": "midpoint"}, 9),  # diffusers maps them to deis / logrho
    ({"thresholding": True, "prediction_type": "sample", "sample_max_value": 2.0, "solver_order": 3}, 14),
])
def test_deis_more_options(cfg, n, monkeypatch):
    compare_loops("DEISMultistepScheduler", cfg, n, monkeypatch)


# --------------------------------------------------------------------------------------------- API
@pytest.mark.parametrize("name", list(OURS))
def test_api_matches_diffusers(name, tmp_path):
    ours, ref = OURS[name](), getattr(diffusers, name)()
    assert type(ours.init_noise_sigma) is type(ref.init_noise_sigma) and ours.init_noise_sigma == ref.init_noise_sigma
    assert ours.order == ref.order == 1
    ours.set_timesteps(10), ref.set_timesteps(10)
    x, noise = torch.randn(SHAPE), torch.randn(SHAPE)
    t = ref.timesteps[[3, 5]]
    assert_rel_close(ours.add_noise(x, noise, t), ref.add_noise(x, noise, t), TOL, "add_noise")
    assert torch.equal(ours.scale_model_input(x, t[0]), ref.scale_model_input(x, t[0]))
    # begin index, step index
    ours.set_begin_index(2), ref.set_begin_index(2)
    assert ours.begin_index == ref.begin_index == 2 and ours.step_index is None
    t = ref.timesteps[2]
    assert_rel_close(ours.add_noise(x, noise, t[None]), ref.add_noise(x, noise, t[None]), TOL, "add_noise begin")
    a, b = ours.step(fake_model(x, t), t, x), ref.step(fake_model(x, t), t, x)
    assert ours.step_index == ref.step_index == 3
    assert list(a.keys()) == list(b.keys()) == ["prev_sample"]
    assert_rel_close(a.prev_sample, b.prev_sample, TOL, "mid-schedule step")
    assert len(a.to_tuple()) == len(b.to_tuple()) == 1
    t = ref.timesteps[3]
    out = ours.step(fake_model(x, t), t, x, return_dict=False)
    assert isinstance(out, tuple) and len(out) == 1
    # config: save_config → diffusers from_pretrained and back
    cfg = {"solver_order": 3, "prediction_type": "v_prediction", "thresholding": True}
    ours = OURS[name](**cfg)
    ours.save_config(tmp_path)
    ref = getattr(diffusers, name).from_pretrained(tmp_path)
    assert all(ref.config[k] == v for k, v in cfg.items())
    back = OURS[name].from_config(ref.config)
    assert back.settings == ours.settings
    assert json.loads((tmp_path / "scheduler_config.json").read_text())["_class_name"] == name


@pytest.mark.parametrize("source, target", [
    ("DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler"),
    ("UniPCMultistepScheduler", "DPMSolverSinglestepScheduler"),
    ("EulerDiscreteScheduler", "DPMSolverSinglestepScheduler"),
    ("DPMSolverMultistepScheduler", "DEISMultistepScheduler"),
    ("DPMSolverSinglestepScheduler", "DEISMultistepScheduler"),
    ("UniPCMultistepScheduler", "DEISMultistepScheduler"),
    ("DDIMScheduler", "DEISMultistepScheduler"),
])
def test_from_config_of_compatible_classes(source, target, monkeypatch):
    """A diffusers config of another scheduler (SD-like: leading spacing, steps_offset 1, its own algorithm/solver
    types) loads as diffusers loads it, and samples the same."""
    kwargs = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "steps_offset": 1,
              "timestep_spacing": "leading", "solver_order": 3, "rescale_betas_zero_snr": False}
    src_cls = getattr(diffusers, source)
    accepted = set(src_cls.__init__.__code__.co_varnames)
    src = src_cls(**{k: v for k, v in kwargs.items() if k in accepted})
    ours, ref = OURS[target].from_config(src.config), getattr(diffusers, target).from_config(src.config)
    unsupported = set(OURS[target].config_class.UNSUPPORTED) | set(OURS[target].config_class.INERT)
    for key, value in ref.config.items():
        if not key.startswith("_") and key not in unsupported:
            assert ours.config[key] == value, (key, ours.config[key], value)
    assert set(ref.config) - set(ours.config) <= {"use_flow_sigmas", "flow_shift", "variance_type",
                                                  "use_dynamic_shifting", "time_shift_type", "_use_default_values"}
    # and back: fields diffusers' target class lacks come back as the source's defaults
    again = src_cls.from_config(ours.config)
    expected = src_cls.from_config(ref.config)
    assert {k: v for k, v in again.config.items() if not k.startswith("_")} == \
        {k: v for k, v in expected.config.items() if not k.startswith("_")}


def test_singlestep_from_deis_config():
    """diffusers maps algorithm_type "deis" to "dpmsolver++" but checks final_sigmas_type against the unmapped value,
    so a DEIS config (final σ "zero" by default) does not load into its singlestep solver; fastdiff maps first (as its
    multistep solver does) and loads it as dpmsolver++."""
    deis = diffusers.DEISMultistepScheduler(solver_order=3, algorithm_type="deis")  # not left at its default
    with pytest.raises(ValueError, match="final_sigmas_type"):  # diffusers 0.42.1
        diffusers.DPMSolverSinglestepScheduler.from_config(deis.config)
    ours = DPMSolverSinglestepScheduler.from_config(deis.config)
    assert (ours.config.algorithm_type, ours.config.solver_type, ours.config.solver_order) == \
        ("dpmsolver++", "midpoint", 3)


def test_foreign_option_values_are_mapped():
    assert DPMSolverSinglestepScheduler(algorithm_type="deis", solver_type="bh2").config.algorithm_type == "dpmsolver++"
    assert DPMSolverSinglestepScheduler(solver_type="logrho").config.solver_type == "midpoint"
    deis = DEISMultistepScheduler(algorithm_type="dpmsolver", solver_type="heun")
    assert (deis.config.algorithm_type, deis.config.solver_type) == ("deis", "logrho")
    assert DEISMultistepScheduler(algorithm_type="dpmsolver++").config.algorithm_type == "deis"


@pytest.mark.parametrize("name, kwargs, key", [
    ("DPMSolverSinglestepScheduler", {"solver_order": 4}, "solver_order"),
    ("DPMSolverSinglestepScheduler", {"algorithm_type": "sde-dpmsolver"}, "algorithm_type"),
    ("DPMSolverSinglestepScheduler", {"algorithm_type": "unipc"}, "algorithm_type"),
    ("DPMSolverSinglestepScheduler", {"solver_type": "euler"}, "solver_type"),
    ("DPMSolverSinglestepScheduler", {"algorithm_type": "dpmsolver"}, "final_sigmas_type"),
    ("DPMSolverSinglestepScheduler", {"final_sigmas_type": "one"}, "final_sigmas_type"),
    ("DPMSolverSinglestepScheduler", {"lambda_min_clipped": float("nan")}, "lambda_min_clipped"),
    ("DPMSolverSinglestepScheduler", {"use_karras_sigmas": True, "use_beta_sigmas": True}, "use_karras_sigmas"),
    ("DPMSolverSinglestepScheduler", {"use_flow_sigmas": True}, "use_flow_sigmas"),
    ("DPMSolverSinglestepScheduler", {"dynamic_thresholding_ratio": 1.5}, "dynamic_thresholding_ratio"),
    ("DPMSolverSinglestepScheduler", {"prediction_type": "flow_prediction"}, "prediction_type"),
    ("DEISMultistepScheduler", {"solver_order": 0}, "solver_order"),
    ("DEISMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}, "algorithm_type"),
    ("DEISMultistepScheduler", {"solver_type": "euler"}, "solver_type"),
    ("DEISMultistepScheduler", {"timestep_spacing": "uniform"}, "timestep_spacing"),
    ("DEISMultistepScheduler", {"beta_schedule": "cosine"}, "beta_schedule"),
    ("DEISMultistepScheduler", {"use_exponential_sigmas": True, "use_karras_sigmas": True}, "use_karras_sigmas"),
    ("DEISMultistepScheduler", {"use_dynamic_shifting": True}, "use_dynamic_shifting"),
])
def test_bad_config_values(name, kwargs, key):
    with pytest.raises(ValueError, match=key):
        OURS[name](**kwargs)


@pytest.mark.parametrize("name", list(OURS))
@pytest.mark.parametrize("n", [0, 1001, 2.0, True, None])
def test_bad_num_inference_steps(name, n):
    with pytest.raises(ValueError, match="num_inference_steps"):
        OURS[name]().set_timesteps(n)


@pytest.mark.parametrize("name", list(OURS))
def test_step_errors(name):
    scheduler = OURS[name]()
    x = torch.randn(SHAPE)
    with pytest.raises(ValueError, match="set_timesteps"):
        scheduler.step(x, 999, x)
    scheduler.set_timesteps(5)
    t = scheduler.timesteps[0]
    with pytest.raises(ValueError, match="model_output"):
        scheduler.step(torch.randn(2, 3, 4, 5), t, x)
    with pytest.raises(ValueError, match="model_output"):  # guidance needs (2B, ...)
        scheduler.step(x, t, x, guidance_scale=7.5)
    with pytest.raises(TypeError):
        scheduler.step(x.numpy(), t, x)
    with pytest.raises(ValueError, match="mu"):
        scheduler.set_timesteps(5, mu=0.5)
    assert scheduler.step_index is None  # nothing ran


def test_singlestep_custom_timesteps_and_order_list(monkeypatch):
    ts = [901, 700, 433, 250, 97, 12]
    ours, ref = DPMSolverSinglestepScheduler(solver_order=3), diffusers.DPMSolverSinglestepScheduler(solver_order=3)
    ours.set_timesteps(timesteps=ts), ref.set_timesteps(timesteps=ts)
    assert torch.equal(ours.timesteps, ref.timesteps) and torch.equal(ours.sigmas, ref.sigmas)
    assert ours.order_list == ref.order_list and ours.config.lower_order_final == ref.config.lower_order_final
    x = y = torch.randn(SHAPE)
    for t in ref.timesteps:
        x = ours.step(fake_model(x, t), t, x).prev_sample
        y = ref.step(fake_model(y, t), t, y).prev_sample
        assert_rel_close(x, y, TOL, f"custom timesteps t={t.item()}")
    with pytest.raises(ValueError, match="timesteps"):
        ours.set_timesteps(timesteps=[10, 500])
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        DPMSolverSinglestepScheduler(use_karras_sigmas=True).set_timesteps(timesteps=ts)
    with pytest.raises(ValueError, match="num_inference_steps"):
        ours.set_timesteps(5, timesteps=ts)
    for order, lof, final in itertools.product([1, 2, 3], [False, True], ["zero", "sigma_min"]):
        for n in (1, 2, 3, 4, 5, 6, 12):
            a = DPMSolverSinglestepScheduler(solver_order=order, lower_order_final=lof, final_sigmas_type=final)
            b = diffusers.DPMSolverSinglestepScheduler(solver_order=order, lower_order_final=lof,
                                                       final_sigmas_type=final)
            try:
                expected = b.get_order_list(n)
            except IndexError:  # diffusers 0.42.1 with an empty list (set_timesteps sets lower_order_final first)
                expected = None
            assert expected is None or a.get_order_list(n) == expected, (order, lof, final, n)
            a.set_timesteps(n), b.set_timesteps(n)
            assert a.order_list == b.order_list and a.config.lower_order_final == b.config.lower_order_final


def test_singlestep_stores_the_group_start_sample():
    """Every step of a group starts from the sample at the group's start (self.sample), not from its own input."""
    scheduler = DPMSolverSinglestepScheduler(solver_order=2, final_sigmas_type="sigma_min")
    scheduler.set_timesteps(4)
    x = torch.randn(SHAPE)
    t0, t1 = scheduler.timesteps[:2]
    x1 = scheduler.step(fake_model(x, t0), t0, x).prev_sample
    assert scheduler.sample is x
    a = scheduler.step(fake_model(x1, t1), t1, x1).prev_sample
    scheduler.set_timesteps(4)
    scheduler.step(fake_model(x, t0), t0, x)
    b = scheduler.step(fake_model(x1, t1), t1, x1 + 1.0).prev_sample  # a different x only changes x̂0's input
    assert scheduler.sample is x and not torch.equal(a, b)
    assert rel_err(a, b) < 0.5


# --------------------------------------------------------------------------------------------- fused path
def _loop(scheduler, n, **step_kwargs):
    scheduler.set_timesteps(n)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    kwargs = {"generator": torch.Generator().manual_seed(0)} if isinstance(scheduler, DPMSolverSinglestepScheduler) \
        else {}
    out = []
    for t in scheduler.timesteps:
        model_output = fake_model(x, t)
        if "guidance_scale" in step_kwargs:  # [uncond; cond]
            model_output = torch.cat([model_output, 0.8 * model_output + 0.1])
        x = scheduler.step(model_output, t, x, **kwargs, **step_kwargs).prev_sample
        out.append(x)
    return out


@pytest.mark.parametrize("name, cfg", [
    ("DPMSolverSinglestepScheduler", {"solver_order": 3, "algorithm_type": "sde-dpmsolver++"}),
    ("DPMSolverSinglestepScheduler", {"solver_order": 2, "solver_type": "heun", "prediction_type": "v_prediction"}),
    ("DEISMultistepScheduler", {"solver_order": 3}),
])
def test_fused_path_matches_torch(name, cfg, monkeypatch):
    torch_path = _loop(OURS[name](**cfg), 6, guidance_scale=3.0)
    monkeypatch.setenv("FASTDIFF_BACKEND", "triton")
    dispatch.reset_counts()
    fused = _loop(OURS[name](**cfg), 6, guidance_scale=3.0)
    assert dispatch.counts().get(("linear_step", "interpreter"), 0) == 6
    for i, (a, b) in enumerate(zip(fused, torch_path)):
        assert_rel_close(a, b, 1e-6, f"{name} step {i}")


@pytest.mark.parametrize("name", list(OURS))
def test_guidance_equals_combined_output(name):
    scheduler = OURS[name](solver_order=3)
    guided = _loop(scheduler, 5, guidance_scale=4.0)
    scheduler = OURS[name](solver_order=3)
    scheduler.set_timesteps(5)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    kwargs = {"generator": torch.Generator().manual_seed(0)} if name == "DPMSolverSinglestepScheduler" else {}
    for i, t in enumerate(scheduler.timesteps):
        uncond = fake_model(x, t)
        cond = 0.8 * uncond + 0.1
        x = scheduler.step(uncond + 4.0 * (cond - uncond), t, x, **kwargs).prev_sample
        assert_rel_close(guided[i], x, 1e-6, f"{name} step {i}")


def test_one_linear_step_per_step():
    for scheduler in (DPMSolverSinglestepScheduler(solver_order=3, thresholding=True), DEISMultistepScheduler()):
        dispatch.reset_counts()
        _loop(scheduler, 7)
        assert sum(v for (op, _), v in dispatch.counts().items() if op == "linear_step") == 7


def test_fp16_step_keeps_dtype(caplog):
    for scheduler in (DPMSolverSinglestepScheduler(), DEISMultistepScheduler()):
        scheduler.set_timesteps(4)
        x = torch.randn(SHAPE).half()
        with caplog.at_level(logging.WARNING):
            for t in scheduler.timesteps:
                x = scheduler.step(fake_model(x.float(), t).half(), t, x).prev_sample
        assert x.dtype == torch.float16 and torch.isfinite(x).all()
