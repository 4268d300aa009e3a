"""Noise schedules as pure functions: β_t of each training timestep, the n inference timesteps picked from the T
training ones, σ tables (training σ_t, Karras σ, σ ↔ timestep), and the checks of the arguments that choose them
(num_inference_steps, custom timesteps, a steps_offset that would leave [0, T)).

Nothing here holds state; the schedulers build their tables from these.
"""

from __future__ import annotations

import math
import numbers
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:
    from fastdiff.schedulers.config import SchedulerConfig


# --------------------------------------------------------------------------------------------- β and ᾱ
def cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> list[float]:
    """β_t = min(1 − ᾱ(t+1)/ᾱ(t), 0.999), ᾱ(t) = cos²((t/T + s)/(1 + s)·π/2), s = 0.008
    (Nichol & Dhariwal 2021, eq. 17)."""
    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    T = num_train_timesteps
    return [min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta) for i in range(T)]


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Shift and scale √ᾱ_t so that √ᾱ_T = 0 while √ᾱ_1 is kept (Lin et al. 2024, Algorithm 1)."""
    sqrt_alpha_bar = torch.cumprod(1 - betas, dim=0).sqrt()
    first, last = sqrt_alpha_bar[0].clone(), sqrt_alpha_bar[-1].clone()
    sqrt_alpha_bar = (sqrt_alpha_bar - last) * (first / (first - last))
    alpha_bar = sqrt_alpha_bar**2
    alphas = torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1 - alphas


def make_betas(config: SchedulerConfig) -> Tensor:
    """β_1..β_T (fp32, (T,)) from trained_betas or the named schedule, optionally rescaled to zero terminal SNR."""
    T = config.num_train_timesteps
    if config.trained_betas is not None:
        betas = torch.tensor(config.trained_betas, dtype=torch.float32)
    elif config.beta_schedule == "linear":  # Ho et al. 2020, §4
        betas = torch.linspace(config.beta_start, config.beta_end, T, dtype=torch.float32)
    elif config.beta_schedule == "scaled_linear":  # latent diffusion: √β linear
        betas = torch.linspace(config.beta_start**0.5, config.beta_end**0.5, T, dtype=torch.float32) ** 2
    else:  # squaredcos_cap_v2
        betas = torch.tensor(cosine_betas(T), dtype=torch.float32)
    if config.rescale_betas_zero_snr:
        betas = rescale_zero_terminal_snr(betas)
    return betas


# --------------------------------------------------------------------------------------------- inference timesteps
def spaced_timesteps(spacing: str, num_train_timesteps: int, n: int, steps_offset: int = 0,
                     round_linspace: bool = True) -> np.ndarray:
    """n timesteps in [0, T), descending, float64 (Lin et al. 2024, Table 2).

    leading:  t_i = i·⌊T/n⌋ + steps_offset;   trailing: round(T − i·T/n) − 1;   linspace: n points over [0, T − 1]
    (rounded unless round_linspace=False, as Euler keeps them fractional).
    """
    T = num_train_timesteps
    if spacing == "leading":
        return (np.arange(0, n) * (T // n)).round()[::-1].astype(np.float64) + steps_offset
    if spacing == "trailing":
        return np.round(np.arange(T, 0, -T / n)) - 1
    timesteps = np.linspace(0, T - 1, n)
    return (timesteps.round() if round_linspace else timesteps)[::-1].copy()


def check_num_inference_steps(num_inference_steps, num_train_timesteps: int) -> int:
    """An integer in [1, num_train_timesteps]; anything else is a ValueError naming num_inference_steps."""
    if isinstance(num_inference_steps, (bool, np.bool_)) or not isinstance(num_inference_steps, numbers.Integral):
        # a ValueError, like the range check below (what diffusers users catch)
        kind = type(num_inference_steps).__name__
        raise ValueError(f"num_inference_steps must be an integer, got {kind} {num_inference_steps!r}")  # noqa: TRY004
    if not 1 <= num_inference_steps <= num_train_timesteps:
        raise ValueError(f"num_inference_steps must be in [1, num_train_timesteps={num_train_timesteps}], "
                         f"got {num_inference_steps}")
    return int(num_inference_steps)


def check_steps_offset(timesteps: np.ndarray, num_train_timesteps: int, steps_offset: int) -> np.ndarray:
    """``timesteps`` as they are, or a ValueError naming steps_offset when it pushed one past T − 1."""
    if len(timesteps) and timesteps.max() > num_train_timesteps - 1:
        raise ValueError(f"steps_offset={steps_offset} puts timestep {timesteps.max():g} outside "
                         f"[0, {num_train_timesteps}) for num_inference_steps={len(timesteps)}")
    return timesteps


def check_schedule_source(**given) -> str:
    """The name of the one argument that was given (not None) of those that each choose the schedule
    (num_inference_steps, timesteps, sigmas); ValueError naming them all when none or several were."""
    names = [name for name, value in given.items() if value is not None]
    if len(names) != 1:
        *first, last = given
        raise ValueError(f"pass exactly one of {', '.join(first)} or {last}, got "
                         f"{', '.join(names) if names else 'none'}")
    return names[0]


def check_custom_timesteps(timesteps, num_train_timesteps: int, dtype, use_karras_sigmas: bool = False,
                           **schedule_options) -> np.ndarray:
    """User-given timesteps as a 1-D array of ``dtype`` (np.int64 truncates): non-empty, strictly descending, in
    [0, T − 1]. ValueError naming timesteps otherwise, or naming use_karras_sigmas or any other of
    ``schedule_options`` that is on (those schedules pick their own timesteps, so custom ones cannot be combined
    with them; diffusers refuses them too)."""
    for name, on in {"use_karras_sigmas": use_karras_sigmas, **schedule_options}.items():
        if on:
            raise ValueError(f"custom timesteps cannot be combined with {name}={on!r}")
    T = num_train_timesteps
    values = timesteps.tolist() if isinstance(timesteps, Tensor) else timesteps
    try:
        schedule = np.array(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"timesteps must be a list of numbers, got {values!r}") from None
    if schedule.ndim == 1 and np.isfinite(schedule).all():
        schedule = schedule.astype(dtype)
        if schedule.size and (np.diff(schedule) < 0).all() and schedule[0] <= T - 1 and schedule[-1] >= 0:
            return schedule
    raise ValueError(f"timesteps must be a non-empty strictly descending list in [0, {T - 1}], "
                     f"got {schedule.tolist()}")


# --------------------------------------------------------------------------------------------- σ (VE noise levels)
def train_sigmas(alphas_cumprod: Tensor) -> np.ndarray:
    """σ_t = √((1 − ᾱ_t)/ᾱ_t), the variance-exploding noise level of each training timestep, fp32 (T,) ascending."""
    return (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).numpy()


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """σ_i = (σ_max^(1/ρ) + i/(n − 1)·(σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ, i = 0..n−1, ρ = 7 (Karras et al. 2022, eq. 5)."""
    ramp = np.linspace(0, 1, n)
    max_inv_rho, min_inv_rho = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def exponential_sigmas(sigma_min: float, sigma_max: float, n: int) -> np.ndarray:
    """n σ's evenly spaced in log σ from σ_max down to σ_min."""
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n))


