"""Parity with diffusers' schedulers: same timesteps, σ's, model inputs, steps and whole sampling loops for the same
inputs and torch.Generator (fp32, relative error ≤ 1e-5), over prediction types × β schedules × timestep spacings ×
Karras σ × solver orders. Each test skips itself when diffusers is not installed.

Where diffusers' own fp32 arithmetic is off by more than the tolerance (it forms the per-step coefficients, e.g.
1 − ᾱ_t/ᾱ_prev, in fp32; fastdiff in float64), a step is accepted only if fastdiff is within the tolerance of the same
diffusers loop run in float64 and closer to it than diffusers' fp32 loop is.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from utils import assert_rel_close, rel_err

import fastdiff
import fastdiff.schedulers as fs

TOL = 1e-5
SHAPE = (2, 3, 4, 4)
PREDICTIONS = ["epsilon", "sample", "v_prediction"]
BETAS = ["linear", "scaled_linear", "squaredcos_cap_v2"]
SPACINGS = ["leading", "trailing", "linspace"]
WORST: dict[str, float] = {}  # largest relative error vs diffusers' fp32 per scheduler (printed with -s)
ARBITRATED: dict[str, tuple[int, float, float]] = {}  # steps settled in fp64: count, worst ours/diffusers vs fp64


@pytest.fixture(scope="module", autouse=True)
def _report_worst():
    yield
    if WORST:
        print("\nmax relative error vs diffusers (fp32):", {k: f"{v:.2e}" for k, v in sorted(WORST.items())})
    for name, (count, ours, theirs) in sorted(ARBITRATED.items()):
        print(f"{name}: {count} steps beyond {TOL} from diffusers fp32, arbitrated in fp64: fastdiff within "
              f"{ours:.2e} of fp64, diffusers fp32 within {theirs:.2e}")


def diffusers_cls(name: str):
    diffusers = pytest.importorskip("diffusers")
    return getattr(diffusers, name)


def fake_model(x: torch.Tensor, t) -> torch.Tensor:
    """A fixed, non-trivial function of (x, t) standing in for a UNet."""
    phase = torch.linspace(0, 3, x[0].numel(), dtype=x.dtype, device=x.device).reshape(x.shape[1:])
    return 0.7 * torch.tanh(x) + 0.3 * torch.cos(float(t) / 97.0 + phase)


def sample_loop(scheduler, n: int, step_kwargs=None, dtype=torch.float32, seed: int = 0, x=None):
    """set_timesteps(n), then the pipeline loop; the per-step model inputs, samples and x̂0 for comparison."""
    scheduler.set_timesteps(n)
    generator = torch.Generator().manual_seed(seed)
    if x is None:
        x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1234)) * float(scheduler.init_noise_sigma)
    x = x.to(dtype)
    trace = []
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(x, t)
        out = scheduler.step(fake_model(model_input, t), t, x, generator=generator, **(step_kwargs or {}))
        x = out.prev_sample
        trace.append({"model_input": model_input, "prev_sample": out.prev_sample,
                      "pred_original_sample": getattr(out, "pred_original_sample", None)})
    return scheduler.timesteps, trace


def diffusers_fp64_loop(name: str, cfg: dict, n: int, step_kwargs, monkeypatch):
    """The same diffusers loop in float64 (ᾱ table, samples and model in fp64; noise drawn in fp32 as the fp32 loop
    draws it, then widened): the arbiter where diffusers' fp32 coefficients are the larger error."""
    from diffusers.schedulers import scheduling_ddim, scheduling_ddpm

    for module in (scheduling_ddim, scheduling_ddpm):
        draw = module.randn_tensor
        monkeypatch.setattr(module, "randn_tensor", lambda shape, generator=None, device=None, dtype=None, _d=draw:
                            _d(shape, generator=generator, device=device, dtype=torch.float32).to(dtype))
    sched = diffusers_cls(name)(**cfg)
    sched.alphas_cumprod = sched.alphas_cumprod.double()
    if hasattr(sched, "final_alpha_cumprod"):
        sched.final_alpha_cumprod = torch.as_tensor(sched.final_alpha_cumprod, dtype=torch.float64)
    if hasattr(sched, "one"):
        sched.one = torch.tensor(1.0, dtype=torch.float64)
    return sample_loop(sched, n, step_kwargs, dtype=torch.float64)


