"""Training losses for the model families of the seed chapter: DDPM, VAE, VQ-VAE and GANs, and the pseudo-Huber
distance of consistency distillation.

GAN losses take discriminator *logits* (pre-sigmoid) and compute the chapter's BCE through log-sigmoid, which is
the same value as ``F.binary_cross_entropy(sigmoid(logits), target)`` without its overflow at large |logits|.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fastdiff.validation import PREDICTION_TYPES, check_choice

__all__ = [
    "q_sample",
    "ddpm_target",
    "ddpm_loss",
    "pseudo_huber_loss",
    "gaussian_kl",
    "vae_loss",
    "vector_quantization_loss",
    "vq_vae_loss",
    "gan_discriminator_loss",
    "gan_generator_loss",
    "hinge_discriminator_loss",
    "hinge_generator_loss",
    "wgan_discriminator_loss",
    "wgan_generator_loss",
    "gradient_penalty",
    "wgan_gp_discriminator_loss",
    "r1_penalty",
]



# --------------------------------------------------------------------------------------------- DDPM
def _alpha_bar(alphas_cumprod: Tensor, t: Tensor, x0: Tensor) -> Tensor:
    """ᾱ_t per sample, (B, 1, …, 1) in fp32 on x0's device."""
    if not isinstance(alphas_cumprod, Tensor) or alphas_cumprod.ndim != 1:
        raise ValueError("alphas_cumprod must be a 1-d tensor (T,) of ᾱ_t")
    if not isinstance(t, Tensor) or t.shape != (x0.shape[0],) or t.dtype.is_floating_point:
        shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"t must be an integer tensor of shape ({x0.shape[0]},) (one timestep per sample), "
                         f"got {shape}")
    n = alphas_cumprod.shape[0]
    if t.device.type == "cpu" and bool(((t < 0) | (t >= n)).any()):  # no device sync for accelerator tensors
        raise ValueError(f"t must index alphas_cumprod: values in [0, {n}), got [{int(t.min())}, {int(t.max())}]")
    a = alphas_cumprod.to(x0.device, torch.float32)[t.to(x0.device)]  # (B,)
    return a.reshape(-1, *([1] * (x0.ndim - 1)))


