"""Heun and KDPM2 (the two-stage σ-space samplers) side by side with diffusers' classes of the same name: tables
(timesteps dtype and values, interleaved σ's, init_noise_sigma), whole sampling loops over prediction types × β
schedules × timestep spacings × σ spacings × step counts, options, add_noise, begin index, configs, errors, and the
fused linear_step path (Triton interpreter) and guidance.

Loops compare every model input, prev_sample and x̂0 at relative error ≤ 1e-5. Where diffusers' own fp32 loop is
farther than that from the same loop in float64 (σ_max ≈ 2·10⁴ on the cosine schedule, or 400 on "exp": x_i + dt·d
cancels terms of size |x_i|), a step passes if fastdiff is within 1e-5 of the float64 loop, or no farther from it
than diffusers' fp32 loop is (fastdiff forms the two-stage updates from x and the model output with float64
coefficients, so it is usually the closer one).
"""

from __future__ import annotations

import itertools
import json
from unittest import mock

import pytest
import torch
from utils import assert_rel_close, rel_err

from fastdiff import dispatch
from fastdiff.schedulers.heun import HeunDiscreteScheduler
from fastdiff.schedulers.kdpm2 import KDPM2DiscreteScheduler

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-5
SHAPE = (2, 3, 4, 4)
OURS = {"HeunDiscreteScheduler": HeunDiscreteScheduler, "KDPM2DiscreteScheduler": KDPM2DiscreteScheduler}
NAMES = list(OURS)
SPACINGS = ["leading", "trailing", "linspace"]
SIGMA_SPACINGS = [{}, {"use_karras_sigmas": True}, {"use_exponential_sigmas": True}, {"use_beta_sigmas": True}]
STEPS = [1, 2, 7, 25]


def fake_model(x: torch.Tensor, t) -> torch.Tensor:
    """A fixed, non-trivial function of (x, t) standing in for a UNet."""
    phase = torch.linspace(0, 3, x[0].numel(), dtype=x.dtype).reshape(x.shape[1:])
    return 0.7 * torch.tanh(x) + 0.3 * torch.cos(float(t) / 97.0 + phase)


def pair(name: str, full_init: bool = False, **cfg):
    """(fastdiff's, diffusers') scheduler. diffusers' KDPM2 builds a T-step schedule at construction one σ at a time
    (seconds on a busy CPU): unless ``full_init``, it builds a 2-step one instead (every test but the tables' calls
    set_timesteps before using it)."""
    cls = getattr(diffusers, name)
    if name != "KDPM2DiscreteScheduler" or full_init:
        return OURS[name](**cfg), cls(**cfg)
    original = cls.set_timesteps
    with mock.patch.object(cls, "set_timesteps", lambda self, n, device=None, T=None: original(self, 2, device, T)):
        ref = cls(**cfg)
    return OURS[name](**cfg), ref


def loop(scheduler, n: int, dtype=torch.float32, x=None, **set_kwargs):
    """set_timesteps, then the pipeline loop; per model call: model input, prev_sample, x̂0."""
    if n is not None:
        scheduler.set_timesteps(n, **set_kwargs)
    timesteps = scheduler.timesteps.tolist()
    if timesteps.count(timesteps[0]) > 1:  # KDPM2's rounded Karras timesteps on the cosine schedule: see
        scheduler.set_begin_index(0)        # test_kdpm2_repeated_first_timestep
    if x is None:
        x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1234)) * float(scheduler.init_noise_sigma)
    x = x.to(dtype)
    trace = []
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(x, t)
        out = scheduler.step(fake_model(model_input, t), t, x)
        x = out.prev_sample
        trace.append((model_input, out.prev_sample, out.pred_original_sample))
    return trace