def euler_fp64_loop(name: str, cfg: dict, n: int, step_kwargs):
    """Euler (with Karras' churn) and Euler ancestral written out here in float64 on diffusers' σ table (Karras et al.
    2022, Algorithm 2; the ancestral σ_up/σ_down split), noise drawn in fp32 from the same generator as the fp32
    loops and widened: the arbiter where diffusers' fp32 form x + (σ' − σ)·(x − x̂0)/σ loses digits (σ_max ≈ 6e4 on
    the cosine schedule)."""
    sched = diffusers_cls(name)(**cfg)
    sched.set_timesteps(n)
    sigmas = sched.sigmas.double().tolist()
    kw, prediction_type = step_kwargs or {}, cfg.get("prediction_type", "epsilon")
    generator = torch.Generator().manual_seed(0)
    x = (torch.randn(SHAPE, generator=torch.Generator().manual_seed(1234)) * float(sched.init_noise_sigma)).double()
    trace = []
    for i, t in enumerate(sched.timesteps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        model_input = x / (sigma**2 + 1) ** 0.5
        out = fake_model(model_input, t)
        sigma_hat, sigma_x0 = sigma, sigma
        if name == "EulerDiscreteScheduler":
            in_window = kw.get("s_tmin", 0.0) <= sigma <= kw.get("s_tmax", float("inf"))
            gamma = min(kw.get("s_churn", 0.0) / (len(sigmas) - 1), 2**0.5 - 1) if in_window else 0.0
            sigma_hat = sigma * (gamma + 1)
            if gamma > 0:
                z = torch.randn(SHAPE, generator=generator).double()
                x = x + z * kw.get("s_noise", 1.0) * (sigma_hat**2 - sigma**2) ** 0.5
            sigma_x0 = sigma_hat if prediction_type == "epsilon" else sigma
        x0 = {"epsilon": lambda: x - sigma_x0 * out, "sample": lambda: out,
              "v_prediction": lambda: out * (-sigma_x0 / (sigma_x0**2 + 1) ** 0.5) + x / (sigma_x0**2 + 1)}[
            prediction_type]()
        if name == "EulerDiscreteScheduler":
            x = x + (sigma_next - sigma_hat) * (x - x0) / sigma_hat
        else:
            sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
            sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
            z = torch.randn(SHAPE, generator=generator).double()
            x = x + (sigma_down - sigma) * (x - x0) / sigma + z * sigma_up
        trace.append({"model_input": model_input, "prev_sample": x, "pred_original_sample": x0})
    return sched.timesteps, trace


FP64_ARBITERS = {"DDIMScheduler": "diffusers", "DDPMScheduler": "diffusers",
                 "EulerDiscreteScheduler": "written", "EulerAncestralDiscreteScheduler": "written"}


def compare_loops(name: str, cfg: dict, n: int, step_kwargs=None, monkeypatch=None, expect_timesteps=True):
    """Run fastdiff's and diffusers' scheduler side by side; every step must match."""
    ours_t, ours = sample_loop(getattr(fs, name)(**cfg), n, step_kwargs)
    ref_t, ref = sample_loop(diffusers_cls(name)(**cfg), n, step_kwargs)
    if expect_timesteps:
        assert ours_t.dtype == ref_t.dtype, f"timesteps dtype {ours_t.dtype} != diffusers' {ref_t.dtype}"
        assert torch.equal(ours_t, ref_t), f"timesteps {ours_t.tolist()} != diffusers' {ref_t.tolist()}"
    ref64 = None
    for i, (a, b) in enumerate(zip(ours, ref)):
        for key, value in a.items():
            if b[key] is None:
                continue
            what = f"{name}({cfg}) step {i} (t={ref_t[i].item()}) {key}"
            err = rel_err(value, b[key])
            WORST[name] = max(WORST.get(name, 0.0), err)
            if err <= TOL:
                continue
            arbiter = FP64_ARBITERS.get(name)
            assert arbiter is not None and (monkeypatch is not None or arbiter == "written"), \
                f"{what}: relative error {err:.3e} > {TOL}"
            if ref64 is None:
                ref64 = (diffusers_fp64_loop(name, cfg, n, step_kwargs, monkeypatch) if arbiter == "diffusers"
                         else euler_fp64_loop(name, cfg, n, step_kwargs))[1]
            ours_vs_64, theirs_vs_64 = rel_err(value, ref64[i][key]), rel_err(b[key], ref64[i][key])
            count, worst_ours, worst_theirs = ARBITRATED.get(name, (0, 0.0, 0.0))
            ARBITRATED[name] = (count + 1, max(worst_ours, ours_vs_64), max(worst_theirs, theirs_vs_64))
            assert ours_vs_64 <= TOL and ours_vs_64 < theirs_vs_64, (
                f"{what}: {err:.3e} from diffusers fp32; from diffusers fp64 fastdiff is {ours_vs_64:.3e}, "
                f"diffusers fp32 is {theirs_vs_64:.3e}")
    return ours, ref


# --------------------------------------------------------------------------------------------- whole loops, grids
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("beta_schedule", BETAS)
@pytest.mark.parametrize("prediction_type", PREDICTIONS)
def test_ddpm_loop(prediction_type, beta_schedule, spacing, variance_type, monkeypatch):
    compare_loops("DDPMScheduler", {"prediction_type": prediction_type, "beta_schedule": beta_schedule,
                                    "timestep_spacing": spacing, "variance_type": variance_type}, 12,
                  monkeypatch=monkeypatch)


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("beta_schedule", BETAS)
@pytest.mark.parametrize("prediction_type", PREDICTIONS)
def test_ddim_loop(prediction_type, beta_schedule, spacing, eta, monkeypatch):
    compare_loops("DDIMScheduler", {"prediction_type": prediction_type, "beta_schedule": beta_schedule,
                                    "timestep_spacing": spacing}, 12, {"eta": eta}, monkeypatch=monkeypatch)


ORDERS = [(1, True), (2, True), (2, False)]  # (solver_order, lower_order_final)
# every combination diffusers can run: Karras σ on the cosine schedule repeat the first timestep and diffusers runs
# past its σ table (test_dpm_solver_karras_cosine_repeats_timesteps)
DPM_GRID = [(p, b, s, k, o, lo) for p, b, s, k, (o, lo) in itertools.product(PREDICTIONS, BETAS, SPACINGS,
                                                                             [False, True], ORDERS)
            if not (k and b == "squaredcos_cap_v2")]


@pytest.mark.parametrize("prediction_type, beta_schedule, spacing, karras, order, lower_order_final", DPM_GRID,
                         ids=["-".join(map(str, c)) for c in DPM_GRID])
def test_dpm_solver_loop(prediction_type, beta_schedule, spacing, karras, order, lower_order_final):
    compare_loops("DPMSolverMultistepScheduler", {
        "prediction_type": prediction_type, "beta_schedule": beta_schedule, "timestep_spacing": spacing,
        "use_karras_sigmas": karras, "solver_order": order, "lower_order_final": lower_order_final}, 10)


@pytest.mark.parametrize("order, lower_order_final", ORDERS, ids=[f"order{o}-lof{int(lo)}" for o, lo in ORDERS])
@pytest.mark.parametrize("prediction_type", PREDICTIONS)
def test_dpm_solver_loop_20_steps(prediction_type, order, lower_order_final):
    """lower_order_final only applies below 15 steps; with 20 the last step is second order unless σ_last = 0."""
    compare_loops("DPMSolverMultistepScheduler", {"prediction_type": prediction_type, "solver_order": order,
                                                  "lower_order_final": lower_order_final}, 20)


@pytest.mark.parametrize("karras", [False, True], ids=["uniform", "karras"])
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("beta_schedule", BETAS)
@pytest.mark.parametrize("prediction_type", PREDICTIONS)
def test_euler_loop(prediction_type, beta_schedule, spacing, karras):
    compare_loops("EulerDiscreteScheduler", {"prediction_type": prediction_type, "beta_schedule": beta_schedule,
                                             "timestep_spacing": spacing, "use_karras_sigmas": karras}, 12)


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("beta_schedule", BETAS)
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])  # diffusers' Euler ancestral has no "sample"
def test_euler_ancestral_loop(prediction_type, beta_schedule, spacing):
    compare_loops("EulerAncestralDiscreteScheduler", {"prediction_type": prediction_type,
                                                      "beta_schedule": beta_schedule, "timestep_spacing": spacing}, 12)