def beta_sigmas(sigma_min: float, sigma_max: float, n: int, alpha: float = 0.6, beta: float = 0.6) -> np.ndarray:
    """n σ's from σ_max down to σ_min spaced by the quantiles of a Beta(α, β) distribution (Lee et al. 2024, "Beta
    Sampling is All You Need"): σ_i = σ_min + F⁻¹(1 − i/(n − 1); α, β)·(σ_max − σ_min). Needs scipy."""
    from scipy.special import betaincinv  # the Beta distribution's quantile function

    quantiles = betaincinv(alpha, beta, 1 - np.linspace(0, 1, n))
    return sigma_min + quantiles * (sigma_max - sigma_min)


def sigma_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """The (fractional) training timestep of each σ: linear interpolation of log σ between neighbouring timesteps.

    log_sigmas: log σ_t of the T training timesteps, ascending. Values outside the range clamp to 0 or T − 1.
    """
    log_sigma = np.log(np.maximum(np.asarray(sigmas), 1e-10))
    low = (np.searchsorted(log_sigmas, log_sigma, side="right") - 1).clip(0, len(log_sigmas) - 2)
    high = low + 1
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[high]), 0, 1)
    return (1 - w) * low + w * high


def sigma_schedule_from_timesteps(timesteps: np.ndarray, sigmas_train: np.ndarray) -> np.ndarray:
    """σ at (possibly fractional) timesteps, interpolated linearly between training timesteps."""
    return np.interp(timesteps, np.arange(0, len(sigmas_train)), sigmas_train)