def compare64(name: str, cfg: dict, n) -> int:
    """Both loops in float64 (fastdiff's linear_step then runs its reference in float64; diffusers' σ tables widened
    to float64), in lockstep: the model sees fastdiff's input and both schedulers step with its output, so that the
    last-bit differences the ill-conditioned steps amplify stay out."""
    ours, ref = pair(name, **cfg)
    ours.set_timesteps(n), ref.set_timesteps(n)
    assert torch.equal(ours.timesteps, ref.timesteps) and torch.equal(ours.sigmas, ref.sigmas), cfg
    ref.sigmas = ref.sigmas.double()  # the same σ's, widened: diffusers' per-step factors (dt, scales) in float64
    if hasattr(ref, "sigmas_interpol"):
        ref.sigmas_interpol = ref.sigmas_interpol.double()
    for s in (ours, ref):
        timesteps = s.timesteps.tolist()
        if timesteps.count(timesteps[0]) > 1:
            s.set_begin_index(0)
    x = y = (torch.randn(SHAPE, generator=torch.Generator().manual_seed(1234)) * float(ref.init_noise_sigma)).double()
    for i, t in enumerate(ref.timesteps):
        model_input = ours.scale_model_input(x, t)
        assert_rel_close(model_input, ref.scale_model_input(y, t), 1e-6, f"{name}({cfg}) n={n} call {i} input")
        m = fake_model(model_input, t)
        a, b = ours.step(m, t, x), ref.step(m, t, y)
        assert a.prev_sample.dtype == torch.float64
        assert_rel_close(a.prev_sample, b.prev_sample, 1e-6, f"{name}({cfg}) n={n} call {i} prev_sample")
        assert_rel_close(a.pred_original_sample, b.pred_original_sample, 1e-6, f"{name}({cfg}) n={n} call {i} x0")
        x, y = a.prev_sample, b.prev_sample
    return len(ref.timesteps)


def compare(name: str, cfg: dict, n, dtype=torch.float32, **set_kwargs) -> int:
    """fastdiff's loop vs diffusers' (see the module docstring for the float64 arbiter); the steps compared."""
    if dtype == torch.float64:
        return compare64(name, cfg, n)
    ours, ref = pair(name, **cfg)
    a, b = loop(ours, n, dtype, **set_kwargs), loop(ref, n, dtype, **set_kwargs)
    assert ours.timesteps.dtype == ref.timesteps.dtype, f"{cfg}: timesteps dtype {ours.timesteps.dtype}"
    assert torch.equal(ours.timesteps, ref.timesteps), f"{cfg}: {ours.timesteps} != {ref.timesteps}"
    assert torch.equal(ours.sigmas, ref.sigmas), f"{cfg}: sigmas"
    assert len(a) == len(b)
    ref64 = None
    for i, (u, v) in enumerate(zip(a, b)):
        for what, p, q in zip(("model input", "prev_sample", "x0"), u, v):
            assert p.dtype == q.dtype or what == "x0"
            if rel_err(p, q) <= TOL:
                continue
            if ref64 is None:  # the same diffusers loop in float64, from the same fp32 x_T
                x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1234)) * float(ref.init_noise_sigma)
                ref64 = loop(getattr(diffusers, name)(**cfg), n, torch.float64, x=x, **set_kwargs)
            ours_64, theirs_64 = rel_err(p, ref64[i][["model input", "prev_sample", "x0"].index(what)]), \
                rel_err(q, ref64[i][["model input", "prev_sample", "x0"].index(what)])
            assert ours_64 <= TOL or ours_64 <= 1.1 * theirs_64, (
                f"{name}({cfg}) n={n} call {i} {what}: {rel_err(p, q):.3e} from diffusers fp32; from diffusers "
                f"fp64 fastdiff is {ours_64:.3e}, diffusers fp32 {theirs_64:.3e}")
    return len(a)


# --------------------------------------------------------------------------------------------- tables
@pytest.mark.parametrize("name", NAMES)
def test_tables_equal_diffusers(name):
    """timesteps (dtype, values), interleaved σ's (and KDPM2's σ_mid), init_noise_sigma, num_inference_steps, before
    set_timesteps and after, every spacing option."""
    for beta, spacing, extra, n in itertools.product(["linear", "scaled_linear", "squaredcos_cap_v2"], SPACINGS,
                                                     SIGMA_SPACINGS + [{"steps_offset": 1}], [None, 1, 3, 25]):
        if name == "KDPM2DiscreteScheduler" and n is None and (extra or spacing != "leading"):
            continue  # diffusers' KDPM2 takes seconds to build its T-step schedule: a few configs
        cfg = {"beta_schedule": beta, "timestep_spacing": spacing, **extra}
        ours, ref = pair(name, full_init=n is None, **cfg)
        if n is not None:
            ours.set_timesteps(n), ref.set_timesteps(n)
        assert ours.timesteps.dtype == ref.timesteps.dtype, (cfg, n)
        assert torch.equal(ours.timesteps, ref.timesteps), (cfg, n)
        assert torch.equal(ours.sigmas, ref.sigmas), (cfg, n)
        if name == "KDPM2DiscreteScheduler":
            assert torch.allclose(ours.sigmas_interpol, ref.sigmas_interpol, rtol=0, atol=0, equal_nan=True)
        init = ours.init_noise_sigma
        assert isinstance(init, torch.Tensor) and init.dtype == torch.float32 and init.ndim == 0
        assert torch.equal(init, ref.init_noise_sigma), (cfg, n)
        assert ours.num_inference_steps == ref.num_inference_steps
        assert ours.order == ref.order == 2
        assert ours.state_in_first_order and ours.step_index is None and ours.begin_index is None