# --------------------------------------------------------------------------------------------- whole loops, options
ALL_NAMES = ["DDPMScheduler", "DDIMScheduler", "DPMSolverMultistepScheduler", "EulerDiscreteScheduler",
             "EulerAncestralDiscreteScheduler"]
TRAINED = [float(b) for b in torch.linspace(1e-4, 0.02, 1000).double() ** 1.1]
COMMON_CASES = [
    ("zero-snr", {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing", "prediction_type": "v_prediction"},
     12),
    ("sd-like", {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "steps_offset": 1}, 12),
    ("one-step", {}, 1),
    ("small-T-trailing", {"num_train_timesteps": 100, "timestep_spacing": "trailing"}, 7),
    ("trained-betas", {"trained_betas": TRAINED}, 9),
]


@pytest.mark.parametrize("name", ALL_NAMES)
@pytest.mark.parametrize("cfg, n", [c[1:] for c in COMMON_CASES], ids=[c[0] for c in COMMON_CASES])
def test_common_options_loop(name, cfg, n, monkeypatch):
    compare_loops(name, cfg, n, monkeypatch=monkeypatch)


@pytest.mark.parametrize("name", ["DDPMScheduler", "DDIMScheduler", "EulerDiscreteScheduler",
                                  "EulerAncestralDiscreteScheduler"])
def test_num_inference_steps_equal_to_num_train_timesteps(name, monkeypatch):
    """n = T (T = 100 here to keep it fast). DDPM's last steps have β_t ≈ 1e-4, where diffusers' fp32
    1 − ᾱ_t/ᾱ_prev loses digits: those steps are arbitrated in float64."""
    compare_loops(name, {"num_train_timesteps": 100}, 100, monkeypatch=monkeypatch)


def test_dpm_solver_all_train_timesteps_stays_finite():
    """n = T with linspace spacing repeats timesteps (h = 0): diffusers' 2M step divides by r0 = 0 and returns NaN;
    fastdiff takes the first-order step there. Timesteps and σ's still equal diffusers'."""
    ours, ref = fs.DPMSolverMultistepScheduler(num_train_timesteps=100), \
        diffusers_cls("DPMSolverMultistepScheduler")(num_train_timesteps=100)
    (ours_t, trace), (ref_t, ref_trace) = sample_loop(ours, 100), sample_loop(ref, 100)
    assert torch.equal(ours_t, ref_t) and torch.equal(ours.sigmas, ref.sigmas)
    assert torch.isfinite(trace[-1]["prev_sample"]).all()
    assert not torch.isfinite(ref_trace[-1]["prev_sample"]).all()  # remove when diffusers handles it
    first_bad = next(i for i, r in enumerate(ref_trace) if not torch.isfinite(r["prev_sample"]).all())
    for i in range(first_bad):
        assert_rel_close(trace[i]["prev_sample"], ref_trace[i]["prev_sample"], TOL, f"step {i}")


def test_dpm_solver_karras_cosine_repeats_timesteps():
    """Karras σ on the cosine schedule round to timesteps 998 four times. diffusers (index of the second match) then
    starts at σ index 1 and runs past its table; fastdiff does the same by default (clear error), and with
    set_begin_index(0) samples all n σ's, which equal diffusers'."""
    cfg = {"beta_schedule": "squaredcos_cap_v2", "use_karras_sigmas": True}
    ours, ref = fs.DPMSolverMultistepScheduler(**cfg), diffusers_cls("DPMSolverMultistepScheduler")(**cfg)
    ours.set_timesteps(10), ref.set_timesteps(10)
    assert torch.equal(ours.timesteps, ref.timesteps) and torch.equal(ours.sigmas, ref.sigmas)
    assert ours.timesteps.tolist().count(ours.timesteps[0].item()) > 1
    with pytest.raises(RuntimeError, match="set_begin_index"):
        sample_loop(ours, 10)
    with pytest.raises(IndexError):  # diffusers 0.42.1; remove when diffusers handles it
        sample_loop(ref, 10)
    ours.set_timesteps(10)
    ours.set_begin_index(0)
    x = torch.randn(SHAPE)
    for t in ours.timesteps:
        x = ours.step(fake_model(x, t), t, x).prev_sample
    assert torch.isfinite(x).all()


OPTION_CASES = [
    ("ddim-clipped-eps", "DDIMScheduler", {"set_alpha_to_one": False, "clip_sample_range": 0.5}, 12,
     {"eta": 0.5, "use_clipped_model_output": True}),
    ("ddim-no-clip", "DDIMScheduler", {"clip_sample": False, "prediction_type": "v_prediction"}, 12, {"eta": 0.3}),
    ("ddpm-no-clip", "DDPMScheduler", {"clip_sample": False, "variance_type": "fixed_large"}, 12, None),
    ("dpm-heun", "DPMSolverMultistepScheduler", {"solver_type": "heun"}, 20, None),
    ("dpm-heun-karras", "DPMSolverMultistepScheduler", {"solver_type": "heun", "use_karras_sigmas": True}, 9, None),
    ("dpm-euler-at-final", "DPMSolverMultistepScheduler",
     {"euler_at_final": True, "final_sigmas_type": "sigma_min", "lower_order_final": False}, 10, None),
    ("dpm-sigma_min", "DPMSolverMultistepScheduler", {"final_sigmas_type": "sigma_min", "lower_order_final": False},
     10, None),
    ("dpm-sd-karras", "DPMSolverMultistepScheduler",
     {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "use_karras_sigmas": True,
      "steps_offset": 1, "timestep_spacing": "leading"}, 25, None),
    ("euler-churn", "EulerDiscreteScheduler", {}, 12, {"s_churn": 1.0}),
    ("euler-churn-window", "EulerDiscreteScheduler", {"prediction_type": "v_prediction"}, 12,
     {"s_churn": 2.0, "s_tmin": 0.5, "s_tmax": 10.0, "s_noise": 1.003}),
    ("euler-karras-range", "EulerDiscreteScheduler",
     {"use_karras_sigmas": True, "sigma_min": 0.05, "sigma_max": 20.0, "final_sigmas_type": "sigma_min"}, 12, None),
    ("euler-sd-karras", "EulerDiscreteScheduler",
     {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "use_karras_sigmas": True,
      "steps_offset": 1, "timestep_spacing": "leading"}, 25, None),
]


@pytest.mark.parametrize("name, cfg, n, step_kwargs", [c[1:] for c in OPTION_CASES], ids=[c[0] for c in OPTION_CASES])
def test_option_loop(name, cfg, n, step_kwargs, monkeypatch):
    compare_loops(name, cfg, n, step_kwargs, monkeypatch=monkeypatch)


def test_dpm_solver_final_zero_length_step_stays_finite():
    """Karras σ with final_sigmas_type="sigma_min" end on σ_min → σ_min (h = 0): diffusers' heun weight
    ((e^(−h) − 1)/h + 1) is 0/0 = NaN there; fastdiff returns the sample unchanged (the h → 0 limit)."""
    cfg = {"solver_type": "heun", "use_karras_sigmas": True, "final_sigmas_type": "sigma_min"}
    (_, ours), (_, ref) = sample_loop(fs.DPMSolverMultistepScheduler(**cfg), 20), \
        sample_loop(diffusers_cls("DPMSolverMultistepScheduler")(**cfg), 20)
    assert not torch.isfinite(ref[-1]["prev_sample"]).all()  # remove when diffusers handles it
    for i in range(len(ref) - 1):
        assert_rel_close(ours[i]["prev_sample"], ref[i]["prev_sample"], TOL, f"step {i}")
    assert torch.equal(ours[-1]["prev_sample"], ours[-2]["prev_sample"])


def test_custom_timesteps_and_sigmas_loops():
    ts = [901, 700, 433, 250, 97, 12]
    for name in ("DDPMScheduler", "DPMSolverMultistepScheduler", "EulerDiscreteScheduler"):
        ours, ref = getattr(fs, name)(), diffusers_cls(name)()
        ours.set_timesteps(timesteps=ts), ref.set_timesteps(timesteps=ts)
        _loop_both(ours, ref, name)
    sigmas = [14.6, 7.0, 3.1, 1.2, 0.4, 0.05, 0.0]
    ours, ref = fs.EulerDiscreteScheduler(), diffusers_cls("EulerDiscreteScheduler")()
    ours.set_timesteps(sigmas=sigmas), ref.set_timesteps(sigmas=sigmas)
    _loop_both(ours, ref, "Euler sigmas=")


def _loop_both(ours, ref, what):
    assert torch.equal(ours.timesteps, ref.timesteps), (ours.timesteps, ref.timesteps)
    x = y = torch.randn(SHAPE) * float(ref.init_noise_sigma)
    for t in ref.timesteps:
        x = ours.step(fake_model(ours.scale_model_input(x, t), t), t, x, generator=torch.Generator().manual_seed(2))[0]
        y = ref.step(fake_model(ref.scale_model_input(y, t), t), t, y, generator=torch.Generator().manual_seed(2))[0]
        assert_rel_close(x, y, TOL, f"{what} t={t.item()}")


# --------------------------------------------------------------------------------------------- the kernel path
KERNEL_CASES = [
    ("ddim-eta", "DDIMScheduler", {}, {"eta": 1.0}),
    ("ddim-zero-snr", "DDIMScheduler", {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing",
                                        "prediction_type": "v_prediction"}, {}),
    ("ddpm", "DDPMScheduler", {"prediction_type": "sample", "variance_type": "fixed_large"}, {}),
    ("ddpm-zero-snr", "DDPMScheduler", {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing",
                                        "prediction_type": "v_prediction"}, {}),
]


@pytest.mark.parametrize("name, cfg, step_kwargs", [c[1:] for c in KERNEL_CASES], ids=[c[0] for c in KERNEL_CASES])
def test_fused_kernel_path_loop(name, cfg, step_kwargs, device, monkeypatch):
    """DDIM/DDPM through the Triton kernels (interpreted on the CPU, compiled on CUDA) vs diffusers on the CPU,
    with the same CPU generator (drawn on the CPU and moved, as diffusers' randn_tensor does)."""
    monkeypatch.setenv("FASTDIFF_BACKEND", "auto")
    ours, ref = getattr(fs, name)(**cfg), diffusers_cls(name)(**cfg)
    ours.set_timesteps(6, device=device), ref.set_timesteps(6)
    assert ours.timesteps.device.type == device.type
    x = y = torch.randn(SHAPE)
    x = x.to(device)
    gen_ours, gen_ref = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    fastdiff.reset_counts()
    for t_ours, t in zip(ours.timesteps, ref.timesteps):
        x = ours.step(fake_model(x, t_ours), t_ours, x, generator=gen_ours, **step_kwargs).prev_sample
        y = ref.step(fake_model(y, t), t, y, generator=gen_ref, **step_kwargs).prev_sample
        assert_rel_close(x, y, TOL, f"{name} on {device} t={int(t)}")
    op = "ddim_step" if name == "DDIMScheduler" else "ddpm_step"
    paths = {path for (o, path), count in fastdiff.counts().items() if o == op and count}
    assert paths == {"triton" if device.type == "cuda" else "interpreter"}


# --------------------------------------------------------------------------------------------- single steps
@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("name, step_kwargs", [("DDPMScheduler", {}), ("DDIMScheduler", {"eta": 0.0}),
                                               ("DDIMScheduler", {"eta": 0.8})])
def test_ddim_ddpm_single_steps(name, step_kwargs, prediction_type):
    """Stateless schedulers: any timestep of the schedule, fresh random x_t and model output each time."""
    ours, ref = getattr(fs, name)(prediction_type=prediction_type), diffusers_cls(name)(prediction_type=prediction_type)
    ours.set_timesteps(25), ref.set_timesteps(25)
    for t in ref.timesteps[[0, 5, 13, 24]]:
        x, out = torch.randn(SHAPE), torch.randn(SHAPE)
        a = ours.step(out, t, x, generator=torch.Generator().manual_seed(int(t)), **step_kwargs)
        b = ref.step(out, t, x, generator=torch.Generator().manual_seed(int(t)), **step_kwargs)
        assert_rel_close(a.prev_sample, b.prev_sample, TOL, f"{name} t={int(t)} prev_sample")
        assert_rel_close(a.pred_original_sample, b.pred_original_sample, TOL, f"{name} t={int(t)} x0")


@pytest.mark.parametrize("name", ALL_NAMES)
def test_first_step_with_random_inputs(name):
    ours, ref = getattr(fs, name)(), diffusers_cls(name)()
    ours.set_timesteps(15), ref.set_timesteps(15)
    t = ref.timesteps[0]
    x, out = torch.randn(SHAPE) * float(ref.init_noise_sigma), torch.randn(SHAPE)
    assert_rel_close(ours.scale_model_input(x, t), ref.scale_model_input(x, t), TOL, "scale_model_input")
    a = ours.step(out, t, x, generator=torch.Generator().manual_seed(5), return_dict=False)
    b = ref.step(out, t, x, generator=torch.Generator().manual_seed(5), return_dict=False)
    assert len(a) == len(b)
    for u, v in zip(a, b):
        assert_rel_close(u, v, TOL, f"{name} first step")


@pytest.mark.parametrize("name", ALL_NAMES)
def test_guided_step_equals_diffusers_on_the_combined_output(name):
    """model_output = [uncond; cond] with guidance_scale=s, vs diffusers' step on uncond + s·(cond − uncond)."""
    ours, ref = getattr(fs, name)(), diffusers_cls(name)()
    ours.set_timesteps(8), ref.set_timesteps(8)
    x = torch.randn(SHAPE) * float(ref.init_noise_sigma)
    y = x.clone()
    for t in ref.timesteps[:4]:
        uncond, cond = fake_model(ours.scale_model_input(x, t), t), fake_model(ref.scale_model_input(y, t) + 0.1, t)
        x = ours.step(torch.cat([uncond, cond]), t, x, guidance_scale=5.0,
                      generator=torch.Generator().manual_seed(int(t)))[0]
        y = ref.step(uncond + 5.0 * (cond - uncond), t, y, generator=torch.Generator().manual_seed(int(t)))[0]
        assert_rel_close(x, y, TOL, f"{name} guided t={int(t)}")


# --------------------------------------------------------------------------------------------- add_noise, init σ
@pytest.mark.parametrize("name", ALL_NAMES)
@pytest.mark.parametrize("spacing", SPACINGS)
def test_add_noise_and_init_noise_sigma(name, spacing):
    ours, ref = getattr(fs, name)(timestep_spacing=spacing), diffusers_cls(name)(timestep_spacing=spacing)
    x0, noise = torch.randn(3, *SHAPE[1:]), torch.randn(3, *SHAPE[1:])
    if name in ("DDPMScheduler", "DDIMScheduler"):  # any training timestep, before set_timesteps too
        ts = torch.tensor([999, 500, 0])
        assert_rel_close(ours.add_noise(x0, noise, ts), ref.add_noise(x0, noise, ts), TOL, "add_noise")
    ours.set_timesteps(10), ref.set_timesteps(10)
    assert float(ours.init_noise_sigma) == pytest.approx(float(ref.init_noise_sigma), rel=1e-6)
    stateless = name in ("DDPMScheduler", "DDIMScheduler")  # diffusers' σ schedulers take 1-D timesteps only
    for ts in (ref.timesteps[[0, 3, 9]], ref.timesteps[4:5]) + ((ref.timesteps[6],) if stateless else ()):
        assert_rel_close(ours.add_noise(x0, noise, ts), ref.add_noise(x0, noise, ts), TOL, f"add_noise at {ts}")


@pytest.mark.parametrize("name", ["EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler"])
def test_add_noise_with_begin_index(name):
    """The image-to-image pattern: set_begin_index, then add_noise at the start timestep, then step."""
    ours, ref = getattr(fs, name)(), diffusers_cls(name)()
    for s in (ours, ref):
        s.set_timesteps(10)
        s.set_begin_index(4)
    x0, noise = torch.randn(SHAPE), torch.randn(SHAPE)
    t = ref.timesteps[4:5].repeat(2)
    x, y = ours.add_noise(x0, noise, t), ref.add_noise(x0, noise, t)
    assert_rel_close(x, y, TOL, "add_noise")
    for t in ref.timesteps[4:]:
        x = ours.step(fake_model(ours.scale_model_input(x, t), t), t, x, generator=torch.Generator().manual_seed(0))[0]
        y = ref.step(fake_model(ref.scale_model_input(y, t), t), t, y, generator=torch.Generator().manual_seed(0))[0]
    assert_rel_close(x, y, TOL, "img2img loop")


def test_generator_list_draws_per_sample():
    """A list of generators (one per sample) draws as diffusers' randn_tensor does."""
    ours, ref = fs.DDPMScheduler(), diffusers_cls("DDPMScheduler")()
    ours.set_timesteps(5), ref.set_timesteps(5)
    x, out = torch.randn(SHAPE), torch.randn(SHAPE)
    gens = lambda: [torch.Generator().manual_seed(s) for s in (3, 4)]
    a = ours.step(out, ref.timesteps[1], x, generator=gens())
    b = ref.step(out, ref.timesteps[1], x, generator=gens())
    assert_rel_close(a.prev_sample, b.prev_sample, TOL, "per-sample generators")

