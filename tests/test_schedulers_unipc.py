"""fastdiff's UniPCMultistepScheduler side by side with diffusers': timesteps (dtype and values), σ's, model inputs,
every step's prev_sample and the kept state (last_sample = the corrected sample, the newest converted model output)
over prediction types × β schedules × timestep spacings × solver orders / types / predict_x0 and the options
(Karras / exponential / beta σ, final_sigmas_type, lower_order_final, disable_corrector, thresholding, steps_offset,
zero-SNR), fp32, relative error ≤ 1e-5; the API around the loop (add_noise, begin index, configs, outputs, errors);
the fused path (one linear_step per step, the Triton interpreter equal to the torch path, guidance inside the op);
and the steps where diffusers' formulas are 0·∞ (it returns NaN/inf or fails), where fastdiff takes the limit.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from utils import assert_rel_close, rel_err

import fastdiff
from fastdiff.schedulers.dpm_solver import DPMSolverMultistepScheduler
from fastdiff.schedulers.unipc import UniPCMultistepScheduler

TOL = 1e-5
SHAPE = (2, 3, 4, 4)
PREDICTIONS = ["epsilon", "sample", "v_prediction"]
BETAS = ["linear", "scaled_linear", "squaredcos_cap_v2"]
SPACINGS = ["leading", "trailing", "linspace"]
ARBITRATED: list[tuple[str, float, float, float]] = []  # steps settled against diffusers in float64 (-s prints them)


@pytest.fixture(scope="module", autouse=True)
def _report_arbitrated():
    yield
    for what, err, ours, theirs in ARBITRATED:
        print(f"\n{what}: {err:.2e} from diffusers fp32; vs diffusers fp64: fastdiff {ours:.2e}, diffusers fp32 "
              f"{theirs:.2e}")


def diffusers_unipc():
    return pytest.importorskip("diffusers").UniPCMultistepScheduler


def fake_model(x: torch.Tensor, t) -> torch.Tensor:
    """A fixed, non-trivial function of (x, t) standing in for a UNet."""
    phase = torch.linspace(0, 3, x[0].numel(), dtype=x.dtype).reshape(x.shape[1:])
    return 0.7 * torch.tanh(x) + 0.3 * torch.cos(float(t) / 97.0 + phase)


def start_sample(scheduler) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(1234)) * float(scheduler.init_noise_sigma)


def sample_loop(scheduler, n: int, x=None, stop: int | None = None, dtype=torch.float32):
    """set_timesteps(n), then the pipeline loop; per step the model input, prev_sample and the kept state. With
    dtype=float64 (diffusers' scheduler only: its σ table widened) the whole loop runs in float64."""
    scheduler.set_timesteps(n)
    if dtype == torch.float64:
        scheduler.sigmas = scheduler.sigmas.double()
    x = (start_sample(scheduler) if x is None else x).to(dtype)
    trace = []
    for t in scheduler.timesteps[:stop]:
        model_input = scheduler.scale_model_input(x, t)
        x = scheduler.step(fake_model(model_input, t), t, x).prev_sample
        trace.append({"model_input": model_input, "prev_sample": x, "last_sample": scheduler.last_sample,
                      "converted": scheduler.model_outputs[-1]})
    return trace


def ill_conditioned(cfg: dict) -> bool:
    return cfg.get("predict_x0") is False and cfg.get("beta_schedule") == "squaredcos_cap_v2"


def compare_loops(cfg: dict, n: int, stop: int | None = None):
    """fastdiff's and diffusers' UniPC run side by side from one config: everything must match at every step."""
    ours_sched, ref_sched = UniPCMultistepScheduler(**cfg), diffusers_unipc()(**cfg)
    ours, ref = sample_loop(ours_sched, n, stop=stop), sample_loop(ref_sched, n, stop=stop)
    assert ours_sched.timesteps.dtype == ref_sched.timesteps.dtype == torch.int64
    assert torch.equal(ours_sched.timesteps, ref_sched.timesteps), \
        f"timesteps {ours_sched.timesteps.tolist()} != diffusers' {ref_sched.timesteps.tolist()}"
    assert ours_sched.sigmas.dtype == ref_sched.sigmas.dtype
    assert torch.equal(ours_sched.sigmas, ref_sched.sigmas), \
        f"sigmas {ours_sched.sigmas.tolist()} != diffusers' {ref_sched.sigmas.tolist()}"
    assert len(ours) == len(ref)
    ref64 = None
    for i, (a, b) in enumerate(zip(ours, ref)):
        for key in a:
            what = f"UniPC({cfg}) n={n} step {i} {key}"
            err = rel_err(a[key], b[key])
            if err <= TOL:
                continue
            # diffusers forms the coefficients (and the ε̂ of an x0-model, ÷σ) in fp32; fastdiff in float64: the
            # step passes if fastdiff is within TOL of diffusers run in float64 and closer to it than diffusers' fp32
            if ref64 is None:
                ref64 = sample_loop(diffusers_unipc()(**cfg), n, stop=stop, dtype=torch.float64)
            ours_vs_64, theirs_vs_64 = rel_err(a[key], ref64[i][key]), rel_err(b[key], ref64[i][key])
            ARBITRATED.append((what, err, ours_vs_64, theirs_vs_64))
            if ill_conditioned(cfg) and ours_vs_64 > TOL:
                # ε̂ solver on the cosine schedule (σ_max ≈ 6e4): c_x·x and the ε̂ terms cancel to 1e-4 of their
                # size, so fp32 inputs alone move the step by more than TOL; fastdiff must be far closer than diffusers
                assert ours_vs_64 * 10 <= theirs_vs_64, (
                    f"{what}: fastdiff {ours_vs_64:.3e}, diffusers fp32 {theirs_vs_64:.3e} from diffusers fp64")
                continue
            assert ours_vs_64 <= TOL and ours_vs_64 < theirs_vs_64, (
                f"{what}: {err:.3e} from diffusers fp32; from diffusers fp64 fastdiff is {ours_vs_64:.3e}, "
                f"diffusers fp32 is {theirs_vs_64:.3e}")
    assert ours_sched.step_index == ref_sched.step_index
    assert ours_sched.this_order == ref_sched.this_order
    assert ours_sched.lower_order_nums == ref_sched.lower_order_nums
    return ours_sched, ref_sched


# --------------------------------------------------------------------------------------------- whole loops
# (solver_order, solver_type, predict_x0); ε̂ solvers end at final_sigmas_type="sigma_min" (at σ = 0 diffusers' ε̂
# update is 0·∞, see test_epsilon_solver_to_sigma_zero_takes_the_limit)
SOLVERS = [(1, "bh2", True), (2, "bh2", True), (2, "bh1", False), (3, "bh1", True), (3, "bh2", False)]
GRID = list(itertools.product(PREDICTIONS, BETAS, SPACINGS, SOLVERS))


@pytest.mark.parametrize("prediction_type, beta_schedule, spacing, solver", GRID,
                         ids=[f"{p}-{b}-{s}-o{o}-{t}-x0{int(x)}" for p, b, s, (o, t, x) in GRID])
def test_unipc_loop_grid(prediction_type, beta_schedule, spacing, solver):
    order, solver_type, predict_x0 = solver
    cfg = {"prediction_type": prediction_type, "beta_schedule": beta_schedule, "timestep_spacing": spacing,
           "solver_order": order, "solver_type": solver_type, "predict_x0": predict_x0}
    if not predict_x0 or solver_type == "bh1":  # diffusers' last step to σ = 0 is NaN for these
        cfg["final_sigmas_type"] = "sigma_min"
    compare_loops(cfg, 8)


OPTION_CASES = [
    ("default", {}),
    ("karras", {"use_karras_sigmas": True}),
    ("karras-sigma-min", {"use_karras_sigmas": True, "final_sigmas_type": "sigma_min", "solver_order": 3}),
    ("karras-bounds", {"use_karras_sigmas": True, "sigma_min": 0.05, "sigma_max": 40.0}),
    ("exponential", {"use_exponential_sigmas": True, "prediction_type": "v_prediction"}),
    ("exponential-sigma-min", {"use_exponential_sigmas": True, "final_sigmas_type": "sigma_min"}),
    ("beta", {"use_beta_sigmas": True, "beta_schedule": "scaled_linear"}),
    ("beta-sigma-min-eps", {"use_beta_sigmas": True, "final_sigmas_type": "sigma_min", "predict_x0": False}),
    ("sigma-min", {"final_sigmas_type": "sigma_min", "solver_type": "bh1"}),
    ("no-lower-order-final", {"lower_order_final": False, "final_sigmas_type": "sigma_min", "solver_order": 3}),
    ("no-lower-order-final-o2", {"lower_order_final": False, "final_sigmas_type": "sigma_min"}),
    ("disable-corrector", {"disable_corrector": [0, 1, 4], "solver_order": 3}),
    ("thresholding", {"thresholding": True, "prediction_type": "sample", "sample_max_value": 1.5}),
    ("thresholding-eps", {"thresholding": True, "dynamic_thresholding_ratio": 0.9}),
    ("thresholding-ignored-by-eps-solver", {"thresholding": True, "predict_x0": False,
                                            "final_sigmas_type": "sigma_min"}),
    ("sd-like", {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "steps_offset": 1,
                 "timestep_spacing": "leading"}),
    ("zero-snr", {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing", "prediction_type": "v_prediction"}),
    ("small-T", {"num_train_timesteps": 100, "timestep_spacing": "trailing", "solver_order": 3}),
    ("trained-betas", {"trained_betas": [float(b) for b in torch.linspace(1e-4, 0.02, 1000).double() ** 1.1]}),
    ("order4", {"solver_order": 4}),
    ("order5-bh1", {"solver_order": 5, "solver_type": "bh1", "final_sigmas_type": "sigma_min"}),
    ("foreign-solver-type", {"solver_type": "midpoint"}),
]


@pytest.mark.parametrize("n", [1, 2, 7, 25])
@pytest.mark.parametrize("cfg", [c[1] for c in OPTION_CASES], ids=[c[0] for c in OPTION_CASES])
def test_unipc_loop_options(cfg, n):
    compare_loops(cfg, n)


def test_ill_conditioned_high_order_last_step():
    """Order 5 without lower_order_final: the last step extrapolates a degree-4 fit, so the sample amplifies the
    fp32 rounding of the history; fastdiff's float64 coefficients and diffusers' fp32 ones then differ by more
    than 1e-5 at that step (both are that far from diffusers run in float64): every step before it must match."""
    compare_loops({"solver_order": 5, "lower_order_final": False, "final_sigmas_type": "sigma_min"}, 25, stop=24)


# --------------------------------------------------------------------------------------------- 0·∞ in diffusers
def test_data_solver_to_sigma_zero_takes_the_limit():
    """σ_last = 0: h = ∞. bh1 (B(h) = h) makes diffusers' last step 0·∞ = NaN; without lower_order_final the order-2
    predictor divides by r = 0 (inf) and order 3 fails to solve. The limit is x̂0 at the last σ: fastdiff returns it."""
    for cfg, failure in [({"solver_type": "bh1"}, "nan"), ({"lower_order_final": False}, "inf"),
                         ({"lower_order_final": False, "solver_order": 3}, "raises")]:
        n = 7
        ours, ref = compare_loops(cfg, n, stop=n - 1)
        t, sample = ref.timesteps[-1], ref_prev(ref)
        x = ours.step(fake_model(sample, t), t, sample).prev_sample
        if failure == "raises":
            with pytest.raises(RuntimeError):  # torch.linalg.solve: singular matrix
                ref.step(fake_model(sample, t), t, sample)
        else:
            theirs = ref.step(fake_model(sample, t), t, sample).prev_sample
            assert not torch.isfinite(theirs).all()
        assert_rel_close(x, ref.model_outputs[-1], TOL, f"{cfg} last step vs x̂0")


def ref_prev(ref) -> torch.Tensor:
    """The sample diffusers' scheduler produced last (what the loop feeds the next step)."""
    return ref._last_prev


def test_epsilon_solver_to_sigma_zero_takes_the_limit():
    """predict_x0=False with σ_last = 0: diffusers' last step is σ_t·(e^h − 1) = 0·∞ = NaN; its limit is x̂0 =
    (x_c − σ_s·ε̂)/α_s from the corrected sample x_c, which fastdiff returns."""
    cfg, n = {"predict_x0": False, "prediction_type": "v_prediction"}, 6
    ours, ref = compare_loops(cfg, n, stop=n - 1)
    t = ref.timesteps[-1]
    sample = ref_prev(ref)
    theirs = ref.step(fake_model(sample, t), t, sample).prev_sample
    assert not torch.isfinite(theirs).all()
    x = ours.step(fake_model(sample, t), t, sample).prev_sample
    alpha, sigma = ref._sigma_to_alpha_sigma_t(ref.sigmas[n - 1].double())
    x0 = (ours.last_sample.double() - sigma * ours.model_outputs[-1].double()) / alpha
    assert_rel_close(x, x0, 1e-6, "last step vs x̂0")


@pytest.fixture(autouse=True)
def _keep_last_prev(monkeypatch):
    """Diffusers' scheduler remembers its last prev_sample (for the tests that finish a loop by hand)."""
    cls = pytest.importorskip("diffusers").UniPCMultistepScheduler
    step = cls.step

    def remembering(self, *args, **kwargs):
        out = step(self, *args, **kwargs)
        self._last_prev = out[0] if isinstance(out, tuple) else out.prev_sample
        return out

    monkeypatch.setattr(cls, "step", remembering)


def test_repeated_sigma_stays_finite():
    """n = T with linspace spacing repeats timesteps (and σ's): h = 0, where diffusers divides by B(0) = 0. fastdiff
    steps by the identity there and stays finite."""
    sched = UniPCMultistepScheduler(num_train_timesteps=40)
    trace = sample_loop(sched, 40)
    assert len(set(sched.timesteps.tolist())) < 40
    assert all(torch.isfinite(s["prev_sample"]).all() for s in trace)


# --------------------------------------------------------------------------------------------- the API
def test_constants_and_scaling():
    ours, ref = UniPCMultistepScheduler(), diffusers_unipc()()
    assert type(ours.init_noise_sigma) is type(ref.init_noise_sigma) is float
    assert ours.init_noise_sigma == ref.init_noise_sigma == 1.0
    assert ours.order == ref.order == 1
    assert len(ours) == len(ref) == 1000
    ours.set_timesteps(10)
    x = torch.randn(SHAPE)
    assert ours.scale_model_input(x, ours.timesteps[0]) is x
    assert ours.predict_x0 is True and ours.solver_p is None and ours.disable_corrector == []


@pytest.mark.parametrize("cfg", [{}, {"use_karras_sigmas": True, "beta_schedule": "scaled_linear"}], ids=str)
def test_add_noise(cfg):
    ours, ref = UniPCMultistepScheduler(**cfg), diffusers_unipc()(**cfg)
    for s in (ours, ref):
        s.set_timesteps(12)
    x0, noise = torch.randn(SHAPE), torch.randn(SHAPE)
    t = ref.timesteps[[1, 7]]
    assert_rel_close(ours.add_noise(x0, noise, t), ref.add_noise(x0, noise, t), 1e-6, "add_noise")
    for s in (ours, ref):
        s.set_begin_index(3)
    t = ref.timesteps[3:4].repeat(2)
    assert_rel_close(ours.add_noise(x0, noise, t), ref.add_noise(x0, noise, t), 1e-6, "add_noise at begin index")


def test_begin_index_img2img_loop():
    """A pipeline that starts mid-schedule: set_begin_index, add_noise at that timestep, then the loop."""
    results = []
    for cls in (UniPCMultistepScheduler, diffusers_unipc()):
        s = cls(solver_order=3)
        s.set_timesteps(10)
        s.set_begin_index(4)
        x = s.add_noise(torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)),
                        torch.randn(SHAPE, generator=torch.Generator().manual_seed(1)), s.timesteps[4:5])
        assert s.step_index is None and s.begin_index == 4
        for t in s.timesteps[4:]:
            x = s.step(fake_model(x, t), t, x).prev_sample
        assert s.step_index == 10
        results.append(x)
    assert_rel_close(results[0], results[1], TOL, "img2img loop")


def test_step_index_counts_from_the_first_timestep():
    ours, ref = UniPCMultistepScheduler(), diffusers_unipc()()
    for s in (ours, ref):
        s.set_timesteps(6)
        x = torch.randn(SHAPE)
        t = s.timesteps[2]
        s.step(fake_model(x, t), t, x)
    assert ours.step_index == ref.step_index == 3


def test_output_shape_and_tuple():
    ours, ref = UniPCMultistepScheduler(), diffusers_unipc()()
    x = torch.randn(SHAPE)
    for s in (ours, ref):
        s.set_timesteps(4)
    t = ours.timesteps[0]
    a, b = ours.step(fake_model(x, t), t, x), ref.step(fake_model(x, t), t, x)
    assert list(a.keys()) == list(b.keys()) == ["prev_sample"]
    assert len(a.to_tuple()) == len(b.to_tuple()) == 1
    t = ours.timesteps[1]
    a, b = ours.step(fake_model(x, t), t, x, return_dict=False), ref.step(fake_model(x, t), t, x, return_dict=False)
    assert isinstance(a, tuple) and len(a) == len(b) == 1
    assert_rel_close(a[0], b[0], TOL)


def test_half_precision_output_dtype():
    s = UniPCMultistepScheduler()
    s.set_timesteps(5)
    x = torch.randn(SHAPE).half()
    for t in s.timesteps:
        x = s.step(fake_model(x.float(), t).half(), t, x).prev_sample
        assert x.dtype == torch.float16 and torch.isfinite(x).all()


# --------------------------------------------------------------------------------------------- configs
def test_config_round_trip_through_diffusers(tmp_path):
    cfg = {"solver_order": 3, "solver_type": "bh1", "predict_x0": False, "disable_corrector": [1, 2],
           "use_karras_sigmas": True, "final_sigmas_type": "sigma_min", "timestep_spacing": "trailing"}
    ours = UniPCMultistepScheduler(**cfg)
    ours.save_config(tmp_path / "a")
    ref = diffusers_unipc().from_pretrained(tmp_path / "a")
    for key, value in cfg.items():
        assert ref.config[key] == value, key
    ref.save_config(tmp_path / "b")
    back = UniPCMultistepScheduler.from_pretrained(tmp_path / "b")
    assert back.settings == ours.settings
    assert UniPCMultistepScheduler.from_config(ref.config).settings == ours.settings
    assert diffusers_unipc().from_config(ours.config).config["solver_type"] == "bh1"


@pytest.mark.parametrize("name, cfg, solver_type", [
    ("DPMSolverMultistepScheduler", {"solver_type": "heun", "solver_order": 3}, "bh2"),
    ("DPMSolverMultistepScheduler", {"solver_type": "midpoint"}, "bh2"),
    ("DEISMultistepScheduler", {"solver_type": "logrho"}, "bh2"),
    ("EulerDiscreteScheduler", {"prediction_type": "v_prediction"}, "bh2"),
    ("DDIMScheduler", {"steps_offset": 1}, "bh2"),
])
def test_from_config_of_compatible_diffusers_schedulers(name, cfg, solver_type):
    diffusers = pytest.importorskip("diffusers")
    config = getattr(diffusers, name)(**cfg).config
    ours, ref = UniPCMultistepScheduler.from_config(config), diffusers.UniPCMultistepScheduler.from_config(config)
    assert ours.solver_type == ref.config.solver_type == solver_type
    for key in ("solver_order", "prediction_type", "timestep_spacing", "steps_offset", "final_sigmas_type"):
        assert ours.config[key] == ref.config[key], key
    assert torch.equal(sample_loop(ours, 6)[-1]["prev_sample"], sample_loop(ours, 6)[-1]["prev_sample"])
    assert_rel_close(sample_loop(ours, 6)[-1]["prev_sample"], sample_loop(ref, 6)[-1]["prev_sample"], TOL)


def test_fastdiff_dpm_solver_config_loads():
    dpm = DPMSolverMultistepScheduler(solver_order=3, solver_type="heun")
    ours = UniPCMultistepScheduler.from_config(dpm.config)
    assert ours.settings.solver_order == 3 and ours.settings.solver_type == "bh2"
    assert DPMSolverMultistepScheduler.from_config(ours.config).settings.solver_type == "midpoint"


@pytest.mark.parametrize("kwargs, match", [
    ({"solver_order": 0}, "solver_order"),
    ({"solver_order": 6}, "solver_order"),
    ({"solver_type": "bh3"}, "solver_type"),
    ({"final_sigmas_type": "one"}, "final_sigmas_type"),
    ({"timestep_spacing": "even"}, "timestep_spacing"),
    ({"beta_schedule": "cosine"}, "beta_schedule"),
    ({"prediction_type": "flow_prediction"}, "prediction_type"),
    ({"use_karras_sigmas": True, "use_beta_sigmas": True}, "use_karras_sigmas"),
    ({"use_flow_sigmas": True}, "use_flow_sigmas"),
    ({"solver_p": DPMSolverMultistepScheduler()}, "solver_p"),
    ({"dynamic_thresholding_ratio": 1.5}, "dynamic_thresholding_ratio"),
    ({"sigma_min": -1.0}, "sigma_min"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        UniPCMultistepScheduler(**kwargs)


@pytest.mark.parametrize("call, match", [
    (lambda s: s.set_timesteps(0), "num_inference_steps"),
    (lambda s: s.set_timesteps(1001), "num_inference_steps"),
    (lambda s: s.set_timesteps(2.5), "num_inference_steps"),
    (lambda s: s.set_timesteps(), "num_inference_steps"),
    (lambda s: s.set_timesteps(sigmas=[3.0, 1.0]), "sigmas"),  # diffusers: only with use_flow_sigmas
])
def test_bad_set_timesteps(call, match):
    with pytest.raises(ValueError, match=match):
        call(UniPCMultistepScheduler())


def test_custom_sigmas_refused_like_diffusers():
    with pytest.raises(ValueError):
        diffusers_unipc()().set_timesteps(sigmas=[3.0, 1.0])


def test_bad_step_inputs_change_nothing():
    s = UniPCMultistepScheduler()
    x = torch.randn(SHAPE)
    with pytest.raises(ValueError, match="set_timesteps"):
        s.step(x, 999, x)
    s.set_timesteps(5)
    t = s.timesteps[0]
    with pytest.raises(ValueError, match="model_output"):
        s.step(torch.randn(2, 3, 4, 5), t, x)
    with pytest.raises(ValueError, match="model_output"):
        s.step(x, t, x, guidance_scale=3.0)  # guidance needs (2B, ...)
    assert s.step_index is None and s.last_sample is None
    s.step(fake_model(x, t), t, x)
    assert s.step_index == 1


# --------------------------------------------------------------------------------------------- the fused path
@pytest.mark.parametrize("cfg", [{"solver_order": 3, "prediction_type": "v_prediction"},
                                 {"predict_x0": False, "solver_type": "bh1", "beta_schedule": "scaled_linear",
                                  "final_sigmas_type": "sigma_min", "disable_corrector": [2]}], ids=str)
def test_fused_path_matches_the_torch_path(monkeypatch, cfg):
    """Two schedulers in lockstep, one on the torch path, one on the Triton interpreter, fed the same sample each
    step (the ε̂ solvers' rows cancel: terms ~20× the result on the linear schedule's v-model, so 1-ulp differences
    of the two paths grow from step to step; the step itself must agree)."""
    n = 6
    ref, fused = UniPCMultistepScheduler(**cfg), UniPCMultistepScheduler(**cfg)
    for s in (ref, fused):
        s.set_timesteps(n)
    x = start_sample(ref)
    fastdiff.reset_counts()
    for t in ref.timesteps:
        m = fake_model(x, t)
        monkeypatch.setenv("FASTDIFF_BACKEND", "torch")
        a = ref.step(m, t, x).prev_sample
        monkeypatch.setenv("FASTDIFF_BACKEND", "triton")
        b = fused.step(m, t, x).prev_sample
        assert_rel_close(b, a, 1e-6, f"prev_sample at t={t.item()}")
        assert_rel_close(fused.last_sample, ref.last_sample, 1e-6, "last_sample")
        assert_rel_close(fused.model_outputs[-1], ref.model_outputs[-1], 1e-6, "converted model output")
        x = a
    # one fused call per step on each path
    assert fastdiff.counts() == {("linear_step", "interpreter"): n, ("linear_step", "torch"): n}


def test_one_linear_step_per_step_on_the_torch_path():
    s = UniPCMultistepScheduler(solver_order=3)
    fastdiff.reset_counts()
    sample_loop(s, 5)
    assert fastdiff.counts() == {("linear_step", "torch"): 5}


def test_guided_step_equals_the_step_on_the_combined_output():
    a, b = UniPCMultistepScheduler(solver_order=3), UniPCMultistepScheduler(solver_order=3)
    for s in (a, b):
        s.set_timesteps(5)
    x = torch.randn(SHAPE)
    for t in a.timesteps:
        both = torch.cat([fake_model(x, t), fake_model(-x, t)])
        combined = both[:2] + 6.0 * (both[2:] - both[:2])
        out_a = a.step(both, t, x, guidance_scale=6.0).prev_sample
        out_b = b.step(combined, t, x).prev_sample
        assert_rel_close(out_a, out_b, 1e-6)
        assert_rel_close(a.last_sample, b.last_sample, 1e-6)
        x = out_a


def test_corrector_changes_the_sample():
    """The corrector really runs: disabling it everywhere changes the result (and matches diffusers too)."""
    all_off = {"disable_corrector": list(range(10))}
    on, _ = compare_loops({}, 6)
    off, _ = compare_loops(all_off, 6)
    assert rel_err(on.last_sample, off.last_sample) > 1e-3