def test_heun_exp_beta_schedule_and_num_train_timesteps_argument():
    ours, ref = pair("HeunDiscreteScheduler", beta_schedule="exp")
    assert torch.equal(ours.betas, ref.betas) and torch.equal(ours.sigmas, ref.sigmas)
    for name in NAMES:
        ours, ref = pair(name)
        ours.set_timesteps(6, num_train_timesteps=500), ref.set_timesteps(6, num_train_timesteps=500)
        assert torch.equal(ours.timesteps, ref.timesteps) and torch.equal(ours.sigmas, ref.sigmas)


# --------------------------------------------------------------------------------------------- whole loops
def grid(name):
    predictions = ["epsilon", "sample", "v_prediction"] if name.startswith("Heun") else ["epsilon", "v_prediction"]
    betas = ["linear", "scaled_linear", "squaredcos_cap_v2"] + (["exp"] if name.startswith("Heun") else [])
    cases = list(itertools.product(predictions, betas, SPACINGS, range(len(SIGMA_SPACINGS))))
    # every config gets one of the step counts, in turn, so that each count meets every option
    return [(p, b, s, k, STEPS[i % len(STEPS)]) for i, (p, b, s, k) in enumerate(cases)]


SWEPT: dict[str, int] = {}


# σ_max ≈ 2·10⁴ (cosine) or 400 ("exp"): x_i + dt·d cancels terms of size σ_max·|ε| down to |x0|, so fp32 loops
# (diffusers' as much as ours) keep few digits, far fewer than 1e-5 for x0-prediction; both run in float64 there
ILL_CONDITIONED = ("squaredcos_cap_v2", "exp")


@pytest.mark.parametrize("name", NAMES)
def test_loops_sweep(name):
    count = 0
    for prediction, beta, spacing, k, n in grid(name):
        cfg = {"prediction_type": prediction, "beta_schedule": beta, "timestep_spacing": spacing,
               **SIGMA_SPACINGS[k]}
        count += compare(name, cfg, n, torch.float64 if beta in ILL_CONDITIONED else torch.float32)
    SWEPT[name] = count
    assert count > 100


OPTION_CASES = [
    ("heun-sd", "HeunDiscreteScheduler", {"beta_schedule": "scaled_linear", "steps_offset": 1,
                                          "timestep_spacing": "leading"}, 25),
    ("heun-clip", "HeunDiscreteScheduler", {"clip_sample": True, "clip_sample_range": 2.0}, 7),
    ("heun-clip-x0", "HeunDiscreteScheduler", {"clip_sample": True, "prediction_type": "sample",
                                               "beta_schedule": "scaled_linear"}, 12),
    ("heun-clip-v", "HeunDiscreteScheduler", {"clip_sample": True, "clip_sample_range": 1.5,
                                              "prediction_type": "v_prediction"}, 2),
    ("heun-trained", "HeunDiscreteScheduler", {"trained_betas": [1e-4 + 2e-5 * i for i in range(1000)]}, 9),
    ("heun-small-T", "HeunDiscreteScheduler", {"num_train_timesteps": 100, "timestep_spacing": "trailing"}, 100),
    ("kdpm2-sd", "KDPM2DiscreteScheduler", {"beta_schedule": "scaled_linear", "steps_offset": 1,
                                            "timestep_spacing": "leading"}, 25),
    ("kdpm2-karras-sd", "KDPM2DiscreteScheduler", {"beta_schedule": "scaled_linear", "use_karras_sigmas": True}, 20),
    ("kdpm2-trained", "KDPM2DiscreteScheduler", {"trained_betas": [1e-4 + 2e-5 * i for i in range(1000)]}, 9),
    ("kdpm2-small-T", "KDPM2DiscreteScheduler", {"num_train_timesteps": 100, "timestep_spacing": "trailing"}, 50),
]


