"""DPM-Solver++ (SDE): the second-order stochastic solver of Lu et al. 2022b ("DPM-Solver++", §4 with the SDE
variant of k-diffusion's ``sample_dpmpp_sde``, r = 1/2), with Karras et al. 2022's σ-space parameterisation;
diffusers' DPMSolverSDEScheduler ("DPM++ SDE").

Each step from σ_i to σ_{i+1} takes two model calls, at σ_i and at the midpoint σ_mid = √(σ_i·σ_{i+1}) (the midpoint
in λ = −log σ). Both stages are ancestral DPM-Solver++(1) updates in λ (eta = 1): from σ_from to σ_to the sample goes
deterministically to σ_down = σ_to²/σ_from and gains fresh noise of std σ_up = σ_to·√(1 − σ_to²/σ_from²)
(σ_down² + σ_up² = σ_to², k-diffusion's ``get_ancestral_step``):

    x_to = (σ_down/σ_from)·x_from + (1 − σ_down/σ_from)·x̂0 + s_noise·σ_up·z,   z ~ N(0, I)

1. at σ_i: x̂0(x_i; σ_i), then x_mid = the update above from (x_i, σ_i) to σ_mid;
2. at σ_mid: x̂0(x_mid; σ_mid), then x_{i+1} = the update from (x_i, σ_i) to σ_{i+1} with that x̂0.

The last step (to σ = 0) is the Euler step, which lands on x̂0. The noise z is a normalised increment of one
Brownian motion over σ, (W(σ_to) − W(σ_from))/√|σ_to − σ_from|, drawn from a Brownian tree (torchsde's
BrownianInterval) seeded with config.noise_sampler_seed: the noise of a step depends on the seed and the σ's, not
on the number of steps taken before, and it is bit-identical to diffusers' for the same seed. torchsde is an optional
dependency: it is imported here only, when a scheduler is built (ImportError naming it where it is missing).

The schedule interleaves the timesteps of σ_i and σ_mid (diffusers' layout, ``order = 2``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from fastdiff import ops
from fastdiff.schedulers.heun import TwoStageSigmaConfig, TwoStageSigmaScheduler
from fastdiff.schedulers.schedules import (
    beta_sigmas,
    check_num_inference_steps,
    check_steps_offset,
    exponential_sigmas,
    karras_sigmas,
    sigma_schedule_from_timesteps,
    sigma_to_t,
    spaced_timesteps,
)
from fastdiff.validation import check_int, check_real


# --------------------------------------------------------------------------------------------- Brownian noise
def import_torchsde():
    """The torchsde module (an optional dependency: only this scheduler needs it), or an ImportError naming it."""
    try:
        import torchsde
    except ImportError as exc:
        raise ImportError("DPMSolverSDEScheduler needs torchsde for its Brownian-tree noise: pip install torchsde") \
            from exc
    return torchsde


def _ordered(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor, float]:
    """(low, high, sign): the two times in increasing order, and −1 where they were swapped (W(a, b) = −W(b, a))."""
    return (a, b, 1.0) if a < b else (b, a, -1.0)


class BrownianTreeNoiseSampler:
    """Normalised increments of a Brownian motion W over σ ∈ [σ_min, σ_max]: for two σ's,
    z = (W(σ_b) − W(σ_a))/√|σ_b − σ_a| ~ N(0, I), of the shape, dtype and device of ``x``.

    W is torchsde's BrownianInterval on the dyadic ("halfway") tree, to tolerance 10⁻⁶, seeded with ``seed``: the
    value for an interval depends only on the seed, not on the order of the queries (the construction of
    k-diffusion and diffusers, so that their noise and this one agree bit for bit). ``seed``: an int; a list of
    ints, one per sample (B of them: one tree per sample, x[b] shaped); or None for a seed drawn from torch's global
    generator. Raises ImportError where torchsde is missing, ValueError for a list of the wrong length.
    """

    def __init__(self, x: Tensor, sigma_min: float, sigma_max: float, seed: int | Sequence[int] | None = None):
        torchsde = import_torchsde()
        self._t0, self._t1, self._sign = _ordered(torch.as_tensor(sigma_min), torch.as_tensor(sigma_max))
        if seed is None:
            seed = torch.randint(0, 2**63 - 1, []).item()
        self.batched = isinstance(seed, (list, tuple))
        seeds = list(seed) if self.batched else [seed]
        if self.batched and len(seeds) != x.shape[0]:
            raise ValueError(f"noise_sampler_seed is a list of {len(seeds)} seeds but the batch has {x.shape[0]} "
                             f"samples")
        size = x.shape[1:] if self.batched else x.shape
        self.trees = [torchsde.BrownianInterval(t0=self._t0, t1=self._t1, size=size, dtype=x.dtype, device=x.device,
                                                entropy=s, tol=1e-6, pool_size=24, halfway_tree=True)
                      for s in seeds]

    def __call__(self, sigma: Tensor, sigma_next: Tensor) -> Tensor:
        """z for the step from ``sigma`` to ``sigma_next`` (0-dim tensors or numbers); x's shape and dtype."""
        sigma, sigma_next = torch.as_tensor(sigma), torch.as_tensor(sigma_next)
        low, high, sign = _ordered(sigma, sigma_next)
        with warnings.catch_warnings():
            # σ's that went through fp32 log and exp (as diffusers forms them) may pass the tree's ends by an ulp;
            # torchsde clamps them to the ends, with a warning per query that says nothing to a user
            warnings.filterwarnings("ignore", message="Should have t", category=UserWarning)
            w = torch.stack([tree(low, high) for tree in self.trees]) * (self._sign * sign)
        if not self.batched:
            w = w[0]
        return w / (sigma_next - sigma).abs().sqrt()