def q_sample(x0: Tensor, t: Tensor, noise: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """Forward diffusion in one step (DDPM eq. 4): x_t = √ᾱ_t · x0 + √(1 − ᾱ_t) · ε.

    x0, noise: (B, ...); t: (B,) integer timesteps indexing alphas_cumprod (T,). Returns x_t in x0's dtype.
    """
    if noise.shape != x0.shape:
        raise ValueError(f"noise must have x0's shape {tuple(x0.shape)}, got {tuple(noise.shape)}")
    a = _alpha_bar(alphas_cumprod, t, x0)
    return (a.sqrt() * x0.float() + (1 - a).sqrt() * noise.float()).to(x0.dtype)


def ddpm_target(x0: Tensor, t: Tensor, noise: Tensor, alphas_cumprod: Tensor,
                prediction_type: str = "epsilon") -> Tensor:
    """What the model should predict: ε ("epsilon"), v = √ᾱ_t·ε − √(1 − ᾱ_t)·x0 ("v_prediction") or x0 ("sample")."""
    check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "sample":
        return x0
    a = _alpha_bar(alphas_cumprod, t, x0)
    return (a.sqrt() * noise.float() - (1 - a).sqrt() * x0.float()).to(x0.dtype)


def ddpm_loss(model: Callable[..., Tensor], x0: Tensor, t: Tensor, noise: Optional[Tensor], alphas_cumprod: Tensor,
              prediction_type: str = "epsilon", **cond) -> Tensor:
    """The simplified DDPM objective (Ho et al. 2020, eq. 14): E‖target − model(x_t, t, **cond)‖², mean over all.

    Args:
        model: called as ``model(x_t, t, **cond)`` (e.g. a UNet with class_labels= or context=).
        x0: clean samples (B, ...); t: (B,) integer timesteps; noise: ε (x0's shape) or None to draw it.
        alphas_cumprod: (T,) ᾱ_t; prediction_type: "epsilon", "v_prediction" or "sample".
    Returns a scalar fp32 loss.
    """
    check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    noise = torch.randn_like(x0) if noise is None else noise
    x_t = q_sample(x0, t, noise, alphas_cumprod)
    pred = model(x_t, t, **cond)
    target = ddpm_target(x0, t, noise, alphas_cumprod, prediction_type)
    if pred.shape != target.shape:
        raise ValueError(f"model output has shape {tuple(pred.shape)}, the target has {tuple(target.shape)}")
    return F.mse_loss(pred.float(), target.float())


def pseudo_huber_loss(pred: Tensor, target: Tensor, c: Optional[float] = None) -> Tensor:
    """The pseudo-Huber distance of consistency training (Song & Dhariwal 2023, §3.3), mean over the batch:
    d(x, y) = √(‖x − y‖² + c²) − c per sample, the norm over all of a sample's d elements; c = 0.001·√d by default
    (LCM's choice; ~‖x − y‖²/2c for small errors, ~‖x − y‖ for large ones, so outliers do not dominate).

    pred, target: (B, ...) of one shape. Returns a scalar fp32 loss. Raises ValueError for mismatched shapes or a
    c ≤ 0.
    """
    if pred.shape != target.shape:
        raise ValueError(f"target must have pred's shape {tuple(pred.shape)}, got {tuple(target.shape)}")
    d = pred[0].numel()
    c = 0.001 * d**0.5 if c is None else float(c)
    if not c > 0:
        raise ValueError(f"c must be > 0, got {c}")
    sq = (pred.float() - target.float()).flatten(1).pow(2).sum(1)  # (B,) ‖x − y‖²
    return ((sq + c * c).sqrt() - c).mean()


# --------------------------------------------------------------------------------------------- VAE / VQ-VAE
def gaussian_kl(mu: Tensor, log_var: Tensor) -> Tensor:
    """Elementwise KL(N(μ, σ²) ‖ N(0, 1)) = ½(μ² + σ² − 1 − log σ²), in closed form; same shape as mu."""
    return 0.5 * (mu.pow(2) + log_var.exp() - 1.0 - log_var)


def vae_loss(x: Tensor, x_recon: Tensor, mu: Tensor, log_var: Tensor, kl_weight: float = 1.0,
             reduction: str = "sum") -> Tensor:
    """Negative ELBO as in the seed chapter: ‖x_recon − x‖² + kl_weight · KL(q(z|x) ‖ N(0, I)).

    reduction: "sum" (the chapter: summed over the batch) or "batchmean" (summed per sample, averaged over the
    batch). Returns a scalar.
    """
    if x_recon.shape != x.shape:
        raise ValueError(f"x_recon must have x's shape {tuple(x.shape)}, got {tuple(x_recon.shape)}")
    if reduction not in ("sum", "batchmean"):
        raise ValueError(f"reduction must be 'sum' or 'batchmean', got {reduction!r}")
    recon = F.mse_loss(x_recon, x, reduction="sum")
    kl = gaussian_kl(mu, log_var).sum()
    total = recon + kl_weight * kl
    return total / x.shape[0] if reduction == "batchmean" else total


def vector_quantization_loss(z_e: Tensor, z_q: Tensor, beta: float = 0.25) -> Tensor:
    """VQ-VAE codebook + commitment loss: ‖sg[z_e] − z_q‖² + β‖z_e − sg[z_q]‖² (means over elements).

    z_q is the codebook vectors chosen for z_e (before the straight-through trick).
    """
    if z_q.shape != z_e.shape:
        raise ValueError(f"z_q must have z_e's shape {tuple(z_e.shape)}, got {tuple(z_q.shape)}")
    return F.mse_loss(z_q, z_e.detach()) + beta * F.mse_loss(z_e, z_q.detach())


def vq_vae_loss(x: Tensor, x_recon: Tensor, vq_loss: Tensor) -> Tensor:
    """VQ-VAE objective: mean squared reconstruction error + the quantiser's loss (e.g. VQVAE.forward's vq_loss)."""
    if x_recon.shape != x.shape:
        raise ValueError(f"x_recon must have x's shape {tuple(x.shape)}, got {tuple(x_recon.shape)}")
    return F.mse_loss(x_recon, x) + vq_loss


# --------------------------------------------------------------------------------------------- GANs
def gan_discriminator_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """The seed chapter's discriminator loss BCE(D(x), 1) + BCE(D(G(z)), 0), from logits:
    mean(softplus(−real)) + mean(softplus(fake))."""
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def gan_generator_loss(fake_logits: Tensor) -> Tensor:
    """Non-saturating generator loss BCE(D(G(z)), 1) = mean(−log σ(fake)) = mean(softplus(−fake))."""
    return F.softplus(-fake_logits).mean()


def hinge_discriminator_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """Hinge discriminator loss (Lim & Ye 2017; SAGAN, BigGAN): mean(relu(1 − real)) + mean(relu(1 + fake))."""
    return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()


def hinge_generator_loss(fake_logits: Tensor) -> Tensor:
    """Hinge generator loss −mean(fake)."""
    return -fake_logits.mean()


def wgan_discriminator_loss(real_scores: Tensor, fake_scores: Tensor) -> Tensor:
    """WGAN critic loss E[D(G(z))] − E[D(x)] (Arjovsky et al. 2017), to minimise."""
    return fake_scores.mean() - real_scores.mean()


def wgan_generator_loss(fake_scores: Tensor) -> Tensor:
    """WGAN generator loss −E[D(G(z))]."""
    return -fake_scores.mean()


def gradient_penalty(critic: Callable[[Tensor], Tensor], real: Tensor, fake: Tensor, eps: Optional[Tensor] = None,
                     generator: Optional[torch.Generator] = None) -> Tensor:
    """WGAN-GP penalty (Gulrajani et al. 2017): E[(‖∇_x̂ D(x̂)‖₂ − 1)²], x̂ = ε·real + (1 − ε)·fake, ε ~ U[0, 1].

    eps: (B,) interpolation weights (drawn with ``generator`` when None). The graph is kept (create_graph) so
    the penalty trains the critic. Returns a scalar.
    """
    if real.shape != fake.shape:
        raise ValueError(f"fake must have real's shape {tuple(real.shape)}, got {tuple(fake.shape)}")
    b = real.shape[0]
    if eps is None:
        eps = torch.rand(b, generator=generator, device=real.device, dtype=real.dtype)
    elif eps.shape != (b,):
        raise ValueError(f"eps must have shape ({b},), got {tuple(eps.shape)}")
    eps = eps.reshape(-1, *([1] * (real.ndim - 1)))
    x_hat = (eps * real.detach() + (1 - eps) * fake.detach()).requires_grad_(True)
    with torch.enable_grad():
        scores = critic(x_hat)
        (grad,) = torch.autograd.grad(scores.sum(), x_hat, create_graph=True)
    return (grad.flatten(1).norm(dim=1) - 1).pow(2).mean()


def wgan_gp_discriminator_loss(critic: Callable[[Tensor], Tensor], real: Tensor, fake: Tensor,
                               gp_weight: float = 10.0, generator: Optional[torch.Generator] = None) -> Tensor:
    """WGAN-GP critic loss: E[D(fake)] − E[D(real)] + gp_weight · gradient_penalty."""
    loss = wgan_discriminator_loss(critic(real), critic(fake.detach()))
    return loss + gp_weight * gradient_penalty(critic, real, fake, generator=generator)


def r1_penalty(discriminator: Callable[[Tensor], Tensor], real: Tensor) -> Tensor:
    """R1 regulariser (Mescheder et al. 2018; StyleGAN2): E[‖∇_x D(x)‖²] on real images, scaled by γ/2 by the
    caller. The graph is kept (create_graph) so the penalty trains the discriminator. Returns a scalar."""
    x = real.detach().requires_grad_(True)
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(discriminator(x).sum(), x, create_graph=True)
    return grad.flatten(1).square().sum(dim=1).mean()