@pytest.mark.parametrize("name, cfg, n", [c[1:] for c in OPTION_CASES], ids=[c[0] for c in OPTION_CASES])
def test_option_loops(name, cfg, n):
    compare(name, cfg, n)


def test_heun_custom_timesteps():
    timesteps = [901, 700, 433, 250, 97, 12]
    compare("HeunDiscreteScheduler", {}, None, timesteps=timesteps)
    ours, ref = pair("HeunDiscreteScheduler")
    ours.set_timesteps(timesteps=timesteps), ref.set_timesteps(timesteps=timesteps)
    assert torch.equal(ours.timesteps, ref.timesteps) and ours.num_inference_steps == ref.num_inference_steps == 6
    for option in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"):
        with pytest.raises(ValueError, match=option):
            HeunDiscreteScheduler(**{option: True}).set_timesteps(timesteps=timesteps)
    with pytest.raises(ValueError, match="num_inference_steps"):
        HeunDiscreteScheduler().set_timesteps(3, timesteps=timesteps)


# --------------------------------------------------------------------------------------------- the counter, add_noise
@pytest.mark.parametrize("name", NAMES)
def test_stage_state_and_step_index(name):
    ours, ref = pair(name)
    ours.set_timesteps(4), ref.set_timesteps(4)
    x = torch.randn(SHAPE) * float(ref.init_noise_sigma)
    y = x.clone()
    for i, t in enumerate(ref.timesteps):
        assert ours.state_in_first_order == ref.state_in_first_order == (i % 2 == 0)
        x = ours.step(fake_model(ours.scale_model_input(x, t), t), t, x).prev_sample
        y = ref.step(fake_model(ref.scale_model_input(y, t), t), t, y).prev_sample
        assert ours.step_index == ref.step_index == i + 1
    assert_rel_close(x, y, TOL, "final sample")
    with pytest.raises(RuntimeError, match="set_timesteps"):
        ours.step(torch.randn(SHAPE), ref.timesteps[-1], x)


@pytest.mark.parametrize("name", NAMES)
def test_add_noise_and_begin_index(name):
    """add_noise before and after set_timesteps, and the image-to-image pattern: set_begin_index(k·order), add_noise at
    that timestep, then the rest of the loop."""
    ours, ref = pair(name, full_init=True)
    x0, noise = torch.randn(3, *SHAPE[1:]), torch.randn(3, *SHAPE[1:])
    ts = ref.timesteps[[0, 5, 9]]
    assert_rel_close(ours.add_noise(x0, noise, ts), ref.add_noise(x0, noise, ts), TOL, "add_noise before")
    ours.set_timesteps(10), ref.set_timesteps(10)
    for ts in (ref.timesteps[[0, 3, 8]], ref.timesteps[4:5]):
        assert_rel_close(ours.add_noise(x0, noise, ts), ref.add_noise(x0, noise, ts), TOL, f"add_noise at {ts}")
    start = 4 * ref.order
    for s in (ours, ref):
        s.set_timesteps(10)
        s.set_begin_index(start)
    t = ref.timesteps[start:start + 1].repeat(3)
    x, y = ours.add_noise(x0, noise, t), ref.add_noise(x0, noise, t)
    assert_rel_close(x, y, TOL, "add_noise at the begin index")
    for t in ref.timesteps[start:]:
        x = ours.step(fake_model(ours.scale_model_input(x, t), t), t, x)[0]
        y = ref.step(fake_model(ref.scale_model_input(y, t), t), t, y)[0]
        assert_rel_close(x, y, TOL, f"img2img t={float(t)}")


# --------------------------------------------------------------------------------------------- outputs, configs
@pytest.mark.parametrize("name", NAMES)
def test_step_output_shape_like_diffusers(name):
    ours, ref = pair(name)
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


@pytest.mark.parametrize("name", NAMES)
def test_fp16_loop_stays_fp16(name):
    ours, ref = pair(name)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3)) * 14.6
    a, b = loop(ours, 6, torch.float16, x=x), loop(ref, 6, torch.float16, x=x)
    assert a[-1][1].dtype == torch.float16
    assert rel_err(a[-1][1], b[-1][1]) < 5e-3