def ancestral_split(sigma_from: float, sigma_to: float) -> tuple[float, float]:
    """(σ_down, σ_up): the step from σ_from to σ_to as a deterministic step to σ_down plus fresh noise of std σ_up,
    σ_down² + σ_up² = σ_to², with σ_up = σ_to·√(1 − σ_to²/σ_from²) (k-diffusion's ``get_ancestral_step``, eta = 1).
    Written with the ratio q = (σ_to/σ_from)² so that σ_down = σ_to·√q does not come from σ_to² − σ_up², which
    cancels where σ_to ≪ σ_from. Where σ does not decrease (q ≥ 1) all of σ_to is noise, as in diffusers."""
    q = (sigma_to / sigma_from) ** 2
    if q >= 1.0:
        return 0.0, sigma_to
    return sigma_to * math.sqrt(q), sigma_to * math.sqrt(1.0 - q)


# --------------------------------------------------------------------------------------------- the scheduler
@dataclass(frozen=True)
class DPMSolverSDEConfig(TwoStageSigmaConfig):
    """DPM++ SDE's fields: those of Heun and KDPM2 (:class:`~fastdiff.schedulers.heun.TwoStageSigmaConfig`: the
    Stable Diffusion β range, "linspace", the σ spacings) and the seed of the Brownian noise. prediction_type="sample"
    is accepted, as diffusers accepts it, and refused by step() (NotImplementedError), as diffusers refuses it."""

    noise_sampler_seed: int | None = None  # seed of the Brownian tree; None: a new one from torch's global generator

    def __post_init__(self):
        super().__post_init__()
        if self.noise_sampler_seed is not None:
            check_int("noise_sampler_seed", self.noise_sampler_seed, minimum=0)