def shared_keys_match(ours, ref_config):
    """Every field but rescale_betas_zero_snr (which diffusers' Heun/KDPM2 lack; always False here) equals
    diffusers'; diffusers' fields are all ours."""
    fields = ours.settings.to_dict()
    assert fields.pop("rescale_betas_zero_snr") is False
    public = {k for k in ref_config if not k.startswith("_")} - {"rescale_betas_zero_snr"}
    assert public == set(fields), public ^ set(fields)
    for key, value in fields.items():
        assert ref_config[key] == value, f"{key}: fastdiff {value!r} != diffusers {ref_config[key]!r}"


@pytest.mark.parametrize("name", NAMES)
def test_config_round_trips(name, tmp_path):
    kwargs = {"beta_schedule": "scaled_linear", "use_karras_sigmas": True, "prediction_type": "v_prediction",
              "timestep_spacing": "trailing", "steps_offset": 1}
    if name.startswith("Heun"):
        kwargs.update(clip_sample=True, clip_sample_range=3.0)
    ours = OURS[name](**kwargs)
    ours.save_config(tmp_path / "ours")
    with open(tmp_path / "ours" / "scheduler_config.json") as f:
        assert json.load(f)["_class_name"] == name
    ref = getattr(diffusers, name).from_pretrained(tmp_path / "ours")
    shared_keys_match(ours, ref.config)
    ref.save_config(tmp_path / "ref")
    back = OURS[name].from_pretrained(tmp_path / "ref")
    assert back.settings == ours.settings
    assert OURS[name].from_config(ref.config).settings == ours.settings
    shared_keys_match(OURS[name].from_config(ours.config), ref.config)


@pytest.mark.parametrize("source", ["DDIMScheduler", "EulerDiscreteScheduler", "DPMSolverMultistepScheduler",
                                    "HeunDiscreteScheduler", "KDPM2DiscreteScheduler"])
@pytest.mark.parametrize("name", NAMES)
def test_from_config_of_compatible_schedulers(name, source):
    """X.from_config(other.config) as diffusers does it: defaulted keys take X's defaults, unknown keys ignored
    (rescale_betas_zero_snr too, as diffusers' Heun/KDPM2 ignore it)."""
    kwargs = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "steps_offset": 1,
              "timestep_spacing": "leading", "prediction_type": "v_prediction"}
    if source in ("DDIMScheduler", "EulerDiscreteScheduler"):
        kwargs["rescale_betas_zero_snr"] = True
    src = getattr(diffusers, source)(**kwargs)
    ours, ref = OURS[name].from_config(src.config), getattr(diffusers, name).from_config(src.config)
    shared_keys_match(ours, ref.config)
    ours.set_timesteps(8), ref.set_timesteps(8)
    assert torch.equal(ours.timesteps, ref.timesteps) and torch.equal(ours.sigmas, ref.sigmas)


# --------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("key, value", [("beta_schedule", "cubic"), ("prediction_type", "x0"),
                                        ("timestep_spacing", "middle"), ("steps_offset", -1),
                                        ("rescale_betas_zero_snr", True), ("num_train_timesteps", 0)])
def test_bad_config_values(name, key, value):
    with pytest.raises(ValueError, match=key):
        OURS[name](**{key: value})


def test_bad_option_values():
    with pytest.raises(ValueError, match="clip_sample_range"):
        HeunDiscreteScheduler(clip_sample_range=-1.0)
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        KDPM2DiscreteScheduler(use_karras_sigmas=True, use_beta_sigmas=True)
    with pytest.raises(ValueError, match="beta_schedule"):
        KDPM2DiscreteScheduler(beta_schedule="exp")  # diffusers' KDPM2 has no "exp" either
    with pytest.raises(TypeError, match="clip_sample"):
        KDPM2DiscreteScheduler(clip_sample=True)  # not a KDPM2 option (diffusers: TypeError too)


@pytest.mark.parametrize("name", NAMES)
def test_bad_set_timesteps_and_step_inputs(name):
    s = OURS[name]()
    for n in (0, 1001, 2.5):
        with pytest.raises(ValueError, match="num_inference_steps"):
            s.set_timesteps(n)
    with pytest.raises(ValueError, match="steps_offset"):
        OURS[name](timestep_spacing="leading", steps_offset=1).set_timesteps(1000)
    s.set_timesteps(5)
    t = s.timesteps[0]
    with pytest.raises(ValueError, match="model_output"):
        s.step(torch.randn(2, 3, 4, 5), t, torch.randn(SHAPE))
    with pytest.raises(ValueError, match="model_output"):
        s.step(torch.randn(SHAPE), t, torch.randn(SHAPE), guidance_scale=3.0)
    with pytest.raises(ValueError, match="timestep"):
        OURS[name]().step(torch.randn(SHAPE), 12.345, torch.randn(SHAPE))


def test_kdpm2_repeated_first_timestep():
    """Karras σ on the cosine schedule round to t = 999 twice in KDPM2's schedule. diffusers (index of the second
    match) then starts at index 2 and runs past its schedule on σ = 0 without a word; fastdiff starts there too and
    refuses the extra calls with a clear error; with set_begin_index(0) both sample the whole schedule alike."""
    cfg = {"beta_schedule": "squaredcos_cap_v2", "use_karras_sigmas": True, "timestep_spacing": "linspace"}
    ours = KDPM2DiscreteScheduler(**cfg)
    ours.set_timesteps(7)
    assert ours.timesteps.tolist().count(999.0) == 2
    x = torch.randn(SHAPE)
    with pytest.raises(RuntimeError, match="set_begin_index"):
        for t in ours.timesteps:
            x = ours.step(fake_model(ours.scale_model_input(x, t), t), t, x).prev_sample
    compare("KDPM2DiscreteScheduler", cfg, 7, torch.float64)  # set_begin_index(0) on both (loop())


def test_kdpm2_sample_prediction_refused_at_step_like_diffusers():
    ours, ref = pair("KDPM2DiscreteScheduler", prediction_type="sample")
    for s in (ours, ref):
        s.set_timesteps(3)
        with pytest.raises(NotImplementedError):
            s.step(torch.randn(SHAPE), s.timesteps[0], torch.randn(SHAPE))


# --------------------------------------------------------------------------------------------- fused path, guidance
@pytest.mark.parametrize("name, cfg", [("HeunDiscreteScheduler", {}),
                                       ("HeunDiscreteScheduler", {"clip_sample": True, "prediction_type": "sample"}),
                                       ("KDPM2DiscreteScheduler", {"prediction_type": "v_prediction"})])
def test_interpreter_path_equals_torch_path(name, cfg, monkeypatch):
    torch_trace = loop(OURS[name](**cfg), 3)
    monkeypatch.setenv("FASTDIFF_BACKEND", "triton")
    dispatch.reset_counts()
    kernel_trace = loop(OURS[name](**cfg), 3)
    for i, (u, v) in enumerate(zip(kernel_trace, torch_trace)):
        for p, q in zip(u, v):
            # 1e-6; clamping x̂0 (cfg1) turns last-bit differences into more
            assert_rel_close(p, q, 1e-5 if cfg.get("clip_sample") else 1e-6, f"{name} call {i}")
    counts = dispatch.counts()
    assert counts.get(("linear_step", "interpreter"), 0) == len(torch_trace)  # one call per step()
    assert counts.get(("linear_step", "torch"), 0) == 0


@pytest.mark.parametrize("name", NAMES)
def test_guided_step_equals_step_on_the_combined_output(name):
    a, b = OURS[name](), OURS[name]()
    ref = getattr(diffusers, name)()
    for s in (a, b, ref):
        s.set_timesteps(4)
    x = torch.randn(SHAPE) * float(ref.init_noise_sigma)
    y, z = x.clone(), x.clone()
    for t in ref.timesteps:
        uncond, cond = fake_model(a.scale_model_input(x, t), t), fake_model(a.scale_model_input(x, t) + 0.1, t)
        combined = uncond + 5.0 * (cond - uncond)
        b.scale_model_input(y, t), ref.scale_model_input(z, t)
        x = a.step(torch.cat([uncond, cond]), t, x, guidance_scale=5.0).prev_sample
        y = b.step(combined, t, y).prev_sample
        z = ref.step(combined, t, z).prev_sample
        assert_rel_close(x, y, 1e-6, f"{name} guided t={float(t)}")
        assert_rel_close(x, z, TOL, f"{name} guided vs diffusers t={float(t)}")