class DPMSolverSDEScheduler(TwoStageSigmaScheduler):
    """DPM-Solver++ (SDE), "DPM++ SDE" (see the module docstring), diffusers-compatible; configured by
    :class:`DPMSolverSDEConfig`. Timesteps are float64, as in diffusers. Needs torchsde (ImportError naming it at
    construction where it is missing).

    Between the two stages of a step it keeps ``sample`` (x_i) and ``mid_point_sigma`` (σ_mid, a 0-dim fp32
    tensor), diffusers' names; ``state_in_first_order`` is True when the next call is a first stage.
    ``noise_sampler`` (a :class:`BrownianTreeNoiseSampler`) is made at the first step() after set_timesteps, from
    that call's sample and ``noise_sampler_seed`` (the config's, unless the attribute is set, as in diffusers).
    """

    config_class = DPMSolverSDEConfig

    def __init__(self, **kwargs):
        import_torchsde()  # before any work: the noise needs it
        super().__init__(**kwargs)
        self.noise_sampler: BrownianTreeNoiseSampler | None = None

    def _reset_stage(self) -> None:
        self.sample: Tensor | None = None
        self.mid_point_sigma: Tensor | None = None

    @property
    def state_in_first_order(self) -> bool:
        """True when the next step() call is the first stage of a step (at σ_i)."""
        return self.sample is None

    # ----------------------------------------------------------------- the schedule
    def _base_schedule(self, num_inference_steps, timesteps, num_train_timesteps, check_offset: bool = True):
        """(timesteps, σ's) of the n steps before interleaving, both float64: the spaced timesteps, σ at each
        interpolated from the training σ's, then re-spaced (Karras / exponential / beta) between the first and last
        of those σ's with the timesteps read back from σ. (Heun's schedule differs: its timesteps are fp32.)"""
        cfg = self.settings
        T = check_int("num_train_timesteps", num_train_timesteps, minimum=1)
        n = check_num_inference_steps(num_inference_steps, T)
        schedule = spaced_timesteps(cfg.timestep_spacing, T, n, cfg.steps_offset, round_linspace=False)
        if check_offset:
            schedule = check_steps_offset(schedule, T, cfg.steps_offset)
        sigmas = sigma_schedule_from_timesteps(schedule, self._train_sigmas)
        spacing = (karras_sigmas if cfg.use_karras_sigmas else exponential_sigmas if cfg.use_exponential_sigmas
                   else beta_sigmas if cfg.use_beta_sigmas else None)
        if spacing is not None:
            sigmas = spacing(float(sigmas[-1]), float(sigmas[0]), n)
            schedule = sigma_to_t(sigmas, self._log_sigmas)
        return schedule, sigmas

    def _set_two_stage_schedule(self, timesteps: np.ndarray, sigmas: np.ndarray, device) -> None:
        """timesteps [t_0, t(σ_mid,0), t_1, ..., t(σ_mid,n−2), t_{n−1}] (2n − 1, float64) and sigmas [σ_0, σ_1, σ_1,
        ..., σ_{n−1}, σ_{n−1}, 0] (2n, fp32): a second stage reads σ_i one place back, σ_{i+1} at its own place."""
        n = len(timesteps)
        sigmas = np.asarray(sigmas, dtype=np.float64)
        # σ_mid = exp(−(λ_i + (λ_{i+1} − λ_i)/2)), λ = −log σ, in float64 in this order (diffusers' timesteps, bit
        # for bit)
        lam = -np.log(sigmas)
        mid = np.exp(-(lam[:-1] + np.diff(lam) * 0.5))
        times = np.empty(2 * n - 1, dtype=np.float64)
        times[0::2] = timesteps
        times[1::2] = sigma_to_t(mid, self._log_sigmas)
        short = np.concatenate([sigmas, [0.0]]).astype(np.float32)
        long = np.concatenate([short[:1], np.repeat(short[1:-1], 2), short[-1:]])
        self._set_interleaved(times, torch.from_numpy(long), n, device, torch.float64)

    def set_timesteps(self, num_inference_steps: int, device=None, num_train_timesteps: int | None = None) -> None:
        """Choose n steps (config.timestep_spacing over ``num_train_timesteps`` training steps, default the
        config's; then Karras / exponential / beta σ if asked), lay them out for the two stages (see
        :meth:`_set_two_stage_schedule`), and forget the noise sampler (the next step() makes a new one).

        Raises ValueError naming num_inference_steps (not an integer in [1, T]) or steps_offset.
        """
        T = self.settings.num_train_timesteps if num_train_timesteps is None else num_train_timesteps
        self._set_two_stage_schedule(*self._base_schedule(num_inference_steps, None, T), device=device)
        self._reset_stage()
        self.noise_sampler = None

    def scale_model_input(self, sample: Tensor, timestep) -> Tensor:
        """x/√(σ² + 1) at this stage's σ: σ_i on a first stage, σ_mid on a second."""
        if self._step_index is None:
            self._init_step_index(timestep)
        sigma = self._sigma_list[self._step_index] if self.state_in_first_order else float(self.mid_point_sigma)
        return sample / (sigma**2 + 1) ** 0.5

    # ----------------------------------------------------------------- step()
    def _stage_sigmas(self, i: int) -> tuple[Tensor, Tensor, Tensor]:
        """(σ_from, σ_to, σ_mid) of this stage as 0-dim fp32 tensors, formed as diffusers forms them (σ →
        λ = −log σ → exp(−λ) in fp32, σ_mid = exp(−(λ + (λ_next − λ)·0.5))): the Brownian tree is queried at these
        times, and only the very same floats give the very same noise. σ_to is σ_mid on a first stage, σ_{i+1} on a
        second."""
        first = self.state_in_first_order
        k = i if first else i - 1  # the place of σ_i in the interleaved table
        lam, lam_next = self.sigmas[k].log().neg(), self.sigmas[k + 1].log().neg()
        sigma_mid = (lam + (lam_next - lam) * 0.5).neg().exp()
        return lam.neg().exp(), sigma_mid if first else lam_next.neg().exp(), sigma_mid

    def step(self, model_output: Tensor, timestep, sample: Tensor, return_dict: bool = True, s_noise: float = 1.0,
             *, guidance_scale: float | None = None):
        """One stage of a DPM++ SDE step (see the module docstring): the ancestral update to σ_mid on a first stage,
        the one from x_i to σ_{i+1} with the midpoint's x̂0 on a second; each is one ``ops.linear_step`` call with
        the Brownian increment z as an input.

        The arguments: see :class:`~fastdiff.schedulers.base.Scheduler`; ``s_noise`` scales the noise (1: the SDE).
        There is no ``generator``: the noise comes from the Brownian tree of config.noise_sampler_seed, as in
        diffusers. Returns x_next (x_mid after a first stage, x_{i+1} after a second) and x̂0 at this stage's σ.
        Raises NotImplementedError for prediction_type="sample", as diffusers does.
        """
        if self.settings.prediction_type == "sample":
            raise NotImplementedError("DPMSolverSDEScheduler.step: prediction_type='sample' is not implemented "
                                      "(nor in diffusers); use 'epsilon' or 'v_prediction'")
        s_noise = check_real("s_noise", s_noise)
        dtype = model_output.dtype
        model_output, i = self._step_inputs(model_output, timestep, sample, guidance_scale)
        if self.noise_sampler is None:
            positive = [s for s in self._sigma_list if s > 0]
            self.noise_sampler = BrownianTreeNoiseSampler(sample, min(positive), max(self._sigma_list),
                                                          self.noise_sampler_seed)
        first = self.state_in_first_order
        sigma_from, sigma_to, sigma_mid = self._stage_sigmas(i)
        # 1. x̂0 = a·x + b·m at this stage's σ (σ_i, or σ_mid on a second stage)
        a, b = self._x0_row(float(sigma_from if first else sigma_mid))
        if self._sigma_list[i + 1 if first else i] == 0.0:
            # 2. the last step, Euler to σ = 0: x + (0 − σ)·(x − x̂0)/σ = x̂0
            x0_pred, prev_sample = ops.linear_step(sample, model_output, [], coefficients=[[a, b], [0.0, 0.0, 1.0]],
                                                   guidance_scale=guidance_scale)
        else:
            # 2. the ancestral split of σ_from → σ_to, and z for that interval
            sigma_down, sigma_up = ancestral_split(float(sigma_from), float(sigma_to))
            ratio = sigma_down / float(sigma_from)
            noise = self.noise_sampler(sigma_from, sigma_to)
            c = s_noise * sigma_up
            if first:
                # 3. x_mid = r·x_i + (1 − r)·x̂0 + c·z, straight from x and m (operands: x_i, m, z, x̂0)
                rows = [[a, b, 0.0], [ratio + (1.0 - ratio) * a, (1.0 - ratio) * b, c, 0.0]]
                x0_pred, prev_sample = ops.linear_step(sample, model_output, [noise], coefficients=rows,
                                                       guidance_scale=guidance_scale)
                self.sample, self.mid_point_sigma = sample, sigma_mid
            else:
                # 3. x_{i+1} = r·x_i + (1 − r)·x̂0(x_mid) + c·z (operands: x_mid, m, x_i, z, x̂0)
                rows = [[a, b, 0.0, 0.0], [(1.0 - ratio) * a, (1.0 - ratio) * b, ratio, c, 0.0]]
                x0_pred, prev_sample = ops.linear_step(sample, model_output, [self.sample, noise], coefficients=rows,
                                                       guidance_scale=guidance_scale)
                self._reset_stage()
        return self._end_step(prev_sample, x0_pred, dtype, return_dict)
